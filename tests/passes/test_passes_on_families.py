"""After all passes, every model family (tests/families.py, both torch exporters) still computes what it
did: the standard-ONNX result matches onnxruntime on the original model, the kiln-ops result matches
kiln's executor on the original. Inputs are fresh random ones at a batch (and sequence) other than
the traced one, so rewritten shape arithmetic is exercised for real."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx
import pytest
import torch
from families import TEXT, VISION, build, example_inputs, export

import kiln
from kiln.compare import compare_outputs, run_onnxruntime
from kiln.passes.framework import PassContext, run_passes
from tests.passes.checks import to_proto

EXPORTERS = [("torchscript", 17), ("dynamo", 18)]


def _exported(tmp_path, family, exporter, opset):
    path = tmp_path / f"{family}_{exporter}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(build(family), example_inputs(family), path, exporter, opset)
    return path


def _feeds(family, model):
    inputs = example_inputs(family, batch=3, seq=6, generator=torch.Generator().manual_seed(11))
    names = {v.name for v in model.graph.inputs}
    return {name: value.numpy() for name, value in inputs.items() if name in names}


@pytest.mark.slow
@pytest.mark.parametrize("exporter,opset", EXPORTERS, ids=[e for e, _ in EXPORTERS])
@pytest.mark.parametrize("family", sorted(VISION) + sorted(TEXT))
def test_all_passes_keep_the_family_correct(tmp_path, family, exporter, opset):
    path = _exported(tmp_path, family, exporter, opset)
    original = kiln.load_model(path)
    feeds = _feeds(family, original)
    reference = run_onnxruntime(path, feeds)

    standard = kiln.load_model(path)
    report = run_passes(standard, PassContext(precision="fp16", kiln_ops=False, dims={"batch": 3, "sequence": 6}))
    proto = to_proto(standard)
    onnx.checker.check_model(proto)
    assert not any(n.domain == "ai.kiln" for n in proto.graph.node)
    out = tmp_path / "standard.onnx"
    onnx.save(proto, out)
    for d in compare_outputs(run_onnxruntime(out, feeds), reference):
        assert d.max_rel <= 1e-4, f"standard passes {report.rewrites}: {d.name} max rel {d.max_rel:.2e}"

    fused = kiln.load_model(path)
    report = run_passes(fused, PassContext(precision="fp16", kiln_ops=True, dims={"batch": 3, "sequence": 6}))
    got = kiln.Executor(kiln.load_model_proto(copy.deepcopy(to_proto(fused)), name="fused")).run(feeds)
    for d in compare_outputs({k: np.asarray(v) for k, v in got.items()}, reference):
        assert d.max_rel <= 1e-4, f"kiln-op passes {report.rewrites}: {d.name} max rel {d.max_rel:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("family,exporter,opset",
                         [("bert", "torchscript", 17), ("resnet", "dynamo", 18), ("gpt2", "torchscript", 17)])
def test_find_changes_nothing(tmp_path, family, exporter, opset):
    """Every pass's find() (what kiln doctor runs) leaves the model byte for byte as it was."""
    import onnx_ir as ir

    from kiln.passes.framework import find_all

    model = kiln.load_model(_exported(tmp_path, family, exporter, opset))
    before = ir.serde.serialize_model(model).SerializeToString()
    findings = find_all(model, PassContext(precision="fp16", kiln_ops=True, dims={"batch": 3, "sequence": 6}))
    assert findings
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_optimize_cli_on_a_family_passes_the_checker_and_matches_onnxruntime(tmp_path, capsys):
    from kiln.cli import main

    path = _exported(tmp_path, "resnet", "torchscript", 17)
    out = tmp_path / "opt.onnx"
    assert main(["optimize", str(path), "-o", str(out), "--precision", "fp16"]) == 0
    assert "nodes per op" in capsys.readouterr().out
    onnx.checker.check_model(str(out), full_check=True)
    feeds = _feeds("resnet", kiln.load_model(path))
    for d in compare_outputs(run_onnxruntime(out, feeds), run_onnxruntime(path, feeds)):
        assert d.max_rel <= 1e-4, d.name
    assert main(["optimize", str(path), "-o", str(tmp_path / "kiln.onnx"), "--kiln-ops"]) == 0
    assert any(n.domain == "ai.kiln" for n in onnx.load(str(tmp_path / "kiln.onnx")).graph.node)
    assert not any(n.domain == "ai.kiln" for n in onnx.load(str(out)).graph.node)
