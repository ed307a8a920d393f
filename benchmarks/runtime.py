"""Benchmark kiln's runtime on ResNet-50 and BERT-base: execution contexts, CUDA graphs, streams, profiles.

Models, export and inputs come from ``benchmarks.models`` (random weights, TorchScript export at
opset 17 with a dynamic batch axis), timing from ``benchmarks.timing``. Each model is built once as an
fp16 engine (level 3, two profiles: batch 1; batch 2..LARGE tuned at MID, MID 32 for ResNet-50 and 16
for BERT at sequence 128) and measured side by side in this one process, stage by stage over the models:

1. batch-1 latency, ms per call: kiln contexts without CUDA graphs, with them, and with them on
   bound buffers (``bind`` + ``execute``); the torch module in fp16 eager; ``torch.compile`` in
   mode ``reduce-overhead`` (its CUDA graphs) and in the default mode (last, when time is left).
   Each is timed twice with ``benchmarks.timing.time_calls``: waiting for every call (``run``,
   ``execute``, eager + stream sync) and queued back to back (``run_async``, ``execute_async``);
2. throughput at MID with 1, 2 and 4 contexts (CUDA graphs), each on its own stream: one Python
   thread per context calling ``run``, ``run_async`` (on the thread's current stream, or on the
   context's), ``execute_async``, and one thread round-robining ``run_async``; samples/s from the
   wall time of a fixed number of calls (median of 3), a device sync at the end;
3. the cost of a new batch size in a warm context (first call, second, steady) and of
   ``set_profile`` (then the first call under the new profile), with and without CUDA graphs, and
   the way to hide both: a second context pre-warmed for that shape or profile (host wall time,
   synchronized);
4. for BERT, an engine built with ``max_aux_streams=2`` run with ``aux_streams=0`` and ``2``.

Every kiln output is checked against onnxruntime fp32 (CPU): max|kiln - ort| / max|ort| <= 1e-2;
multi-context and aux-stream outputs against the single-context ones (identical or max abs diff).

    PYTHONPATH=src python3 -m benchmarks.runtime --out OUT [--models resnet50,bert] [--budget-s 400]
    .venv/bin/python -m benchmarks.runtime --smoke --out /tmp/br_smoke      # tiny models on CPU

It writes OUT/bench_runtime.json and OUT/bench_runtime.md after each stage, so a killed run still
leaves what it measured; stages that the budget no longer covers are skipped with a note. On the CPU
(``--smoke``) the CUDA-graph, stream and reduce-overhead rows are skipped and timing is shortened.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import shutil
import statistics
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks import timing
from benchmarks.building import timed_build
from benchmarks.checks import compare_with_ort, same_outputs
from benchmarks.models import FULL_MODELS, SMOKE_MODELS, export_onnx, make_feeds, to_torch
from benchmarks.run_info import command_line, gpu_info, log, versions
from kiln.precision import TOLERANCES

MID = {"resnet50": 32, "bert": 16}
AUX_MODELS = {"bert", "tiny_encoder"}
CONTEXTS = (1, 2, 4)
THROUGHPUT_REPS, THROUGHPUT_REP_S = 3, 0.4
# least time left (s) to start a stage for one model
RESERVE = {"build": 60, "latency": 25, "throughput": 30, "shape_change": 15, "compile_reduce_overhead": 100,
           "aux_streams": 35, "compile_default": 100}
LATENCY_ROWS = ["kiln, no CUDA graph", "kiln, CUDA graph", "kiln, CUDA graph + bound buffers", "torch eager"]


@dataclasses.dataclass
class Live:
    """What the stages of one model share: spec, device, ONNX file, engine, eager module, inputs."""

    spec: Any
    device: torch.device
    mid: int
    path: Path
    engine: Any = None
    eager: Any = None
    config: Any = None
    feeds_cache: dict = dataclasses.field(default_factory=dict)
    refs: dict = dataclasses.field(default_factory=dict)

    def feeds(self, batch: int) -> dict[str, torch.Tensor]:
        if batch not in self.feeds_cache:
            self.feeds_cache[batch] = to_torch(make_feeds(self.spec, batch, seed=100 + batch), self.device)
        return self.feeds_cache[batch]

    def eager_args(self, batch: int) -> list[torch.Tensor]:
        dtype = next(p.dtype for p in self.eager.parameters())
        return [t.to(dtype) if t.is_floating_point() else t for t in self.feeds(batch).values()]

    def ort(self, batch: int) -> dict[str, Any]:
        from kiln.compare import run_onnxruntime

        if batch not in self.refs:
            self.refs[batch] = run_onnxruntime(self.path, make_feeds(self.spec, batch, seed=100 + batch))
        return self.refs[batch]

    def on_cuda(self) -> bool:
        return self.device.type == "cuda"


def failure(error: BaseException) -> dict[str, str]:
    return {"error": f"{type(error).__name__}: {str(error)[:1000]}", "traceback": traceback.format_exc()[-4000:]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def wall_ms(fn, device: torch.device) -> float:
    """Host wall time of one call, the device synchronized before and after."""
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def steady_ms(fn, device: torch.device, calls: int = 5) -> float:
    return statistics.median(wall_ms(fn, device) for _ in range(calls))


def versus(outputs: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """outputs against another run's: identical, and the max abs difference."""
    return same_outputs({k: v.detach().float() for k, v in outputs.items()},
                        {k: v.detach().float() for k, v in reference.items()})


def as_outputs(live: Live, value: Any) -> dict[str, Any]:
    values = [value] if isinstance(value, torch.Tensor) else list(value)
    return dict(zip(live.spec.outputs, values))


def context_info(ctx) -> dict[str, Any]:
    return {"stats": dataclasses.asdict(ctx.stats), "graph_errors": list(ctx.graph_errors)}


# -- stages ------------------------------------------------------------------------------------

def stage_build(live: Live, args, state: dict[str, Any]) -> None:
    import kiln

    spec, t0 = live.spec, time.perf_counter()
    module = spec.make()
    live.path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(spec, module, live.path)
    state["export_s"] = time.perf_counter() - t0
    shapes = lambda b: {name: [b, *shape] for name, (shape, _) in spec.inputs.items()}  # noqa: E731
    profiles = [kiln.Profile.from_lists(opt_shapes=shapes(1)),
                kiln.Profile.from_lists(min_shapes=shapes(2), opt_shapes=shapes(live.mid),
                                        max_shapes=shapes(spec.large))]
    cache = Path(args.out) / f"timing_runtime_{spec.name}.cache"
    cache.unlink(missing_ok=True)
    live.config = kiln.BuildConfig(fp16=True, device=live.device.type, opt_level=1 if args.smoke else 3,
                                   timing_cache=str(cache), profiles=profiles)
    live.engine, state["build_s"] = timed_build(live.path, live.config, f"{spec.name} build")
    state.update(summary=live.engine.summary(), weights_bytes=live.engine.weights_bytes,
                 build_config={**live.config.to_json(), "device": live.config.device})
    live.eager = copy.deepcopy(module).to(live.device, torch.float32 if args.smoke else torch.float16).eval()
    state["eager_dtype"] = str(next(live.eager.parameters()).dtype)
    log(f"{spec.name}: built in {state['build_s']:.1f} s; weights {live.engine.weights_bytes / 2**20:.1f} MiB")


def time_row(live: Live, row: dict[str, Any], first, wait, queued) -> None:
    """``first()`` once (checked against onnxruntime), then ``wait`` and ``queued`` timed, then checked again."""
    dev = live.device
    with torch.inference_mode():
        row["vs_ort_first_call"] = compare_with_ort(first(), live.ort(1), live.engine)
    row["wait"] = timing.time_calls(wait, dev)
    row["queued"] = (timing.time_calls(queued, dev) if live.on_cuda()
                     else {"skipped": "CPU: no streams, queued = waiting"})
    with torch.inference_mode():
        row["vs_ort"] = compare_with_ort(wait(), live.ort(1), live.engine)


def stage_latency(live: Live, args, state: dict[str, Any]) -> None:
    rows = state.setdefault("latency_b1", {})
    engine, feeds, on_cuda = live.engine, live.feeds(1), live.on_cuda()
    for label in LATENCY_ROWS:
        row = rows.setdefault(label, {})
        if "CUDA graph" in label and "no CUDA" not in label and not on_cuda:
            row["skipped"] = "CPU: no CUDA graphs"
            continue
        try:
            if label.startswith("kiln"):
                ctx = engine.create_context(cuda_graph="no CUDA" not in label)
                if "bound" in label:
                    outs = {k: torch.empty(v.shape, dtype=v.dtype, device=v.device) for k, v in ctx.run(feeds).items()}
                    ctx = engine.create_context(cuda_graph=True)  # a fresh one: its first call is execute()
                    ctx.bind(feeds, outs)
                    time_row(live, row, ctx.execute, ctx.execute, ctx.execute_async)
                else:
                    time_row(live, row,
                             lambda c=ctx: c.run(feeds), lambda c=ctx: c.run(feeds), lambda c=ctx: c.run_async(feeds))
                row.update(context_info(ctx))
            else:
                eager_call(live, row, live.eager)
            log(f"{live.spec.name}: b1 {label}: {fmt_cell(row.get('wait'))} ms waiting, {fmt_cell(row.get('queued'))} "
                "queued")
        except Exception as error:  # noqa: BLE001 - one failing row is a row, not a crash
            row.update(failure(error))
            log(f"{live.spec.name}: b1 {label} FAILED {row['error'][:300]}")


def eager_call(live: Live, row: dict[str, Any], module) -> None:
    a = live.eager_args(1)

    def wait():
        out = module(*a)
        if live.on_cuda():
            torch.cuda.current_stream().synchronize()
        return as_outputs(live, out)

    time_row(live, row, wait, wait, lambda: module(*a))


def stage_compile(live: Live, args, state: dict[str, Any], mode: str) -> None:
    row = state.setdefault("latency_b1", {}).setdefault(f"torch.compile {mode}", {})
    if mode == "reduce-overhead" and not live.on_cuda():
        row["skipped"] = "CPU: no CUDA graphs"
        return
    try:
        compiled = torch.compile(copy.deepcopy(live.eager), mode=mode, dynamic=False)
        t0 = time.perf_counter()
        with torch.inference_mode(), (torch.cuda.stream(timing.side_stream()) if live.on_cuda()
                                      else contextlib.nullcontext()):
            for _ in range(3):
                compiled(*live.eager_args(1))
        sync(live.device)
        row["warmup_s"] = time.perf_counter() - t0
        log(f"{live.spec.name}: torch.compile {mode} warm-up {row['warmup_s']:.1f} s")
        eager_call(live, row, compiled)
        log(f"{live.spec.name}: b1 torch.compile {mode}: {fmt_cell(row['wait'])} ms waiting, {fmt_cell(row['queued'])} "
            "queued")
    except Exception as error:  # noqa: BLE001 - torch.compile failing is a result, not a crash
        row.update(failure(error))
        log(f"{live.spec.name}: torch.compile {mode} FAILED {row['error'][:300]}")


def drive(n: int, call, calls_each: int, threads: bool, device: torch.device) -> tuple[float, list[Any]]:
    """n contexts, ``calls_each`` calls each (``call(i)`` is one call on context i), from one thread per
    context or one thread round-robining; wall seconds to the device sync after the last call."""
    last: list[Any] = [None] * n
    errors: list[BaseException] = []

    def loop(indices) -> None:
        try:
            with torch.inference_mode():
                for _ in range(calls_each):
                    for i in indices:
                        last[i] = call(i)
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            errors.append(error)

    sync(device)
    if threads:
        barrier = threading.Barrier(n + 1)
        workers = [threading.Thread(target=lambda i=i: (barrier.wait(), loop([i]))) for i in range(n)]
        for w in workers:
            w.start()
        barrier.wait()
        t0 = time.perf_counter()
        for w in workers:
            w.join()
    else:
        t0 = time.perf_counter()
        loop(range(n))
    sync(device)
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return seconds, last


def stage_throughput(live: Live, args, state: dict[str, Any]) -> None:
    b, dev, on_cuda = live.mid, live.device, live.on_cuda()
    out = state.setdefault("throughput", {"batch": b})
    memory = (torch.cuda.memory_allocated(), torch.cuda.memory_reserved()) if on_cuda else None
    ctxs = [live.engine.create_context(cuda_graph=on_cuda) for _ in range(max(CONTEXTS))]
    feeds = [{k: v.clone() for k, v in live.feeds(b).items()} for _ in ctxs]
    with torch.inference_mode():
        first = {k: v.clone() for k, v in ctxs[0].run(feeds[0]).items()}  # the eager first run
    for ctx, f in zip(ctxs, feeds):
        ctx.bind(f, {k: torch.empty(v.shape, dtype=v.dtype, device=v.device) for k, v in first.items()})
        for _ in range(3):
            wall_ms(lambda c=ctx, f=f: (c.run(f), c.run_async(f, stream=c.stream if on_cuda else None),
                                        c.execute()), dev)
    if on_cuda:  # each context: its graphs' pool (reserved), their outputs and its bound buffers (allocated)
        out["mib_per_context"] = {"allocated": (torch.cuda.memory_allocated() - memory[0]) / 2**20 / len(ctxs),
                                  "reserved": (torch.cuda.memory_reserved() - memory[1]) / 2**20 / len(ctxs)}
    with torch.inference_mode():
        reference = {k: v.clone() for k, v in ctxs[0].run(feeds[0]).items()}  # one context, warm (a replay)
    out["first_call_vs_warm"] = versus(first, reference)
    single = steady_ms(lambda: ctxs[0].run(feeds[0]), dev)
    total = max(8, min(4000, round(THROUGHPUT_REP_S * 1e3 / max(single, 1e-3))))
    total += -total % 4
    out.update(single_call_ms=single, calls_per_repetition=total,
               reference_vs_ort=compare_with_ort(reference, live.ort(b), live.engine))
    calls = {"run": lambda i: ctxs[i].run(feeds[i]),
             "run_async (caller's stream)": lambda i: ctxs[i].run_async(feeds[i]),
             "run_async (context's stream)": lambda i: ctxs[i].run_async(feeds[i], stream=ctxs[i].stream),
             "execute_async (bound)": lambda i: ctxs[i].execute_async(ctxs[i].stream)}
    modes = [("threads", name) for name in calls] + [("round-robin", "run_async (context's stream)")]
    if not on_cuda:  # no streams: run_async is run
        calls = {"run": calls["run"]}
        modes = [("threads", "run"), ("round-robin", "run")]
    rows = out.setdefault("rows", [])
    for driver, api in modes:
        for n in CONTEXTS:
            row: dict[str, Any] = {"driver": driver, "call": api, "contexts": n}
            rows.append(row)
            try:
                drive(n, calls[api], 2, driver == "threads", dev)  # warm the threads and allocator
                reps = [drive(n, calls[api], total // n, driver == "threads", dev) for _ in range(THROUGHPUT_REPS)]
                rates = [total // n * n * b / s for s, _ in reps]
                row.update(samples_per_s=statistics.median(rates), repetitions=rates)
                last = reps[-1][1]
                checks = [versus(o, reference) for o in last]
                row["identical_to_single"] = all(c["identical"] for c in checks)
                row["max_abs_vs_single"] = max(v["max_abs_diff"] for c in checks for v in c["outputs"].values())
                vs_ort = [compare_with_ort(o, live.ort(b), live.engine) for o in last]
                row["max_rel_vs_ort"] = max(c["max_rel"] for c in vs_ort)
                row["ok_vs_ort"] = all(c["ok"] for c in vs_ort)
                log(f"{live.spec.name}: {driver} {api} x{n}: {row['samples_per_s']:.0f} samples/s")
            except Exception as error:  # noqa: BLE001
                row.update(failure(error))
                log(f"{live.spec.name}: {driver} {api} x{n} FAILED {row['error'][:300]}")
    out["contexts_info"] = [context_info(c) for c in ctxs]


def stage_shape_change(live: Live, args, state: dict[str, Any]) -> None:
    b = live.mid
    new = sorted({max(2, min(live.spec.large, x)) for x in (b // 2, 3 * b // 4, 3 * b // 2)} - {b})
    out = state.setdefault("shape_change", {"mid": b, "new_batches": new})
    for n in (1, b, *new):
        live.feeds(n)  # made before anything is timed
    for graphs in (False, True) if live.on_cuda() else (False,):
        out["cuda_graph" if graphs else "no_graph"] = shape_costs(live, graphs, b, new)


def shape_costs(live: Live, graphs: bool, b: int, new: list[int]) -> dict[str, Any]:
    """Host wall ms of the calls around a new batch size and a profile switch, in one context each,
    and of the same call in a second context warmed for that shape or profile beforehand."""
    engine, dev, ev = live.engine, live.device, {}
    call = lambda c, n: wall_ms(lambda: c.run(live.feeds(n)), dev)  # noqa: E731
    steady = lambda c, n: steady_ms(lambda: c.run(live.feeds(n)), dev)  # noqa: E731
    ctx = engine.create_context(cuda_graph=graphs)
    for _ in range(3):
        call(ctx, b)
    ev[f"batch {b}: steady"] = steady(ctx, b)
    for n in new:
        ev[f"batch {n}: first call (new shape)"] = call(ctx, n)
        ev[f"batch {n}: second call"] = call(ctx, n)
        ev[f"batch {n}: steady"] = steady(ctx, n)
    other = engine.create_context(cuda_graph=graphs)
    call(other, new[0]), call(other, new[0])
    ev[f"batch {new[0]}: one call in a second context warmed at it"] = call(other, new[0])
    p = engine.create_context(profile=1, cuda_graph=graphs)
    for _ in range(3):
        call(p, b)
    ev["set_profile(0) itself"] = wall_ms(lambda: p.set_profile(0), dev)
    ev["batch 1: first call after set_profile(0)"] = call(p, 1)
    ev["batch 1: second call"] = call(p, 1)
    ev["batch 1: steady"] = steady(p, 1)
    ev[f"set_profile(1) + call at batch {b} (warmed before)"] = wall_ms(
        lambda: (p.set_profile(1), p.run(live.feeds(b))), dev)
    q = engine.create_context(profile=0, cuda_graph=graphs)
    call(q, 1), call(q, 1)
    ev["batch 1: one call in a second context warmed on profile 0"] = call(q, 1)
    log(f"{live.spec.name}: cuda graph {graphs}: first call at b{new[0]} "
        f"{ev[f'batch {new[0]}: first call (new shape)']:.2f} ms "
        f"(steady {ev[f'batch {new[0]}: steady']:.2f}); first call after set_profile "
        f"{ev['batch 1: first call after set_profile(0)']:.2f} ms (steady {ev['batch 1: steady']:.2f})")
    return {"events_ms": ev, "contexts": {"shape": context_info(ctx), "profile": context_info(p)}}


def stage_aux_streams(live: Live, args, state: dict[str, Any]) -> None:
    if live.spec.name not in AUX_MODELS:
        return
    out, dev = state.setdefault("aux_streams", {}), live.device
    config = dataclasses.replace(live.config, max_aux_streams=2)
    engine, out["build_s"] = timed_build(live.path, config, f"{live.spec.name} build, max_aux_streams=2")
    out.update(plan_aux_streams=engine.aux_streams,
               layers_on_aux=sum(1 for layer in engine.plan["layers"] if layer.get("stream", 0)))
    if not live.on_cuda():
        out["note"] = "CPU: contexts have no streams; both columns run one stream"
    rows = out.setdefault("rows", [])
    for graphs in (False, True) if live.on_cuda() else (False,):
        ctxs = {k: engine.create_context(cuda_graph=graphs, aux_streams=k) for k in (0, 2)}
        for b in (1, live.mid):
            row: dict[str, Any] = {"cuda_graph": graphs, "batch": b}
            rows.append(row)
            f = live.feeds(b)
            for k, ctx in ctxs.items():
                for _ in range(2):
                    wall_ms(lambda c=ctx, f=f: c.run(f), dev)
                row[f"aux{k}_wait"] = timing.time_calls(lambda c=ctx, f=f: c.run(f), dev)["ms"]
                if live.on_cuda():
                    row[f"aux{k}_queued"] = timing.time_calls(lambda c=ctx, f=f: c.run_async(f), dev)["ms"]
            with torch.inference_mode():
                got = {k: c.run(f) for k, c in ctxs.items()}
            row["identical"] = versus(got[2], got[0])["identical"]
            row["max_abs_diff"] = max(v["max_abs_diff"] for v in versus(got[2], got[0])["outputs"].values())
            vs_ort = compare_with_ort(got[2], live.ort(b), live.engine)
            row["max_rel_vs_ort"], row["ok_vs_ort"] = vs_ort["max_rel"], vs_ort["ok"]
            log(f"{live.spec.name}: aux streams, graph {graphs}, b{b}: 0 -> {row['aux0_wait']:.3f} ms, "
                   f"2 -> {row['aux2_wait']:.3f} ms; identical {row['identical']}")
        out.setdefault("contexts", {})["cuda_graph" if graphs else "no_graph"] = {k: context_info(c)
                                                                                  for k, c in ctxs.items()}


STAGES = [("build", stage_build), ("latency", stage_latency), ("throughput", stage_throughput),
          ("shape_change", stage_shape_change),
          ("compile_reduce_overhead", lambda live, args, state: stage_compile(live, args, state, "reduce-overhead")),
          ("aux_streams", stage_aux_streams),
          ("compile_default", lambda live, args, state: stage_compile(live, args, state, "default"))]


# -- report ------------------------------------------------------------------------------------

def fmt_cell(cell: Any, spec: str = ".3f") -> str:
    if isinstance(cell, dict):
        return format(cell["ms"], spec) if "ms" in cell else ("skipped" if "skipped" in cell else "failed")
    return "-" if cell is None else format(cell, spec) if isinstance(cell, float) else str(cell)


def ratio(a: Any, b: Any) -> str:
    a, b = (x.get("ms") if isinstance(x, dict) else x for x in (a, b))
    return f"{a / b:.2f}x" if a and b else "-"


def table(header: list[str], rows: list[list[Any]], align: str) -> list[str]:
    """A markdown table; ``align`` has an "l" or "r" per column."""
    cells = [[fmt_cell(c).replace("|", "/") for c in row] for row in rows]
    rule = "|" + "".join("---|" if a == "l" else "---:|" for a in align)
    return [f"| {' | '.join(header)} |", rule, *(f"| {' | '.join(r)} |" for r in cells), ""]


def markdown(results: dict[str, Any]) -> str:
    meta, v = results["meta"], results["meta"]["versions"]
    lines = [f"# kiln runtime benchmark ({meta['date']})", "",
             f"Device: {meta['gpu']['name'] or 'CPU (smoke)'}; torch {v['torch']} (CUDA {v['cuda']}), triton "
             f"{v['triton']}, onnx {v['onnx']}, onnxruntime {v['onnxruntime']}, transformers {v['transformers']}, "
             f"torchvision {v['torchvision']}, kiln {v['kiln']}, Python {v['python']}.", "",
             f"Command: `{meta['command']}`", "",
             "One fp16 engine per model (two profiles: batch 1; 2..LARGE tuned at MID); eager and torch.compile run "
             f"the torch module in {'fp32 (smoke, CPU)' if meta['smoke'] else 'fp16'}; inputs already on the device. "
             "'waiting': each call waits for its outputs (run, execute, eager + stream sync); 'queued': calls back to "
             "back without a host sync (run_async, execute_async, eager). ms per call, median of "
             f"{meta['timing']['repetitions']} repetitions (benchmarks.timing.time_calls). 'ro / this' above 1: this "
             "row is faster than torch.compile reduce-overhead. "
             "'rel vs ort': max|kiln - ort| / max|ort| against onnxruntime fp32 on the CPU.", ""]
    for name, s in results["models"].items():
        lines += [f"## {name}", ""]
        if "build_s" in s:
            lines += [f"Built in {s['build_s']:.1f} s; weights {s['weights_bytes'] / 2**20:.1f} MiB, shared by every "
                      "context.", ""]
        if lat := s.get("latency_b1"):
            ro = lat.get("torch.compile reduce-overhead", {})
            rows = [[label, r.get("wait"), r.get("queued"), ratio(ro.get("wait"), r.get("wait")),
                     ratio(ro.get("queued"), r.get("queued")),
                     fmt_cell(r.get("vs_ort", {}).get("max_rel"), ".1e"),
                     "{captures} / {replays}".format(**r["stats"]) if "stats" in r else "-",
                     r.get("skipped") or r.get("error", "")[:80]
                     or (f"warm-up {r['warmup_s']:.1f} s" if "warmup_s" in r else "")
                     + ("graph errors: " + "; ".join(r.get("graph_errors", []))[:150] if r.get("graph_errors") else "")]
                    for label, r in lat.items()]
            lines += ["### Batch-1 latency", "", *table(["mode", "ms waiting", "ms queued", "ro / this, waiting",
                                                          "ro / this, queued", "rel vs ort",
                                                          "graphs captured / replayed", "note"], rows, "lrrrrrll")]
        if (tp := s.get("throughput", {})).get("rows"):
            one = {(r["driver"], r["call"]): r.get("samples_per_s") for r in tp["rows"] if r["contexts"] == 1}
            rows = [[r["driver"], r["call"], r["contexts"], fmt_cell(r.get("samples_per_s"), ".0f"),
                     ratio(r.get("samples_per_s"), one.get((r["driver"], r["call"]))),
                     r.get("identical_to_single", r.get("error", "-")[:80]),
                     fmt_cell(r.get("max_abs_vs_single"), ".1e"),
                     fmt_cell(r.get("max_rel_vs_ort"), ".1e")] for r in tp["rows"]]
            lines += [f"### Throughput at batch {tp['batch']} ({tp['calls_per_repetition']} calls over all contexts, "
                      f"median of {THROUGHPUT_REPS} runs; CUDA graphs where there is a GPU)", "",
                      *table(["driver", "call", "contexts", "samples/s", "vs 1 context", "identical to 1 context",
                              "max abs diff", "rel vs ort"], rows, "llrrrlrr")]
            if "mib_per_context" in tp:
                lines += ["Device memory per warm context (its CUDA graphs, their outputs, its bound buffers): "
                          "{allocated:.1f} MiB allocated, {reserved:.1f} MiB reserved.".format(**tp["mib_per_context"]),
                          ""]
            if "first_call_vs_warm" in tp:
                lines += ["A context's first call (eager) identical to its warm calls: "
                          f"{tp['first_call_vs_warm']['identical']}.", ""]
        if sc := {k: s.get("shape_change", {}).get(k) for k in ("no_graph", "cuda_graph")
                  if k in s.get("shape_change", {})}:
            labels = list(dict.fromkeys(e for c in sc.values() for e in c["events_ms"]))
            lines += ["### New batch size and profile switch (host wall ms, device synchronized)", "",
                      *table(["call", *(k.replace("_", " ") for k in sc)],
                             [[e, *(c["events_ms"].get(e) for c in sc.values())] for e in labels],
                             "l" + "r" * len(sc))]
        if (aux := s.get("aux_streams", {})).get("rows"):
            lines += ["### Auxiliary streams (an engine built with max_aux_streams=2: the plan uses "
                      f"{aux['plan_aux_streams']}, {aux['layers_on_aux']} layers on them)", "",
                      *([aux["note"], ""] if "note" in aux else []),
                      *table(["CUDA graph", "batch", "aux 0 ms waiting", "aux 2 ms waiting", "aux 0 ms queued",
                              "aux 2 ms queued", "identical", "max abs diff", "rel vs ort"],
                             [[r["cuda_graph"], r["batch"], r.get("aux0_wait"), r.get("aux2_wait"),
                               r.get("aux0_queued"), r.get("aux2_queued"), r.get("identical"),
                               fmt_cell(r.get("max_abs_diff"), ".1e"),
                               fmt_cell(r.get("max_rel_vs_ort"), ".1e")] for r in aux["rows"]], "lrrrrrlrr")]
        lines += [f"- {stage}: skipped ({why})" for stage, why in s.get("skipped", {}).items()]
        lines += [f"- {stage}: FAILED {why.splitlines()[0][:200]}" for stage, why in s.get("errors", {}).items()]
        lines.append("")
    lines.append("Tolerance: each engine against onnxruntime fp32, per element, at kiln.precision's tolerance of its "
                 "loosest precision.")
    return "\n".join(lines) + "\n"


# -- main --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    saved = (timing.REPETITIONS, timing.TARGET_REPETITION_MS, timing.WARMUP_CALLS, timing.ESTIMATE_CALLS,
             torch.get_num_threads())
    try:
        return run_all(argv)
    finally:
        *constants, threads = saved
        timing.REPETITIONS, timing.TARGET_REPETITION_MS, timing.WARMUP_CALLS, timing.ESTIMATE_CALLS = constants
        torch.set_num_threads(threads)


def run_all(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.runtime", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True,
                        help="folder for bench_runtime.json, bench_runtime.md and timing caches")
    parser.add_argument("--models", default=None, help="comma-separated: resnet50,bert (smoke: tiny_cnn,tiny_encoder)")
    parser.add_argument("--budget-s", type=float, default=400.0,
                        help="soft wall-clock budget: stages that no longer fit are skipped")
    parser.add_argument("--smoke", action="store_true", help="tiny stand-in models on CPU, for testing this script")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--keep-artifacts", action="store_true", help="keep the ONNX files under OUT/tmp")
    args = parser.parse_args(argv)
    specs = SMOKE_MODELS if args.smoke else FULL_MODELS
    names = args.models.split(",") if args.models else list(specs)
    if unknown := [n for n in names if n not in specs]:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(specs)}")
    warnings.filterwarnings("ignore")
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA GPU: run on the GPU machine, or use --smoke here", file=sys.stderr)
        return 2
    if args.smoke:  # a test of this script, not a benchmark: shorter timing, and one CPU thread per op
        timing.REPETITIONS, timing.TARGET_REPETITION_MS, timing.WARMUP_CALLS, timing.ESTIMATE_CALLS = 3, 5.0, 4, 2
        torch.set_num_threads(1)  # (on a small shared host, torch's intra-op threads made each call 20x slower)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.smoke else "cuda")
    results: dict[str, Any] = {"meta": {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": command_line("benchmarks.runtime", argv),
        "smoke": args.smoke, "versions": versions(), "gpu": gpu_info(), "host_cpus": os.cpu_count(),
        "budget_s": args.budget_s, "tolerance": {p: [t.atol, t.rtol] for p, t in TOLERANCES.items()},
        "timing": {"repetitions": timing.REPETITIONS, "target_repetition_ms": timing.TARGET_REPETITION_MS,
                   "warmup_calls": timing.WARMUP_CALLS, "throughput_repetitions": THROUGHPUT_REPS}},
        "models": {}}

    def save() -> None:
        results["meta"]["elapsed_s"] = time.perf_counter() - started
        tmp = out / "bench_runtime.json.tmp"
        tmp.write_text(json.dumps(results, indent=1, default=str))
        os.replace(tmp, out / "bench_runtime.json")
        (out / "bench_runtime.md").write_text(markdown(results))

    lives = {n: Live(specs[n], device, MID.get(n, specs[n].large), out / "tmp" / n / f"{n}.onnx") for n in names}
    states = {n: results["models"].setdefault(n, {"mid_batch": lives[n].mid, "large_batch": specs[n].large})
              for n in names}
    log(f"kiln runtime benchmark on {results['meta']['gpu']['name'] or 'CPU (smoke)'}; models {names}")
    failed = False
    for stage, fn in STAGES:
        for name in names:
            live, state = lives[name], states[name]
            if stage == "aux_streams" and name not in AUX_MODELS:
                continue
            left = args.budget_s - (time.perf_counter() - started)
            why = ("torch.compile disabled (--no-compile)" if args.no_compile and stage.startswith("compile") else
                   "the build failed" if stage != "build" and live.engine is None else
                   f"time budget: {left:.0f} s left, the stage needs about {RESERVE[stage]} s" if left < RESERVE[stage]
                   else None)
            if why:
                state.setdefault("skipped", {})[stage] = why
                log(f"{name}: {stage} skipped ({why})")
                continue
            t0 = time.perf_counter()
            try:
                fn(live, args, state)
            except Exception as error:  # noqa: BLE001 - one failing stage still leaves the others' results
                state.setdefault("errors", {})[stage] = failure(error)["error"]
                state.setdefault("tracebacks", {})[stage] = traceback.format_exc()[-6000:]
                log(f"{name}: {stage} FAILED {state['errors'][stage][:300]}\n{state['tracebacks'][stage]}")
                failed = True
            state.setdefault("stage_seconds", {})[stage] = time.perf_counter() - t0
            save()
    for live in lives.values():
        live.engine = live.eager = None
    if not args.keep_artifacts:
        shutil.rmtree(out / "tmp", ignore_errors=True)
    checks = [v for s in results["models"].values() for v in _ort_checks(s)]
    results["meta"]["all_within_tolerance"] = all(checks)
    save()
    print(markdown(results), flush=True)
    log(f"wrote {out / 'bench_runtime.json'} and {out / 'bench_runtime.md'}")
    return 1 if failed or not all(checks) else 0


def _ort_checks(state: dict[str, Any]) -> list[bool]:
    """Every kiln output checked against onnxruntime, and every multi-context / aux-stream output
    against the single-context one (False where one differs beyond tolerance)."""
    checks = [row[k]["ok"] for label, row in state.get("latency_b1", {}).items() if label.startswith("kiln")
              for k in ("vs_ort_first_call", "vs_ort") if k in row]
    rows = state.get("throughput", {}).get("rows", []) + state.get("aux_streams", {}).get("rows", [])
    return checks + [r["ok_vs_ort"] for r in rows if "ok_vs_ort" in r]


if __name__ == "__main__":
    sys.exit(main())
