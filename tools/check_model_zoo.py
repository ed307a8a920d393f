"""Export the real model families with both torch exporters and check kiln against onnxruntime.

Runs where torchvision and transformers are installed (the lent GPU machine): each architecture is
built with random weights (nothing is downloaded), exported by the TorchScript exporter (opset 13,
or 14 where the model uses scaled_dot_product_attention, and 17) and by the dynamo exporter
(opset 18), then run by kiln on CPU and on CUDA in float32 and compared with onnxruntime (CPU).

    PYTHONPATH=src python3 -m tools.check_model_zoo --out OUT_DIR [--models resnet50,bert] [--workers 8]

(a module run from the repository root: its model wrappers come from ``benchmarks.models``).

Writes OUT_DIR/model_zoo.json and OUT_DIR/model_zoo.md (a table: model, exporter, opset, nodes,
max relative difference on CPU and CUDA, verdict).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from benchmarks.models import TextModel, VisionModel, redraw_zero_parameters

VISION = ["resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny", "regnet_y_400mf",
          "vit_b_16"]
TEXT = ["bert", "distilbert", "gpt2"]
USES_SDPA = {"vit_b_16", "bert", "distilbert", "gpt2"}
BATCH, SEQ = 2, 64


def _build(name: str):

    torch.manual_seed(0)
    if name in VISION:
        import torchvision

        model = redraw_zero_parameters(getattr(torchvision.models, name)(weights=None).eval())
        return model, {"images": torch.randn(BATCH, 3, 224, 224)}
    import transformers

    config = {"bert": transformers.BertConfig, "distilbert": transformers.DistilBertConfig,
              "gpt2": transformers.GPT2Config}[name]()
    config.return_dict = False
    if name == "gpt2":
        config.use_cache = False
    model = {"bert": transformers.BertModel, "distilbert": transformers.DistilBertModel,
             "gpt2": transformers.GPT2Model}[name](config).eval()
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, SEQ // 2:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if name == "bert":
        inputs["token_type_ids"] = torch.randint(0, 2, (BATCH, SEQ))
    return model, inputs


def _export(model, inputs: dict, path: Path, exporter: str, opset: int) -> None:
    """Export with dynamic batch (and sequence) dims, through a wrapper with named inputs. Gradients stay enabled:
    under no_grad, nn.MultiheadAttention takes a fused fast path the TorchScript exporter cannot export."""

    names = list(inputs)
    text = "input_ids" in inputs
    wrapped = TextModel(model, all_outputs=True) if text else VisionModel(model)
    if exporter == "torchscript":
        axes = {n: {0: "batch", 1: "sequence"} if text else {0: "batch"} for n in names}
        torch.onnx.export(wrapped, tuple(inputs.values()), str(path), input_names=names, opset_version=opset,
                          dynamo=False, dynamic_axes=axes)
    else:
        batch = torch.export.Dim("batch", min=1, max=256)
        seq = torch.export.Dim("sequence", min=2, max=512)
        shapes = tuple({0: batch, 1: seq} if text else {0: batch} for _ in names)
        torch.onnx.export(wrapped, tuple(inputs.values()), str(path), input_names=names, opset_version=opset,
                          dynamo=True, dynamic_shapes=shapes, verbose=False, external_data=True)


def check(name: str, exporter: str, opset: int, work: str, devices: list[str]) -> dict:
    """Export one model and compare kiln (each device) with onnxruntime. Runs in a worker process."""
    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.WARNING)
    import numpy as np

    import kiln
    from kiln.compare import compare_outputs, run_onnxruntime

    torch.set_num_threads(2)
    row = {"model": name, "exporter": exporter, "opset": opset}
    try:
        model, inputs = _build(name)
        folder = Path(work) / f"{name}_{exporter}{opset}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "model.onnx"
        start = time.time()
        _export(model, inputs, path, exporter, opset)
        row["export_s"] = round(time.time() - start, 1)
        ir_model = kiln.load_model(path)
        row["nodes"] = len(ir_model.graph)
        row["ops"] = sorted({n.op_type for n in ir_model.graph})
        feeds = {v.name: inputs[v.name].numpy() for v in ir_model.graph.inputs if v.name in inputs}
        reference = run_onnxruntime(path, feeds)
        for device in devices:
            executor = kiln.Executor(ir_model, device=device, name=path.name)
            outputs = executor.run(feeds)
            if device == "cuda":
                torch.cuda.synchronize()
            diffs = compare_outputs(outputs, reference)
            row[f"max_rel_{device}"] = max(d.max_rel for d in diffs)
            row[f"outputs_{device}"] = {d.name: {"shape": list(d.shape), "max_abs": d.max_abs, "max_rel": d.max_rel}
                                        for d in diffs}
        row["ok"] = all(row[f"max_rel_{d}"] <= 1e-4 for d in devices)
        del np
    except Exception as error:  # noqa: BLE001 - a failing model is a row in the report, not a crash
        row["ok"] = False
        row["error"] = f"{type(error).__name__}: {str(error)[:500]}"
        row["trace"] = traceback.format_exc()[-2000:]
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default=",".join(VISION + TEXT))
    parser.add_argument("--exporters", default="torchscript-low,torchscript17,dynamo18")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--work", default="/tmp/kiln_zoo")
    args = parser.parse_args()

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    jobs = []
    for name in args.models.split(","):
        for spec in args.exporters.split(","):
            if spec == "torchscript-low":
                jobs.append((name, "torchscript", 14 if name in USES_SDPA else 13))
            elif spec.startswith("torchscript"):
                jobs.append((name, "torchscript", int(spec[len("torchscript"):])))
            else:
                jobs.append((name, "dynamo", int(spec[len("dynamo"):])))
    rows = []
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=context) as pool:
        futures = {pool.submit(check, *job, args.work, devices): job for job in jobs}
        for future in as_completed(futures):
            row = future.result()
            rows.append(row)
            status = "ok" if row["ok"] else "FAIL " + row.get("error", "over tolerance")
            print(f"{row['model']:20s} {row['exporter']:11s} opset {row['opset']:2d}: "
                  + " ".join(f"{d} {row.get(f'max_rel_{d}', float('nan')):.2e}" for d in devices) + f"  {status}",
                  flush=True)
    rows.sort(key=lambda r: (r["model"], r["exporter"], r["opset"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    (out / "model_zoo.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"Model zoo check, {meta['date']}, {meta['gpu']}, torch {meta['torch']}: kiln fp32 vs onnxruntime CPU "
             "(max |kiln - ort| / max |ort| over all outputs; tolerance 1e-4).", "",
             "| model | exporter | opset | nodes | " + " | ".join(f"rel diff {d}" for d in devices) + " | verdict |",
             "|---|---|---|---|" + "---|" * len(devices) + "---|"]
    for r in rows:
        cells = [f"{r.get(f'max_rel_{d}', float('nan')):.1e}" for d in devices]
        verdict = "ok" if r["ok"] else ("error: " + r.get("error", "")[:80].replace("|", "/") if "error" in r
                                        else "over")
        lines.append(f"| {r['model']} | {r['exporter']} | {r['opset']} | {r.get('nodes', '-')} "
                     "| " + " | ".join(cells) + f" | {verdict} |")
    (out / "model_zoo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
