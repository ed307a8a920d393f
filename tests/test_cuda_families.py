"""The exported model families on the GPU: kiln on CUDA matches onnxruntime (CPU) in fp32 and runs
fp16 models in fp16. Skipped without a GPU; run on the lent GPU."""

from __future__ import annotations

import pytest
from families import TEXT, VISION
from test_exported_models import _export, _feeds

import kiln
from kiln.compare import compare_outputs, run_onnxruntime


@pytest.mark.cuda
@pytest.mark.parametrize("exporter,opset", [("torchscript", 13), ("dynamo", 18)])
@pytest.mark.parametrize("family", sorted(VISION) + sorted(TEXT))
def test_family_on_cuda_matches_onnxruntime(tmp_path, family, exporter, opset):
    path = _export(tmp_path, family, exporter, opset)
    executor = kiln.Executor(kiln.load_model(path), device="cuda", name=path.name)
    feeds = _feeds(family, executor)
    outputs = executor.run(feeds)
    assert all(v.device.type == "cuda" for v in outputs.values())
    for d in compare_outputs(outputs, run_onnxruntime(path, feeds)):
        assert d.max_rel <= 1e-4, f"{path.name} output {d.name}: max rel diff {d.max_rel:.2e}"
