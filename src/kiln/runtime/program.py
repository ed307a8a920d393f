"""The program: an engine's plan made runnable, the one thing execution contexts read.

TensorRT's deserialized ``ICudaEngine`` without the file: ``Program`` turns a plan (``kiln.builder``'s
JSON), its prepared weights and its weights-stripped ONNX graph into

- **steps**: one ``Step`` per layer and optimization profile (the profile's tactic, bound to its
  weights), with the *slots* (indices into one list of values) each reads and writes and the slots
  it frees after its last reader;
- **static layers** (``kiln.builder.schedule.static_layers``): the shape arithmetic that runs on
  the first run at a shape only; ``cached_slots`` says which of its values the other layers read
  (on the device, as a host copy, or both), and ``lean`` holds each profile's steps without it;
- **the stream plan** of the lean runs: each step's stream, the events it waits for and records
  (``cross_stream_waits``), and what it frees when values cross streams;
- **input checks**: names, dtypes, ranks, fixed dimensions, devices, and the optimization profile
  that holds the shapes (``check_inputs``), before anything runs.

Nothing in a program changes after it is built; every ``kiln.runtime.ExecutionContext`` of an
engine reads the same one, through the public fields below. A plan that does not fit together
(an unknown tactic, a value read before it is written, weights that do not match) raises
``EngineLoadError``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch

from kiln import dtypes
from kiln.builder.config import Profile
from kiln.builder.layers import Layer
from kiln.builder.schedule import producers, static_layers
from kiln.builder.tactics import registry
from kiln.errors import EngineLoadError, InputError
from kiln.executor import Executor
from kiln.ops.registry import op_facts
from kiln.precision import PRECISION_DTYPES


@dataclass
class Step:
    """One layer of one profile, ready to run: ``run(inputs) -> outputs`` on the values in
    ``in_slots``, its results stored in ``out_slots`` (None: an output nothing reads)."""

    name: str
    run: Any
    in_slots: list[int]
    out_slots: list[int | None]
    cast: list[int]  # input positions cast to cast_dtype first
    cast_dtype: torch.dtype | None
    tf32: bool  # runs with TF32 switched on
    free: list[int]  # slots to free after it on one stream
    static: bool = False  # shape arithmetic: run on the first run at a shape, cached after
    # several streams (lean runs only): the layer's stream, the events it waits for, the event it
    # records (None: no other stream reads it), and what it frees when values cross streams
    stream: int = 0
    waits: tuple[int, ...] = ()
    record: int | None = None
    free_lean: list[int] = field(default_factory=list)  # set for every step when there are several
    where: str = ""  # "layer 'name' (op Conv+Relu)", for errors and time limits
    # a Pointwise layer's weight shapes: its output is the broadcast of them and its inputs, checked
    # against the tensor-size ceiling on the first run at each input shape (None: other kinds)
    broadcast: list[tuple[int, ...]] | None = None


class Program:
    """A plan's runnable steps and what running them needs; see the module docstring.

    Fields (read-only once built):

    - ``name``, ``device``: the engine's name (its file once loaded; errors start with it) and device;
    - ``inputs``, ``outputs``: the plan's input and output specs (name, dtype, shape), in order;
    - ``profiles``: the optimization profiles, and ``aux_streams``: the auxiliary streams the plan uses;
    - ``steps[p]``: every layer's ``Step`` for profile ``p``, in plan order (the first run at a shape);
    - ``lean[p]``: the same without the static layers (later runs, CUDA-graph captures);
    - ``slot_count``: the values a run holds; ``input_slots``: the slot of each input, in order;
    - ``constant_slots``: slot -> tensor, the outputs that are weights;
    - ``held_slots``: the input and constant slots (an output read from one is handed out as a copy);
    - ``cached_slots``: slot of a static value other layers read -> (the slot its device value is
      cached in, the slot its host copy is cached in), either None where no reader needs it;
    - ``output_slots``, ``output_dtypes``: per output, its slot and the dtype it is handed out in;
    - ``event_count``: the events the stream plan records (one per layer another stream waits for);
    - ``reads_torch_flags``: whether the lean steps read torch's process-wide TF32 / cuDNN switches.
    """

    def __init__(self, plan: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], graph: bytes,
                 device: torch.device, name: str) -> None:
        self.name = name
        self.device = device
        self.inputs: list[dict[str, Any]] = plan["inputs"]
        self.outputs: list[dict[str, Any]] = plan["outputs"]
        self.profiles = [Profile.from_json(p) for p in plan["profiles"]]
        self.aux_streams = int(plan.get("aux_streams", 0))
        try:
            proto = onnx.load_from_string(graph)
            model = ir.serde.deserialize_model(proto)
        except Exception as error:  # noqa: BLE001 - any parse failure means a broken engine
            raise EngineLoadError(f"{name}: the engine's graph does not parse ({type(error).__name__})") from error
        self._node_steps = Executor(model, device, name).node_steps()

        slots: dict[str, int] = {}

        def slot(value: str) -> int:
            if value not in slots:
                slots[value] = len(slots)
            return slots[value]

        self.input_slots = [slot(spec["name"]) for spec in self.inputs]
        layers = plan["layers"]
        last_use: dict[str, int] = {}
        for index, layer in enumerate(layers):
            for value in layer["inputs"]:
                last_use[value] = index
        graph_outputs = {o["name"] for o in self.outputs}
        self.steps: list[list[Step]] = [[] for _ in self.profiles]
        for index, record in enumerate(layers):
            layer = Layer(name=record["name"], kind=record["kind"], nodes=list(record["nodes"]),
                          inputs=list(record["inputs"]), outputs=list(record["outputs"]), attrs=record["attrs"],
                          weights=dict(record["weights"]), op_types=list(record["op_types"]),
                          origins=[list(o) for o in record.get("origins", [])])
            in_slots = []
            for value in layer.inputs:
                if value not in slots:
                    raise EngineLoadError(f"{name}: layer {layer.name!r} reads {value!r} before anything writes it")
                in_slots.append(slots[value])
            out_slots = [slot(value) if value else None for value in layer.outputs]
            free = [slots[n] for n, at in last_use.items() if at == index and n not in graph_outputs]
            precision = record["precision"]
            runners: dict[str, Any] = {}
            broadcast = None
            for profile, choice in enumerate(record["choices"]):
                key = json.dumps([choice["tactic"], choice["config"]], sort_keys=True)
                if key not in runners:
                    t = registry.get(choice["tactic"])
                    if t is None or t.kind != layer.kind:
                        raise EngineLoadError(f"{name}: layer {layer.name!r} names unknown tactic {choice['tactic']!r}")
                    prefix = choice["weights"] + "."
                    prepared = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                    if sorted(prepared) != sorted(choice["roles"]):
                        raise EngineLoadError(f"{name}: layer {layer.name!r} needs weights {sorted(choice['roles'])}, "
                                              f"the engine holds {sorted(prepared)}")
                    runners[key] = t.runner(layer, prepared, precision, choice["config"], self)
                    if layer.kind == "Pointwise":
                        broadcast = [tuple(w.shape) for w in prepared.values()]
                self.steps[profile].append(Step(
                    layer.name, runners[key], in_slots, out_slots, list(record["cast_inputs"]),
                    PRECISION_DTYPES.get(precision), precision == "tf32", free,
                    where=f"layer {layer.name!r} (op {layer.described_ops})", broadcast=broadcast,
                ))
        static = self._plan_static(layers, slots)
        # Whether the layers of a run after the first at a shape (the static ones are cached then)
        # read torch's process-wide TF32 / cuDNN-benchmark switches: convolutions, and fp32/tf32
        # GEMMs, attention and reference ops that multiply matrices or hold subgraphs. Those runs
        # of an engine without them never touch the switches, so contexts in several threads do
        # not wait for one another over them (first runs always set them).
        self.reads_torch_flags = device.type == "cuda" and any(
            layer_reads_torch_flags(layer) for layer, is_static in zip(layers, static) if not is_static)
        # outputs that are constants (an initializer, or computed from constants alone) are weights
        self.constant_slots = {slot(o["name"]): tensors[o["constant"]] for o in self.outputs if "constant" in o}
        missing = [o["name"] for o in self.outputs if o["name"] not in slots]
        if missing:
            raise EngineLoadError(f"{name}: nothing in the plan produces output(s) {missing}")
        self.output_slots = [slots[o["name"]] for o in self.outputs]
        self.held_slots = set(self.input_slots) | set(self.constant_slots)
        self.output_dtypes = [dtypes.to_torch_dtype(getattr(ir.DataType, o["dtype"].upper())) for o in self.outputs]
        self.slot_count = len(slots)

    def _plan_static(self, layers: list[Mapping[str, Any]], slots: dict[str, int]) -> list[bool]:
        """Mark the layers that compute from input shapes alone (returned, per layer), and which of
        their values the other layers read (those are cached per input shape; on the CPU where
        only shape inputs read them)."""
        static = static_layers(layers)
        derived = {n for layer, is_static in zip(layers, static) if is_static for n in layer["outputs"] if n}
        readers: dict[str, list[tuple[list[int], int, bool]]] = {}
        steps0 = self.steps[0] if self.steps else []
        for index, (layer, is_static) in enumerate(zip(layers, static)):
            if is_static:
                continue
            for position, value in enumerate(layer["inputs"]):
                if value in derived:
                    in_slots = steps0[index].in_slots if index < len(steps0) else []
                    readers.setdefault(value, []).append((in_slots, position, _host_position(layer, position)))
        for value in (o["name"] for o in self.outputs):
            if value in derived:
                readers.setdefault(value, []).append(([], 0, False))
        self.cached_slots: dict[int, tuple[int | None, int | None]] = {}
        for value, uses in sorted(readers.items()):
            slot = slots[value]
            hosts = [use for use in uses if use[2]]
            if len(hosts) == len(uses):
                self.cached_slots[slot] = (None, slot)
            elif not hosts:
                self.cached_slots[slot] = (slot, None)
            else:  # read both ways: host readers get a slot of their own holding a CPU copy
                shadow = slots.setdefault("\0host\0" + value, len(slots))
                for in_slots, position, _ in hosts:
                    in_slots[position] = shadow
                self.cached_slots[slot] = (slot, shadow)
        self.lean: list[list[Step]] = []
        for steps in self.steps:
            for step, is_static in zip(steps, static):
                step.static = is_static
            self.lean.append([step for step in steps if not step.static])
        self._plan_streams(layers, slots, static)
        return static

    def _plan_streams(self, layers: list[Mapping[str, Any]], slots: dict[str, int], static: list[bool]) -> None:
        """Streams, events and frees of the lean runs (``kiln.builder.schedule`` assigns the
        streams). A value that crosses streams is freed only when the run ends, after every
        stream has joined the context's own: freeing it at its last use could hand its memory to
        one stream while another still reads it."""
        streams = [int(layer.get("stream", 0)) for layer in layers]
        if any(s < 0 or s > self.aux_streams for s in streams) or any(s and st for s, st in zip(streams, static)):
            raise EngineLoadError(f"{self.name}: the plan puts layers on streams outside 0..{self.aux_streams}")
        waits = cross_stream_waits(layers, streams, static)
        recorded = sorted({d for w in waits for d in w})
        event_of = {layer: event for event, layer in enumerate(recorded)}
        self.event_count = len(recorded)
        # a value crosses when a stream other than its producer's reads it, or several streams do
        made_on: dict[str, int] = {spec["name"]: 0 for spec in self.inputs}
        read_on: dict[str, set[int]] = {}
        for layer, stream, is_static in zip(layers, streams, static):
            if is_static:
                continue
            for value in layer["inputs"]:
                read_on.setdefault(value, set()).add(stream)
            made_on.update((value, stream) for value in layer["outputs"] if value)
        crossing = {value for value, seen in read_on.items() if len(seen | {made_on.get(value, min(seen))}) > 1}
        held = {slots[value] for value in crossing if value in slots}
        for steps in self.steps:
            for index, step in enumerate(steps):
                step.stream = streams[index]
                step.waits = tuple(event_of[d] for d in waits[index])
                step.record = event_of.get(index)
                step.free_lean = [slot for slot in step.free if slot not in held]

    def node_step(self, name: str):
        """The reference op bound to a node (the tactics of Node layers run it)."""
        return self._node_steps[name]

    # -- input checks ------------------------------------------------------------------------
    def profile_for(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        """The first profile whose min..max range holds every input shape."""
        for index, profile in enumerate(self.profiles):
            if all(_within(profile.shapes[name], shape) for name, shape in shapes.items() if name in profile.shapes):
                return index
        ranges = "; ".join(
            f"profile {i}: " + ", ".join(f"{n} {list(lo)}..{list(hi)}" for n, (lo, _, hi) in p.shapes.items())
            for i, p in enumerate(self.profiles)
        )
        given = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
        raise InputError(
            f"{self.name}: input shapes {given} fit no optimization profile ({ranges}); "
            "rebuild with a profile that covers them"
        )

    def check_profile(self, index: int, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Refuse shapes outside profile ``index``, naming the input, its shape and the allowed range."""
        profile = self.profiles[index]
        for name, shape in shapes.items():
            if name in profile.shapes and not _within(profile.shapes[name], shape):
                lo, _, hi = profile.shapes[name]
                raise InputError(f"{self.name}: input {name!r} has shape {list(shape)}, outside optimization profile "
                                 f"{index}, which allows {list(lo)} to {list(hi)}; choose another profile or rebuild")

    def check_inputs(self, feeds: Mapping[str, Any], profile: int | None = None) -> tuple[list[torch.Tensor], int]:
        """``feeds`` checked against the engine's inputs, before anything runs or moves: names,
        dtypes, ranks, fixed dimensions, devices, and the optimization profile's range (the given
        one, else the first that fits). Returns one tensor per input in the engine's order, still
        where it was given (numpy arrays become CPU tensors), and the profile."""
        names = [spec["name"] for spec in self.inputs]
        unknown = sorted(set(feeds) - set(names))
        if unknown:
            raise InputError(f"{self.name}: unknown input(s) {unknown}; the engine's inputs are {names}")
        missing = [n for n in names if n not in feeds]
        if missing:
            raise InputError(f"{self.name}: missing input(s) {missing}")
        values = []
        for spec in self.inputs:
            given = feeds[spec["name"]]
            if isinstance(given, torch.Tensor):
                value = given
                where = value.device
                if where.type != "cpu" and not _same_device(where, self.device):
                    raise InputError(f"{self.name}: input {spec['name']!r} is on {where}; this engine runs on "
                                     f"{self.device}: pass it there, on the CPU, or as a numpy array")
            else:
                try:
                    converted = dtypes.tensor_from_numpy(np.asarray(given), "cpu")
                except KeyError as error:
                    raise InputError(
                        f"{self.name}: input {spec['name']!r} has dtype {np.asarray(given).dtype}, "
                        "which kiln cannot hold"
                    ) from error
                if not isinstance(converted, torch.Tensor):
                    raise InputError(
                        f"{self.name}: input {spec['name']!r} is a string tensor; engines take numeric inputs"
                    )
                value = converted
            got = (dtypes.onnx_name(dtypes.ONNX_DTYPES[value.dtype]) if value.dtype in dtypes.ONNX_DTYPES
                   else str(value.dtype))
            if got != spec["dtype"]:
                raise InputError(
                    f"{self.name}: input {spec['name']!r} has dtype {got}, the engine expects {spec['dtype']}"
                )
            shape = spec["shape"]
            if shape is not None:
                if len(shape) != value.dim():
                    raise InputError(
                        f"{self.name}: input {spec['name']!r} has rank {value.dim()} (shape {list(value.shape)}), "
                        f"the engine expects rank {len(shape)}"
                    )
                for axis, (dim, size) in enumerate(zip(shape, value.shape)):
                    if dim is not None and dim != size:
                        raise InputError(f"{self.name}: input {spec['name']!r} has shape {list(value.shape)}, "
                                         f"the engine expects {shape} (axis {axis} must be {dim})")
            values.append(value)
        shapes = {spec["name"]: tuple(v.shape) for spec, v in zip(self.inputs, values)}
        if profile is None:
            return values, self.profile_for(shapes)
        self.check_profile(profile, shapes)
        return values, profile


def cross_stream_waits(layers: Sequence[Mapping[str, Any]], streams: Sequence[int],
                       static: Sequence[bool] | None = None) -> list[list[int]]:
    """Per layer, the layers on other streams it must wait for (an event recorded after each): per
    producing stream only the latest producer, and none where this stream has already waited for
    that layer or a later one of its stream. ``static``: ``static_layers(layers)``, if known."""
    static = static_layers(layers) if static is None else static
    deps = producers(layers, static)
    seen: dict[tuple[int, int], int] = {}  # (waiting stream, producing stream) -> latest layer waited for
    waits = []
    for index in range(len(layers)):
        own = streams[index]
        latest: dict[int, int] = {}  # producing stream -> its latest producer of this layer
        for d in deps[index]:
            if streams[d] != own:
                latest[streams[d]] = max(latest.get(streams[d], -1), d)
        mine = []
        for other, d in sorted(latest.items()):
            if seen.get((own, other), -1) < d:
                mine.append(d)
                seen[(own, other)] = d
        waits.append(mine)
    return waits


def layer_reads_torch_flags(layer: Mapping[str, Any]) -> bool:
    """Whether a plan layer's kernels read torch's process-wide TF32 / cuDNN-benchmark switches."""
    if layer["kind"] == "Conv" or layer["precision"] == "tf32":  # a tf32 step switches TF32 on around itself
        return True
    if layer["precision"] not in ("fp32", "tf32"):
        return False
    return layer["kind"] in ("Gemm", "Attention") or (
        layer["kind"] == "Node" and op_facts(layer["op_types"][0], None).reads_torch_flags
    )


def _host_position(layer: Mapping[str, Any], index: int) -> bool:
    """True when a Node layer reads its ``index``-th runtime input only as a list of ints."""
    if layer["kind"] != "Node":
        return False
    for position, arg in enumerate(layer["attrs"].get("args", [])):
        if arg is not None and arg.get("input") == index:
            return position in op_facts(layer["op_types"][0], None).host_inputs
    return False


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Same device, an unindexed CUDA device meaning the current one."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def _within(ranges, shape) -> bool:
    lo, _, hi = ranges
    return len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))
