"""Benchmark the kiln builder on ResNet-50 and BERT-base: build time, engine determinism, accuracy, speed.

For each model (random weights, nothing is downloaded), exported to ONNX in fp32 by the
TorchScript exporter (opset 17, dynamic batch axis), this script measures:

1. the build of an fp16 kiln engine on CUDA (optimization level 3, two profiles: batch 1, and
   batch 2..LARGE tuned at LARGE; LARGE is 256 for ResNet-50 and 64 for BERT at sequence 128),
   once with a cold timing cache (the file is deleted first) and once again with the warm cache:
   both wall times, the speedup, and whether the two saved engine files are byte-identical;
2. accuracy: the fp16 engine against onnxruntime fp32 (CPU) at batch 1 and 2, rel =
   max|kiln - ort| / max|ort| per output (must be <= 1e-2); an fp32 engine built on CPU against
   onnxruntime at batch 1 (must be <= 1e-4); and that ``kiln.load_engine`` of the saved file gives
   outputs identical to the in-memory engine;
3. speed, side by side in this one process, at batch 1 and LARGE: the kiln engine, the same torch
   module in fp16 eager, and ``torch.compile`` of it (default mode, ``dynamic=False``: one static
   graph per batch size, both compiled before any timing). Each is timed with CUDA events on one
   side stream: 10 warm-up calls, then the median of 7 repetitions of N back-to-back calls (N makes
   a repetition last >= 100 ms, at most 200 calls).

It writes OUT/bench_builder.json (everything: versions, GPU, build logs, summaries, timings,
tracebacks of anything that failed) and OUT/bench_builder.md (the tables), printing progress as it
goes. The GPU run (Python 3.12, torch + torchvision + transformers + onnxruntime):

    PYTHONPATH=src python3 -m benchmarks.builder --out OUT [--models resnet50,bert]

The CPU smoke run, with two tiny stand-in models (a small residual CNN and a one-layer
transformer-ish encoder), builds the same engines on CPU at level 1 with batches 1 and 4, runs
eager in fp32 and times with perf_counter (a test of this script, not a benchmark):

    .venv/bin/python -m benchmarks.builder --smoke --out /tmp/bench_smoke

ONNX files and engines go to OUT/tmp/<model>/ and are deleted after each model unless
--keep-artifacts is given (their sizes and SHA-256 are in the JSON); each model's timing cache
stays at OUT/timing_<model>.cache.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.building import profiles_for, timed_build
from benchmarks.checks import compare_with_ort, same_outputs
from benchmarks.models import FULL_MODELS, SMOKE_MODELS, ModelSpec, export_onnx, make_feeds, to_torch
from benchmarks.run_info import command_line, elapsed, gpu_info, log, versions
from benchmarks.timing import MAX_CALLS, REPETITIONS, TARGET_REPETITION_MS, WARMUP_CALLS, free_memory, time_calls


def report_json(engine) -> dict[str, Any]:
    report = engine.report
    return {"lines": list(report.lines), "seconds": report.seconds, "timed": report.timed,
            "cache_hits": report.cache_hits, "cache_misses": report.cache_misses, "rejected": report.rejected,
            "fallbacks": list(report.fallbacks), "output_diffs": dict(report.output_diffs)}


def layer_table(engine) -> list[dict[str, Any]]:
    """The per-layer plan in short: name, ops, tactic per profile, precision, timed ms."""
    return [{"name": row["name"], "kind": row["kind"], "ops": "+".join(row["op_types"]),
             "tactics": row["tactics_per_profile"], "precision": row["precision"], "layout": row["layout"],
             "time_ms": row["time_ms"], "notes": row["notes"]} for row in engine.describe()]


def file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def with_throughput(result: dict[str, Any], batch: int) -> dict[str, Any]:
    result["samples_per_s"] = batch / (result["ms"] / 1e3) if result["ms"] > 0 else None
    return result


def time_model(spec: ModelSpec, engine, module: nn.Module, batches: list[int], device: torch.device,
               eager_dtype: torch.dtype, use_compile: bool, state: dict[str, Any], save: Callable[[], None]) -> None:
    """kiln, eager and torch.compile side by side at each batch; results into state["timing"]."""
    timing = state.setdefault("timing", {})
    names = list(spec.inputs)
    kiln_feeds = {b: to_torch(make_feeds(spec, b, seed=100 + b), device) for b in batches}
    eager_feeds = {b: to_torch(make_feeds(spec, b, seed=100 + b), device, eager_dtype) for b in batches}
    eager = copy.deepcopy(module).to(device=device, dtype=eager_dtype).eval()
    for b in batches:
        row = timing.setdefault(str(b), {})
        try:
            row["kiln"] = with_throughput(time_calls(lambda f=kiln_feeds[b]: engine.run(f), device), b)
            log(f"  {spec.name} batch {b}: kiln {row['kiln']['ms']:.3f} ms")
        except Exception as error:  # noqa: BLE001 - one failing measurement is a cell, not a crash
            row["kiln"] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
            log(f"  {spec.name} batch {b}: kiln FAILED {type(error).__name__}: {error}")
        try:
            args = [eager_feeds[b][n] for n in names]
            row["eager"] = with_throughput(time_calls(lambda a=args: eager(*a), device), b)
            log(f"  {spec.name} batch {b}: eager {row['eager']['ms']:.3f} ms")
        except Exception as error:  # noqa: BLE001
            row["eager"] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
            log(f"  {spec.name} batch {b}: eager FAILED {type(error).__name__}: {error}")
    save()
    if not use_compile:
        for b in batches:
            timing[str(b)]["compile"] = {"skipped": state.get("compile_skipped", "disabled")}
        return
    try:
        compiled = torch.compile(eager, dynamic=False)
        compile_s = {}
        with torch.inference_mode():
            for b in batches:  # compile every batch size before timing any
                t0 = time.perf_counter()
                for _ in range(3):
                    compiled(*[eager_feeds[b][n] for n in names])
                if device.type == "cuda":
                    torch.cuda.synchronize()
                compile_s[str(b)] = time.perf_counter() - t0
                log(f"  {spec.name} batch {b}: torch.compile warm-up {compile_s[str(b)]:.1f} s")
        state["compile_warmup_s"] = compile_s
    except Exception as error:  # noqa: BLE001 - torch.compile failing is a result, not a crash
        for b in batches:
            timing[str(b)]["compile"] = {"error": f"{type(error).__name__}: {str(error)[:2000]}",
                                         "traceback": traceback.format_exc()[-6000:]}
        log(f"  {spec.name}: torch.compile FAILED {type(error).__name__}: "
            f"{str(error).splitlines()[0][:200] if str(error) else ''}")
        return
    for b in batches:
        try:
            args = [eager_feeds[b][n] for n in names]
            timing[str(b)]["compile"] = with_throughput(time_calls(lambda a=args: compiled(*a), device), b)
            log(f"  {spec.name} batch {b}: compile {timing[str(b)]['compile']['ms']:.3f} ms")
        except Exception as error:  # noqa: BLE001
            timing[str(b)]["compile"] = {"error": f"{type(error).__name__}: {error}",
                                         "traceback": traceback.format_exc()}
            log(f"  {spec.name} batch {b}: compile FAILED {type(error).__name__}: {error}")
    save()


# -- one model ---------------------------------------------------------------------------------

def bench_model(spec: ModelSpec, args, out: Path, state: dict[str, Any], save: Callable[[], None]) -> None:
    """Every measurement of one model, recorded into ``state`` (saved after each stage). The ONNX
    file and engines are deleted afterwards, failed or not, unless --keep-artifacts."""
    work = Path(args.work) / spec.name
    try:
        measure_model(spec, args, out, work, state, save)
    finally:
        if not args.keep_artifacts:
            shutil.rmtree(work, ignore_errors=True)


def measure_model(spec: ModelSpec, args, out: Path, work: Path, state: dict[str, Any],
                  save: Callable[[], None]) -> None:
    import kiln
    from kiln import BuildConfig, Profile
    from kiln.compare import run_onnxruntime

    device = torch.device("cpu" if args.smoke else "cuda")
    large = spec.large
    batches = [1, large]
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    stages = state.setdefault("stage_seconds", {})

    def stage(name: str, t0: float) -> None:
        stages[name] = time.perf_counter() - t0
        save()

    # 1. export
    t0 = time.perf_counter()
    module = spec.make()
    onnx_path = work / f"{spec.name}.onnx"
    export_onnx(spec, module, onnx_path)
    state["onnx"] = {"bytes": onnx_path.stat().st_size, "sha256": file_digest(onnx_path), "opset": 17,
                     "exporter": "torchscript", "inputs": {n: ["batch", *s] for n, (s, _) in spec.inputs.items()}}
    log(f"{spec.name}: exported ({state['onnx']['bytes'] / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s")
    stage("export", t0)

    # 2. fp16 build, cold then warm timing cache
    cache = out / f"timing_{spec.name}.cache"
    cache.unlink(missing_ok=True)
    opt_level = 1 if args.smoke else 3
    config = BuildConfig(fp16=True, device=device.type, opt_level=opt_level, timing_cache=str(cache),
                         profiles=profiles_for(spec, large), atol=spec.atol_for("fp16"))
    state["build_config"] = {**config.to_json(), "device": config.device, "timing_cache": str(cache)}
    build = state.setdefault("build", {})
    t0 = time.perf_counter()
    engine, cold_s = timed_build(onnx_path, config, f"{spec.name} cold build")
    build.update(cold_s=cold_s, cold_report=report_json(engine), summary=engine.summary(), layers=layer_table(engine))
    log(f"{spec.name}: cold build {cold_s:.1f} s; {engine.summary()}")
    stage("cold_build", t0)

    t0 = time.perf_counter()
    warm_engine, warm_s = timed_build(onnx_path, config, f"{spec.name} warm build")
    build.update(warm_s=warm_s, warm_report=report_json(warm_engine), speedup_cold_over_warm=cold_s / warm_s,
                 warm_summary=warm_engine.summary())
    cold_file, warm_file = work / "cold.kiln", work / "warm.kiln"
    engine.save(cold_file)
    warm_engine.save(warm_file)
    cold_hash, warm_hash = file_digest(cold_file), file_digest(warm_file)
    build.update(engine_bytes=cold_file.stat().st_size, warm_engine_bytes=warm_file.stat().st_size,
                 sha256_cold=cold_hash, sha256_warm=warm_hash, identical=cold_hash == warm_hash,
                 plans_equal=engine.plan == warm_engine.plan,
                 timing_cache_bytes=cache.stat().st_size if cache.exists() else None)
    del warm_engine
    log(f"{spec.name}: warm build {warm_s:.1f} s (cold/warm {cold_s / warm_s:.1f}x); engine files identical: "
        f"{build['identical']}")
    stage("warm_build_and_save", t0)

    # 3. correctness: fp16 engine vs onnxruntime fp32, and load-then-run
    t0 = time.perf_counter()
    correctness = state.setdefault("correctness", {})
    loaded = kiln.load_engine(cold_file)
    for b in (1, 2):
        feeds = make_feeds(spec, b, seed=b)
        reference = run_onnxruntime(onnx_path, feeds)
        torch_feeds = to_torch(feeds, device)
        kiln_out = engine.run(torch_feeds)
        correctness[f"fp16_vs_ort_batch{b}"] = compare_with_ort(kiln_out, reference, engine, spec.atol_for("fp16"))
        # the second run captures a CUDA graph at this shape, the third replays it: both must match too
        for run_index in (2, 3):
            correctness[f"fp16_vs_ort_batch{b}_run{run_index}"] = compare_with_ort(engine.run(torch_feeds), reference,
                                                                                   engine, spec.atol_for("fp16"))
        correctness[f"cuda_graph_errors_batch{b}"] = list(getattr(engine, "graph_errors", []))
        correctness[f"load_then_run_batch{b}"] = same_outputs(kiln_out, loaded.run(to_torch(feeds, device)))
        log(f"{spec.name}: fp16 vs ort at batch {b}: rel {correctness[f'fp16_vs_ort_batch{b}']['max_rel']:.2e}, "
            f"replayed {correctness[f'fp16_vs_ort_batch{b}_run3']['max_rel']:.2e}; graph errors {engine.graph_errors}; "
            f"loaded engine identical: {correctness[f'load_then_run_batch{b}']['identical']}")
    del loaded
    stage("fp16_correctness", t0)

    # 4. timing, kiln vs eager vs torch.compile
    t0 = time.perf_counter()
    eager_dtype = torch.float32 if args.smoke else torch.float16
    state["eager_dtype"] = str(eager_dtype)
    use_compile = not args.no_compile
    if use_compile and args.budget_s - elapsed() < args.compile_reserve_s:
        use_compile = False
        state["compile_skipped"] = f"time budget: {args.budget_s - elapsed():.0f} s left of {args.budget_s:.0f} s"
        log(f"{spec.name}: skipping torch.compile ({state['compile_skipped']})")
    time_model(spec, engine, module, batches, device, eager_dtype, use_compile, state, save)
    stage("timing", t0)
    del engine
    free_memory()

    # 5. fp32 engine on CPU vs onnxruntime at batch 1
    t0 = time.perf_counter()
    if args.budget_s - elapsed() < args.cpu_build_reserve_s:
        correctness["fp32_cpu_vs_ort_batch1"] = {"skipped": f"time budget: {args.budget_s - elapsed():.0f} s left"}
        log(f"{spec.name}: skipping the CPU fp32 build (time budget)")
    else:
        cpu_config = BuildConfig(device="cpu", opt_level=1, atol=spec.atol_for("fp32"),
                                 profiles=[Profile.from_lists(opt_shapes={n: [1, *s]
                                                                          for n, (s, _) in spec.inputs.items()})])
        cpu_engine, cpu_s = timed_build(onnx_path, cpu_config, f"{spec.name} cpu fp32 build")
        feeds = make_feeds(spec, 1, seed=1)
        result = compare_with_ort(cpu_engine.run(to_torch(feeds, torch.device("cpu"))),
                                  run_onnxruntime(onnx_path, feeds),
                                  cpu_engine, spec.atol_for("fp32"))
        result["build_s"] = cpu_s
        result["summary"] = cpu_engine.summary()
        result["build_log"] = list(cpu_engine.report.lines)
        correctness["fp32_cpu_vs_ort_batch1"] = result
        log(f"{spec.name}: cpu fp32 engine vs ort at batch 1: rel {result['max_rel']:.2e} (build {cpu_s:.1f} s)")
        del cpu_engine
    stage("fp32_cpu_correctness", t0)
    state["ok"] = all(v.get("ok", True) for v in correctness.values() if isinstance(v, dict) and "ok" in v) and all(
        v["identical"] for k, v in correctness.items() if k.startswith("load_then_run"))


# -- reporting ---------------------------------------------------------------------------------

def _ms(cell: dict[str, Any] | None) -> float | None:
    return cell.get("ms") if isinstance(cell, dict) else None


def _note(cell: dict[str, Any] | None) -> str | None:
    """Why a timing cell has no number: failed, skipped, or not measured."""
    if not isinstance(cell, dict):
        return "not run"
    if "error" in cell:
        return "failed"
    if "skipped" in cell:
        return "skipped"
    return None


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, state in results["models"].items():
        for batch, cells in state.get("timing", {}).items():
            kiln_ms, eager_ms, compile_ms = _ms(cells.get("kiln")), _ms(cells.get("eager")), _ms(cells.get("compile"))
            rows.append({
                "model": name, "batch": int(batch), "kiln_ms": kiln_ms, "eager_ms": eager_ms, "compile_ms": compile_ms,
                "kiln_samples_per_s": cells.get("kiln", {}).get("samples_per_s"),
                "peak_extra_mb": {k: cells[k].get("peak_extra_mb") for k in ("kiln", "eager", "compile")
                                  if isinstance(cells.get(k), dict) and "peak_extra_mb" in cells[k]},
                "notes": {k: _note(cells.get(k)) for k in ("kiln", "eager", "compile") if _ms(cells.get(k)) is None},
                "eager_over_kiln": eager_ms / kiln_ms if kiln_ms and eager_ms else None,
                "compile_over_kiln": compile_ms / kiln_ms if kiln_ms and compile_ms else None,
            })
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec) + "x"


def markdown(results: dict[str, Any]) -> str:
    from kiln.precision import TOLERANCES

    meta = results["meta"]
    v = meta["versions"]
    eager = "fp32 (smoke, CPU)" if meta["smoke"] else "fp16"
    lines = [
        f"# kiln builder benchmark ({meta['date']})", "",
        f"Device: {meta['gpu']['name'] or 'CPU (smoke)'}; torch {v['torch']} (CUDA {v['cuda']}), triton {v['triton']}, "
        f"onnx {v['onnx']}, onnxruntime {v['onnxruntime']}, transformers {v['transformers']}, torchvision "
        f"{v['torchvision']}, kiln {v['kiln']}, Python {v['python']}.", "",
        f"Command: `{meta['command']}`", "",
        f"Times are ms per batch, median of {REPETITIONS} repetitions of N back-to-back calls after {WARMUP_CALLS} "
        f"warm-up calls ({'CUDA events on a side stream' if not meta['smoke'] else 'perf_counter'}). kiln: fp16 "
        f"engine, inputs already on the device; eager: the torch module in {eager} under inference_mode; compile: "
        "torch.compile of it (default mode, dynamic=False). eager/kiln and compile/kiln above 1 mean kiln is faster.",
        "",
        "| model | batch | kiln ms | eager ms | compile ms | kiln samples/s | eager/kiln | compile/kiln |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["table"]:
        ms = {k: _fmt(r[f"{k}_ms"], ".3f") if r[f"{k}_ms"] is not None else r["notes"].get(k) or "-"
              for k in ("kiln", "eager", "compile")}
        lines.append(f"| {r['model']} | {r['batch']} | {ms['kiln']} | {ms['eager']} | {ms['compile']} | "
                     f"{_fmt(r['kiln_samples_per_s'], '.1f')} | "
                     f"{_ratio(r['eager_over_kiln'])} | {_ratio(r['compile_over_kiln'])} |")
    if any(r["peak_extra_mb"] for r in results["table"]):
        lines += ["", "Peak GPU memory allocated while timing, beyond what was already allocated (MiB):", "",
                  "| model | batch | kiln | eager | compile |", "|---|---:|---:|---:|---:|"]
        for r in results["table"]:
            peak = r["peak_extra_mb"]
            lines.append(f"| {r['model']} | {r['batch']} "
                         "| " + " | ".join(_fmt(peak.get(k), ".0f") for k in ("kiln", "eager", "compile")) + " |")
    skipped = {name: state["compile_skipped"] for name, state in results["models"].items()
               if "compile_skipped" in state}
    if skipped:
        lines += ["", "torch.compile skipped: " + "; ".join(f"{n}: {why}" for n, why in skipped.items())]
    lines += ["", "| model | cold build s | warm build s | cold/warm | engines identical | fp16 vs ort b1 | "
                  "fp16 vs ort b2 | "
              "cpu fp32 vs ort b1 | loaded = in-memory | status |", "|---|---:|---:|---:|---|---:|---:|---:|---|---|"]
    for name, state in results["models"].items():
        build, corr = state.get("build", {}), state.get("correctness", {})
        rel = [corr.get(k, {}).get("max_rel")
               for k in ("fp16_vs_ort_batch1", "fp16_vs_ort_batch2", "fp32_cpu_vs_ort_batch1")]
        loaded = [corr[k]["identical"] for k in ("load_then_run_batch1", "load_then_run_batch2") if k in corr]
        status = "error: " + state["error"].splitlines()[0][:100].replace("|", "/") if "error" in state else (
            "ok" if state.get("ok") else "CHECK FAILED")
        lines.append(f"| {name} | {_fmt(build.get('cold_s'), '.1f')} | {_fmt(build.get('warm_s'), '.1f')} | "
                     f"{_ratio(build.get('speedup_cold_over_warm'), '.1f')} | {build.get('identical', '-')} | "
                     + " | ".join(_fmt(x, '.1e') for x in rel) + f" | {all(loaded) if loaded else '-'} | {status} |")
    lines += ["", "Columns: max|kiln - ort| / max|ort| over each output. Verdicts per element, |kiln - ort| <= atol "
                  "+ rtol * "
              f"|ort| at the engine's loosest precision (kiln.precision: fp16 {TOLERANCES['fp16']}; fp32 "
              f"{TOLERANCES['fp32']})"
              + "".join(f"; {n}'s outputs reach ~{spec.output_scale:g}, so its engines are built and judged with atol "
                        f"= rtol x {spec.output_scale:g} (fp16 {spec.atol_for('fp16'):.3g}, fp32 "
                        f"{spec.atol_for('fp32'):.3g})"
                        for n, spec in {**FULL_MODELS, **SMOKE_MODELS}.items()
                        if n in results.get("models", {}) and spec.output_scale is not None) + "."]
    return "\n".join(lines) + "\n"


def write_results(out: Path, results: dict[str, Any]) -> None:
    results["table"] = table_rows(results)
    results["meta"]["elapsed_s"] = elapsed()
    tmp = out / "bench_builder.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, out / "bench_builder.json")
    (out / "bench_builder.md").write_text(markdown(results))


# -- main --------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.builder", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True,
                        help="folder for bench_builder.json, bench_builder.md and timing caches")
    parser.add_argument("--models", default=None, help="comma-separated: resnet50,bert (smoke: tiny_cnn,tiny_encoder)")
    parser.add_argument("--smoke", action="store_true", help="tiny stand-in models on CPU, for testing this script")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--work", default=None, help="folder for ONNX files and engines (default OUT/tmp)")
    parser.add_argument("--keep-artifacts", action="store_true", help="keep the ONNX files and engines")
    parser.add_argument("--budget-s", type=float, default=510.0,
                        help="soft time budget: later optional stages are skipped when it runs short")
    parser.add_argument("--compile-reserve-s", type=float, default=150.0,
                        help="skip torch.compile when less than this is left of the budget")
    parser.add_argument("--cpu-build-reserve-s", type=float, default=30.0,
                        help="skip the CPU fp32 build when less than this is left of the budget")
    args = parser.parse_args(argv)
    models = SMOKE_MODELS if args.smoke else FULL_MODELS
    args.model_names = args.models.split(",") if args.models else list(models)
    unknown = [m for m in args.model_names if m not in models]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(models)}")
    args.work = args.work or os.path.join(args.out, "tmp")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA GPU: run on the GPU machine, or use --smoke here", file=sys.stderr)
        return 2
    from kiln.precision import TOLERANCES

    specs = SMOKE_MODELS if args.smoke else FULL_MODELS
    results: dict[str, Any] = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": command_line("benchmarks.builder", argv),
            "smoke": args.smoke, "versions": versions(), "gpu": gpu_info(), "host_cpus": os.cpu_count(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark, "budget_s": args.budget_s,
            "timing": {"warmup_calls": WARMUP_CALLS, "repetitions": REPETITIONS,
                       "target_repetition_ms": TARGET_REPETITION_MS,
                       "max_calls": MAX_CALLS, "clock": "perf_counter" if args.smoke else "cuda events, side stream"},
            "tolerances": {p: {"atol": TOLERANCES[p].atol, "rtol": TOLERANCES[p].rtol}
                           for p in ("fp16", "bf16", "fp32")},
        },
        "models": {},
    }
    v = results["meta"]["versions"]
    log(f"kiln builder benchmark on {results['meta']['gpu']['name'] or 'CPU (smoke)'}; torch {v['torch']}, "
        f"triton {v['triton']}, onnxruntime {v['onnxruntime']}; models {args.model_names}")

    def save() -> None:
        write_results(out, results)

    failed = False
    for name in args.model_names:
        state: dict[str, Any] = {"large_batch": specs[name].large}
        results["models"][name] = state
        if args.budget_s - elapsed() < 60:
            state["error"] = f"skipped: time budget ({args.budget_s - elapsed():.0f} s left)"
            log(f"{name}: {state['error']}")
            failed = True
            continue
        t0 = time.perf_counter()
        try:
            bench_model(specs[name], args, out, state, save)
            failed |= not state.get("ok", False)
        except Exception as error:  # noqa: BLE001 - one model failing still writes the other's results
            state["error"] = f"{type(error).__name__}: {error}"
            state["traceback"] = traceback.format_exc()
            log(f"{name}: FAILED {state['error'][:300]}\n{state['traceback']}")
            failed = True
        state["seconds"] = time.perf_counter() - t0
        torch._dynamo.reset()
        free_memory()
        save()
    if not args.keep_artifacts:
        try:
            Path(args.work).rmdir()  # only when empty
        except OSError:
            pass
    save()
    print(markdown(results), flush=True)
    log(f"wrote {out / 'bench_builder.json'} and {out / 'bench_builder.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
