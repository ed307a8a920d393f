"""Regenerate the model-zoo section of BENCHMARKS.md: kiln fp16 and fp32 beside its peers on five models.

Models (random weights, nothing is downloaded), each exported once to ONNX in fp32 by the TorchScript
exporter (opset 17, batch axis dynamic) as ``benchmarks.models`` makes and exports them:

    resnet50, mobilenet_v2, vit_b_16, bert, gpt2 (the table of ``benchmarks.models``: model, inputs, large batch)

(torchvision zero-initializes ViT's head; an all-zero output would compare nothing, so it is drawn
from N(0, 0.02).) Every number comes from kiln's own ``kiln.bench.run.run_bench``: kiln builds an engine
with one optimization profile per batch size (``BuildConfig(fp16=..., opt_level=3)``, one timing
cache per model, so a later stage rebuilds the same engine from the cache in seconds) and runs it in
one execution context with CUDA graphs on bound buffers; the peers run in the same process on the
same inputs and are compared with kiln's outputs: ``eager`` and ``compile`` (``torch.compile``,
default mode) run the torch module itself (in fp16 when the engine is fp16), ``onnxruntime`` the fp32
ONNX file (CPU provider; ``onnxruntime-cuda`` reports itself unavailable where the provider is
missing). Each measurement: 100 ms warm-up, then 1 s, repeated twice.

The work runs in stages, one ``run_bench`` call each, round by round over the models (``--stages``
picks and orders them), so that what matters most is measured first and a short budget drops the
rest:

    core-fp16     kiln fp16 and eager fp16 at batches 1 and LARGE; for ResNet-50 a sweep
                  1, 8, 32, 128, 256 (the saturation verdict) and the per-layer profile
    core-fp32     kiln fp32 and eager fp32 at 1 and LARGE (and onnxruntime-cuda where it exists)
    compile-fp16  torch.compile fp16 at 1 and LARGE (LARGE alone when only one compile fits)
    ort-b1        onnxruntime CPU at batch 1 (against kiln fp32)
    ort-large     onnxruntime CPU at LARGE, only where its batch-1 latency x LARGE x 5 calls stays
                  under --ort-large-max-s (a CPU run of ResNet-50 at 256 takes seconds per call)
    compile-fp32  torch.compile fp32 at 1 and LARGE

onnxruntime runs the fp32 ONNX file whatever kiln's precision, so it is measured once, beside kiln
fp32, rather than twice. A stage starts only when its estimated time (guesses for cold builds,
exports and torch.compile, replaced by measured times as they come) fits in what is left of
``--budget-s``; a stage that does not fit is recorded with the reason and shows in the notes. On the
GPU a watchdog stops the script at the budget, after writing which stage it cut. TF32 is off for
every fp32 target (torch's cuDNN default would give eager convolutions TF32).

Everything does not fit in one 9-minute run (cold builds of ten engines and torch.compile at two
batch sizes per model and precision each take tens of seconds); a second run can do the rest, and
``--render`` merges the two:

    PYTHONPATH=src python3 -m benchmarks.zoo --out $OUT --budget-s 540
    PYTHONPATH=src python3 -m benchmarks.zoo --out $OUT --budget-s 540 --stages compile-fp16,ort-b1,compile-fp32
    .venv/bin/python -m benchmarks.zoo --render first/zoo.json second/zoo.json --out /tmp/zoo --update BENCHMARKS.md

Outputs, rewritten after every stage (so a killed run keeps what it measured):

    OUT/zoo.json            everything: meta, per model the stages (times, skips, errors) and one
                            BenchResult per precision (``BenchResult.to_json``, every number)
    OUT/zoo.md              the markdown section (title, device, versions, command, tables, notes)
    OUT/plots/MODEL.png     per model, ``kiln.bench.report.plot`` of fp16 and fp32 together
                            (targets named "kiln fp16", "eager fp32", ...); also copied to --plots-dir
    OUT/details/MODEL_PRECISION.{json,png}   with --details: ``report.write_json`` and ``report.plot``
                            of each model and precision
    --update FILE           splices zoo.md between <!-- zoo:begin --> and <!-- zoo:end --> (appended
                            with the markers if absent), atomically, with links to --plots-dir

By default OUT holds at most 7 files (the lent GPU machine returns 8); ``--render OUT/zoo.json``
regenerates every output, the plots and the BENCHMARKS.md splice from that one file, anywhere:

    PYTHONPATH=src python3 -m benchmarks.zoo --out $OUT --budget-s 540                   # the lent GPU
    .venv/bin/python -m benchmarks.zoo --render ZOO.json --out /tmp/zoo --update BENCHMARKS.md
    .venv/bin/python -m benchmarks.zoo --smoke --out /tmp/zoo_smoke                      # CPU test run

``--smoke`` runs the same stages on this CPU with benchmarks.models' tiny models (a residual
CNN with a batch sweep 1, 2, 4 and the layer profile; a one-layer encoder), device cpu, no CUDA
graphs, optimization level 1 and millisecond timing: a test of this script, not a benchmark.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.models import SEQ, SMOKE_MODELS, ZOO_MODELS, ModelSpec, export_onnx
from benchmarks.run_info import command_line, gpu_info, log, versions
from benchmarks.timing import free_memory
from kiln.atomic_file import write_atomically
from kiln.bench.results import BenchResult, Row, Run

REPO = Path(__file__).resolve().parents[1]
TITLE = "Model zoo: kiln bench (issue 6)"
BEGIN, END = "<!-- zoo:begin -->", "<!-- zoo:end -->"
PRECISIONS = ("fp16", "fp32")
TARGET_ORDER = ("kiln", "eager", "compile", "compile-reduce-overhead", "onnxruntime", "onnxruntime-cuda")
ROUNDS = ("core-fp16", "core-fp32", "compile-fp16", "ort-b1", "ort-large", "compile-fp32")
RESNET_SWEEP = [1, 8, 32, 128, 256]
ORT_CALLS = 5  # onnxruntime calls at least, when one call outlasts the timing: setup + (warm-up + timed) x 2 repeats
TOP_LAYERS = 10
RESERVE_S = 5.0  # kept free at the end of the budget for the last writes


# -- models --------------------------------------------------------------------------------------

@dataclass
class ZooModel:
    """One model of the zoo: its spec (benchmarks.models'), how the markdown names it, the fp16 batch
    sweep if it has one, and guesses (seconds on an H200) for its export and cold builds, which the
    budget uses until measured times replace them."""

    spec: ModelSpec
    title: str
    source: str
    sweep: list[int] | None = None
    profile_layers: bool = False
    export_s: float = 10.0
    build_s: float = 30.0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def large(self) -> int:
        return self.spec.large


FULL_ZOO = {
    "resnet50": ZooModel(ZOO_MODELS["resnet50"], "ResNet-50", "torchvision resnet50(weights=None), 224x224",
                         sweep=RESNET_SWEEP, profile_layers=True, export_s=8, build_s=45),
    "mobilenet_v2": ZooModel(ZOO_MODELS["mobilenet_v2"], "MobileNetV2",
                             "torchvision mobilenet_v2(weights=None), 224x224", export_s=6, build_s=30),
    "vit_b_16": ZooModel(ZOO_MODELS["vit_b_16"], "ViT-B/16", "torchvision vit_b_16(weights=None), 224x224",
                         export_s=12, build_s=25),
    "bert": ZooModel(ZOO_MODELS["bert"], "BERT-base", f"transformers BertModel(BertConfig()), sequence {SEQ}",
                     export_s=12, build_s=15),
    "gpt2": ZooModel(ZOO_MODELS["gpt2"], "GPT-2 small", f"transformers GPT2Model(GPT2Config()), sequence {SEQ}",
                     export_s=15, build_s=25),
}
SMOKE_ZOO = {
    "tiny_cnn": ZooModel(SMOKE_MODELS["tiny_cnn"], "tiny CNN", "benchmarks/models.py TinyResidualCNN, 32x32",
                         sweep=[1, 2, 4], profile_layers=True, export_s=1, build_s=2),
    "tiny_encoder": ZooModel(SMOKE_MODELS["tiny_encoder"], "tiny encoder",
                             "benchmarks/models.py TinyEncoder, sequence 16", export_s=1, build_s=2),
}


# -- results as JSON and back --------------------------------------------------------------------

def merge(base: BenchResult | None, new: BenchResult) -> tuple[BenchResult, list[Row]]:
    """Add ``new``'s rows that ``base`` lacks (by target and batch; a row that failed in ``base`` is
    replaced by one that ran), its notes, and its saturation and layer profile where ``base`` has
    none. Returns the merged result and ``new``'s rows that ``base`` already had (kiln re-measured)."""
    if base is None:
        return new, []
    repeated = []
    for row in new.rows:
        old = base.row(row.target, row.batch)
        if old is None:
            base.rows.append(row)
        elif old.error is not None and row.error is None:
            base.rows[base.rows.index(old)] = row
        else:
            repeated.append(row)
    base.notes += [note for note in new.notes if note not in base.notes]
    if base.saturation is None and new.saturation is not None:
        base.saturation = new.saturation
    if base.layers is None and new.layers is not None:
        base.layers, base.layer_batch = new.layers, new.layer_batch
    return base, repeated


def _order(target: str) -> int:
    return TARGET_ORDER.index(target) if target in TARGET_ORDER else len(TARGET_ORDER)


def combined(name: str, results: dict[str, BenchResult]) -> BenchResult:
    """fp16 and fp32 of one model as one result, its targets named "kiln fp16", "eager fp32", ...: one plot."""
    first = next(iter(results.values()))
    out = BenchResult(model=f"{name}: kiln and peers, fp16 and fp32", device=first.device, gpu=first.gpu,
                      date=first.date, command=first.command, versions=first.versions, config={})
    rows = [(row, precision) for precision, result in results.items() for row in result.rows]
    rows.sort(key=lambda item: (_order(item[0].target), PRECISIONS.index(item[1]), item[0].batch))
    out.rows = [dataclasses.replace(row, target=f"{row.target} {precision}") for row, precision in rows]
    return out


# -- markdown ------------------------------------------------------------------------------------

def _ms(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:#.3g}"


def _rate(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def _median(run: Run) -> float:
    return (run.compute_ms or run.latency_ms).median


def _round_what(round_name: str, batches: list[int] | None = None) -> str:
    at = f" at batch {', '.join(str(b) for b in batches)}" if batches else ""
    return {"core-fp16": "kiln fp16 and eager fp16", "core-fp32": "kiln fp32 and eager fp32",
            "ort-b1": "onnxruntime CPU", "ort-large": "onnxruntime CPU", "compile-fp16": "torch.compile fp16",
            "compile-fp32": "torch.compile fp32"}.get(round_name, round_name) + at


def stage_notes(record: dict[str, Any]) -> list[str]:
    """The notes one model's stage records give: skips, failures, torch.compile times."""
    notes = []
    if record.get("export", {}).get("error"):
        notes.append(f"export failed: {record['export']['error']}")
    stages = record.get("stages", [])
    done = {stage["round"] for stage in stages if stage["status"] == "ok"}
    last = {stage["round"]: i for i, stage in enumerate(stages)}
    for i, stage in enumerate(stages):
        what = _round_what(stage["round"], stage.get("batches"))
        if stage["status"] != "ok" and (stage["round"] in done or last[stage["round"]] != i):
            continue  # another run merged by --render did it, or tried it later
        if stage["status"] == "skipped":
            notes.append(f"{stage['round']} ({what}): not run: {stage['reason']}")
        elif stage["status"] == "error":
            notes.append(f"{stage['round']} ({what}): failed: {stage['error']}")
        elif stage["status"] == "cut":
            notes.append(f"{stage['round']} ({what}): cut short by the time budget: {stage['reason']}")
        if stage.get("compile"):
            times = "; ".join(f"batch {c['batch']}: {c['setup_s']:.1f} s to compile and run once, then "
                              f"{c['timed_s']:.1f} s timed" for c in stage["compile"])
            dynamo = stage.get("dynamo") or {}
            notes.append(f"torch.compile {stage['precision']}: {times}; {dynamo.get('graphs', '?')} graph(s), "
                         f"{dynamo.get('graph_breaks', '?')} graph break(s)")
    return notes


def _model_table(results: dict[str, BenchResult]) -> list[str]:
    lines = ["| target | precision | batch | median ms | p99 ms | e2e ms | samples/s | vs kiln | rel diff | vs fp32 "
             "ref |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for precision in PRECISIONS:
        result = results.get(precision)
        if result is None:
            continue
        for batch in result.batches:
            kiln_row = result.row("kiln", batch)
            kiln_run = kiln_row.best if kiln_row is not None and kiln_row.error is None else None
            for row in sorted((r for r in result.rows if r.batch == batch), key=lambda r: _order(r.target)):
                run = row.best if row.error is None else None
                if run is None:
                    lines.append(f"| {row.target} | {precision} | {batch} | failed | - | - | - | - | - | - |")
                    continue
                shown = run.compute_ms or run.latency_ms
                versus = (f"{run.samples_per_s / kiln_run.samples_per_s:.2f}x"
                          if kiln_run is not None and kiln_run.samples_per_s and row.target != "kiln" else "-")
                diff = "-" if row.max_rel_diff is None else f"{row.max_rel_diff:.1e}"
                ref = "-" if row.ref_rel_diff is None else f"{row.ref_rel_diff:.1e}"
                lines.append(f"| {row.target} | {precision} | {batch} | {_ms(shown.median)} | {_ms(shown.p99)} | "
                             f"{_ms(run.latency_ms.median)} | {_rate(run.samples_per_s)} | {versus} | {diff} | {ref} |")
    return lines


def _overview(zoo: dict[str, Any], results: dict[str, dict[str, BenchResult]]) -> list[str]:
    columns = [("kiln", "fp16"), ("kiln", "fp32"), ("eager", "fp16"), ("compile", "fp16"), ("eager", "fp32"),
               ("compile", "fp32"), ("onnxruntime", "fp32")]
    lines = ["| model | batch | " + " | ".join(f"{t} {p}" for t, p in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for name, record in zoo["models"].items():
        model_results = results.get(name, {})
        batches = sorted({r.batch for result in model_results.values() for r in result.rows})
        for batch in batches:
            cells = []
            for target, precision in columns:
                result = model_results.get(precision)
                row = result.row(target, batch) if result is not None else None
                run = row.best if row is not None and row.error is None else None
                cells.append(_ms(_median(run)) if run is not None else ("failed" if row is not None else "-"))
            lines.append(f"| {record['title']} | {batch} | " + " | ".join(cells) + " |")
    return lines


def _versions_line(meta: dict[str, Any]) -> str:
    v = meta["versions"]
    parts = [f"torch {v.get('torch')} (CUDA {v.get('cuda')}, cuDNN {v.get('cudnn')})"]
    parts += [f"{name} {v.get(name)}" for name in ("triton", "onnx", "onnx_ir", "onnxruntime", "transformers",
                                                     "torchvision", "numpy", "kiln")]
    return ", ".join(parts) + f", Python {v.get('python')}"


def _device_line(meta: dict[str, Any]) -> str:
    gpu = meta.get("gpu") or {}
    if not gpu.get("name"):
        return f"CPU ({meta.get('host_cpus')} cores; smoke run, not a benchmark)"
    driver = f", driver {meta['driver']}" if meta.get("driver") else ""
    return (f"{gpu['name']} (compute capability {gpu.get('capability')}, {gpu.get('memory_gb', 0):.0f} GB{driver}); "
            f"{meta.get('host_cpus')} CPU cores")


def markdown(zoo: dict[str, Any], link: Callable[[str], str]) -> str:
    """The section, from zoo.json's content alone; ``link(model)`` is the plot's path as the page links it."""
    meta = zoo["meta"]
    results = {name: {p: BenchResult.from_json(r) for p, r in record.get("results", {}).items()}
               for name, record in zoo["models"].items()}
    timing = meta["timing"]
    gpu_run = not meta["smoke"]
    lines = [f"## {TITLE} — {meta['date']}", ""]
    models = ", ".join(f"{r['title']} ({r['source']}; batch 1 and {r['large']})" for r in zoo["models"].values())
    lines += [
        f"Models, random weights, nothing downloaded: {models}; exported once each by the TorchScript exporter "
        "(opset 17, dynamic batch axis). kiln builds one engine per precision with one optimization profile per "
        f"batch size (optimization level {meta['opt_level']}, one timing cache per model) and runs it in one "
        f"execution context{' with CUDA graphs' if gpu_run else ''} on bound buffers. eager and compile "
        "(torch.compile, default mode, one graph per batch size) run the torch module itself, in fp16 beside kiln "
        "fp16; onnxruntime (ORT_ENABLE_ALL) runs the fp32 ONNX file and is compared with kiln fp32. All in one "
        "process, on the same inputs (kiln.bench's seeded random inputs: floats N(0, 1), integer inputs 0 or 1, so "
        "token ids are 0/1 and about half of each attention mask is padding).", "",
        f"Device: {_device_line(meta)}.", "",
        f"Versions: {_versions_line(meta)}.", "",
        *_command_lines(meta),
        f"Each measurement: {timing['warmup_ms']:g} ms warm-up, then {timing['duration_s']:g} s, repeated "
        f"{timing['repeats']}x; the table shows the faster repeat. median and p99: "
        + ("compute time from CUDA events for kiln, eager and compile (inputs already on the GPU), end to end by the "
           "host clock for onnxruntime; " if gpu_run else "host clock, end to end; ")
        + "e2e: the median with the input and output copies; samples/s: from the wall time of all iterations "
        "(copies included); vs kiln: samples/s over kiln's at the same batch and precision (below 1.00x: kiln is "
        "faster); rel diff: max |out - kiln| / max |kiln|; vs fp32 ref: max |out - ref| / max |ref|, ref being the "
        "fp32 ONNX file on kiln's reference executor (unoptimized, TF32 off) on the same inputs, for every target, "
        "kiln included: where kiln and a peer disagree, it says which of them lost the precision ('-': measured "
        "before the script had this column).", "",
    ]
    if any(results.values()):
        lines += ["Median latency (ms) at batch 1 and the large batch; the sections below have every number.", ""]
        lines += _overview(zoo, results) + [""]
    for name, record in zoo["models"].items():
        model_results = results.get(name, {})
        lines += [f"### {record['title']}", "", f"{record['source']}, batch 1 and {record['large']}"
                  + (f"; kiln fp16 swept over batches {', '.join(map(str, record['sweep']))}" if record.get("sweep")
                     else "") + ".", ""]
        if model_results:
            lines += _model_table(model_results) + [""]
        else:
            lines += ["Not measured (see the notes).", ""]
        fp16 = model_results.get("fp16")
        if record.get("sweep") and fp16 is not None and fp16.saturation is not None:
            sat = fp16.saturation
            lines += [f"Saturation (kiln fp16): {sat.verdict}.", ""]
            if sat.steps:
                lines += ["| batch | batch x | throughput x | efficiency |", "|---|---:|---:|---:|"]
                lines += [f"| {s['from']:g} -> {s['to']:g} | {s['batch_ratio']:.2f}x | {s['throughput_ratio']:.2f}x | "
                          f"{s['efficiency']:.2f} |" for s in sat.steps]
                lines += ["", f"efficiency = log(throughput x) / log(batch x): 1 is linear growth; threshold "
                          f"{sat.threshold:.2f}.", ""]
        for precision, result in model_results.items():
            if not result.layers:
                continue
            layers = sorted(result.layers, key=lambda layer: -layer.ms)
            total = sum(layer.ms for layer in layers)
            lines += [f"Top {min(TOP_LAYERS, len(layers))} of {len(layers)} layers, kiln {precision} at batch "
                      f"{result.layer_batch} (layer by layer, no CUDA graph; {total:.3f} ms in all):", "",
                      "| # | layer | kind | tactic | precision | ms | share |", "|---:|---|---|---|---|---:|---:|"]
            lines += [f"| {layer.index} | {_cell(layer.name)} | {layer.kind} | {layer.tactic} | {layer.precision} | "
                      f"{layer.ms:.4f} | {100 * layer.share:.1f}% |" for layer in layers[:TOP_LAYERS]]
            lines.append("")
        if model_results:
            lines += [f"![{record['title']}: latency and throughput against batch]({link(name)})", ""]
        notes = stage_notes(record)
        for precision, result in model_results.items():
            notes += [f"{precision}: {n}" for n in result.notes if not n.startswith("each measurement:")]
            notes += [f"{row.target} {precision} at batch {row.batch} failed: {row.error}"
                      for row in result.rows if row.error is not None]
        if notes:
            lines += ["Notes:", ""] + [f"- {_cell(n)}" for n in dict.fromkeys(notes)] + [""]
    runs = _runs(meta)
    lines += ["### How this run went" if len(runs) == 1 else f"### How the {len(runs)} runs went", ""]
    lines += [f"- {n}" for n in zoo.get("notes", []) if not n.startswith(_PER_RUN_NOTES)]
    for i, run in enumerate(runs, 1):
        lines.append(f"- {'run ' + str(i) + ': ' if len(runs) > 1 else ''}stages in this order, each round over the "
                     f"models: {', '.join(run['stages'])}; a stage starts only when its estimate fits in what is left "
                     f"of the budget (skipped ones are named in each model's notes); elapsed {run['elapsed_s']:.0f} s "
                     f"of a {run['budget_s']:.0f} s budget" + (f"; {run['cut']}" if run.get("cut") else "") + ".")
    return "\n".join(lines) + "\n"


# notes older zoo.json files carry once per run; the runs list says them now
_PER_RUN_NOTES = ("stages in this order, each round over the models", "merged with a later run")


def _runs(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs of the script behind a zoo.json: several where --render merged files, else this one."""
    if meta.get("runs"):
        return meta["runs"]
    return [{key: meta.get(key) for key in ("command", "date", "stages", "elapsed_s", "budget_s", "cut")}]


def _command_lines(meta: dict[str, Any]) -> list[str]:
    runs = _runs(meta)
    if len(runs) == 1:
        return [f"Command: `{runs[0]['command']}`", ""]
    lines = [f"Commands: {len(runs)} runs of this script in one session on the same GPU machine (one run of every "
             "stage takes about 15 minutes; a call to the lent GPU is limited to 10), merged by `--render` (a "
             "row measured by two runs is taken from the first file given to it):", ""]
    lines += [f"{i}. `{run['command']}` ({run['date']})" for i, run in enumerate(runs, 1)]
    if meta.get("rendered"):
        lines += ["", f"Rendered with `{meta['rendered']}`."]
    return lines + [""]


def splice(text: str, section: str) -> str:
    """``text`` with ``section`` between the zoo markers (replacing what was there), or appended with
    the markers; everything outside the markers is left as it was."""
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    begin, end = text.find(BEGIN), text.find(END)
    if begin == -1 and end == -1:
        if not text:
            return block + "\n"
        return text + ("" if text.endswith("\n") else "\n") + "\n" + block + "\n"
    if begin == -1 or end == -1 or end < begin or text.count(BEGIN) > 1 or text.count(END) > 1:
        raise ValueError(f"the markers {BEGIN} ... {END} are broken (one missing, repeated or out of order)")
    return text[:begin] + block + text[end + len(END):]


# -- outputs -------------------------------------------------------------------------------------

class Outputs:
    """Writes zoo.json, zoo.md, the plots (and their copies), --details and --update, atomically."""

    def __init__(self, args) -> None:
        self.out = Path(args.out)
        self.plots_dir = Path(args.plots_dir) if args.plots_dir else None
        self.details = args.details
        self.update = Path(args.update) if args.update else None

    def write(self, zoo: dict[str, Any], plot_models: list[str] | None = None) -> None:
        """Everything; the plots only of ``plot_models`` (None: of every model)."""
        from kiln.bench.report import plot, write_json

        self.out.mkdir(parents=True, exist_ok=True)
        _write_text(self.out / "zoo.json", json.dumps(zoo, indent=1, default=str) + "\n")
        _write_text(self.out / "zoo.md", markdown(zoo, lambda name: f"plots/{name}.png"))
        for name in zoo["models"] if plot_models is None else plot_models:
            results = {p: BenchResult.from_json(r) for p, r in zoo["models"][name].get("results", {}).items()}
            if not any(row.best for result in results.values() for row in result.rows):
                continue
            png = self.out / "plots" / f"{name}.png"
            png.parent.mkdir(exist_ok=True)
            try:
                plot(combined(name, results), png)
                if self.plots_dir is not None:
                    self.plots_dir.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(png, self.plots_dir / png.name)
                if self.details:
                    (self.out / "details").mkdir(exist_ok=True)
                    for precision, result in results.items():
                        write_json(result, self.out / "details" / f"{name}_{precision}.json")
                        plot(result, self.out / "details" / f"{name}_{precision}.png")
            except Exception as error:  # noqa: BLE001 - a plot must not cost a run: --render redraws it from zoo.json
                log(f"{name}: plot failed ({type(error).__name__}: {error}); --render ZOO_JSON redraws it")
        if self.update is not None:
            plots = self.plots_dir or self.out / "plots"
            base = self.update.resolve().parent
            section = markdown(zoo,
                               lambda name: Path(os.path.relpath((plots / f"{name}.png").resolve(), base)).as_posix())
            old = self.update.read_text() if self.update.exists() else ""
            _write_text(self.update, splice(old, section))


def _write_text(path: Path, text: str) -> None:
    data = text.encode()
    write_atomically(path, lambda handle: handle.write(data))


# -- running -------------------------------------------------------------------------------------

@dataclass
class Live:
    """One model while the script runs: its files, its pristine fp32 torch module (on the CPU; each
    stage gets a deep copy, since the eager peer casts and moves its module in place), its results
    and its record in zoo.json."""

    zoo: ZooModel
    record: dict[str, Any]
    onnx: Path | None = None
    cache: Path | None = None
    module: nn.Module | None = None
    results: dict[str, BenchResult] = field(default_factory=dict)
    cold_build_s: dict[str, float] = field(default_factory=dict)  # the first build per precision
    warm_build_s: float | None = None


@dataclass
class Stage:
    round: str
    precision: str
    batches: list[int]
    peers: list[str]
    profile_layers: bool = False
    estimate_s: float = 0.0


class Session:
    """The state of one invocation: arguments, deadline, zoo.json's content, the lock the watchdog takes."""

    def __init__(self, args, zoo: dict[str, Any], outputs: Outputs) -> None:
        self.args = args
        self.zoo = zoo
        self.outputs = outputs
        self.lock = threading.RLock()
        self.start = time.perf_counter()
        self.current: tuple[str, str | None, str] | None = None  # model, round (None: export), description
        self.done = False
        self.compile_times: list[float] = []

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def measure_s(self) -> float:
        """One target at one batch: the repeats of warm-up + duration, and setup."""
        return self.args.repeats * (self.args.warmup_ms / 1e3 + self.args.duration_s) + 0.5

    def save(self, plot_models: list[str] | None = None) -> None:
        with self.lock:
            self.zoo["meta"]["elapsed_s"] = time.perf_counter() - self.start
            self.outputs.write(self.zoo, plot_models=plot_models)

    def watch(self) -> None:
        """On the GPU: once the budget is spent while a stage (or an export) runs, record it as cut,
        write everything and exit with status 3. Between stages nothing starts past the budget anyway."""

        def expire() -> None:
            while not self.done:
                left = self.left()
                if left > 0 or self.current is None:
                    time.sleep(max(min(left, 30.0), 0.5))
                    continue
                with self.lock:
                    if self.done or self.current is None:
                        continue
                    name, round_name, what = self.current
                    reason = f"stopped at the {self.args.budget_s:.0f} s budget during {what}"
                    self.zoo["meta"]["cut"] = reason
                    if round_name is not None:
                        self.zoo["models"][name]["stages"].append(
                            {"round": round_name, "status": "cut", "reason": reason, "precision": None})
                    log(reason)
                    try:
                        self.zoo["meta"]["elapsed_s"] = time.perf_counter() - self.start
                        self.outputs.write(self.zoo, plot_models=[])
                    finally:
                        os._exit(3)

        threading.Thread(target=expire, name="zoo-budget", daemon=True).start()


def ensure_exported(live: Live, state: Session) -> bool:
    """Make the torch module and the ONNX file once; False (recorded) when that failed."""
    if live.onnx is not None:
        return True
    if live.record["export"].get("error"):
        return False
    spec = live.zoo.spec
    state.current = (spec.name, None, f"the export of {spec.name}")
    log(f"{spec.name}: making the torch module and exporting it to ONNX")
    start = time.perf_counter()
    try:
        module = spec.make()
        path = Path(state.args.work) / f"{spec.name}.onnx"
        export_onnx(spec, module, path)
    except Exception as error:  # noqa: BLE001 - a model that cannot be made or exported is a note, not a crash
        live.record["export"] = {"error": f"{type(error).__name__}: "
                                          f"{str(error).splitlines()[0][:300] if str(error) else ''}",
                                 "traceback": traceback.format_exc()}
        log(f"{spec.name}: export FAILED: {live.record['export']['error']}")
        return False
    live.module, live.onnx = module, path
    live.cache = Path(state.args.work) / f"{spec.name}.timing.cache"
    live.record["export"] = {"seconds": round(time.perf_counter() - start, 2),
                             "onnx_mb": round(path.stat().st_size / 1e6, 1),
                             "parameters": sum(p.numel() for p in module.parameters())}
    log(f"{spec.name}: exported in {live.record['export']['seconds']:.1f} s ({live.record['export']['onnx_mb']} MB)")
    return True


def plan(round_name: str, live: Live, state: Session) -> tuple[Stage | None, str | None]:
    """The stage this round runs for this model, or None and why not (None: nothing to say)."""
    args, zoo = state.args, live.zoo
    large = zoo.large
    m = state.measure_s()
    export = 0.0 if live.onnx is not None else zoo.export_s
    precision = "fp16" if round_name.endswith("fp16") else "fp32"

    def build(precision: str) -> float:
        if precision not in live.cold_build_s:
            return zoo.build_s * (1.5 if precision == "fp16" and zoo.sweep else 1.0)
        return live.warm_build_s if live.warm_build_s is not None else 0.15 * live.cold_build_s[precision] + 2

    if round_name.startswith("core"):
        batches = (zoo.sweep if precision == "fp16" and zoo.sweep else [1, large])
        peers = ["eager"] + (["onnxruntime-cuda"] if precision == "fp32" else [])
        timed = 2 + (1 if precision == "fp32" and _ort_cuda() else 0)
        profile = zoo.profile_layers and precision == "fp16"
        estimate = export + build(precision) + len(batches) * timed * m + (5 if profile else 0)
        return Stage(round_name, precision, batches, peers, profile, estimate), None
    if round_name == "ort-b1":
        return Stage(round_name, "fp32", [1], ["onnxruntime"], estimate_s=export + build("fp32") + 2 * m + 3), None
    if round_name == "ort-large":
        result = live.results.get("fp32")
        row = result.row("onnxruntime", 1) if result is not None else None
        if row is None or row.best is None:
            return None, "no batch-1 onnxruntime measurement to project the large batch from"
        call_s = row.best.latency_ms.median * large / 1e3
        projected = call_s * ORT_CALLS if call_s > args.duration_s else args.repeats * (
            args.warmup_ms / 1e3 + args.duration_s) + 2 * call_s
        if projected > args.ort_large_max_s:
            return None, (f"projected {projected:.0f} s (batch-1 latency {row.best.latency_ms.median:.2f} ms x {large} "
                          f"x {ORT_CALLS} calls) is over --ort-large-max-s {args.ort_large_max_s:g} s")
        return Stage(round_name, "fp32", [large], ["onnxruntime"],
                     estimate_s=export + build("fp32") + m + projected + 3), None
    if round_name.startswith("compile"):
        if args.no_compile:
            return None, "--no-compile"
        per = sum(state.compile_times) / len(state.compile_times) if state.compile_times else args.compile_estimate_s
        batches = [1, large]
        estimate = export + build(precision) + len(batches) * (2 * m + per)
        if estimate > state.left() - RESERVE_S:
            batches = [large]  # one compile: the large batch, where kiln and torch.compile are closest
            estimate = export + build(precision) + 2 * m + per
        return Stage(round_name, precision, batches, ["compile"], estimate_s=estimate), None
    raise ValueError(round_name)


def _ort_cuda() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def run_stage(stage: Stage, live: Live, state: Session) -> dict[str, Any]:
    """One ``run_bench`` call; merges its result into the model's result for that precision."""
    from torch._dynamo.utils import counters

    from kiln import BuildConfig
    from kiln.bench.options import BenchOptions
    from kiln.bench.run import run_bench

    args, name = state.args, live.zoo.name
    record: dict[str, Any] = {"round": stage.round, "precision": stage.precision, "batches": stage.batches,
                              "peers": stage.peers, "estimate_s": round(stage.estimate_s, 1)}
    options = BenchOptions(
        batches=stage.batches, warmup_ms=args.warmup_ms, duration_s=args.duration_s, repeats=args.repeats,
        peers=stage.peers, profile_layers=stage.profile_layers, cuda_graph=not args.smoke,
        build=BuildConfig(fp16=stage.precision == "fp16", device=args.device, opt_level=args.opt_level,
                          timing_cache=str(live.cache)))
    torch_peers = any(p in ("eager", "compile", "compile-reduce-overhead") for p in stage.peers)
    module = copy.deepcopy(live.module) if torch_peers else None
    steps: list[tuple[float, str]] = []

    def progress(message: str) -> None:
        steps.append((time.perf_counter(), message))
        log(f"{name} {stage.precision} [{stage.round}]: {message}")

    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    start = time.perf_counter()
    try:
        result = run_bench(live.onnx, options, module=module, progress=progress, command=state.zoo["meta"]["command"])
        if "compile" in stage.peers:  # read before torch._dynamo.reset() clears the counters
            record["dynamo"] = {"graphs": counters["stats"]["unique_graphs"] - graphs,
                                "graph_breaks": sum(counters["graph_break"].values()) - breaks}
    except Exception as error:  # noqa: BLE001 - a failed stage is a note; the others still run
        text = str(error).splitlines()[0][:300] if str(error) else ""
        record.update(status="error", error=f"{type(error).__name__}: {text}", traceback=traceback.format_exc(),
                      seconds=round(time.perf_counter() - start, 1))
        log(f"{name} {stage.precision} [{stage.round}]: FAILED {record['error']}\n{record['traceback']}")
        return record
    finally:
        del module
        if "compile" in stage.peers:
            torch._dynamo.reset()
        free_memory()
    end = time.perf_counter()
    record["seconds"] = round(end - start, 1)
    record["status"] = "ok"
    durations = [(message, (steps[i + 1][0] if i + 1 < len(steps) else end) - t)
                 for i, (t, message) in enumerate(steps)]
    record["steps"] = [{"what": message, "s": round(s, 2)} for message, s in durations]
    built = next((s for message, s in durations if message.startswith("building")), None)
    if built is not None:
        record["build_s"] = round(built, 1)
        if stage.precision in live.cold_build_s:
            live.warm_build_s = built
        else:
            live.cold_build_s[stage.precision] = built
    if "compile" in stage.peers:
        # run_bench reports no compile time: the step from "compile at batch B" to the next message is
        # torch.compile's first calls (compile + one run) plus the timed repeats, whose length is known
        timed = args.repeats * (args.warmup_ms / 1e3 + args.duration_s)
        record["compile"] = []
        for message, s in durations:
            if message.startswith("compile at batch "):
                batch = int(message.removeprefix("compile at batch ").split()[0])
                row = result.row("compile", batch)
                setup = max(s - timed, 0.0) if row is not None and row.best is not None else s
                record["compile"].append({"batch": batch, "setup_s": round(setup, 1), "timed_s": round(s - setup, 1)})
                state.compile_times.append(setup)
    with state.lock:
        merged, repeated = merge(live.results.get(stage.precision), result)
        live.results[stage.precision] = merged
        live.record["results"][stage.precision] = merged.to_json()
        record["repeated_rows"] = [{"target": r.target, "batch": r.batch,
                                    "median_ms": _median(r.best) if r.best else None} for r in repeated]
    return record


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.zoo", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--out", required=True, help="folder for zoo.json, zoo.md and plots/")
    parser.add_argument("--models", help=f"comma-separated subset of {', '.join(FULL_ZOO)} "
                                          f"(--smoke: {', '.join(SMOKE_ZOO)}); default all")
    parser.add_argument("--stages", help=f"comma-separated stages, run in the order given (default {','.join(ROUNDS)})")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: a test of this script")
    parser.add_argument("--budget-s", type=float, help="time budget in seconds (default 540; --smoke 300)")
    parser.add_argument("--work", help="folder for ONNX files and timing caches (default: a temporary folder, removed)")
    parser.add_argument("--plots-dir", help="copy the plots here (default docs/bench of this repository; "
                                            "none for --smoke and for --render of a smoke run)")
    parser.add_argument("--update",
                        help="splice the markdown into this file between the zoo markers (e.g. BENCHMARKS.md)")
    parser.add_argument("--details", action="store_true",
                        help="also write OUT/details/MODEL_PRECISION.json and .png (report.write_json, report.plot)")
    parser.add_argument("--render", nargs="+", metavar="ZOO_JSON",
                        help="measure nothing: regenerate every output from these zoo.json files (merged in order)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile stages")
    parser.add_argument("--compile-estimate-s", type=float,
                        help="torch.compile time per batch size assumed until one is measured (default 60; --smoke 20)")
    parser.add_argument("--ort-large-max-s", type=float, default=20.0,
                        help="run onnxruntime CPU at the large batch only if projected under this (default 20)")
    parser.add_argument("--warmup-ms", type=float, help="warm-up per measurement (default 100; --smoke 10)")
    parser.add_argument("--duration-s", type=float, help="timed part of a measurement (default 1.0; --smoke 0.05)")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per target and batch (default 2)")
    parser.add_argument("--opt-level", type=int, choices=range(6),
                        help="kiln optimization level (default 3; --smoke 1)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    defaults = {"budget_s": (300.0, 540.0), "compile_estimate_s": (20.0, 60.0), "warmup_ms": (10.0, 100.0),
                "duration_s": (0.05, 1.0), "opt_level": (1, 3)}
    for key, (small, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if smoke else full)
    if args.plots_dir is None and not smoke and not args.render:
        args.plots_dir = str(REPO / "docs" / "bench")
    zoo = SMOKE_ZOO if smoke else FULL_ZOO
    args.model_names = args.models.split(",") if args.models else list(zoo)
    unknown = [m for m in args.model_names if m not in zoo]
    if unknown and not args.render:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(zoo)}")
    args.rounds = args.stages.split(",") if args.stages else list(ROUNDS)
    if [r for r in args.rounds if r not in ROUNDS]:
        parser.error(f"unknown stage(s) {[r for r in args.rounds if r not in ROUNDS]}; choose from {', '.join(ROUNDS)}")
    args.rounds = list(dict.fromkeys(args.rounds))
    args.device = "cpu" if smoke else "cuda"
    return args


def driver_version() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None


def render_only(args) -> int:
    """--render: merge the given zoo.json files (later stages' rows added where missing) and write everything."""
    zoo: dict[str, Any] | None = None
    runs: list[dict[str, Any]] = []
    for path in args.render:
        data = json.loads(Path(path).read_text())
        runs += _runs(data["meta"])
        if zoo is None:
            zoo = data
            continue
        zoo["notes"] += [n for n in data.get("notes", []) if n not in zoo["notes"]]
        for name, record in data["models"].items():
            mine = zoo["models"].setdefault(name, record)
            if mine is record:
                continue
            mine["stages"] += record.get("stages", [])
            for precision, result in record.get("results", {}).items():
                base = (BenchResult.from_json(mine["results"][precision]) if precision in mine.get("results", {})
                        else None)
                mine.setdefault("results", {})[precision] = merge(base, BenchResult.from_json(result))[0].to_json()
    zoo["notes"] = [n for n in zoo["notes"] if not n.startswith(_PER_RUN_NOTES)]
    if len(args.render) > 1:
        zoo["meta"]["runs"] = sorted({(r["date"], r["command"]): r for r in runs}.values(), key=lambda r: r["date"])
        zoo["meta"]["date"] = zoo["meta"]["runs"][0]["date"]
        zoo["meta"]["rendered"] = args.command_line
    if args.plots_dir is None and not zoo["meta"]["smoke"]:
        args.plots_dir = str(REPO / "docs" / "bench")
    Outputs(args).write(zoo)
    log(f"rendered {', '.join(args.render)} into {args.out}")
    return 0


def one_round(round_name: str, live: Live, state: Session) -> None:
    """Plan this round's stage for one model, check it fits in the budget, run it, record it, save."""
    name, args = live.zoo.name, state.args
    if live.record["export"].get("error"):
        return  # said once, by the round that tried

    def skip(reason: str, stage: Stage | None = None) -> None:
        with state.lock:
            live.record["stages"].append({"round": round_name, "status": "skipped", "reason": reason,
                                          "precision": stage.precision if stage else None,
                                          "batches": stage.batches if stage else None})
        log(f"{name} [{round_name}]: not run: {reason}")
        state.save(plot_models=[])

    stage, why_not = plan(round_name, live, state)
    if stage is None:
        if why_not:
            skip(why_not)
        return
    if stage.estimate_s > state.left() - RESERVE_S:
        skip(f"time budget: {max(state.left(), 0):.0f} s left of {args.budget_s:.0f} s, the stage needs about "
             f"{stage.estimate_s:.0f} s", stage)
        return
    if not ensure_exported(live, state):
        state.current = None
        skip("the model could not be made or exported", stage)
        return
    what = _round_what(round_name, stage.batches)
    state.current = (name, round_name, f"{name} {round_name} ({what})")
    log(f"{name} [{round_name}]: {what}, about {stage.estimate_s:.0f} s ({state.left():.0f} s left)")
    record = run_stage(stage, live, state)
    with state.lock:
        live.record["stages"].append(record)
        state.current = None
    state.save(plot_models=[name])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.render:
        args.command_line = command_line("benchmarks.zoo", argv)
        return render_only(args)
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA GPU here: run on the GPU machine, or use --smoke", file=sys.stderr)
        return 2
    for category in (UserWarning, DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    if args.update:  # a broken file must fail now, not after minutes of measuring
        try:
            splice(Path(args.update).read_text() if Path(args.update).exists() else "", "")
        except (OSError, ValueError) as error:
            print(f"--update {args.update}: {error}", file=sys.stderr)
            return 2
    own_work = args.work is None
    args.work = args.work or tempfile.mkdtemp(prefix="kiln_zoo_")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    flags = {"cudnn.benchmark": torch.backends.cudnn.benchmark}
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # put back at the end
    if not args.smoke:  # fp32 means fp32 for every target: torch's cuDNN default would run eager convolutions in TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    flags.update({"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                  "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32})
    zoo_models = SMOKE_ZOO if args.smoke else FULL_ZOO
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": command_line("benchmarks.zoo", argv),
        "smoke": args.smoke,
        "versions": versions(), "gpu": gpu_info(), "driver": None if args.smoke else driver_version(),
        "host_cpus": os.cpu_count(), "torch_flags": flags, "budget_s": args.budget_s, "opt_level": args.opt_level,
        "timing": {"warmup_ms": args.warmup_ms, "duration_s": args.duration_s, "repeats": args.repeats},
        "stages": args.rounds, "elapsed_s": 0.0, "cut": None,
    }
    notes = [
        "TF32 off for every fp32 target (torch.backends.cuda.matmul.allow_tf32 and cudnn.allow_tf32 False); "
        f"cudnn.benchmark {flags['cudnn.benchmark']} (torch's default) for eager and compile"
        if not args.smoke else "smoke run on the CPU: tiny models, optimization level 1, millisecond timing",
        "onnxruntime runs the fp32 ONNX file whatever kiln's precision: measured once, beside kiln fp32, at batch 1, "
        f"and at the large batch only where batch-1 latency x batch x {ORT_CALLS} calls stays under "
        f"{args.ort_large_max_s:g} s",
        "eager and compile run the torch module (kiln.bench's module= path), not the ONNX file; torch.compile: "
        "default mode, dynamic=False (one graph per batch size), its compile time is in each model's notes",
    ]
    zoo = {"meta": meta, "notes": notes, "models": {}}
    state = Session(args, zoo, Outputs(args))
    lives: dict[str, Live] = {}
    for name in args.model_names:
        z = zoo_models[name]
        record = {"title": z.title, "source": z.source, "large": z.large, "sweep": z.sweep,
                  "inputs": {k: [list(s), kind] for k, (s, kind) in z.spec.inputs.items()}, "export": {},
                  "stages": [], "results": {}}
        zoo["models"][name] = record
        lives[name] = Live(z, record)
    gpu = meta["gpu"].get("name") or "CPU (smoke)"
    log(f"kiln model zoo on {gpu}: models {', '.join(args.model_names)}; stages {', '.join(args.rounds)}; "
        f"budget {args.budget_s:.0f} s; work in {args.work}")
    state.save()
    if not args.smoke:
        state.watch()
    try:
        for round_name in args.rounds:
            for name in args.model_names:
                try:
                    one_round(round_name, lives[name], state)
                except Exception as error:  # noqa: BLE001 - a bug in one stage must not lose the others
                    with state.lock:
                        lives[name].record["stages"].append(
                            {"round": round_name, "status": "error", "precision": None,
                             "traceback": traceback.format_exc(),
                             "error": f"{type(error).__name__}: {str(error)[:300]}"})
                        state.current = None
                    log(f"{name} [{round_name}]: FAILED\n{traceback.format_exc()}")
                    state.save(plot_models=[])
    finally:
        state.done = True
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        for live in lives.values():
            live.module = None
        if own_work:
            shutil.rmtree(args.work, ignore_errors=True)
    state.save(plot_models=[])
    log(f"wrote {Path(args.out) / 'zoo.json'}, {Path(args.out) / 'zoo.md'} and the plots")
    failed = [f"{name} {s['round']}" for name, r in zoo["models"].items() for s in r["stages"]
              if s["status"] == "error"]
    failed += [f"{name} export" for name, r in zoo["models"].items() if r["export"].get("error")]
    if failed:
        log(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
