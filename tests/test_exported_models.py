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
    path = tmp_path / f"{family}_{exporter}{opset}_{str(dtype).removeprefix('torch.')}.onnx"
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
    for d in compare_outputs(outputs, reference):
        assert d.max_rel <= 1e-4, f"{path.name} output {d.name}: max rel diff {d.max_rel:.2e}"


# Each case uses an exporter that writes a valid model in that dtype: the TorchScript exporter writes
# torch's dtype code for bfloat16 (15, ONNX's complex128) into some Cast nodes of transformers, and
# the dynamo exporter folds BatchNorm into float32 Conv biases of bfloat16 CNNs (onnxruntime refuses
# both models too).
LOW_PRECISION = [
    (family, torch.float16, "torchscript", 17) for family in ["resnet", "convnext", "bert", "gpt2"]
] + [
    ("resnet", torch.bfloat16, "torchscript", 17), ("convnext", torch.bfloat16, "torchscript", 17),
    ("bert", torch.bfloat16, "dynamo", 18), ("gpt2", torch.bfloat16, "dynamo", 18),
]


@pytest.mark.slow
@pytest.mark.parametrize("family,dtype,exporter,opset", LOW_PRECISION,
                         ids=[f"{f}-{str(d)[6:]}-{e}{o}" for f, d, e, o in LOW_PRECISION])
def test_family_in_low_precision(tmp_path, family, dtype, exporter, opset):
    """A model exported in fp16/bf16 runs in that dtype and stays within 1e-2 of the fp32 model."""
    low = _export(tmp_path, family, exporter, opset, dtype)
    full = _export(tmp_path, family, exporter, opset)
    executor = kiln.Executor(kiln.load_model(low), name=low.name)
    feeds = _feeds(family, executor, np.float32)
    low_feeds = {k: torch.from_numpy(v).to(dtype) if v.dtype.kind == "f" else v for k, v in feeds.items()}
    outputs = executor.run(low_feeds)
    assert all(value.dtype == dtype for value in outputs.values())
    reference = run_onnxruntime(full, feeds)
    # The two exports name their outputs differently; they agree in order.
    renamed = {ref_name: value.float() for ref_name, value in zip(reference, outputs.values())}
    for d in compare_outputs(renamed, reference):
        assert d.max_rel <= 1e-2, f"{low.name} output {d.name}: max rel diff {d.max_rel:.2e} against fp32"
