"""The bench peers (``kiln.bench.peers``) run the model they are given and return its outputs:
each peer that runs on the CPU is set up, iterated (h2d, compute, d2h) and checked against numpy on
fresh random inputs; peers that cannot run here are reported with their reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kiln.bench.peers import PEERS, CompileTarget, EagerTarget, OrtTarget, make_peers
from kiln.errors import KilnError

IN, HIDDEN, OUT = 8, 16, 4


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


@pytest.fixture
def weights(rng):
    return {"w1": rng.standard_normal((IN, HIDDEN)).astype(np.float32),
            "b1": rng.standard_normal(HIDDEN).astype(np.float32),
            "w2": rng.standard_normal((HIDDEN, OUT)).astype(np.float32)}


@pytest.fixture
def onnx_path(tmp_path, weights):
    """y = relu(x @ w1 + b1) @ w2, and h = relu(x @ w1 + b1): two outputs, a dynamic batch."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["mm"]), helper.make_node("Add", ["mm", "b1"], ["pre"]),
             helper.make_node("Relu", ["pre"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUT]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", HIDDEN])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path = tmp_path / "mlp.onnx"
    onnx.save(model, path)
    return path


class MLP(torch.nn.Module):
    """The ONNX model as a torch module: returns (y, h) as the ONNX model orders its outputs."""

    def __init__(self, weights):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.from_numpy(weights["w1"]))
        self.b1 = torch.nn.Parameter(torch.from_numpy(weights["b1"]))
        self.w2 = torch.nn.Parameter(torch.from_numpy(weights["w2"]))

    def forward(self, x):
        h = torch.relu(x @ self.w1 + self.b1)
        return h @ self.w2, h


def reference(weights, x):
    h = np.maximum(x.astype(np.float64) @ weights["w1"] + weights["b1"], 0)
    return {"y": h @ weights["w2"], "h": h}


def check_runs(target, weights, rng, batches=(3, 5), iterations=3):
    """Set up at each batch, iterate, and compare the outputs with numpy on fresh random inputs."""
    try:
        for batch in batches:
            x = rng.standard_normal((batch, IN)).astype(np.float32)
            target.setup({"x": x})
            for _ in range(iterations):
                target.h2d()
                target.compute()
                target.d2h()
            if target.device.type == "cuda" and target.gpu_timed:
                torch.cuda.synchronize(target.device)
            got, want = target.outputs(), reference(weights, x)
            assert set(got) == set(want)
            for name in want:
                assert got[name].shape == want[name].shape and got[name].dtype == np.float32
                assert rel(got[name], want[name]) <= 1e-4, name
    finally:
        target.close()


def test_eager_on_the_executor(onnx_path, weights, rng):
    target = EagerTarget(onnx_path=onnx_path, device="cpu")
    assert target.name == "eager" and not target.gpu_timed and target.dtype is None
    check_runs(target, weights, rng)


def test_eager_module(onnx_path, weights, rng):
    check_runs(EagerTarget(module=MLP(weights), onnx_path=onnx_path, device="cpu"), weights, rng)


def test_eager_module_names_without_onnx(weights, rng):
    """Without the ONNX model the outputs are named by output_names, or output_0, output_1."""
    x = rng.standard_normal((2, IN)).astype(np.float32)
    target = EagerTarget(module=MLP(weights), device="cpu")
    target.setup({"x": x})
    target.compute()
    assert list(target.outputs()) == ["output_0", "output_1"]
    named = EagerTarget(module=MLP(weights), device="cpu", output_names=["y", "h"])
    named.setup({"x": x})
    named.compute()
    assert rel(named.outputs()["y"], reference(weights, x)["y"]) <= 1e-4


def test_eager_module_dict_output_and_wrong_count(rng):
    class Dict(torch.nn.Module):
        def forward(self, a, b):
            return {"sum": a + b, "none": None, "diff": a - b}

    a, b = (rng.standard_normal((2, 3)).astype(np.float32) for _ in range(2))
    target = EagerTarget(module=Dict(), device="cpu")
    target.setup({"a": a, "b": b})
    target.compute()
    out = target.outputs()
    assert list(out) == ["sum", "diff"] and np.allclose(out["diff"], a - b)
    wrong = EagerTarget(module=Dict(), device="cpu", output_names=["only"])
    with pytest.raises(KilnError, match="returned 2 tensor"):
        wrong.setup({"a": a, "b": b})


def test_eager_module_in_float64(onnx_path, weights, rng):
    """``dtype`` casts the module and its floating inputs; outputs stay in that dtype."""
    target = EagerTarget(module=MLP(weights), onnx_path=onnx_path, device="cpu", dtype=torch.float64)
    x = rng.standard_normal((4, IN)).astype(np.float32)
    target.setup({"x": x})
    target.compute()
    out = target.outputs()
    assert out["y"].dtype == np.float64 and rel(out["y"], reference(weights, x)["y"]) <= 1e-6


def test_feeds_must_match_the_inputs(onnx_path, weights):
    for target in (EagerTarget(onnx_path=onnx_path, device="cpu"),
                   EagerTarget(onnx_path=onnx_path, module=MLP(weights), device="cpu")):
        with pytest.raises(KilnError, match="the feeds lack"):
            target.setup({"z": np.ones((1, IN), np.float32)})


def test_compile_on_the_executor(onnx_path, weights, rng):
    target = CompileTarget(onnx_path=onnx_path, device="cpu")
    check_runs(target, weights, rng, batches=(3,))
    assert target.compile_s is not None and target.compile_s > 0
    assert target.graphs is not None and target.graph_breaks is not None


def test_compile_module(onnx_path, weights, rng):
    target = CompileTarget(module=MLP(weights), onnx_path=onnx_path, device="cpu", mode="default")
    assert target.mode is None
    check_runs(target, weights, rng)
    assert target.compile_s > 0 and target.graphs >= 1


def test_onnxruntime_cpu(onnx_path, weights, rng):
    target = OrtTarget(onnx_path)
    assert target.name == "onnxruntime" and not target.gpu_timed
    check_runs(target, weights, rng)


def test_make_peers_on_cpu(onnx_path):
    import onnxruntime as ort

    targets, skipped = make_peers(PEERS, onnx_path=onnx_path, device="cpu")
    names = [t.name for t in targets]
    reasons = dict(skipped)
    assert names[:3] == ["eager", "compile", "onnxruntime"]
    assert "CUDA graphs need a GPU" in reasons["compile-reduce-overhead"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert "onnxruntime-cuda" in names
    else:
        assert "no CUDAExecutionProvider" in reasons["onnxruntime-cuda"]
    assert set(names) | set(reasons) == set(PEERS) and not set(names) & set(reasons)
    assert isinstance(targets[1], CompileTarget) and targets[1].mode is None


def test_make_peers_reasons(weights):
    targets, skipped = make_peers(["eager", "compile", "onnxruntime"], device="cpu")
    assert targets == [] and dict(skipped) == {
        "eager": "needs the ONNX file or a torch module", "compile": "needs the ONNX file or a torch module",
        "onnxruntime": "needs the ONNX file (onnxruntime does not run a torch module)"}
    targets, skipped = make_peers(["eager", "onnxruntime"], module=MLP(weights), device="cpu")
    assert [t.name for t in targets] == ["eager"] and [n for n, _ in skipped] == ["onnxruntime"]
    if not torch.cuda.is_available():
        targets, skipped = make_peers(["eager"], module=MLP(weights), device="cuda")
        assert targets == [] and "no CUDA GPU" in dict(skipped)["eager"]


def test_make_peers_missing_file(tmp_path):
    targets, skipped = make_peers(["eager", "onnxruntime"], onnx_path=tmp_path / "missing.onnx", device="cpu")
    assert targets == [] and all("no such file" in reason for _, reason in skipped) and len(skipped) == 2


def test_make_peers_unknown_name():
    with pytest.raises(KilnError, match="unknown peer.*tensorrt.*the peers are eager, compile"):
        make_peers(["eager", "tensorrt"], device="cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["eager", "compile", "compile-reduce-overhead"])
def test_torch_peers_on_cuda_executor(name, onnx_path, weights, rng):
    (target,), skipped = make_peers([name], onnx_path=onnx_path, device="cuda")
    assert not skipped and target.gpu_timed
    check_runs(target, weights, rng)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["eager", "compile", "compile-reduce-overhead"])
def test_torch_peers_on_cuda_module(name, onnx_path, weights, rng):
    (target,), skipped = make_peers([name], onnx_path=onnx_path, module=MLP(weights), device="cuda")
    assert not skipped and target.gpu_timed
    check_runs(target, weights, rng, iterations=5)


@pytest.mark.cuda
def test_module_in_float16_on_cuda(onnx_path, weights, rng):
    (target,), _ = make_peers(["eager"], onnx_path=onnx_path, module=MLP(weights), device="cuda", dtype=torch.float16)
    x = rng.standard_normal((4, IN)).astype(np.float32)
    target.setup({"x": x})
    target.h2d()
    target.compute()
    target.d2h()
    torch.cuda.synchronize()
    out = target.outputs()
    assert out["y"].dtype == np.float16 and rel(out["y"], reference(weights, x)["y"]) <= 1e-2


@pytest.mark.cuda
def test_onnxruntime_cuda(onnx_path, weights, rng):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDAExecutionProvider")
    (target,), _ = make_peers(["onnxruntime-cuda"], onnx_path=onnx_path, device="cuda")
    check_runs(target, weights, rng)
