"""The builder and engine on the GPU: every tactic, CUDA-graph replay, reduced precision vs onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from families import example_inputs, export_family

import kiln
from kiln.builder import BuildConfig, Profile
from kiln.compare import run_onnxruntime
from kiln.precision import scaled_error
from tests.builder.graphs import model, node, weights

pytestmark = pytest.mark.cuda

CASES = [("resnet", "torchscript"), ("bert", "torchscript"), ("gpt2", "dynamo"), ("vit", "dynamo"),
         ("convnext", "torchscript"),
         ("mobilenet_v3", "dynamo"), ("efficientnet", "torchscript")]


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("fp16", 1e-2)])
@pytest.mark.parametrize("family,exporter", CASES, ids=[f"{f}-{e}" for f, e in CASES])
def test_engine_matches_onnxruntime_on_every_run(tmp_path, family, exporter, precision, tol):
    """Run 1 runs every layer, run 2 captures a CUDA graph, run 3 replays it: all three match."""
    path = export_family(tmp_path, family, exporter)
    feeds = {k: v.numpy()
             for k, v in example_inputs(family, batch=3, seq=6, generator=torch.Generator().manual_seed(5)).items()}
    profile = Profile.from_lists(opt_shapes={k: v.shape for k, v in feeds.items()})
    flags = {} if precision == "fp32" else {precision: True}
    engine = kiln.build(path, BuildConfig(device="cuda", opt_level=2, profiles=[profile], **flags))
    reference = run_onnxruntime(path, feeds)
    for _ in range(3):
        got = engine.run(feeds)
        for name, ref in reference.items():
            assert scaled_error(got[name].float().cpu(), torch.from_numpy(ref).float()) <= tol, name
    assert engine.graph_errors == []  # every layer, the passes' Pad and Slice nodes included, was captured


def _models(rng):
    conv = model([node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), node("Add", ["c", "z"], ["s"]),
                  node("Relu", ["s"], ["y"])],
                 [("x", [4, 16, 8, 8]), ("z", [4, 32, 8, 8])], [("y", [4, 32, 8, 8])],
                 [("w", weights(rng, 32, 16, 3, 3)), ("b", weights(rng, 32))])
    gemm = model([node("MatMul", ["x", "w"], ["m"]), node("Add", ["m", "b"], ["a"]), node("Relu", ["a"], ["y"])],
                 [("x", [4, 32, 64])], [("y", [4, 32, 128])], [("w", weights(rng, 64, 128)), ("b", weights(rng, 128))])
    norm = model([node("Add", ["x", "r"], ["s"]), node("LayerNormalization", ["s", "g", "b"], ["y"])],
                 [("x", [4, 32, 96]), ("r", [4, 32, 96])], [("y", [4, 32, 96])],
                 [("g", weights(rng, 96) + 1), ("b", weights(rng, 96))])
    softmax = model([node("Softmax", ["x"], ["y"], axis=-1)], [("x", [4, 8, 100])], [("y", [4, 8, 100])])
    chain = model([node("Mul", ["x", "r"], ["a"]), node("Tanh", ["a"], ["b"]), node("Add", ["b", "r"], ["y"])],
                  [("x", [4, 32, 64]), ("r", [64])], [("y", [4, 32, 64])])
    from onnx import TensorProto

    attention = model([node("Mul", ["q", "r"], ["qs"]), node("Mul", ["k", "r"], ["ks"]),
                       node("MatMul", ["qs", "ks"], ["s"]),
                       node("Where", ["m", "zero", "ninf"], ["bias"]), node("Add", ["s", "bias"], ["x"]),
                       node("Softmax", ["x"], ["p"], axis=-1), node("IsNaN", ["p"], ["nan"]),
                       node("Where", ["nan", "zero", "p"], ["pc"]), node("MatMul", ["pc", "v"], ["y"])],
                      [("q", [4, 12, 64, 64]), ("k", [4, 12, 64, 64]), ("v", [4, 12, 64, 64]),
                       ("m", [4, 1, 1, 64], TensorProto.BOOL)],
                      [("y", [4, 12, 64, 64])],
                      [("r", np.array(64 ** -0.25, np.float32)), ("zero", np.array(0.0, np.float32)),
                       ("ninf", np.array(-np.inf, np.float32))])
    return {"attention.torch": attention, "attention.sdpa": attention, "conv.nchw": conv, "conv.nhwc": conv,
            "conv.cudnn_fused": conv, "gemm.torch": gemm, "gemm.cublaslt": gemm,
            "gemm.triton": gemm, "layernorm.torch": norm, "layernorm.triton": norm, "softmax.torch": softmax,
            "softmax.triton": softmax, "pointwise.torch": chain, "pointwise.triton": chain}


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("fp16", 1e-2), ("bf16", 1e-2)])
@pytest.mark.parametrize("tactic", sorted(_models(np.random.default_rng(0))))
def test_each_tactic_alone_is_chosen_and_correct(rng, tactic, precision, tol):
    """Only this tactic (and the kind's reference, which checks it) allowed: it wins and matches."""
    m = _models(rng)[tactic]
    kind = tactic.split(".")[0]
    from kiln.builder.tactics import registry

    reference = next(t.name for t in registry.all_tactics() if t.reference and t.name.startswith(kind + "."))
    deny = [] if tactic == reference else [reference]
    flags = {} if precision == "fp32" else {precision: True}
    # layout alternatives come at level 4: NCHW in reduced precision, NHWC in fp32
    alternative = (tactic == "conv.nchw" and precision != "fp32") or (tactic == "conv.nhwc" and precision == "fp32")
    level = 4 if alternative else 3
    engine = kiln.build(m, BuildConfig(device="cuda", opt_level=level, allow_tactics=[tactic], deny_tactics=deny,
                                       precision_check=False, **flags))
    chosen = {layer["choices"][0]["tactic"] for layer in engine.plan["layers"] if layer["kind"] != "Node"}
    assert chosen == {tactic}
    feeds = {v.name: (rng.random(list(v.shape)) < 0.7) if v.dtype == ir.DataType.BOOL
             else rng.standard_normal(list(v.shape)).astype(np.float32) for v in m.graph.inputs}
    got, ref = engine.run(feeds), kiln.Executor(m).run(feeds)
    for name in ref:
        assert scaled_error(got[name].float().cpu(), ref[name].float()) <= tol


def test_memory_limit_rejects_tactics_that_need_scratch(rng):
    m = _models(rng)["conv.nchw"]
    engine = kiln.build(m, BuildConfig(device="cuda", opt_level=4, fp16=True, memory_limit=0))
    feeds = {v.name: rng.standard_normal([d for d in v.shape]).astype(np.float32) for v in m.graph.inputs}
    got, ref = engine.run(feeds), kiln.Executor(m).run(feeds)
    assert scaled_error(got["y"].float().cpu(), ref["y"].float()) <= 1e-2
    notes = [n for layer in engine.plan["layers"] for n in layer["notes"]]
    assert all("scratch memory" in n for n in notes if "rejected" in n and "relative error" not in n)
