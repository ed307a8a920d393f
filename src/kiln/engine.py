"""The engine: a built plan and its prepared weights, runnable, and saved as ONE file.

The file is safetensors: every prepared weight is a tensor, and the plan (layers, chosen tactics,
precisions, profiles) is JSON in the safetensors metadata, with the kiln, torch and triton versions,
the GPU name and compute capability, and a SHA-256 over the plan and every tensor byte. Loading
refuses an engine from another kiln version or GPU architecture and a truncated or damaged file,
each with one clear message. Nothing is ever unpickled: the plan names registered tactics, and the
weights-stripped ONNX graph (for layers that run kiln's reference ops) is parsed by onnx.

An engine file is untrusted input, and three things stand between it and the process:

- the **checksum** (SHA-256) catches damage; anyone can recompute it, so it proves nothing more;
- a **key** proves authenticity: with one (``save(key=...)``, ``kiln build --sign-key FILE``, or a
  key file named by ``KILN_ENGINE_KEY``), the file carries an HMAC-SHA256 over all its bytes, and
  ``load_engine`` with a key refuses an unsigned or mis-signed file before it parses anything;
- the **schema** (``kiln.engine_schema``) contains what any file can do, signed or not: every
  header and plan field is checked for type and range before anything is built from it, and the
  embedded graph is checked as a model file is (``kiln.onnx_io.load_embedded_model``), with no
  external data anywhere, so an engine cannot make kiln read a file or run code of its choosing.

Example::

    engine = kiln.build("resnet50.onnx", BuildConfig(fp16=True))
    engine.save("resnet50.kiln")
    engine = kiln.load_engine("resnet50.kiln")
    outputs = engine.run({"input": images})
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import stat
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kiln import dtypes, engine_schema
from kiln.atomic_file import write_atomically
from kiln.builder.schedule import cross_stream_waits, static_layers
from kiln.errors import InputError, KilnError
from kiln.regular_file import UnreadableFile, read_regular_file
from kiln.versions import environment

FORMAT = "kiln-engine"
VERSION = 1
_GRAPH_TENSOR = "__graph__"
MAX_ENGINE_BYTES = 64 * 1024**3
KEY_ENVIRONMENT = "KILN_ENGINE_KEY"
"""The environment variable naming a key file: engines kiln writes are signed with it, and engines
it loads must carry a valid signature."""
SIGNATURE_KEY = "kiln-hmac-sha256"
"""The safetensors metadata entry holding the HMAC-SHA256 (hex) of the file with this entry zeroed."""
_UNSIGNED = "0" * 64
_SIGNATURE = re.compile(rb'"kiln-hmac-sha256":"([0-9a-f]{64})"')
MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 4096


if TYPE_CHECKING:
    from kiln.builder.plan import BuiltPlan
    from kiln.runtime import ExecutionContext


class EngineLoadError(KilnError):
    """An engine file cannot be used here (corrupt, tampered, or built for something else)."""


@dataclass
class _Step:
    name: str
    run: Any
    in_slots: list[int]
    out_slots: list[int | None]
    cast: list[int]
    cast_dtype: torch.dtype | None
    tf32: bool
    free: list[int]
    static: bool = False
    # several streams (lean runs only): the layer's stream, the events it waits for, the event it
    # records (None: no other stream reads it), and what it frees when values cross streams
    stream: int = 0
    waits: tuple[int, ...] = ()
    record: int | None = None
    free_lean: list[int] | None = None
    where: str = ""  # "layer 'name' (op Conv+Relu)", for errors and time limits
    # a Pointwise layer's weight shapes: its output is the broadcast of them and its inputs, checked
    # against the tensor-size ceiling on the first run at each input shape (None: other kinds)
    broadcast: list[tuple[int, ...]] | None = None


class Engine:
    """A built model: the plan, its prepared weights and the compiled steps, shared by every
    execution context. ``run`` takes inputs by name (numpy arrays or tensors) and returns outputs
    by name as tensors on the engine's device, in one default context; ``create_context`` gives
    more (one per thread or stream)."""

    def __init__(self, plan: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], graph: bytes, device: str = "cuda",
                 name: str | None = None) -> None:
        self.plan = dict(plan)
        self.tensors = {name: t.to(device) for name, t in tensors.items()}
        self.graph = graph
        self.device = torch.device(device)
        self.report = None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EngineLoadError("this engine runs on CUDA, but torch sees no CUDA GPU here")
        self.name = name or self.plan["name"]  # the engine file once loaded; errors start with it
        self.inputs = self.plan["inputs"]
        self.outputs = self.plan["outputs"]
        from kiln.builder.config import Profile

        self.profiles = [Profile.from_json(p) for p in self.plan["profiles"]]
        self._context: ExecutionContext | None = None
        self._build_runtime()

    @classmethod
    def from_plan(cls, built: BuiltPlan) -> Engine:
        """The engine of a finished build, carrying the build's report."""
        engine = cls(built.plan, built.tensors, built.graph, device=built.device)
        engine.report = built.report
        return engine

    # -- runtime -----------------------------------------------------------------------------
    def _build_runtime(self) -> None:
        import onnx
        import onnx_ir as ir

        from kiln.builder.layers import Layer
        from kiln.builder.tactics import registry
        from kiln.executor import Executor
        from kiln.precision import PRECISION_DTYPES

        try:
            proto = onnx.load_from_string(self.graph)
            model = ir.serde.deserialize_model(proto)
        except Exception as error:  # noqa: BLE001 - any parse failure means a broken engine
            raise EngineLoadError(f"{self.name}: the engine's graph does not parse ({type(error).__name__})") from error
        self._executor = Executor(model, self.device, self.name)
        self._node_steps = self._executor.node_steps()

        slots: dict[str, int] = {}

        def slot(name: str) -> int:
            if name not in slots:
                slots[name] = len(slots)
            return slots[name]

        self._input_slots = [slot(spec["name"]) for spec in self.inputs]
        layers = self.plan["layers"]
        last_use: dict[str, int] = {}
        for index, layer in enumerate(layers):
            for name in layer["inputs"]:
                last_use[name] = index
        graph_outputs = {o["name"] for o in self.outputs}
        self._steps: list[list[_Step]] = [[] for _ in self.profiles]
        for index, record in enumerate(layers):
            layer = Layer(name=record["name"], kind=record["kind"], nodes=list(record["nodes"]), inputs=list(record["inputs"]),
                          outputs=list(record["outputs"]), attrs=record["attrs"], weights=dict(record["weights"]),
                          op_types=list(record["op_types"]), origins=[list(o) for o in record.get("origins", [])])
            in_slots = []
            for name in layer.inputs:
                if name not in slots:
                    raise EngineLoadError(f"{self.name}: layer {layer.name!r} reads {name!r} before anything writes it")
                in_slots.append(slots[name])
            out_slots = [slot(name) if name else None for name in layer.outputs]
            free = [slots[n] for n, at in last_use.items() if at == index and n not in graph_outputs]
            precision = record["precision"]
            runners: dict[str, Any] = {}
            broadcast = None
            for profile, choice in enumerate(record["choices"]):
                key = json.dumps([choice["tactic"], choice["config"]], sort_keys=True)
                if key not in runners:
                    t = registry.get(choice["tactic"])
                    if t is None or t.kind != layer.kind:
                        raise EngineLoadError(f"{self.name}: layer {layer.name!r} names unknown tactic {choice['tactic']!r}")
                    prefix = choice["weights"] + "."
                    prepared = {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}
                    if sorted(prepared) != sorted(choice["roles"]):
                        raise EngineLoadError(f"{self.name}: layer {layer.name!r} needs weights {sorted(choice['roles'])}, "
                                              f"the engine holds {sorted(prepared)}")
                    runners[key] = t.runner(layer, prepared, precision, choice["config"], self)
                    if layer.kind == "Pointwise":
                        broadcast = [tuple(w.shape) for w in prepared.values()]
                self._steps[profile].append(_Step(
                    layer.name, runners[key], in_slots, out_slots, list(record["cast_inputs"]),
                    PRECISION_DTYPES.get(precision), precision == "tf32", free,
                    where=f"layer {layer.name!r} (op {'+'.join(layer.op_types)})", broadcast=broadcast,
                ))
        static = self._plan_static(layers, slots)
        # Whether the layers of a run after the first at a shape (the static ones are cached then)
        # read torch's process-wide TF32 / cuDNN-benchmark switches: convolutions, and fp32/tf32
        # GEMMs, attention and reference ops that multiply matrices or hold subgraphs. Those runs
        # of an engine without them never touch the switches, so contexts in several threads do
        # not wait for one another over them (first runs always set them).
        self.reads_torch_flags = self.device.type == "cuda" and any(
            _reads_torch_flags(layer) for layer, is_static in zip(layers, static) if not is_static)
        # outputs that are constants (an initializer, or computed from constants alone) are weights
        self._constant_slots = {slot(o["name"]): self.tensors[o["constant"]] for o in self.outputs if "constant" in o}
        missing = [o["name"] for o in self.outputs if o["name"] not in slots]
        if missing:
            raise EngineLoadError(f"{self.name}: nothing in the plan produces output(s) {missing}")
        self._output_slots = [slots[o["name"]] for o in self.outputs]
        self._held_slots = set(self._input_slots) | set(self._constant_slots)
        self._output_dtypes = [dtypes.to_torch_dtype(getattr(ir.DataType, o["dtype"].upper())) for o in self.outputs]
        self._slot_count = len(slots)

    def _plan_static(self, layers: list[Mapping[str, Any]], slots: dict[str, int]) -> list[bool]:
        """Mark the layers that compute from input shapes alone (returned, per layer), and which of
        their values the other layers read (those are cached per input shape; on the CPU where
        only shape inputs read them)."""
        static = static_layers(layers)
        derived = {n for layer, is_static in zip(layers, static) if is_static for n in layer["outputs"] if n}
        readers: dict[str, list[tuple[list[int], int, bool]]] = {}
        steps0 = self._steps[0] if self._steps else []
        for index, (layer, is_static) in enumerate(zip(layers, static)):
            if is_static:
                continue
            for position, name in enumerate(layer["inputs"]):
                if name in derived:
                    in_slots = steps0[index].in_slots if index < len(steps0) else []
                    readers.setdefault(name, []).append((in_slots, position, _host_position(layer, position)))
        for name in (o["name"] for o in self.outputs):
            if name in derived:
                readers.setdefault(name, []).append(([], 0, False))
        # slot -> (slot the device value is cached in, slot the host copy is cached in)
        self._cached_slots: dict[int, tuple[int | None, int | None]] = {}
        for name, uses in sorted(readers.items()):
            slot = slots[name]
            hosts = [use for use in uses if use[2]]
            if len(hosts) == len(uses):
                self._cached_slots[slot] = (None, slot)
            elif not hosts:
                self._cached_slots[slot] = (slot, None)
            else:  # read both ways: host readers get a slot of their own holding a CPU copy
                shadow = slots.setdefault("\0host\0" + name, len(slots))
                for in_slots, position, _ in hosts:
                    in_slots[position] = shadow
                self._cached_slots[slot] = (slot, shadow)
        self._lean: list[list[_Step]] = []
        for steps in self._steps:
            for step, is_static in zip(steps, static):
                step.static = is_static
            self._lean.append([step for step in steps if not step.static])
        self._plan_streams(layers, slots, static)
        return static

    def _plan_streams(self, layers: list[Mapping[str, Any]], slots: dict[str, int], static: list[bool]) -> None:
        """Streams, events and frees of the lean runs (see ``kiln.builder.schedule``). A value that
        crosses streams is freed only when the run ends, after every stream has joined the
        context's own: freeing it at its last use could hand its memory to one stream while
        another still reads it."""
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
            for name in layer["inputs"]:
                read_on.setdefault(name, set()).add(stream)
            made_on.update((name, stream) for name in layer["outputs"] if name)
        crossing = {name for name, seen in read_on.items() if len(seen | {made_on.get(name, min(seen))}) > 1}
        held = {slots[name] for name in crossing if name in slots}
        for steps in self._steps:
            for index, step in enumerate(steps):
                step.stream = streams[index]
                step.waits = tuple(event_of[d] for d in waits[index])
                step.record = event_of.get(index)
                step.free_lean = [slot for slot in step.free if slot not in held]

    @property
    def aux_streams(self) -> int:
        """The auxiliary streams the plan uses (BuildConfig.max_aux_streams at most)."""
        return int(self.plan.get("aux_streams", 0))

    @property
    def weights_bytes(self) -> int:
        """Bytes of prepared weights, held once however many execution contexts run the engine."""
        seen: set[tuple[int, int]] = set()
        total = 0
        for tensor in self.tensors.values():
            key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += key[1]
        return total

    def node_step(self, name: str):
        """The reference op bound to a node (Node layers run it)."""
        return self._node_steps[name]

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
        raise InputError(f"{self.name}: input shapes {given} fit no optimization profile ({ranges}); rebuild with a profile that covers them")

    def check_profile(self, index: int, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Refuse shapes outside profile ``index``, naming the input, its shape and the allowed range."""
        profile = self.profiles[index]
        for name, shape in shapes.items():
            if name in profile.shapes and not _within(profile.shapes[name], shape):
                lo, _, hi = profile.shapes[name]
                raise InputError(f"{self.name}: input {name!r} has shape {list(shape)}, outside optimization profile "
                                 f"{index}, which allows {list(lo)} to {list(hi)}; choose another profile or rebuild")

    def create_context(self, **options) -> ExecutionContext:
        """A new execution context (its own stream, shape and CUDA-graph caches) sharing this
        engine's weights; see ``kiln.runtime.ExecutionContext`` for the options."""
        from kiln.runtime import ExecutionContext

        return ExecutionContext(self, **options)

    def _default_context(self) -> ExecutionContext:
        if self._context is None:
            self._context = self.create_context(cuda_graph=self.device.type == "cuda")
        return self._context

    @property
    def graph_errors(self) -> list[str]:
        """Why ``run``'s context could not capture a CUDA graph (empty when every shape was captured)."""
        return self._default_context().graph_errors

    def run(self, feeds: Mapping[str, Any], timeout_s: float | None = None) -> dict[str, torch.Tensor]:
        """Run the engine on ``feeds`` (name -> numpy array or torch tensor) in one default execution
        context: the first run at an input shape runs every layer, keeps the shape arithmetic's
        results, and on CUDA captures a CUDA graph of the other layers that later runs at that shape
        replay. As with a torch op, the outputs are ready in the current stream's order (the work
        runs on the context's own stream; no host synchronization). For several threads or
        streams, give each its own ``create_context()``. ``timeout_s``: stop with
        ``kiln.deadline.RunStopped`` after that many seconds (``ExecutionContext.run``)."""
        return self._default_context().run_async(feeds, timeout_s=timeout_s)

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
                    value = dtypes.tensor_from_numpy(np.asarray(given), "cpu")
                except KeyError as error:
                    raise InputError(f"{self.name}: input {spec['name']!r} has dtype {np.asarray(given).dtype}, which kiln cannot hold") from error
                if not isinstance(value, torch.Tensor):
                    raise InputError(f"{self.name}: input {spec['name']!r} is a string tensor; engines take numeric inputs")
            got = dtypes.onnx_name(dtypes.ONNX_DTYPES[value.dtype]) if value.dtype in dtypes.ONNX_DTYPES else str(value.dtype)
            if got != spec["dtype"]:
                raise InputError(f"{self.name}: input {spec['name']!r} has dtype {got}, the engine expects {spec['dtype']}")
            shape = spec["shape"]
            if shape is not None:
                if len(shape) != value.dim():
                    raise InputError(f"{self.name}: input {spec['name']!r} has rank {value.dim()} (shape {list(value.shape)}), "
                                     f"the engine expects rank {len(shape)}")
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

    # -- description --------------------------------------------------------------------------
    def describe(self) -> list[dict[str, Any]]:
        """One row per layer (for ``kiln inspect``): nodes, tactic, precision, layout, shapes, share of timed cost."""
        layers = self.plan["layers"]
        total = sum(layer["choices"][0]["time_ms"] or 0.0 for layer in layers)
        rows = []
        for index, layer in enumerate(layers):
            choice = layer["choices"][0]
            ms = choice["time_ms"]
            origins = layer.get("origins") or [[n, t] for n, t in zip(layer["nodes"], layer["op_types"])]
            rows.append({
                "index": index, "name": layer["name"], "kind": layer["kind"], "nodes": [n for n, _ in origins],
                "op_types": [t for _, t in origins], "graph_nodes": layer["nodes"], "tactic": choice["tactic"],
                "config": choice["config"],
                "tactics_per_profile": [c["tactic"] for c in layer["choices"]],
                "precision": layer["precision"], "layout": _layout(choice),
                "inputs": {n: layer["shapes"].get(n) for n in layer["inputs"]},
                "outputs": {n: layer["shapes"].get(n) for n in layer["outputs"] if n},
                "time_ms": ms, "share": (ms / total) if ms is not None and total > 0 else None,
                "notes": layer.get("notes", []), "stream": layer.get("stream", 0),
            })
        return rows

    def summary(self) -> dict[str, Any]:
        layers = self.plan["layers"]
        tactics: dict[str, int] = {}
        for layer in layers:
            tactics[layer["choices"][0]["tactic"]] = tactics.get(layer["choices"][0]["tactic"], 0) + 1
        precisions: dict[str, int] = {}
        for layer in layers:
            precisions[layer["precision"]] = precisions.get(layer["precision"], 0) + 1
        sizes = [len(layer.get("origins") or layer["nodes"]) for layer in layers]
        return {
            "layers": len(layers), "fused_layers": sum(1 for n in sizes if n > 1),
            "nodes": sum(sizes), "tactics": dict(sorted(tactics.items())),
            "precisions": dict(sorted(precisions.items())), "profiles": len(self.profiles),
            "weights_bytes": self.weights_bytes, "aux_streams": self.aux_streams,
        }

    # -- files --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], key: bytes | None = None) -> None:
        """Write the engine as one safetensors file, atomically; signed with ``key`` (bytes; by
        default the key file named by ``KILN_ENGINE_KEY``, if set)."""
        from safetensors.torch import save

        stored, layouts, aliases = {}, {}, {}
        seen: dict[tuple, str] = {}
        storages: set[int] = set()
        for name, tensor in sorted(self.tensors.items()):
            identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                        tuple(tensor.stride()), tensor.dtype, tensor.device)
            if identity in seen:  # one weight prepared identically for two layers: stored once
                aliases[name] = seen[identity]
                continue
            seen[identity] = name
            flat, perm = _storable(tensor)
            if flat.untyped_storage().data_ptr() in storages or flat.numel() != flat.untyped_storage().nbytes() // max(flat.element_size(), 1):
                flat = flat.clone()
            storages.add(flat.untyped_storage().data_ptr())
            stored[name] = flat
            if perm is not None:
                layouts[name] = perm
        stored[_GRAPH_TENSOR] = torch.frombuffer(bytearray(self.graph), dtype=torch.uint8) if self.graph else torch.zeros(0, dtype=torch.uint8)
        header = {"format": FORMAT, "version": VERSION, **environment(self.device), "plan": self.plan, "layouts": layouts,
                  "aliases": aliases}
        header["sha256"] = _digest(header, stored)
        key = configured_key(key)
        metadata = {"kiln": json.dumps(header, sort_keys=True, separators=(",", ":"))}
        if key is not None:
            metadata[SIGNATURE_KEY] = _UNSIGNED
        data = save(stored, metadata=metadata)
        if key is not None:
            data = sign(data, key)
        write_atomically(path, lambda handle: handle.write(data))


def load_engine(path: str | os.PathLike[str], device: str | None = None, *, key: bytes | None = None) -> Engine:
    """Read an engine file, refusing (with ``EngineLoadError``) anything it cannot trust or run here.

    With a key (``key``, or the key file named by ``KILN_ENGINE_KEY``) the file must carry a valid
    signature made with it; without one, a signature is not checked. Either way every field is
    checked against ``kiln.engine_schema`` before anything is built from it."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = os.fspath(path)
    key = configured_key(key)
    data = _read_engine(path)
    if key is not None:
        verify(data, key, path)
    try:
        metadata = engine_schema.tensor_table(data, (SIGNATURE_KEY,))
        stored = load(data)
    except engine_schema.SchemaError as error:
        raise EngineLoadError(f"{path}: not a kiln engine, or truncated: {error}") from error
    except (SafetensorError, ValueError, RuntimeError, KeyError, OverflowError) as error:
        raise EngineLoadError(f"{path}: not a kiln engine, or truncated ({str(error).splitlines()[0][:200]})") from error
    header_text = metadata.get("kiln")
    if header_text is None:
        raise EngineLoadError(f"{path}: a safetensors file without kiln's plan; not a kiln engine")
    try:
        header = json.loads(header_text)
    except (ValueError, RecursionError) as error:
        raise EngineLoadError(f"{path}: the engine's plan is not valid JSON; the file is corrupt") from error
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise EngineLoadError(f"{path}: not a kiln engine")
    if header.get("version") != VERSION:
        raise EngineLoadError(f"{path}: engine format version {engine_schema.show(header.get('version'))}; "
                              f"this kiln reads version {VERSION}. Rebuild it")
    if header.get("sha256") != _digest({k: v for k, v in header.items() if k != "sha256"}, stored):
        raise EngineLoadError(f"{path}: checksum mismatch: the engine file was modified or damaged after it was written; rebuild it")
    try:
        engine_schema.check_header(header)
    except engine_schema.SchemaError as error:
        raise EngineLoadError(f"{path}: {error}; the engine file is corrupt or was edited") from error
    built_on = header["device"]
    if device not in (None, "cpu", "cuda"):
        raise EngineLoadError(f"{path}: device must be 'cpu' or 'cuda', got {device!r}")
    here = environment(torch.device(device or built_on))
    if header.get("kiln") != here["kiln"]:
        raise EngineLoadError(f"{path}: built by kiln {header.get('kiln')}, this is kiln {here['kiln']}; rebuild the engine with this version")
    if device is not None and device != built_on:
        raise EngineLoadError(f"{path}: the engine was built for {built_on}, not {device}; rebuild it with --device {device}")
    if built_on == "cuda":
        if not torch.cuda.is_available():
            raise EngineLoadError(f"{path}: the engine was built for CUDA ({header.get('gpu')}), and torch sees no CUDA GPU here")
        if header.get("capability") != here.get("capability"):
            raise EngineLoadError(
                f"{path}: built for {header.get('gpu')} (compute capability {header.get('capability')}); this GPU is "
                f"{here.get('gpu')} ({here.get('capability')}). Rebuild the engine on this GPU"
            )
    graph = stored.pop(_GRAPH_TENSOR, torch.zeros(0, dtype=torch.uint8))
    if graph.dtype != torch.uint8 or graph.dim() != 1:
        raise EngineLoadError(f"{path}: the engine's graph is not a byte string; the file is corrupt")
    graph = graph.numpy().tobytes()
    nodes = _graph_nodes(graph, path)
    try:
        engine_schema.check_tensor_tables(header, stored, _GRAPH_TENSOR)
        tensors = {name: _restore(t, header.get("layouts", {}).get(name)) for name, t in stored.items()}
        tensors.update({name: tensors[target] for name, target in header.get("aliases", {}).items()})
        engine_schema.check_plan(header["plan"], tensors, built_on, nodes)
    except engine_schema.SchemaError as error:
        raise EngineLoadError(f"{path}: {error}; the engine file is corrupt or was edited") from error
    try:
        return Engine(header["plan"], tensors, graph, device=built_on, name=path)
    except KilnError:
        raise
    except Exception as error:  # noqa: BLE001 - a plan that does not fit together is a corrupt engine
        raise EngineLoadError(f"{path}: the engine's plan is inconsistent ({type(error).__name__}: {error}); rebuild it") from error


def _read_engine(path: str) -> bytes:
    """The file's bytes: a regular file (a FIFO in its place must not hang the load) within the size limit."""
    try:
        return read_regular_file(path, MAX_ENGINE_BYTES)
    except FileNotFoundError:
        raise EngineLoadError(f"{path}: cannot read the engine: no such file") from None
    except UnreadableFile as error:
        raise EngineLoadError(f"{path}: {error.reason}; cannot read it as an engine") from None


# sha256 of an embedded graph -> its checked main-graph nodes (a graph is checked once per process)
_CHECKED_GRAPHS: OrderedDict[str, dict[str, engine_schema.GraphNode]] = OrderedDict()


def _graph_nodes(graph: bytes, path: str) -> dict[str, engine_schema.GraphNode]:
    """The embedded graph's main-graph nodes by name, after the checks a model file gets."""
    from kiln.onnx_io import load_embedded_model

    digest = hashlib.sha256(graph).hexdigest()
    nodes = _CHECKED_GRAPHS.get(digest)
    if nodes is None:
        try:
            proto = load_embedded_model(graph, f"{path}: the engine's graph")
        except KilnError as error:
            raise EngineLoadError(str(error)) from error
        nodes = {node.name: engine_schema.GraphNode(node.op_type, len(node.input), len(node.output)) for node in proto.graph.node}
        _CHECKED_GRAPHS[digest] = nodes
        while len(_CHECKED_GRAPHS) > 16:
            _CHECKED_GRAPHS.popitem(last=False)
    return nodes


# -- signatures ---------------------------------------------------------------------------------

def read_key(path: str | os.PathLike[str]) -> bytes:
    """A signing key from a file: its bytes, surrounding whitespace ignored (so ``openssl rand -hex
    32 > engine.key`` makes one), at least ``MIN_KEY_BYTES`` long. Raises ``KilnError``."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise KilnError(f"engine key {path}: not a regular file")
            key = handle.read(MAX_KEY_BYTES + 1).strip()
    except OSError as error:
        raise KilnError(f"engine key {path}: cannot read it ({error.strerror or error})") from error
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise KilnError(f"engine key {path}: a key is {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes, this file holds {len(key)}; "
                        "make one with: openssl rand -hex 32 > engine.key")
    return key


def configured_key(key: bytes | None = None) -> bytes | None:
    """``key`` if given, else the key file named by ``KILN_ENGINE_KEY`` if that is set, else None."""
    if key is not None:
        if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
            raise KilnError(f"an engine key is at least {MIN_KEY_BYTES} bytes")
        return key
    named = os.environ.get(KEY_ENVIRONMENT)
    return read_key(named) if named else None


def sign(data: bytes, key: bytes) -> bytes:
    """An engine file's bytes, written with the unsigned placeholder, with its signature filled in."""
    mac = hmac.new(key, data, hashlib.sha256).hexdigest().encode()
    match = _signature_at(data)
    if match is None or match.group(1) != _UNSIGNED.encode():
        raise KilnError("internal error: the engine was written without a signature placeholder")
    return data[:match.start(1)] + mac + data[match.end(1):]


def verify(data: bytes, key: bytes, path: str) -> None:
    """Refuse a file that is unsigned, or whose HMAC-SHA256 over its bytes (the signature zeroed)
    is not the one it carries; nothing of the file is parsed before this."""
    match = _signature_at(data)
    if match is None:
        raise EngineLoadError(f"{path}: the engine is not signed, and a key is configured ({KEY_ENVIRONMENT} or key=); "
                              "rebuild it with --sign-key, or load it without a key")
    unsigned = data[:match.start(1)] + _UNSIGNED.encode() + data[match.end(1):]
    expected = hmac.new(key, unsigned, hashlib.sha256).hexdigest().encode()
    if not hmac.compare_digest(expected, match.group(1)):
        raise EngineLoadError(f"{path}: signature mismatch: the engine was modified after it was signed, or signed "
                              "with another key; refused")


def _signature_at(data: bytes) -> re.Match | None:
    """The one signature entry in the file's safetensors header, or None (none, or more than one)."""
    if len(data) < 8:
        return None
    length = int.from_bytes(data[:8], "little")
    if length > min(len(data) - 8, engine_schema.MAX_HEADER_BYTES):
        return None
    found = list(_SIGNATURE.finditer(data, 8, 8 + length))
    return found[0] if len(found) == 1 else None


def _host_position(layer: Mapping[str, Any], index: int) -> bool:
    """True when a Node layer reads its ``index``-th runtime input only as a list of ints."""
    if layer["kind"] != "Node":
        return False
    for position, arg in enumerate(layer["attrs"].get("args", [])):
        if arg is not None and arg.get("input") == index:
            from kiln.builder.tactics.node import HOST_INPUTS

            return (layer["op_types"][0], position) in HOST_INPUTS
    return False


# reference ops whose torch kernels read the TF32 / cuDNN switches (or whose subgraphs may)
_FLAG_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "Attention", "RNN", "GRU", "LSTM",
                       "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "If", "Loop", "Scan",
                       "SequenceMap", "DFT", "STFT", "FusedConv", "FusedAttention"})


def _reads_torch_flags(layer: Mapping[str, Any]) -> bool:
    if layer["kind"] == "Conv" or layer["precision"] == "tf32":  # a tf32 step switches TF32 on around itself
        return True
    if layer["precision"] not in ("fp32", "tf32"):
        return False
    return layer["kind"] in ("Gemm", "Attention") or (layer["kind"] == "Node" and layer["op_types"][0] in _FLAG_OPS)


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


def _layout(choice: Mapping) -> str:
    tactic = choice["tactic"]
    if tactic == "conv.nhwc" or choice["config"].get("layout") == "nhwc":
        return "NHWC"
    if tactic.startswith("conv."):
        return "NCHW"
    return "-"


def _storable(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int] | None]:
    """A contiguous CPU tensor to store, and the permutation that restores the original strides
    (channels_last weights are stored as their NHWC bytes, not converted)."""
    tensor = tensor.detach()
    if tensor.is_contiguous():
        return tensor.cpu(), None
    perm = sorted(range(tensor.dim()), key=lambda d: (-tensor.stride(d), d))
    return tensor.permute(perm).contiguous().cpu(), perm


def _restore(tensor: torch.Tensor, perm: list[int] | None) -> torch.Tensor:
    if perm is None:
        return tensor
    if not isinstance(perm, list) or not all(type(p) is int for p in perm) or sorted(perm) != list(range(tensor.dim())):
        raise EngineLoadError("a stored tensor's layout permutation does not fit its rank; the file is corrupt")
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return tensor.permute(inverse)


def _digest(header: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
