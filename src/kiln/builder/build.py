"""The builder: ONNX model + BuildConfig -> plan (``kiln.build`` makes it an Engine), choosing the fastest correct tactic per layer.

The steps, each visible in the build log:

1. a reference run at each profile's opt shapes records every value's shape and dtype (on the
   calibration inputs where given, seeded random ones otherwise: a model that cannot take those
   fails here in one line that names the inputs that got random values);
2. lowering fuses nodes into layers (``kiln.builder.layers``);
3. each layer gets a precision: the config's, a per-layer constraint, fp32 for shape arithmetic
   and control flow, or (strongly typed) the model's own;
4. tactic selection, per layer and profile: every candidate allowed at the optimization level is
   run on fresh random inputs at the opt shape, checked against the kind's reference tactic at the
   same precision (a wrong fast kernel is never chosen), and timed with CUDA events (median of
   repeated runs). Timings go to the timing cache; level 0 times nothing and trusts the heuristic;
5. a walk over the network on representative inputs, in fp32 beside the chosen tactics: a
   reduced-precision layer whose output overflows or drifts from fp32 falls back (fp16 -> bf16 ->
   fp32); Node layers are timed on real values here;
6. the end-to-end check: the planned network on the same inputs against the fp32 reference, every
   float output within the engine's precision's tolerance (``kiln.precision``), moving the layers
   that drifted most towards fp32 until it is, or failing (``_check_outputs``);
7. the engine: plan + prepared weights, deterministic for the same model, config and cache.

``BuildConfig.timeout_s`` bounds all of it: the build runs under one deadline (``kiln.deadline``),
checked between layers in each step and by every run of the model the build makes (between
nodes, at every loop iteration), and a build past it stops with ``RunStopped``.
"""

from __future__ import annotations

import os
import statistics
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch

from kiln import deadline as deadlines
from kiln import dtypes
from kiln.builder import tactics as tactic_registry
from kiln.builder.config import BuildConfig, Profile
from kiln.builder.layers import FLOAT_TYPES, GraphFacts, Layer, lower
from kiln.builder.plan import BuildReport, BuiltPlan
from kiln.builder.schedule import assign_streams
from kiln.builder.tactics import PRECISION_DTYPES, Tactic
from kiln.builder.tactics.conv import conv_runs_nhwc
from kiln.builder.tactics.node import castable
from kiln.builder.timing_cache import TimingCache
from kiln.errors import InputError, KilnError, OpError, PrecisionError, UnsupportedModelError, first_line, named
from kiln.executor import Executor
from kiln.float64 import distance, float64_model, widen
from kiln.inputs import random_array
from kiln.passes import unique_node_names
from kiln.precision import TOLERANCES, judge, loosest, tolerance
from kiln.precision import scaled_error as relative_error
from kiln.versions import environment

# (op, input index) whose value is a shape, size, index or axis: the float arithmetic feeding
# them stays fp32 in reduced-precision builds (a rounded size is a wrong size).
SHAPE_INPUTS = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "Resize": (1, 2, 3), "Upsample": (1,),
    "ConstantOfShape": (0,), "Range": (0, 1, 2), "Pad": (1, 3), "TopK": (1,), "OneHot": (1,), "Squeeze": (1,),
    "Unsqueeze": (1,), "Split": (1,), "ReduceSum": (1,), "ReduceMean": (1,), "ReduceMax": (1,), "ReduceMin": (1,),
    "ReduceProd": (1,), "CumSum": (1,), "Gather": (1,), "GatherElements": (1,), "GatherND": (1,),
}
METADATA_OPS = {"Shape", "Size"}
_NOT_FOLDABLE = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial",
                 "Dropout"}


def _layer_tolerance(precision: str) -> float:
    """A layer's allowed error against its own output's scale (``kiln.precision.scaled_error``): the
    table's rtol for the precision it runs at (a strongly typed layer's own types count as fp16)."""
    return TOLERANCES[loosest([precision])].rtol


_REDUCED_TYPES = {ir.DataType.FLOAT16: "fp16", ir.DataType.BFLOAT16: "bf16"}
REDUCED = ("fp16", "bf16", "tf32")  # the precisions the end-to-end check may move a layer out of
WIDE_MARGIN = 0.9  # a layer runs wide when that is at least 10% faster (_prefer_faster_wide) ...
WIDE_MIN_GAIN_MS = 0.02  # ... and, on a GPU, saves more than two small kernels (the casts at its edges) cost


def _has_subgraph(node: ir.Node) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())


@dataclass
class Choice:
    tactic: str
    config: dict
    time_ms: float | None


@dataclass
class PlannedLayer:
    """A layer with everything the build decided about it."""

    layer: Layer
    precision: str
    constrained: bool = False
    choices: list[Choice] = field(default_factory=list)  # one per profile
    cast_inputs: list[int] = field(default_factory=list)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    drift: float = 0.0  # its output's error against fp32 at its precision, as the walk measured it
    widened_for_speed: bool = False  # fp16/bf16 was allowed, but fp32 (tf32) was faster


def build(
    model: ir.Model | onnx.ModelProto | str | os.PathLike[str],
    config: BuildConfig | None = None,
    *,
    calibration: Mapping[str, Any] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    name: str | None = None,
) -> BuiltPlan:
    """Build a plan (``kiln.build`` turns it into an ``Engine``). ``calibration``: representative inputs (name -> array) at the first profile's
    opt shapes, for every run of the model the build makes (shape recording, the precision walk,
    the end-to-end check); seeded random ones (never zeros) for the inputs it lacks.
    ``progress(phase, done, total)`` is called as layers are processed. ``name``: what errors and
    the log call the model (default: its file, or an ``ir.Model``'s graph name). ``config.timeout_s``
    bounds the build once the model is loaded (``kiln.deadline.RunStopped`` after)."""
    config = config or BuildConfig()
    config.validate()
    if isinstance(model, onnx.ModelProto):  # checked as a file is, external data refused (no folder)
        from kiln.onnx_io import load_model_proto

        name = name or model.graph.name or "model"
        model = load_model_proto(model, name=name)
    elif not isinstance(model, ir.Model):
        from kiln.onnx_io import load_model

        name = name or str(model)
        model = load_model(model)
    else:
        name = name or model.graph.name or "model"
        model = model.clone()  # the passes rewrite the graph; the caller's model stays as it was
    with deadlines.time_limit(config.timeout_s):
        return _build(model, name, config, calibration, progress)


def _build(model: ir.Model, name: str, config: BuildConfig, calibration, progress) -> BuiltPlan:
    builder = _Builder(model, config, name, calibration, progress)
    # cuDNN picks each convolution's algorithm by timing it (cached per shape), as the engine does.
    with torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False,
                                    allow_tf32=torch.backends.cudnn.allow_tf32):
        plan, tensors, graph_bytes = builder.run()
    return BuiltPlan(plan, tensors, graph_bytes, config.device, builder.report)


class _Builder:
    def __init__(self, model: ir.Model, config: BuildConfig, name: str, calibration, progress) -> None:
        self.model = model
        self.config = config
        self.name = name
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise KilnError("the build asks for device 'cuda' but torch sees no CUDA GPU; build with --device cpu")
        self.calibration = calibration
        self.progress = progress or (lambda phase, done, total: None)
        self.report = BuildReport()
        self.cache = TimingCache(config.timing_cache, environment(self.device),
                                 on_refusal=lambda message: self.report.log(f"warning: {message}"))
        self.opset = dict(model.opset_imports).get("", dict(model.opset_imports).get("ai.onnx", 1))
        self.level = config.opt_level
        self.reps = 11 if self.level >= 5 else 5
        self.made_up: set[str] = set()  # inputs the build gave random values (no calibration array)
        self.reference: dict[str, Any] = {}  # the fp32 reference's outputs on the first profile's feeds

    # -- driver -------------------------------------------------------------------------------
    def run(self):
        start = time.perf_counter()
        graph = self.model.graph
        unique_node_names(graph)  # layers, constraints and the engine refer to nodes by name
        self._run_passes()
        self.executor = Executor(self.model, self.device, self.name)
        self._steps = self.executor.node_steps()
        self.profiles = self._profiles()
        unknown = sorted(set(self.calibration or {}) - {v.name for v in self.executor.inputs})
        if unknown:
            raise InputError(f"{self.name}: calibration input(s) {unknown} are not inputs of the model; its inputs are "
                             f"{sorted(v.name for v in self.executor.inputs)}")
        self.facts: list[GraphFacts] = []
        self.opt_feeds: list[dict[str, torch.Tensor]] = []
        for index, profile in enumerate(self.profiles):
            feeds = self._random_feeds({n: s[1] for n, s in profile.shapes.items()}, strict=index == 0)
            self.opt_feeds.append(feeds)
            self.facts.append(self._record(feeds))
        facts = self.facts[0]
        self.constants = {n: torch.as_tensor(v).to(self.device) if isinstance(v, np.ndarray) else v
                          for n, v in facts.constants.items()}
        layers = lower(graph, facts, self.opset)
        fused = sum(1 for layer in layers if layer.fused)
        before = sum(self.pass_report.ops_before.values())
        self.report.log(f"{self.name}: {before} nodes -> {len(list(graph))} after passes -> {len(layers)} layers ({fused} fused)")
        planned = [self._assign_precision(layer) for layer in layers]
        self._check_constraints_used(layers)
        # what the engine's outputs are judged at: its loosest precision before any fallback
        self.output_precision = loosest(self._judged_precision(item) for item in planned)
        self.canonical: dict[int, dict[str, torch.Tensor]] = {}
        for index, item in enumerate(planned):
            self.progress("tactics", index, len(planned))
            self._check_time(f"tactic selection for layer {item.layer.name!r} (op {'+'.join(item.layer.op_types)})")
            item.choices = [self._select(index, item, p) for p in range(len(self.profiles))]
            self._prefer_faster_wide(index, item)
        self.progress("tactics", len(planned), len(planned))
        self._walk(planned)
        widened = sum(1 for item in planned if item.widened_for_speed)
        if widened:
            self.report.log(f"{widened} layer(s) run in {self._wide_precision()}: their tactics there were "
                            f"faster than in {'/'.join(self.config.low_precisions)} (see their notes)")
        self._check_outputs(planned)
        tensors, layer_records = self._prepare_all(planned)
        plan = self._plan_json(planned, layer_records, tensors)
        graph_bytes = _stripped_graph(self.model)
        try:
            self.cache.save()
        except KilnError as error:
            self.report.log(f"warning: {error}")
        self.report.seconds = time.perf_counter() - start
        self.report.cache_hits, self.report.cache_misses = self.cache.hits, self.cache.misses
        self.report.log(
            f"optimization level {self.level}: built in {self.report.seconds:.1f} s; {self.report.timed} candidates timed, "
            f"{self.cache.hits} timing-cache hits, {self.report.rejected} candidates rejected"
        )
        self.planned = planned
        return plan, tensors, graph_bytes

    # -- passes -------------------------------------------------------------------------------
    def _run_passes(self) -> None:
        """The graph passes, before lowering: fusions into ai.kiln ops the layers lower one to one,
        and rewrites for the GPU. Measuring passes time their alternatives at the first profile's
        opt shapes on CUDA from level 1 on; level 0 times nothing and they decide by rule."""
        from kiln.passes import PassContext, run_passes

        measure_both = None
        if self.device.type == "cuda" and self.level >= 1:
            def measure_both(a, b):
                return measure(a, self.device, self.reps), measure(b, self.device, self.reps)
        ctx = PassContext(precision=self.config.default_precision(), kiln_ops=True, device=self.device.type,
                          dims=self._opt_dims(), measure=measure_both)
        report = run_passes(self.model, ctx, self.config.passes, self.config.skip_passes, build=True)
        self.pass_report = report
        done = {name: n for name, n in report.rewrites.items() if n}
        self.report.log("passes: " + (", ".join(f"{name} {n}" for name, n in done.items()) or "no rewrites"))
        self.report.lines.extend(f"  {line}" for line in report.log)

    def _opt_dims(self) -> dict[str, int]:
        """Symbolic input dimension name -> its size in the first profile that gives it (opt shape)."""
        dims: dict[str, int] = {}
        for profile in self.config.profiles:
            for value in self.model.graph.inputs:
                if value.name not in profile.shapes or value.shape is None:
                    continue
                opt = profile.shapes[value.name][1]
                for axis, dim in enumerate(value.shape):
                    name = getattr(dim, "value", None)
                    if not isinstance(dim, int) and isinstance(name, str) and axis < len(opt):
                        dims.setdefault(name, int(opt[axis]))
        return dims

    # -- shapes -------------------------------------------------------------------------------
    def _profiles(self) -> list[Profile]:
        inputs = [v for v in self.executor.inputs]
        names = {v.name for v in inputs}
        profiles = list(self.config.profiles) or [Profile({})]
        for index, profile in enumerate(profiles):
            unknown = sorted(set(profile.shapes) - names)
            if unknown:
                raise InputError(f"{self.name}: profile {index} names unknown input(s) {unknown}; inputs are {sorted(names)}")
            full = dict(profile.shapes)
            for value in inputs:
                declared = value.shape
                if value.name in full:
                    lo, opt, hi = full[value.name]
                    if declared is not None:
                        if len(declared) != len(opt):
                            raise InputError(f"{self.name}: profile {index} gives input {value.name!r} rank {len(opt)}, "
                                             f"the model declares rank {len(declared)}")
                        for axis, dim in enumerate(declared):
                            if isinstance(dim, int) and not (lo[axis] == opt[axis] == hi[axis] == dim):
                                raise InputError(f"{self.name}: profile {index} gives input {value.name!r} axis {axis} "
                                                 f"sizes {lo[axis]}/{opt[axis]}/{hi[axis]}, the model fixes it at {dim}")
                    continue
                if declared is None or any(not isinstance(d, int) for d in declared):
                    shown = "?" if declared is None else "x".join(str(d) if isinstance(d, int) else "N" for d in declared)
                    raise InputError(
                        f"{self.name}: input {value.name!r} has dynamic dimensions ({shown}); give its shapes with "
                        f"--min-shapes/--opt-shapes/--max-shapes {value.name}:{shown.replace('N', '1')}"
                    )
                static = tuple(int(d) for d in declared)
                full[value.name] = (static, static, static)
            profiles[index] = Profile(full)
        return profiles

    def _random_feeds(self, shapes: Mapping[str, tuple[int, ...]], strict: bool = True) -> dict[str, torch.Tensor]:
        """Inputs at ``shapes``: the calibration arrays where given, seeded random values for the rest
        (floats standard normal, integers in [0, 2), bools coin flips; see ``_failed_run``).
        ``strict``: a calibration array must have its shape (the first profile's opt shapes); other
        profiles use the arrays whose shape fits and random values for the others."""
        generator = np.random.default_rng(self.config.seed)
        feeds = {}
        for value in self.executor.inputs:
            shape = shapes[value.name]
            dtype = value.dtype
            given = None if self.calibration is None else self.calibration.get(value.name)
            if given is not None and tuple(np.shape(given)) != tuple(shape):
                if strict:
                    raise InputError(f"{self.name}: calibration input {value.name!r} has shape {list(np.shape(given))}, "
                                     f"the profile's opt shape is {list(shape)}")
                given = None
            if given is not None:
                array = np.asarray(given)
            elif dtype is not None and dtype != ir.DataType.STRING:
                array = random_array(generator, shape, dtype, f"{self.name}: random input {value.name!r}")
            else:
                raise InputError(f"{self.name}: cannot make inputs for {value.name!r} of type {value.type}")
            if given is None:
                self.made_up.add(value.name)
            feeds[value.name] = dtypes.tensor_from_numpy(array, self.device)
        return feeds

    def _check_time(self, where: str) -> None:
        """Stop at the build's time limit (``BuildConfig.timeout_s``), naming the model and ``where``."""
        deadline = deadlines.current()
        if deadline is not None and deadline.expired():
            raise named(deadline.stopped(where), self.name)

    def _failed_run(self, cause: str) -> KilnError:
        """A run of the model inside the build (recording shapes, the precision walk, the end-to-end
        check) failed with ``cause`` (naming the node, op and error): one line that says so and, where
        the build made inputs up, which ones, and that ``--inputs`` gives real values. Random integers
        in [0, 2) are no sample rate, size or index a real model takes."""
        cause = " ".join(cause.split())
        while cause.startswith(f"{self.name}: "):
            cause = cause[len(self.name) + 2:]
        made_up = [v for v in self.executor.inputs if v.name in self.made_up]
        if not made_up:
            return OpError(f"{self.name}: the model failed on the calibration inputs: {cause}")
        shown = [v for v in made_up if v.dtype is None or not v.dtype.is_floating_point()] or made_up
        return OpError(
            f"{self.name}: the model failed on the build's random inputs: {cause}; "
            f"{', '.join(_described(v) for v in shown)} got random values: pass real ones with --inputs FILE.npz "
            f"(builds run the model on those inputs to record shapes, check precision and check the engine's outputs)"
        )

    def _record(self, feeds: Mapping[str, torch.Tensor]) -> GraphFacts:
        shapes: dict[str, tuple[int, ...]] = {}
        kinds: dict[str, ir.DataType] = {}
        constants: dict[str, Any] = {}
        for name, value in {**self.executor._main.constants, **feeds}.items():
            if isinstance(value, torch.Tensor):
                shapes[name] = tuple(value.shape)
                kinds[name] = dtypes.ONNX_DTYPES.get(value.dtype)
        for name, value in self.executor._main.constants.items():
            constants[name] = value

        def observe(step, outputs) -> None:
            # A node computed from constants alone is a constant (the builder's constant folding);
            # random ops are not, and neither is anything reading a subgraph.
            op = step.op
            folded = op.domain == "" and op.op_type not in _NOT_FOLDABLE and not _has_subgraph(op.node) and (
                op.op_type == "Constant" or (any(step.inputs) and all(n in constants for n in step.inputs if n)))
            for out_name, value in zip(step.outputs, outputs):
                if out_name and isinstance(value, torch.Tensor):
                    shapes[out_name] = tuple(value.shape)
                    kinds[out_name] = dtypes.ONNX_DTYPES.get(value.dtype)
                    if folded:
                        constants[out_name] = value

        outputs = self._run_reference(feeds, observe)
        if not self.reference:
            self.reference = outputs
        return GraphFacts(shapes, kinds, constants)

    def _run_reference(self, feeds: Mapping[str, torch.Tensor], observe: Callable[[Any, tuple], None]) -> dict[str, Any]:
        """The model on the reference executor (fp32 means IEEE fp32), ``observe(step, outputs)`` after
        each main-graph node. A failure of the model's own nodes is reported by ``_failed_run``; an
        error the observer raises passes through as it is."""
        raised: list[BaseException] = []

        def guarded(step, outputs) -> None:
            try:
                observe(step, outputs)
            except BaseException as error:
                raised.append(error)
                raise

        self.executor.observer = guarded
        try:
            return self.executor.run(feeds)
        except deadlines.RunStopped:
            raise
        except KilnError as error:
            if raised and error is raised[0]:
                raise
            raise self._failed_run(str(error)) from error
        finally:
            self.executor.observer = None

    # -- precision ----------------------------------------------------------------------------
    def _shape_nodes(self) -> set[str]:
        if hasattr(self, "_shape_node_names"):
            return self._shape_node_names
        names: set[str] = set()
        stack = []
        for node in self.model.graph:
            for index in SHAPE_INPUTS.get(node.op_type, ()):
                if index < len(node.inputs) and node.inputs[index] is not None:
                    stack.append(node.inputs[index])
        seen: set[int] = set()
        while stack:
            value = stack.pop()
            producer = value.producer()
            if producer is None or id(producer) in seen:
                continue
            seen.add(id(producer))
            names.add(producer.name)
            if producer.op_type in METADATA_OPS:
                continue
            stack.extend(v for v in producer.inputs if v is not None)
        self._shape_node_names = names
        return names

    def _assign_precision(self, layer: Layer) -> PlannedLayer:
        config = self.config
        facts = self.facts[0]
        constraint = None
        for key in layer.nodes + layer.op_types + [key for origin in layer.origins for key in origin]:
            if key in config.layer_precisions:
                constraint = config.layer_precisions[key]
                break
        if config.strongly_typed:
            precision = self._native_precision(layer)
        elif constraint is not None:
            precision = constraint
        elif any(n in self._shape_nodes() for n in layer.nodes) or (
                layer.kind == "Node" and _has_subgraph(self._steps[layer.nodes[0]].op.node)):
            # shape arithmetic; and If/Loop/Scan, whose bodies run reference ops on the fp32 weights
            # they capture (casting the node's inputs alone would mix precisions inside)
            precision = "fp32"
        else:
            precision = config.default_precision()
        item = PlannedLayer(layer, precision, constrained=constraint is not None)
        if precision != "native":
            for i, name in enumerate(layer.inputs):
                if facts.dtypes.get(name) == ir.DataType.FLOAT and (layer.kind != "Node" or self._castable_input(layer, i)):
                    item.cast_inputs.append(i)
        item.shapes = {n: list(facts.shapes[n]) for n in layer.inputs + layer.outputs if n in facts.shapes}
        return item

    def _castable_input(self, layer: Layer, runtime_index: int) -> bool:
        for slot, arg in enumerate(layer.attrs.get("args", [])):
            if arg is not None and arg.get("input") == runtime_index:
                return castable(layer.op_types[0], slot)
        return True  # captured values

    def _judged_precision(self, item: PlannedLayer) -> str:
        """A layer's precision, a strongly typed Node layer's the types it computes in."""
        if item.precision != "native":
            return item.precision
        return loosest(_REDUCED_TYPES.get(self.facts[0].dtypes.get(n), "fp32") for n in item.layer.outputs if n)

    def _native_precision(self, layer: Layer) -> str:
        if layer.kind == "Node":
            return "native"
        facts = self.facts[0]
        dtype = facts.dtypes.get(layer.outputs[0] if layer.kind == "Pointwise" else layer.inputs[0])
        return {ir.DataType.FLOAT16: "fp16", ir.DataType.BFLOAT16: "bf16"}.get(dtype, "fp32")

    def _check_constraints_used(self, layers: list[Layer]) -> None:
        known = {n for layer in layers for n in layer.nodes} | {o for layer in layers for o in layer.op_types}
        known |= {key for layer in layers for origin in layer.origins for key in origin}
        known |= {n.name for n in self.model.graph} | {n.op_type for n in self.model.graph}
        unknown = sorted(set(self.config.layer_precisions) - known)
        if unknown:
            raise KilnError(f"{self.name}: --layer-precision names {unknown}, which are neither node names nor op types of the model")

    # -- tactic selection ---------------------------------------------------------------------
    def _candidates(self, item: PlannedLayer, precision: str) -> list[tuple[Tactic, dict]]:
        """The tactics (and configs) to try, best heuristic first. The reference tactic stays unless
        denied by its full name: where the lists and the level leave nothing else (it is a layout
        alternative only from level 4, say), it is tried with every config it has."""
        layer, config, device = item.layer, self.config, self.device.type
        found = []
        reference = None
        for t in tactic_registry.tactics_for(layer.kind):
            if device not in t.devices or precision not in t.precisions:
                continue
            if any(t.matches(p) for p in config.deny_tactics) and not (t.reference and t.name not in config.deny_tactics):
                continue
            if config.allow_tactics and not t.reference and not any(t.matches(p) for p in config.allow_tactics):
                continue
            if not t.supports(layer, precision, device):
                continue
            reference = t if t.reference else reference
            level = 3 if self.level == 0 else self.level
            if t.level > level:
                continue
            for cfg in t.configs(layer, level, precision, device):
                found.append((t, cfg))
        if not found and reference is not None:
            found = [(reference, cfg) for cfg in reference.configs(layer, 5, precision, device)]
        if not found:
            raise KilnError(
                f"{self.name}: no tactic is left for layer {layer.name!r} ({layer.kind}, op {'+'.join(layer.op_types)}) "
                f"at {precision} after the tactic allow/deny lists; allow at least its reference tactic"
            )
        found.sort(key=lambda tc: -tc[0].heuristic(layer, precision, device))
        return found

    def _weights(self, index: int, layer: Layer) -> dict[str, torch.Tensor]:
        if index not in self.canonical:
            self.canonical[index] = tactic_registry.canonical(layer, self.constants)
        return self.canonical[index]

    def _select(self, index: int, item: PlannedLayer, profile: int, precision: str | None = None) -> Choice:
        precision = precision or item.precision
        layer = item.layer
        candidates = self._candidates(item, precision)
        if layer.kind == "Node":
            t, cfg = candidates[0]
            return Choice(t.name, cfg, None)
        shapes = self.facts[profile].shapes
        in_shapes = [list(shapes[n]) for n in layer.inputs]
        weights = self._weights(index, layer)
        key_fields = {
            "kind": layer.kind, "attrs": layer.attrs, "inputs": in_shapes, "precision": precision,
            "weights": {r: list(w.shape) for r, w in sorted(weights.items())},
            "in_dtypes": [str(self.facts[profile].dtypes.get(n)) for n in layer.inputs],
        }
        if self.level == 0:
            return self._heuristic_choice(index, item, candidates, precision, profile, key_fields)
        inputs = None
        reference = None
        best: Choice | None = None
        cached_failures = []
        for attempt in range(2):
            for t, cfg in candidates if attempt == 0 else cached_failures:
                self._check_time(f"tactic selection for layer {layer.name!r} (op {'+'.join(layer.op_types)})")
                key = self.cache.key({**key_fields, "tactic": t.name, "config": cfg})
                entry = self.cache.get(key) if attempt == 0 else None
                if entry is None:
                    if inputs is None:
                        inputs = self._layer_inputs(index, layer, profile, precision)
                        reference = self._reference_output(index, item, inputs, precision)
                    entry = self._time(t, cfg, item, index, inputs, reference, precision)
                    self.cache.put(key, entry)
                    self.report.timed += 1
                elif not entry["ok"]:
                    cached_failures.append((t, cfg))
                if not entry["ok"]:
                    self.report.rejected += 1
                    item.notes.append(f"{t.name} {cfg or ''} rejected: {entry.get('reason', 'mismatch')}")
                    continue
                if best is None or entry["ms"] < best.time_ms:
                    best = Choice(t.name, cfg, entry["ms"])
            if best is not None:  # a cache may only speed a build up: its failures are checked before giving up
                break
        if best is None:
            raise KilnError(f"{self.name}: every tactic for layer {layer.name!r} ({layer.kind}) failed its check at {precision}")
        return best

    def _prefer_faster_wide(self, index: int, item: PlannedLayer) -> None:
        """TensorRT's reading of --fp16/--bf16: reduced precision is allowed, not imposed. A layer
        whose timed fp32 tactics (tf32 where allowed) beat its fp16/bf16 ones runs wide
        (``_widen_if_faster``). On a CPU, which emulates fp16 convolutions and GEMMs, that is most
        of them. Nothing changes at level 0 (nothing is timed); Node layers are timed, and so
        decided, in the walk (``_prefer_faster_wide_node``)."""
        if self.level == 0 or item.layer.kind == "Node" or not self._may_widen(item):
            return
        try:
            choices = [self._select(index, item, p, self._wide_precision()) for p in range(len(self.profiles))]
        except deadlines.RunStopped:
            raise
        except KilnError:  # no tactic runs wide: the layer stays as it is
            return
        self._widen_if_faster(item, _total_ms(item.choices), _total_ms(choices), choices)

    def _prefer_faster_wide_node(self, index: int, item: PlannedLayer, ref_inputs: list[Any]) -> None:
        """``_prefer_faster_wide`` for a Node layer, timed on the walk's real values: the reference
        op on fp32 (tf32) inputs against fp16/bf16 ones."""
        low_ms = item.choices[0].time_ms
        if not self._may_widen(item) or low_ms is None:
            return
        wide_ms = self._time_node(index, item, ref_inputs, self._wide_precision())
        choices = [Choice(c.tactic, c.config, wide_ms if p == 0 else c.time_ms) for p, c in enumerate(item.choices)]
        self._widen_if_faster(item, low_ms, wide_ms, choices)

    def _may_widen(self, item: PlannedLayer) -> bool:
        """Pinned layers and strongly typed builds keep their precision; only fp16/bf16 can widen."""
        return not item.constrained and not self.config.strongly_typed and item.precision in ("fp16", "bf16")

    def _wide_precision(self) -> str:
        return "tf32" if self.config.tf32 else "fp32"

    def _widen_if_faster(self, item: PlannedLayer, low_ms: float | None, wide_ms: float | None,
                         choices: list[Choice]) -> None:
        """Run ``item`` wide (with ``choices``) when that is more than 10% faster and, on a GPU, saves
        more than ``WIDE_MIN_GAIN_MS``: the margins stand for the casts at its edges, which timing one
        layer does not see, and for timing noise on small GPU layers."""
        gain = WIDE_MIN_GAIN_MS if self.device.type == "cuda" else 0.0
        if low_ms is None or wide_ms is None or not wide_ms < WIDE_MARGIN * low_ms or low_ms - wide_ms <= gain:
            return
        wide = self._wide_precision()
        item.notes.append(f"layer {item.layer.name!r} ({'+'.join(item.layer.op_types)}): runs in {wide}, "
                          f"{wide_ms:.3g} ms against {low_ms:.3g} ms in {item.precision}")
        item.precision, item.choices, item.widened_for_speed = wide, choices, True

    def _heuristic_choice(self, index, item, candidates, precision, profile, key_fields) -> Choice:
        """Level 0: the heuristic's first pick that passes its correctness check; nothing is timed."""
        inputs = self._layer_inputs(index, item.layer, profile, precision)
        reference = self._reference_output(index, item, inputs, precision)
        for t, cfg in candidates:
            ok, reason = self._check(t, cfg, item, index, inputs, reference, precision)
            if ok:
                return Choice(t.name, cfg, None)
            self.report.rejected += 1
            item.notes.append(f"{t.name} rejected: {reason}")
        raise KilnError(f"{self.name}: every tactic for layer {item.layer.name!r} failed its check at {precision}")

    def _layer_inputs(self, index: int, layer: Layer, profile: int, precision: str) -> list[torch.Tensor]:
        facts = self.facts[profile]
        generator = torch.Generator(device="cpu").manual_seed(self.config.seed * 7919 + zlib.crc32(layer.name.encode()))
        dtype = PRECISION_DTYPES[precision]
        inputs = []
        for name in layer.inputs:
            shape = facts.shapes[name]
            kind = facts.dtypes.get(name)
            if kind in FLOAT_TYPES:
                value = torch.randn(shape, generator=generator).to(self.device, dtype)
                if layer.kind == "Conv" and value.dim() == 4 and conv_runs_nhwc(layer, precision, self.device.type):
                    value = value.contiguous(memory_format=torch.channels_last)
                inputs.append(value)
            else:
                raise KilnError(f"{self.name}: layer {layer.name!r} has a non-float input {name!r}; this is a kiln bug")
        return inputs

    def _runner(self, t: Tactic, cfg: dict, item: PlannedLayer, index: int, precision: str):
        prepared = t.prepare(item.layer, self._weights(index, item.layer), precision, cfg)
        return t.runner(item.layer, prepared, precision, cfg, self)

    def _reference_output(self, index, item, inputs, precision) -> list[torch.Tensor]:
        ref = tactic_registry.reference_for(item.layer.kind)
        with _tf32(precision == "tf32"), torch.inference_mode():
            return ref_outputs(self._runner(ref, {}, item, index, precision)(list(inputs)))

    def _check(self, t, cfg, item, index, inputs, reference, precision) -> tuple[bool, str]:
        try:
            run = self._runner(t, cfg, item, index, precision)
            with _tf32(precision == "tf32"), torch.inference_mode():
                got = run(list(inputs))
        except deadlines.RunStopped:
            raise
        except Exception as error:  # noqa: BLE001 - a tactic that cannot run is not chosen
            return False, f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        for a, b in zip(got, reference):
            err = relative_error(a, b)
            if not err <= _layer_tolerance(precision):
                return False, f"relative error {err:.3g} over {_layer_tolerance(precision):g}"
        return True, ""

    def _time(self, t, cfg, item, index, inputs, reference, precision) -> dict:
        try:
            run = self._runner(t, cfg, item, index, precision)
            with _tf32(precision == "tf32"), torch.inference_mode():
                workspace = _workspace(run, inputs, self.device)
                got = run(list(inputs))
        except deadlines.RunStopped:
            raise
        except Exception as error:  # noqa: BLE001 - a tactic that cannot run is not chosen
            return {"ms": None, "ok": False, "reason": f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"}
        for a, b in zip(got, reference):
            err = relative_error(a, b)
            if not err <= _layer_tolerance(precision):
                return {"ms": None, "ok": False, "reason": f"relative error {err:.3g} over {_layer_tolerance(precision):g}"}
        limit = self.config.memory_limit
        if limit is not None and workspace is not None and workspace > limit:
            return {"ms": None, "ok": False, "reason": f"needs {workspace} bytes of scratch memory, over the limit of {limit}"}
        with _tf32(precision == "tf32"), torch.inference_mode():
            ms = measure(lambda: run(list(inputs)), self.device, self.reps)
        return {"ms": ms, "ok": True, "workspace": workspace}

    # -- the walk: precision check, fallback, Node timing -------------------------------------
    def node_step(self, name: str):
        return self._steps[name]

    def _walk(self, planned: list[PlannedLayer]) -> None:
        """The first profile's feeds through the reference executor; as each layer's last node
        finishes, the layer is checked (reduced precisions against fp32, on the fp32 values of its
        inputs) and, for Node layers, timed on those real values."""
        low = [p for p in planned if p.precision in ("fp16", "bf16")]
        check = bool(low) and self.config.precision_check and not self.config.strongly_typed
        if not check and self.level == 0:
            return
        phase = "precision check" if check else "profiling"
        order = {name: position for position, name in enumerate(self._steps)}
        finishing = {max(item.layer.nodes, key=order.__getitem__): index for index, item in enumerate(planned)}
        last_read: dict[str, int] = {}  # layer inputs and outputs -> the last layer that needs them here
        for index, item in enumerate(planned):
            for name in item.layer.inputs + item.layer.outputs:
                last_read[name] = index
        feeds = self.opt_feeds[0]
        held = {name: value for name, value in feeds.items() if name in last_read}

        def observe(step, outputs) -> None:
            held.update((name, value) for name, value in zip(step.outputs, outputs) if name in last_read)
            index = finishing.get(step.op.node.name)
            if index is None:
                return
            self.progress(phase, index, len(planned))
            item = planned[index]
            layer = item.layer
            ref_inputs = [held.get(n) for n in layer.inputs]
            ref_out = [held.get(n) for n in layer.outputs]
            if check and item.precision in ("fp16", "bf16") and not item.constrained:
                self._check_precision(index, item, ref_inputs, ref_out)
            if layer.kind == "Node" and self.level > 0 and item.choices:
                item.choices[0].time_ms = self._time_node(index, item, ref_inputs)
                self._prefer_faster_wide_node(index, item, ref_inputs)
            for name in layer.inputs + layer.outputs:
                if last_read.get(name) == index:
                    held.pop(name, None)

        self._run_reference(feeds, observe)
        self.progress(phase, len(planned), len(planned))

    # -- the end-to-end check -----------------------------------------------------------------
    def _check_outputs(self, planned: list[PlannedLayer]) -> None:
        """The build's contract: on its inputs (the calibration inputs, else the seeded random ones of
        the first profile) the planned network's outputs are within the tolerance of the engine's
        loosest precision (``kiln.precision``) of the fp32 reference's. Layers that pass the walk's
        check one by one can still add up to more (drift that later layers amplify, a softmax over
        thousands of classes). While an output is over, layers move towards fp32 (fp16/bf16 to tf32
        where allowed, else fp32; tf32 to fp32), those that drifted most in the walk first, 1, then
        2, 4, ... at a time, the network rerun after each move; the log and the moved layers' notes
        say which and why. Layers the user pinned and a strongly typed build's stay as they are.
        When every layer is in fp32 and an output is still over, the model run in float64 referees
        (``_fp32_rounding``): an engine as near to it as the fp32 reference is accepted, its
        differences logged. Otherwise, with nothing left to move, the build fails
        (``PrecisionError``). The final differences are in ``report.output_diffs``. The first
        profile's tactics are the ones run: the precisions it settles hold for every profile."""
        if not self.config.precision_check:
            return
        precision = self.output_precision
        tol = tolerance(precision, self.config.atol, self.config.rtol)
        made_up = [v.name for v in self.executor.inputs if v.name not in (self.calibration or {})]  # first profile's
        given = len(made_up) < len(self.executor.inputs)
        on = ("seeded random inputs" if not given else "the calibration inputs" +
              (f" (random values for {', '.join(made_up)})" if made_up else ""))
        movable = [] if self.config.strongly_typed else [
            index for index, item in enumerate(planned) if not item.constrained and item.precision in REDUCED]
        movable.sort(key=lambda index: -planned[index].drift)  # stable: equal drifts in plan order
        runners: dict = {}
        batch = 1
        while True:
            self.progress("end-to-end check", 0, 1)
            got = self._plan_outputs(planned, runners)
            verdicts = self._judge_outputs(got, tol)
            over = {name: j for name, j in verdicts.items() if not j.ok}
            if not over:
                break
            worst = ", ".join(f"{name!r} {j.max_rel:.3g} from fp32 (max abs {j.max_abs:.3g}, {j.bad} elements over)"
                              for name, j in over.items())
            if not movable and not any(item.precision in REDUCED for item in planned):
                rounding, refereed = self._fp32_rounding(got, over)
                if rounding:
                    self.report.log(f"end-to-end check on {on}: output(s) {worst} over the {precision} tolerance ({tol}) "
                                    f"with every layer in fp32; {refereed}: fp32 rounding the network amplifies, "
                                    f"accepted")
                    break
                worst += f"; {refereed}" if refereed else ""
            if not movable:
                pinned = [item.layer.name for item in planned if item.constrained and item.precision != "fp32"]
                held = (f"; layers pinned by --layer-precision: {', '.join(pinned)}" if pinned else
                        "; the build is strongly typed" if self.config.strongly_typed and precision != "fp32" else "")
                raise PrecisionError(
                    f"{self.name}: on {on} the engine's output(s) {worst} are over the {precision} tolerance of fp32 "
                    f"({tol}) with every layer that may move in fp32{held}; give representative inputs with --inputs, "
                    f"compare the model itself with kiln run --compare onnxruntime, or pass --no-precision-check to "
                    f"build it as it is"
                )
            chosen, movable = movable[:batch], movable[batch:]
            self.report.log(f"end-to-end check on {on}: output(s) {worst} over the {precision} tolerance ({tol}); "
                            f"moving {len(chosen)} layer(s) with the largest drift towards fp32")
            for index in chosen:
                item = planned[index]
                before = item.precision
                target = "tf32" if before != "tf32" and self.config.tf32 else "fp32"
                item.precision = target
                item.choices = [self._select(index, item, p, target) for p in range(len(self.profiles))]
                if target == "tf32":
                    movable.append(index)
                message = (f"layer {item.layer.name!r} ({'+'.join(item.layer.op_types)}): moved from {before} to {target}: "
                           f"the engine's outputs were over the {precision} tolerance of fp32 end to end "
                           f"(its own drift in {before}: {item.drift:.3g})")
                item.notes.append(message)
                self.report.fallbacks.append(message)
                self.report.log(message)
            batch *= 2
        self.progress("end-to-end check", 1, 1)
        self.report.output_diffs = {name: j.max_rel for name, j in verdicts.items()}
        if verdicts:
            diffs = ", ".join(f"{name!r} {j.max_rel:.3g}" for name, j in verdicts.items())
            self.report.log(f"end-to-end check on {on}: every float output within the {precision} tolerance of fp32 "
                            f"({tol}); max relative differences {diffs}")
        moved = sum(1 for item in planned if any("end to end" in note for note in item.notes))
        if moved:
            self.report.log(f"end-to-end check: {moved} layer(s) moved towards fp32 to meet atol {tol.atol:g} + rtol "
                            f"{tol.rtol:g} |fp32| per element; where outputs are large (logits, pixel coordinates) an "
                            f"atol that fine is below {precision}'s spacing there: give the build --atol for your outputs' "
                            f"scale to keep {precision}")

    def _fp32_rounding(self, got: Mapping[str, Any], over: Mapping[str, Any]) -> tuple[bool, str]:
        """With every layer in fp32, are the outputs over fp32's tolerance of the reference only
        fp32 rounding that the network amplifies? The model run in float64 (``kiln.float64``)
        referees: yes when each such output of the engine is no farther from it than twice the fp32
        reference's distance (kernels that sum in another order are as exact; a kernel that is off
        is farther). Returns the verdict and what the referee measured, for the log or the error."""
        try:
            executor = Executor(float64_model(self.model), self.device, f"{self.name} (float64)")
            exact = executor.run(widen(self.opt_feeds[0]))
        except deadlines.RunStopped:
            raise
        except Exception as error:  # noqa: BLE001 - without a referee the contract stands as it is
            return False, f"the float64 referee could not run the model ({first_line(error)})"
        verdict, parts = True, []
        for name in over:
            engine, reference = distance(got[name], exact[name]), distance(self.reference[name], exact[name])
            verdict = verdict and engine <= 2 * reference
            parts.append(f"{name!r} {engine:.3g} from the model run in float64, the fp32 reference {reference:.3g}")
        return verdict, "; ".join(parts)

    def _plan_outputs(self, planned: list[PlannedLayer], runners: dict) -> dict[str, Any]:
        """The planned layers run end to end on the first profile's feeds, as the engine runs them."""
        last_read: dict[str, int] = {}
        for index, item in enumerate(planned):
            for name in item.layer.inputs:
                last_read[name] = index
        env: dict[str, Any] = dict(self.opt_feeds[0])
        for index, item in enumerate(planned):
            layer = item.layer
            where = f"layer {layer.name!r} (op {'+'.join(layer.op_types)})"
            self._check_time(f"the end-to-end check, {where}")
            try:
                result = self._run_choice(index, item, item.choices[0], item.precision, [env[n] for n in layer.inputs], runners)
            except deadlines.RunStopped as error:
                raise named(error, self.name) from error
            except Exception as error:
                reduced = [p.layer.name for p in planned[:index] if p.precision in ("fp16", "bf16", "tf32")]
                if not reduced and item.precision not in ("fp16", "bf16", "tf32"):
                    raise  # the same computation as the fp32 reference, which ran: kiln's bug
                # values computed in reduced precision that a layer cannot take (a count, a size)
                upstream = f" or the reduced-precision layers before it ({', '.join(reduced[-3:])}" \
                           f"{', ...' if len(reduced) > 3 else ''})" if reduced else ""
                raise OpError(
                    f"{self.name}: layer {layer.name!r} ({'+'.join(layer.op_types)}, {item.precision}) failed in the "
                    f"end-to-end run of the planned engine, where the fp32 reference ran: {type(error).__name__}: "
                    f"{first_line(error)}; pin it{upstream} to fp32 with --layer-precision NAME:fp32") from error
            env.update((name, value) for name, value in zip(layer.outputs, result) if name)
            for name in layer.inputs:
                if last_read[name] == index and name not in self.reference:
                    env.pop(name, None)
        return {name: env[name] for name in self.reference if name in env}

    def _judge_outputs(self, got: Mapping[str, Any], tol) -> dict[str, Any]:
        """``kiln.precision.judge`` per float output against the fp32 reference's."""
        verdicts = {}
        for name, ref in self.reference.items():
            value = got.get(name)
            if isinstance(ref, torch.Tensor) and ref.is_floating_point() and isinstance(value, torch.Tensor):
                verdicts[name] = judge(value.detach().to(torch.float64).cpu().numpy(),
                                       ref.detach().to(torch.float64).cpu().numpy(), tol)
        return verdicts

    def _cast_inputs(self, item: PlannedLayer, values: list[Any], precision: str) -> list[Any]:
        dtype = PRECISION_DTYPES.get(precision)
        out = list(values)
        if dtype is None:
            return out
        for i in item.cast_inputs:
            if isinstance(out[i], torch.Tensor) and out[i].dtype != dtype:
                out[i] = out[i].to(dtype)
        return out

    def _run_choice(self, index: int, item: PlannedLayer, choice: Choice, precision: str, values: list[Any],
                    runners: dict | None = None):
        """One layer as the engine runs it: inputs cast as the plan casts them, the tactic's runner
        on its prepared weights (kept in ``runners``, where given, for the next call)."""
        key = (index, choice.tactic, repr(sorted(choice.config.items())), precision)
        run = runners.get(key) if runners is not None else None
        if run is None:
            run = self._runner(tactic_registry.get(choice.tactic), choice.config, item, index, precision)
            if runners is not None:
                runners[key] = run
        with _tf32(precision == "tf32"), torch.inference_mode():
            return run(self._cast_inputs(item, values, precision))

    def _check_precision(self, index: int, item: PlannedLayer, ref_inputs: list[Any], ref_out: list[Any]) -> None:
        chain = self.config.low_precisions
        if item.precision not in chain:
            return
        order = chain[chain.index(item.precision):] + [self._wide_precision()]
        for position, precision in enumerate(order):
            if position > 0:
                item.precision = precision
                item.choices = [self._select(index, item, p, precision) for p in range(len(self.profiles))]
            if position == len(order) - 1:
                return
            reason = self._precision_problem(index, item, precision, ref_inputs, ref_out)
            if reason is None:
                return
            message = (f"layer {item.layer.name!r} ({'+'.join(item.layer.op_types)}): {reason} in {precision}; "
                       f"falls back to {order[position + 1]}")
            item.notes.append(message)
            self.report.fallbacks.append(message)
            self.report.log(message)

    def _precision_problem(self, index, item, precision, ref_inputs, ref_out) -> str | None:
        """Why the layer cannot run at ``precision`` (None: it can; its drift is then recorded)."""
        try:
            got = self._run_choice(index, item, item.choices[0], precision, ref_inputs)
        except deadlines.RunStopped:
            raise
        except Exception as error:  # noqa: BLE001 - an op without a kernel at this precision falls back
            return f"cannot run ({type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''})"
        worst = 0.0
        for a, b in zip(got, ref_out):
            if not isinstance(b, torch.Tensor) or not isinstance(a, torch.Tensor):
                continue
            if b.is_floating_point():
                finite = torch.isfinite(b)
                if bool((finite & ~torch.isfinite(a.float())).any()):
                    return "output overflows"
                err = relative_error(a, b)
                if err > _layer_tolerance(precision):
                    return f"output drifts from fp32 by {err:.3g}"
                worst = max(worst, err)
            elif a.shape != b.shape or not torch.equal(a, b.to(a.dtype)):
                return "integer output differs from fp32"
        item.drift = worst
        return None

    def _time_node(self, index: int, item: PlannedLayer, ref_inputs: list[Any], precision: str | None = None) -> float | None:
        precision = precision or item.precision
        facts = self.facts[0]
        key = self.cache.key({
            "kind": "Node", "op": item.layer.op_types[0], "node": _node_signature(self._steps[item.layer.nodes[0]].op.node),
            "inputs": [list(facts.shapes.get(n, ())) for n in item.layer.inputs],
            "in_dtypes": [str(facts.dtypes.get(n)) for n in item.layer.inputs], "precision": precision,
            "tactic": "node.reference", "config": {},
        })
        entry = self.cache.get(key)
        if entry is None:
            try:
                t = tactic_registry.get("node.reference")
                run = self._runner(t, {}, item, index, precision)
                values = self._cast_inputs(item, ref_inputs, precision)
                with torch.inference_mode():
                    ms = measure(lambda: run(values), self.device, 3)
                entry = {"ms": ms, "ok": True}
            except deadlines.RunStopped:
                raise
            except Exception as error:  # noqa: BLE001 - timing is informative only
                entry = {"ms": None, "ok": False, "reason": type(error).__name__}
            self.cache.put(key, entry)
        return entry["ms"]

    # -- the engine ---------------------------------------------------------------------------
    def _prepare_all(self, planned: list[PlannedLayer]):
        tensors: dict[str, torch.Tensor] = {}
        records = []
        for index, item in enumerate(planned):
            self.progress("weights", index, len(planned))
            self._check_time(f"preparing the weights of layer {item.layer.name!r}")
            record = []
            roles: dict[str, list[str]] = {}
            for choice in item.choices:
                t = tactic_registry.get(choice.tactic)
                prep = f"{index}.{t.prep_id(choice.config)}"
                if prep not in roles:
                    prepared = t.prepare(item.layer, self._weights(index, item.layer), item.precision, choice.config)
                    for role, tensor in prepared.items():
                        tensors[f"{prep}.{role}"] = tensor.detach()
                    roles[prep] = sorted(prepared)
                record.append((prep, roles[prep]))
            records.append(record)
            self.canonical.pop(index, None)
        self.progress("weights", len(planned), len(planned))
        return tensors, records

    def _plan_json(self, planned: list[PlannedLayer], records, tensors: dict[str, torch.Tensor]) -> dict:
        declared = []
        for value in self.executor.inputs:
            declared.append({"name": value.name, "dtype": dtypes.onnx_name(value.dtype),
                             "shape": [d if isinstance(d, int) else None for d in value.shape] if value.shape is not None else None})
        layers = []
        for item, prep in zip(planned, records):
            layer = item.layer
            layers.append({
                "name": layer.name, "kind": layer.kind, "nodes": layer.nodes, "op_types": layer.op_types,
                "origins": layer.origins,
                "inputs": layer.inputs, "outputs": layer.outputs, "attrs": layer.attrs, "weights": layer.weights,
                "precision": item.precision, "cast_inputs": item.cast_inputs, "shapes": item.shapes,
                "choices": [{"tactic": c.tactic, "config": c.config, "time_ms": c.time_ms, "weights": p, "roles": r}
                            for c, (p, r) in zip(item.choices, prep)],
                "notes": item.notes,
            })
        streams = assign_streams(layers, self.config.max_aux_streams)
        for layer, stream in zip(layers, streams):
            layer["stream"] = stream
        used = max(streams, default=0)
        if self.config.max_aux_streams:
            busy = sum(1 for s in streams if s)
            self.report.log(f"auxiliary streams: {used} of {self.config.max_aux_streams} used, {busy} of {len(layers)} layers on them")
        return {
            "name": os.path.basename(self.name),
            "aux_streams": used,
            "inputs": declared,
            "outputs": self._outputs_json(planned, tensors),
            "opsets": {d or "": v for d, v in sorted(self.model.opset_imports.items())},
            "profiles": [p.to_json() for p in self.profiles],
            "config": self.config.to_json(),
            "passes": {name: n for name, n in self.pass_report.rewrites.items()},
            "layers": layers,
        }


    def _outputs_json(self, planned: list[PlannedLayer], tensors: dict[str, torch.Tensor]) -> list[dict]:
        """The engine's outputs: each graph output once (a value listed twice is one output). One
        that no layer computes and that is no input, an initializer or a value folded from
        constants alone, is stored as a tensor of the engine (``constant``: its name)."""
        facts = self.facts[0]
        produced = {name for item in planned for name in item.layer.outputs if name} | {v.name for v in self.executor.inputs}
        outputs = []
        for value in self.model.graph.outputs:
            if any(spec["name"] == value.name for spec in outputs):
                continue
            spec = {"name": value.name, "dtype": dtypes.onnx_name(facts.dtypes[value.name]) if value.name in facts.dtypes
                    else dtypes.onnx_name(value.dtype)}
            if value.name not in produced:
                constant = self.constants.get(value.name)
                if not isinstance(constant, torch.Tensor):
                    raise UnsupportedModelError(f"{self.name}: output {value.name!r} is a constant kiln cannot store in an "
                                                f"engine ({type(constant).__name__}); run the model with kiln run instead")
                spec["constant"] = f"output.{len(outputs)}"
                tensors[spec["constant"]] = constant.detach()
            outputs.append(spec)
        return outputs


# -- helpers shared with the engine and the tests ---------------------------------------------

def _total_ms(choices: list[Choice]) -> float | None:
    """The choices' times over every profile; None where one was not timed."""
    times = [c.time_ms for c in choices]
    return None if None in times else sum(times)


def ref_outputs(values: list[Any]) -> list[Any]:
    return [v.clone() if isinstance(v, torch.Tensor) else v for v in values]


def measure(fn: Callable[[], Any], device: torch.device, reps: int = 5) -> float:
    """Median milliseconds per call: warm-up, then ``reps`` batches of back-to-back calls, timed with
    CUDA events on a side stream (never the default stream), or with perf_counter on CPU.

    On CUDA each batch is queued behind a GPU sleep longer than the host takes to launch it, so the
    events measure GPU time alone. An engine replays its layers from a CUDA graph, where host launch
    cost is gone; timing it here would favour kernels with cheap launches (cuBLAS over Triton) for
    small layers whose kernels finish before the next launch arrives.
    """
    if device.type == "cuda":
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            stream.synchronize()
            t0 = time.perf_counter()
            start.record()
            fn()
            end.record()
            launch_s = time.perf_counter() - t0
            end.synchronize()
            estimate = max(start.elapsed_time(end), 1e-3)
            iters = max(1, min(100, int(0.5 / estimate)))
            times = []
            for _ in range(reps):
                # twice the host's launch time for the batch, in GPU clock cycles (at most ~50 ms)
                _gpu_sleep(min(2.0 * launch_s * iters + 1e-4, 0.05), device)
                start.record()
                for _ in range(iters):
                    fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / iters)
        torch.cuda.current_stream(device).wait_stream(stream)
        return statistics.median(times)
    fn()
    t0 = time.perf_counter()
    fn()
    estimate = max((time.perf_counter() - t0) * 1e3, 1e-3)
    iters = max(1, min(50, int(0.5 / estimate)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(times)


_CYCLES_PER_S: dict[int, float] = {}


def _gpu_sleep(seconds: float, device: torch.device) -> None:
    """Keep the current stream busy for about ``seconds`` (``torch.cuda._sleep`` spins for a number of
    clock cycles; the rate is measured once per device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CYCLES_PER_S:
        cycles = 1_000_000
        torch.cuda._sleep(cycles)  # warm-up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _CYCLES_PER_S[index] = cycles / max(start.elapsed_time(end) / 1e3, 1e-6)
    torch.cuda._sleep(int(seconds * _CYCLES_PER_S[index]))


def _workspace(run, inputs, device: torch.device) -> int | None:
    """Bytes a tactic allocates beyond its outputs (its scratch memory), on CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = run(list(inputs))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    produced = sum(o.numel() * o.element_size() for o in out if isinstance(o, torch.Tensor))
    return max(0, peak - base - produced)


class _tf32:
    """TF32 on for the duration (cuBLAS and cuDNN), off otherwise: fp32 layers stay IEEE fp32."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = self.enabled
        torch.backends.cudnn.allow_tf32 = self.enabled

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def _described(value: ir.Value) -> str:
    """An input and the random values the build gave it, for error messages."""
    if value.shape is None:
        shape = "tensor"
    elif len(value.shape) == 0:
        shape = "scalar"
    else:
        shape = "[" + ", ".join(str(d) if isinstance(d, int) else (d.value or "?") for d in value.shape) + "]"
    kind = dtypes.onnx_name(value.dtype) if value.dtype is not None else "?"
    if value.dtype == ir.DataType.BOOL:
        made = "coin flips"
    elif value.dtype is not None and value.dtype.is_floating_point():
        made = "standard normal"
    else:
        made = "integers in [0, 2)"
    return f"{value.name} ({kind} {shape}, {made})"


def _node_signature(node: ir.Node) -> str:
    attrs = []
    for name, attr in sorted(node.attributes.items()):
        if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS, ir.AttributeType.TENSOR, ir.AttributeType.TENSORS):
            attrs.append(f"{name}=<{attr.type.name}>")
        else:
            attrs.append(f"{name}={attr.value!r}")
    return f"{node.domain}::{node.op_type}({','.join(attrs)})"


def _stripped_graph(model: ir.Model) -> bytes:
    """The model without its weights (they live in the engine's tensors), as ONNX bytes: the engine
    rebuilds its Node layers' ops (attributes, subgraphs) from it. Initializers become typed graph
    inputs so every name still resolves. The weights are lifted off while the graph is serialized,
    so their bytes are never copied (onnx-ir would copy every one into the proto)."""
    import logging

    import onnx

    graph = model.graph
    weights = {name: value.const_value for name, value in graph.initializers.items()}
    serde_log = logging.getLogger("onnx_ir.serde")  # it warns once per initializer without a value
    level = serde_log.level
    try:
        serde_log.setLevel(logging.ERROR)
        for value in graph.initializers.values():
            value.const_value = None
        proto = ir.serde.serialize_model(model)
    finally:
        serde_log.setLevel(level)
        for name, tensor in weights.items():
            graph.initializers[name].const_value = tensor
    kept_inputs = {i.name for i in proto.graph.input}
    for name, tensor in weights.items():
        if name not in kept_inputs and tensor is not None:
            proto.graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.dtype.value, list(tensor.shape)))
    return proto.SerializeToString(deterministic=True)
