"""Benchmark the graph passes: ResNet-50 and BERT-base fp16 engines with all passes on, all off, and
each pass left out in turn (its own effect inside the full pipeline), timed side by side in one run.

Models, export (TorchScript, opset 17, dynamic batch), inputs and timing are those of
``benchmarks.builder`` (``benchmarks.models``, ``benchmarks.timing``): random weights; engines built at
optimization level 3 with two profiles (batch 1; 2..LARGE tuned at LARGE) sharing one timing cache per
model; each engine timed at batch 1 and LARGE with CUDA events on a side stream (median of 7
repetitions of N back-to-back calls) and checked against onnxruntime fp32 at batch 1 (max|kiln - ort| / max|ort|).

    PYTHONPATH=src python3 -m benchmarks.passes --out OUT [--models resnet50,bert] [--budget-s 480]

It writes OUT/bench_passes.json (everything, including each build's pass log) and OUT/bench_passes.md
(the table). "all passes" is what a build runs by default; passes builds skip by default (the
builder's layers do their work already) get a "with" row. ``--smoke`` runs the tiny stand-in
models on CPU at level 1 (a test of this script).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks.building import profiles_for, timed_build
from benchmarks.checks import compare_with_ort, to_numpy
from benchmarks.models import FULL_MODELS, SMOKE_MODELS, export_onnx, make_feeds, to_torch
from benchmarks.run_info import command_line, elapsed, gpu_info, log, versions
from benchmarks.timing import time_calls


def variants(passes: dict) -> list[tuple[str, list[str] | None, list[str]]]:
    """(label, passes, skip_passes): the build's default passes, none, each default one left out,
    and each pass builds skip by default (``in_builds = False``) added."""
    default = [name for name, p in passes.items() if p.in_builds]
    return ([("all passes", None, []), ("no passes", [], [])] + [(f"without {name}", None, [name]) for name in default]
            + [(f"with {name}", default + [name], []) for name, p in passes.items() if not p.in_builds])


def bench_model(spec, args, out: Path, state: dict[str, Any], save) -> None:
    from kiln import BuildConfig
    from kiln.compare import run_onnxruntime
    from kiln.passes.framework import registered_passes

    device = torch.device("cpu" if args.smoke else "cuda")
    work = out / "tmp" / spec.name
    work.mkdir(parents=True, exist_ok=True)
    module = spec.make()
    path = work / f"{spec.name}.onnx"
    export_onnx(spec, module, path)
    feeds1 = make_feeds(spec, 1, seed=7)
    reference = run_onnxruntime(path, feeds1)
    cache = out / f"timing_passes_{spec.name}.cache"
    cache.unlink(missing_ok=True)
    batches = [1, spec.large]
    torch_feeds = {b: to_torch(make_feeds(spec, b, seed=100 + b), device) for b in batches}
    rows = state.setdefault("variants", {})
    for label, passes, skip in variants(registered_passes()):
        if args.budget_s - elapsed() < 45:
            rows[label] = {"skipped": "time budget"}
            log(f"{spec.name} / {label}: skipped (time budget)")
            continue
        row: dict[str, Any] = rows.setdefault(label, {"passes": passes, "skip": skip})
        try:
            config = BuildConfig(fp16=True, device=device.type, opt_level=1 if args.smoke else 3,
                                 timing_cache=str(cache),
                                 profiles=profiles_for(spec, spec.large), passes=passes, skip_passes=skip)
            engine, seconds = timed_build(path, config, f"{spec.name} / {label}")
            row.update(build_s=seconds, layers=len(engine.plan["layers"]),
                       fused_layers=engine.summary()["fused_layers"], rewrites=engine.plan["passes"],
                       pass_log=[line for line in engine.report.lines if line.startswith(("passes", "  "))])
            got = to_numpy(engine.run(to_torch(feeds1, device)))
            row["vs_ort_b1"] = compare_with_ort(got, reference, engine)["max_rel"]
            for b in batches:
                row[f"ms_b{b}"] = time_calls(lambda f=torch_feeds[b], e=engine: e.run(f), device)["ms"]
            log(f"{spec.name} / {label}: {row['layers']} layers, b1 {row['ms_b1']:.3f} ms, "
                   f"b{spec.large} {row[f'ms_b{spec.large}']:.3f} ms, vs ort {row['vs_ort_b1']:.1e}")
        except Exception as error:  # noqa: BLE001 - one failing variant is a row, not a crash
            row["error"] = f"{type(error).__name__}: {str(error)[:1000]}"
            row["traceback"] = traceback.format_exc()[-4000:]
            log(f"{spec.name} / {label}: FAILED {row['error'][:200]}")
        save()


def table(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [f"# kiln passes benchmark ({meta['date']})", "",
             f"Device: {meta['gpu'].get('name') or 'CPU (smoke)'}; torch {meta['versions']['torch']}, "
             f"triton {meta['versions']['triton']}, onnxruntime {meta['versions']['onnxruntime']}.", "",
             f"Command: `{meta['command']}`", "",
             "fp16 engines, optimization level 3, ms per batch (CUDA events, median of 7 repetitions). "
             "'vs all' above 1 means the variant is slower than the engine with every pass.", ""]
    for name, state in results["models"].items():
        large = state.get("large_batch")
        rows = state.get("variants", {})
        base = rows.get("all passes", {})
        lines += [f"## {name}", "",
                  f"| variant | layers | fused | b1 ms | b{large} ms | b1 vs all | b{large} vs all | rel diff vs ort | "
                  "rewrites |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for label, row in rows.items():
            if "ms_b1" not in row:
                lines.append(f"| {label} | | | | | | | | {row.get('error') or row.get('skipped', '')} |")
                continue
            big = row[f"ms_b{large}"]
            rel1 = row["ms_b1"] / base["ms_b1"] if base.get("ms_b1") else float("nan")
            rel2 = big / base[f"ms_b{large}"] if base.get(f"ms_b{large}") else float("nan")
            done = ", ".join(f"{k} {v}" for k, v in (row.get("rewrites") or {}).items() if v)
            lines.append(f"| {label} | {row['layers']} | {row['fused_layers']} | {row['ms_b1']:.3f} | {big:.3f} | "
                         f"{rel1:.2f}x | {rel2:.2f}x | {row['vs_ort_b1']:.1e} | {done} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.passes", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default=None, help="comma-separated (default: resnet50,bert; smoke: "
                                                       "tiny_cnn,tiny_encoder)")
    parser.add_argument("--budget-s", type=float, default=480.0)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA GPU: run on the GPU machine, or use --smoke here", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = SMOKE_MODELS if args.smoke else FULL_MODELS
    names = args.models.split(",") if args.models else list(specs)
    results: dict[str, Any] = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                        "command": command_line("benchmarks.passes", argv),
                                        "versions": versions(), "gpu": gpu_info(), "smoke": args.smoke},
                               "models": {}}

    def save() -> None:
        (out / "bench_passes.json").write_text(json.dumps(results, indent=1, default=str))
        (out / "bench_passes.md").write_text(table(results))

    for name in names:
        state: dict[str, Any] = {"large_batch": specs[name].large}
        results["models"][name] = state
        try:
            bench_model(specs[name], args, out, state, save)
        except Exception as error:  # noqa: BLE001
            state["error"] = f"{type(error).__name__}: {error}"
            state["traceback"] = traceback.format_exc()
            log(f"{name}: FAILED {state['error'][:300]}")
        save()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
