"""The builder: ONNX model + BuildConfig -> plan (``kiln.build`` makes it an Engine), choosing the fastest
correct tactic per layer.

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
   that drifted most towards fp32 until it is, or failing;
7. the engine: plan + prepared weights, deterministic for the same model, config and cache.

Each step is a module of ``kiln.builder`` that reads and extends one ``BuildState``: ``profiles``
and ``record`` (1), ``layers`` (2), ``precision_assignment`` (3), ``choose_tactic`` (4), ``walk`` (5),
``check_outputs`` (6), ``plan_json`` (7); this module runs the passes and the steps in order.

``BuildConfig.timeout_s`` bounds all of it: the build runs under one deadline (``kiln.deadline``),
checked between layers in each step and by every run of the model the build makes (between
nodes, at every loop iteration), and a build past it stops with ``RunStopped``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch

from kiln import deadline as deadlines
from kiln.builder.check_outputs import check_outputs
from kiln.builder.choose_tactic import prefer_faster_wide, select_all
from kiln.builder.config import BuildConfig
from kiln.builder.layers import lower
from kiln.builder.plan import BuiltPlan
from kiln.builder.plan_json import plan_json, prepare_weights, stripped_graph
from kiln.builder.precision_assignment import assign_precisions
from kiln.builder.profiles import full_profiles, opt_dims, random_feeds
from kiln.builder.record import record
from kiln.builder.state import BuildState
from kiln.builder.walk import walk
from kiln.errors import InputError, KilnError
from kiln.executor import Executor
from kiln.passes.framework import PassContext, run_passes
from kiln.passes.rewriting import unique_node_names
from kiln.timing import median_ms


def build(
    model: ir.Model | onnx.ModelProto | str | os.PathLike[str],
    config: BuildConfig | None = None,
    *,
    calibration: Mapping[str, Any] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    name: str | None = None,
) -> BuiltPlan:
    """Build a plan (``kiln.build`` turns it into an ``Engine``). ``calibration``: representative inputs (name -> array)
    at the first profile's opt shapes, for every run of the model the build makes (shape recording, the precision walk,
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
        state = BuildState(model, config, name, calibration, progress)
        # cuDNN picks each convolution's algorithm by timing it (cached per shape), as the engine does.
        with torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False,
                                        allow_tf32=torch.backends.cudnn.allow_tf32):
            return _build(state)


def _build(state: BuildState) -> BuiltPlan:
    """The steps of the module docstring, in order, on one ``BuildState``."""
    start = time.perf_counter()
    graph, report = state.model.graph, state.report
    unique_node_names(state.model)  # layers, constraints and the engine refer to nodes by name
    _run_passes(state)
    state.executor = Executor(state.model, state.device, state.name)
    state.steps = state.executor.node_steps()
    state.profiles = full_profiles(state)
    inputs = sorted(v.name or "" for v in state.executor.inputs)
    unknown = sorted(set(state.calibration or {}) - set(inputs))
    if unknown:
        raise InputError(f"{state.name}: calibration input(s) {unknown} are not inputs of the model; its inputs are "
                         f"{inputs}")
    for index, profile in enumerate(state.profiles):
        feeds = random_feeds(state, {n: s[1] for n, s in profile.shapes.items()}, strict=index == 0)
        state.opt_feeds.append(feeds)
        state.facts.append(record(state, feeds))
    facts = state.facts[0]
    state.constants = {n: torch.as_tensor(v).to(state.device) if isinstance(v, np.ndarray) else v
                       for n, v in facts.constants.items()}
    layers = lower(graph, facts, state.opset)
    fused = sum(1 for layer in layers if layer.fused)
    before = sum(state.pass_report.ops_before.values())
    report.log(f"{state.name}: {before} nodes -> {len(list(graph))} after passes -> {len(layers)} layers "
               f"({fused} fused)")
    planned = assign_precisions(state, layers)
    for index, item in enumerate(planned):
        state.progress("tactics", index, len(planned))
        state.check_time(f"tactic selection for layer {item.layer.name!r} (op {item.layer.described_ops})")
        item.choices = select_all(state, index, item)
        prefer_faster_wide(state, index, item)
    state.progress("tactics", len(planned), len(planned))
    walk(state, planned)
    widened = sum(1 for item in planned if item.widened_for_speed)
    if widened:
        report.log(f"{widened} layer(s) run in {state.wide_precision()}: their tactics there were "
                   f"faster than in {'/'.join(state.config.low_precisions)} (see their notes)")
    check_outputs(state, planned)
    tensors, layer_records = prepare_weights(state, planned)
    plan = plan_json(state, planned, layer_records, tensors)
    graph_bytes = stripped_graph(state.model)
    try:
        state.cache.save()
    except KilnError as error:
        report.log(f"warning: {error}")
    report.seconds = time.perf_counter() - start
    report.cache_hits, report.cache_misses = state.cache.hits, state.cache.misses
    report.log(
        f"optimization level {state.level}: built in {report.seconds:.1f} s; {report.timed} candidates timed, "
        f"{state.cache.hits} timing-cache hits, {report.rejected} candidates rejected"
    )
    return BuiltPlan(plan, tensors, graph_bytes, state.config.device, report)


def _run_passes(state: BuildState) -> None:
    """The graph passes, before lowering: fusions into ai.kiln ops the layers lower one to one,
    and rewrites for the GPU. Measuring passes time their alternatives at the first profile's
    opt shapes on CUDA from level 1 on; level 0 times nothing and they decide by rule."""
    measure_both = None
    if state.device.type == "cuda" and state.level >= 1:
        def measure_both(a, b):
            return median_ms(a, state.device, state.reps), median_ms(b, state.device, state.reps)
    ctx = PassContext(precision=state.config.default_precision(), kiln_ops=True, device=state.device.type,
                      dims=opt_dims(state.model, state.config), measure=measure_both)
    report = run_passes(state.model, ctx, state.config.passes, state.config.skip_passes, build=True)
    state.pass_report = report
    done = {name: n for name, n in report.rewrites.items() if n}
    state.report.log("passes: " + (", ".join(f"{name} {n}" for name, n in done.items()) or "no rewrites"))
    state.report.lines.extend(f"  {line}" for line in report.log)
