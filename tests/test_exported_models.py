"""Models as the torch exporters emit them run on kiln and match onnxruntime.

Each family (tests/families.py) is exported by the TorchScript exporter at opsets 13 and 17 and by
the dynamo exporter at opset 18, with dynamic batch (and sequence) dimensions, then run at a batch
size other than the traced one, so the exported shape arithmetic is exercised for real.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from families import TEXT, VISION, build, example_inputs, export

import kiln
from kiln.compare import compare_outputs, run_onnxruntime

EXPORTERS = [("torchscript", 13), ("torchscript", 17), ("dynamo", 18)]


def _export(tmp_path, family, exporter, opset, dtype=torch.float32):
    model = build(family).to(dtype)
    inputs = example_inputs(family)
    if dtype != torch.float32:
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    path = tmp_path / f"{family}_{exporter}{opset}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(model, inputs, path, exporter, opset)
    return path


def _feeds(family, executor, dtype=np.float32):
    inputs = example_inputs(family, batch=3, seq=6, generator=torch.Generator().manual_seed(7))
    names = [v.name for v in executor.inputs]
    feeds = {}
    for name, value in inputs.items():
        if name in names:
            array = value.numpy()
            feeds[name] = array.astype(dtype) if array.dtype.kind == "f" else array
    return feeds


@pytest.mark.slow
@pytest.mark.parametrize("exporter,opset", EXPORTERS, ids=[f"{e}{o}" for e, o in EXPORTERS])
@pytest.mark.parametrize("family", sorted(VISION) + sorted(TEXT))
def test_family_matches_onnxruntime_fp32(tmp_path, family, exporter, opset):
    path = _export(tmp_path, family, exporter, opset)
    executor = kiln.Executor(kiln.load_model(path), name=path.name)
    feeds = _feeds(family, executor)
    outputs = executor.run(feeds)
    reference = run_onnxruntime(path, feeds)
    for d in compare_outputs(outputs, reference, tolerance=1e-4):
        assert d.max_rel <= 1e-4, f"{path.name} output {d.name}: max rel diff {d.max_rel:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("family", ["resnet", "convnext", "bert", "gpt2"])
def test_family_in_low_precision(tmp_path, family, dtype):
    """A model exported in fp16/bf16 runs in that dtype and stays within 1e-2 of the fp32 model."""
    low = _export(tmp_path, family, "torchscript", 17, dtype)
    full = _export(tmp_path, family, "torchscript", 17)
    executor = kiln.Executor(kiln.load_model(low), name=low.name)
    np_dtype = {torch.float16: np.float16, torch.bfloat16: np.float32}[dtype]
    feeds = _feeds(family, executor, np_dtype)
    if dtype == torch.bfloat16:
        feeds = {k: torch.from_numpy(v).to(torch.bfloat16) if v.dtype.kind == "f" else v for k, v in feeds.items()}
    outputs = executor.run(feeds)
    for value in outputs.values():
        assert value.dtype == dtype
    full_feeds = {k: (v.float().numpy() if isinstance(v, torch.Tensor) else v.astype(np.float32) if v.dtype.kind == "f" else v)
                  for k, v in feeds.items()}
    reference = run_onnxruntime(full, full_feeds)
    for d in compare_outputs({k: v.float() for k, v in outputs.items()}, reference, tolerance=1e-2):
        assert d.max_rel <= 1e-2, f"{low.name} output {d.name}: max rel diff {d.max_rel:.2e} against fp32"
