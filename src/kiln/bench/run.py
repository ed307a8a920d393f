"""``kiln bench``: trtexec-grade measurement of a kiln engine, with its peers side by side.

Playbook rule: *batching* — larger batches raise throughput until the GPU is full, and linear growth
means it is not full yet. ``bench`` times the engine at each batch size of ``--batch`` (an ONNX model
is built with one optimization profile per batch size, so each is tuned for its own shape) along
each input's batch axis (``batch_axes``: ``--batch-axes state:1``, or by default the symbolic dim the
inputs share; ``kiln.bench.batching.batch_axes`` says which and why, in one note). Inputs that do not batch
(a sample rate, a fixed-size table) keep the shapes given or declared. It prints
latency percentiles, the H2D / compute / D2H split, throughput and peak memory, repeats every
measurement (``repeats``, 2) and prints how far the repeats disagree, and reads the sweep for the
batch where throughput stops growing with the batch (``kiln.bench.measure.saturation``).

Peers (``kiln.bench.peers``): PyTorch eager and ``torch.compile`` (the model rebuilt from the ONNX
file by kiln's reference executor, or a torch module given to ``run_bench``), and onnxruntime (CPU,
and its CUDA provider where installed), on the same inputs in the same process; each peer's outputs
are compared with kiln's, so a fast wrong result shows. Every target, kiln included, is also
compared with the reference: the ONNX file itself on kiln's reference executor (every node as
torch ops, the model's own precision, TF32 off, on the engine's device), once per batch size. When
kiln fp16 and eager fp16 disagree, the reference says which one lost the precision (a model whose
activations fall below fp16's range, say). Each comparison is judged per element,
``|out - other| <= atol + rtol * |other|``, at the tolerance ``kiln.precision`` gives each output's
dtype and the engine's loosest layer precision (``atol``/``rtol`` override it); rows carry the
verdicts (``diff_ok``, ``ref_ok``) beside the max relative differences. ``profile_layers`` adds the per-layer
profile of the engine (TensorRT's ``--dumpProfile``) at the largest batch.

Everything that is not GPU-only works on the CPU; GPU-only options (CUDA graphs, auxiliary
streams) are refused there with a clear message. Under a time limit (``kiln.deadline.time_limit``,
``kiln bench --timeout-s``) the whole benchmark stops at it, with ``RunStopped``: the build, the
reference runs, every measured iteration (its check is the engine's own, between layers or before
a CUDA-graph replay) and the peers.
"""


from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kiln.bench.batching import batch_axes, batch_shapes, batch_size, batched, feeds_at, shapes_with_inputs
from kiln.bench.measure import measure, measure_parallel, saturation, spread
from kiln.bench.options import BenchOptions, check_options
from kiln.bench.results import BenchResult, LayerTime, Row
from kiln.bench.targets import KilnTarget, Target
from kiln.deadline import RunStopped, time_limit
from kiln.errors import KilnError, first_line
from kiln.versions import versions

if TYPE_CHECKING:
    from kiln.engine import Engine

LAYER_PROFILE_RUNS = 20
LAYER_PROFILE_SECONDS = 2.0


def run_bench(model: str | os.PathLike[str] | Engine, options: BenchOptions, *, module: torch.nn.Module | None = None,
              progress: Callable[[str], None] | None = None, command: str = "") -> BenchResult:
    """Measure ``model`` (an .onnx file, built here; a .kiln engine file; or an ``Engine`` already
    built or loaded, whose ONNX file ``options.onnx`` names for the peers) and its peers; see the
    module docstring. ``module``: a torch module computing the same model, for the eager and compile
    peers. ``progress(message)`` is called as work advances. ``options.timeout_s`` bounds the
    benchmark once the model is loaded (see the module docstring)."""
    from kiln.engine import Engine

    say = progress or (lambda message: None)
    check_options(options)
    label = model.name if isinstance(model, Engine) else str(model)
    if isinstance(model, Engine):
        if options.build is not None:
            raise KilnError(f"{label}: an engine is already built; precision and build flags apply to .onnx models")
        source, onnx_path = model, options.onnx
    else:
        source, onnx_path = _load(Path(model), options)
    with time_limit(options.timeout_s):
        return _run_bench(model, source, onnx_path, label, options, module, say, command)


def _run_bench(model, source, onnx_path, label: str, options: BenchOptions, module, say, command: str) -> BenchResult:
    from kiln.engine import Engine
    from kiln.inputs import engine_input_values

    values = engine_input_values(source) if isinstance(source, Engine) else _model_inputs(source)
    axes, axes_note = batch_axes(values, options, label)
    options = replace(options, shapes=shapes_with_inputs(values, options, axes, label))
    engine = source if isinstance(source, Engine) else _build(source, Path(model), values, axes, options, say)
    device = engine.device
    if device.type != "cuda":
        for flag, on in (("--cuda-graph", options.cuda_graph), ("--aux-streams", bool(options.aux_streams))):
            if on:
                raise KilnError(f"{label}: {flag} needs a CUDA GPU; this engine runs on the CPU")
    batches: list[int | None] = [*options.batches] if options.batches else [None]
    feeds = {b: feeds_at(engine, options, b, axes, label) for b in batches}
    batch_of = {b: b if b is not None else batch_size(feeds[b], axes) for b in batches}
    result = BenchResult(model=label, device=device.type, gpu=_gpu_name(device), date=_now(), command=command,
                         versions=versions(), config=_config_json(options, axes, engine))
    if options.batches is not None:
        result.notes.append(axes_note)
    context_options = {"cuda_graph": options.cuda_graph, "aux_streams": options.aux_streams, "profile": options.profile}
    kiln_targets = [KilnTarget(engine, name="kiln", **context_options) for _ in range(options.contexts)]
    peers, unavailable = _peers(options, onnx_path, module, engine)
    what = f"{options.iterations} iterations" if options.iterations else f"{options.duration_s:g} s"
    result.notes.append(f"each measurement: {options.warmup_ms:g} ms warm-up, then {what}; repeated {options.repeats}x")
    for name, reason in unavailable:
        result.notes.append(f"{name}: not run: {reason}")
    for peer in peers:
        if note := getattr(peer, "note", None):
            result.notes.append(f"{peer.name}: {note}")
    timing: dict[str, Any] = {"warmup_ms": options.warmup_ms, "duration_s": options.duration_s,
                              "iterations": options.iterations}
    truths = (_reference_outputs(onnx_path, device, feeds, batch_of, result.notes, say) if options.reference
              else dict.fromkeys(batches))
    judge = _Judge(engine, options)
    result.notes.append(judge.note)
    for b in batches:
        batch = batch_of[b]
        truth = truths[b]
        say(f"kiln at batch {batch}: {options.contexts} context(s), {options.repeats} runs")
        for target in kiln_targets:
            target.setup(feeds[b])
        row = Row("kiln", batch)
        row.runs = [measure_parallel(kiln_targets, batch, **timing) for _ in range(options.repeats)]
        reference = kiln_targets[0].outputs()
        row.spread = spread(*row.runs[:2]) if len(row.runs) >= 2 else None
        row.ref_rel_diff, row.ref_ok = judge(reference, truth)
        result.rows.append(row)
        for peer in peers:
            say(f"{peer.name} at batch {batch}")
            row = _measure_peer(peer, feeds[b], batch, reference, truth, options, timing, judge)
            result.rows.append(row)
            compile_s = getattr(peer, "compile_s", None)  # torch.compile peers only
            if row.error is None and compile_s is not None:
                result.notes.append(f"{peer.name} at batch {batch}: compiled in {compile_s:.1f} s "
                                    f"({getattr(peer, 'graphs', None)} graph(s), "
                                    f"{getattr(peer, 'graph_breaks', None)} graph break(s))")
    kiln_points = [(r.batch, best.samples_per_s) for r in result.rows if r.target == "kiln"
                   and (best := r.best) is not None]
    if len(kiln_points) > 1:
        result.saturation = saturation(kiln_points)
    if options.profile_layers:
        largest = max(batches, key=lambda b: batch_of[b])
        say(f"per-layer profile at batch {batch_of[largest]}")
        result.layers = layer_profile(engine, feeds[largest], context_options)
        result.layer_batch = batch_of[largest]
    for each in [*kiln_targets, *peers]:
        each.close()
    return result


def _reference_outputs(onnx_path, device: torch.device, feeds: Mapping[Any, Mapping[str, np.ndarray]],
                       batch_of: Mapping[Any, int], notes: list[str], say: Callable[[str], None]) -> dict[Any, Any]:
    """What every target is compared with, per batch: the ONNX file on kiln's reference executor (the
    eager peer's executor path: every node as torch ops, the model's own precision, TF32 off) on the
    engine's device. Every batch is run before anything is measured and the executor is then freed,
    so its weights are not held while kiln and the peers run. A model it cannot run is a note, not a
    failure: the batches after it have no reference (None)."""
    from kiln.bench.peers import EagerTarget

    truths: dict[Any, Any] = dict.fromkeys(feeds)
    if onnx_path is None:
        notes.append("vs ref: no reference (an engine without its ONNX file; give it with --onnx)")
        return truths
    notes.append(f"vs ref: max |out - ref| / max |ref|, ref = the ONNX file on kiln's reference executor "
                 f"(unoptimized, the model's own precision, TF32 off) on {device.type}")
    reference = None
    try:
        reference = EagerTarget(onnx_path=onnx_path, device=device, name="reference")
        for b, batch_feeds in feeds.items():
            say(f"reference at batch {batch_of[b]}")
            reference.setup(batch_feeds)  # runs the model once
            reference.d2h()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            truths[b] = reference.outputs()
    except RunStopped:
        raise
    except Exception as error:  # noqa: BLE001 - no reference is a note: the timings stand without it
        notes.append(f"vs ref: the reference executor could not run this model: {type(error).__name__}: "
                     f"{first_line(error)}")
    finally:
        if reference is not None:
            reference.close()
        reference = None
        if device.type == "cuda":
            torch.cuda.empty_cache()  # its weights and activations go back before anything is measured
    return truths


class _Judge:
    """Outputs against other outputs (``kiln.compare``), per element at the tolerance of each output's
    dtype and the engine's loosest layer precision, ``atol``/``rtol`` overriding the table."""

    def __init__(self, engine, options: BenchOptions) -> None:
        from kiln.precision import engine_precision, output_tolerance

        self.computed_in, self.atol, self.rtol = engine_precision(engine), options.atol, options.rtol
        shown = output_tolerance("float32", self.computed_in, self.atol, self.rtol)
        self.note = (f"verdicts per element, |out - other| <= atol + rtol * |other|: float outputs at {shown} "
                     f"(the engine's {self.computed_in}; --atol/--rtol override), other dtypes exactly")

    def __call__(self, got: Mapping[str, Any],
                 truth: Mapping[str, np.ndarray] | None) -> tuple[float | None, bool | None]:
        """(the largest max|got - truth| / max|truth| over the outputs, whether every element is within
        tolerance); (None, None) without a truth."""
        from kiln.compare import compare_outputs

        if truth is None:
            return None, None
        shared = {name: ref for name, ref in truth.items() if name in got}
        diffs = compare_outputs(got, shared, computed_in=self.computed_in, atol=self.atol, rtol=self.rtol)
        if not diffs:
            return None, None
        return max(d.max_rel for d in diffs), all(d.ok for d in diffs)


def _load(path: Path, options: BenchOptions):
    """A .kiln file's engine and the ONNX file for the peers (``options.onnx``), or an ONNX file's
    model (built once its profiles are known) and the file itself."""
    from kiln.engine import load_engine
    from kiln.onnx_io import load_model

    if path.suffix == ".kiln":
        if options.build is not None:
            raise KilnError(f"{path}: an engine is already built; precision and build flags apply to .onnx models")
        return load_engine(path), options.onnx
    from kiln.builder import BuildConfig

    model = load_model(path)
    if (options.build or BuildConfig()).device == "cuda" and not torch.cuda.is_available():
        raise KilnError(f"{path}: torch sees no CUDA GPU here; benchmark on the CPU with --device cpu")
    return model, path


def _model_inputs(model) -> list:
    return [v for v in model.graph.inputs if not v.is_initializer()]


def _build(model, path: Path, values, axes: Mapping[str, int], options: BenchOptions, say: Callable[[str], None]):
    """The engine for an ONNX model: one optimization profile per batch size (min = opt = max). The
    ``inputs`` arrays are its calibration data too, so that the build runs the model on them (a
    sample rate the model branches on, say) rather than on random values."""
    from kiln import BuildConfig, Profile, build
    from kiln.inputs import concrete_shape

    config = options.build or BuildConfig()
    batches: list[int | None] = [*options.batches] if options.batches else [None]
    profiles = []
    for b in batches:
        shapes = {v.name: tuple(concrete_shape(v, batch_shapes(values, options.shapes, b, axes, str(path)), str(path)))
                  for v in values}
        profiles.append(Profile.from_lists(shapes, shapes, shapes))
    # the builder runs the model at every profile's opt shape on the same calibration arrays: one that
    # batches takes part only when there is one batch size (else the builder makes random ones for it)
    calibration = {name: batched(array, axes.get(name), batches[0]) for name, array in options.inputs.items()
                   if len(batches) == 1 or name not in axes}
    say(f"building {path.name} ({', '.join(p for p in ('fp16', 'bf16', 'tf32') if getattr(config, p)) or 'fp32'}, "
        f"{len(profiles)} profile(s), optimization level {config.opt_level})")
    return build(model, replace(config, profiles=profiles), calibration=calibration or None, name=str(path))


def _peers(options: BenchOptions, onnx_path, module, engine) -> tuple[list[Target], list[tuple[str, str]]]:
    if not options.peers:
        return [], []
    from kiln.bench.peers import make_peers

    dtype = None
    build = options.build
    if module is not None and build is not None and (build.fp16 or build.bf16):
        dtype = torch.float16 if build.fp16 else torch.bfloat16
    return make_peers(options.peers, onnx_path=onnx_path, module=module, device=engine.device, dtype=dtype,
                      output_names=[o["name"] for o in engine.outputs])


def _measure_peer(peer: Target, feeds, batch: int, reference: Mapping[str, np.ndarray],
                  truth: Mapping[str, np.ndarray] | None, options: BenchOptions, timing: Mapping[str, Any],
                  judge: _Judge) -> Row:
    row = Row(peer.name, batch)
    try:
        peer.setup(feeds)
        row.runs = [measure(peer, batch, **timing) for _ in range(options.repeats)]
        got = peer.outputs()
    except RunStopped:
        raise
    except KilnError as error:
        row.error = str(error)
        return row
    except Exception as error:  # noqa: BLE001 - a peer failing is a finding, not a crash of the benchmark
        row.error = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
        return row
    row.spread = spread(*row.runs[:2]) if len(row.runs) >= 2 else None
    row.max_rel_diff, row.diff_ok = judge(got, reference)
    row.ref_rel_diff, row.ref_ok = judge(got, truth)
    return row


def layer_profile(engine, feeds: Mapping[str, np.ndarray], context_options: Mapping[str, Any]) -> list[LayerTime]:
    """Mean time per engine layer over several eager runs (CUDA events per layer on a GPU), with
    each layer's tactic and precision, slowest first."""
    context = engine.create_context(**{k: v for k, v in context_options.items() if k != "cuda_graph"})
    context.run(feeds)  # the first run at a shape also computes the shape arithmetic
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}

    def record(layer: str, ms: float) -> None:
        totals[layer] = totals.get(layer, 0.0) + ms
        counts[layer] = counts.get(layer, 0) + 1

    context.profiler = record
    start = time.perf_counter()
    runs = 0
    while runs < 3 or (runs < LAYER_PROFILE_RUNS and time.perf_counter() - start < LAYER_PROFILE_SECONDS):
        context.run(feeds)
        runs += 1
    context.profiler = None
    rows = {row["name"]: row for row in engine.describe()}
    mean = {name: totals[name] / counts[name] for name in totals}
    total = sum(mean.values())
    layers = [LayerTime(index=rows[name]["index"], name=name, kind=rows[name]["kind"], nodes=rows[name]["nodes"],
                        tactic=rows[name]["tactic"], precision=rows[name]["precision"], ms=ms,
                        share=ms / total if total > 0 else 0.0) for name, ms in mean.items()]
    return sorted(layers, key=lambda layer: -layer.ms)


def _gpu_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _config_json(options: BenchOptions, axes: Mapping[str, int], engine) -> dict[str, Any]:
    build = options.build.to_json() if options.build is not None else None
    return {"batches": options.batches, "batch_axes": dict(axes),
            "shapes": {k: list(v) for k, v in options.shapes.items()},
            "warmup_ms": options.warmup_ms, "duration_s": options.duration_s if options.iterations is None else None,
            "iterations": options.iterations, "repeats": options.repeats, "peers": list(options.peers),
            "cuda_graph": options.cuda_graph, "contexts": options.contexts, "aux_streams": options.aux_streams,
            "profile": options.profile, "build": build, "engine_summary": engine.summary(),
            "tolerance": {"atol": options.atol, "rtol": options.rtol}}
