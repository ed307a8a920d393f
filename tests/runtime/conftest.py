"""Engines for the runtime tests: a model with three independent branches (for auxiliary streams),
a dynamic batch and two optimization profiles, and its shape arithmetic (Shape -> Concat -> Reshape)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.builder import BuildConfig, Profile
from kiln.runtime import ExecutionContext

WIDTH = 16
ACTIVATIONS = ("Relu", "Tanh", "Sigmoid")


def branches_model() -> onnx.ModelProto:
    """x[N,16] -> three branches MatMul -> activation -> MatMul, summed, reshaped to [N,4,4] by a
    shape computed from x: y = Reshape(b0 + b1 + b2, Concat(Shape(x)[:1], [4, 4]))."""
    rng = np.random.default_rng(7)
    inits, nodes, outs = [], [], []
    for i, act in enumerate(ACTIVATIONS):
        inits += [numpy_helper.from_array((rng.standard_normal((WIDTH, 32)) / 4).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array((rng.standard_normal((32, WIDTH)) / 6).astype(np.float32), f"v{i}")]
        nodes += [helper.make_node("MatMul", ["x", f"w{i}"], [f"h{i}"], name=f"up{i}"),
                  helper.make_node(act, [f"h{i}"], [f"a{i}"], name=f"act{i}"),
                  helper.make_node("MatMul", [f"a{i}", f"v{i}"], [f"b{i}"], name=f"down{i}")]
        outs.append(f"b{i}")
    inits += [
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([4, 4], np.int64), "tail"),
    ]
    nodes += [
        helper.make_node("Add", [outs[0], outs[1]], ["s01"], name="sum01"),
        helper.make_node("Add", ["s01", outs[2]], ["s"], name="sum"),
        helper.make_node("Shape", ["x"], ["xs"], name="shape"),
        helper.make_node("Slice", ["xs", "zero", "one"], ["n"], name="batch"),
        helper.make_node("Concat", ["n", "tail"], ["target"], name="target", axis=0),
        helper.make_node("Reshape", ["s", "target"], ["y"], name="reshape"),
    ]
    graph = helper.make_graph(nodes, "branches", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


PROFILES = [Profile.from_lists({"x": (1, WIDTH)}, {"x": (2, WIDTH)}, {"x": (4, WIDTH)}),
            Profile.from_lists({"x": (5, WIDTH)}, {"x": (8, WIDTH)}, {"x": (16, WIDTH)})]


def build_branches(device: str = "cpu", aux: int = 0, **config) -> kiln.Engine:
    model = kiln.load_model_proto(branches_model(), name="branches")
    return kiln.build(
        model, BuildConfig(device=device, opt_level=1, profiles=list(PROFILES), max_aux_streams=aux, **config)
    )


def build_branches_file(folder, device: str) -> tuple:
    """The branches model saved in ``folder`` and built by ``kiln build`` into an engine file with two
    auxiliary streams and two profiles (batch 1-4, tuned at 2; batch 5-16, tuned at 8)."""
    from kiln.cli import main

    model = folder / "branches.onnx"
    onnx.save(branches_model(), model)
    engine = folder / "branches.kiln"
    assert main(["build", str(model), "-o", str(engine), "--device", device, "--opt-level", "1", "--quiet",
                 "--aux-streams", "2", "--min-shapes", f"x:1x{WIDTH}", "--opt-shapes", f"x:2x{WIDTH}", "--max-shapes",
                 f"x:4x{WIDTH}", "--min-shapes", f"x:5x{WIDTH}", "--opt-shapes", f"x:8x{WIDTH}", "--max-shapes",
                 f"x:16x{WIDTH}"]) == 0
    return model, engine


def reference(x: np.ndarray) -> np.ndarray:
    """What the model computes, in numpy (float64)."""
    proto = branches_model()
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in proto.graph.initializer}
    acts = {"Relu": lambda a: np.maximum(a, 0), "Tanh": np.tanh, "Sigmoid": lambda a: 1 / (1 + np.exp(-a))}
    total = sum(acts[act](x.astype(np.float64) @ w[f"w{i}"]) @ w[f"v{i}"] for i, act in enumerate(ACTIVATIONS))
    return total.reshape(x.shape[0], 4, 4)


def feeds(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, WIDTH)).astype(np.float32)}


@pytest.fixture(scope="module")
def engine() -> kiln.Engine:
    """The branches model built for the CPU with up to two auxiliary streams."""
    return build_branches("cpu", aux=2)


def runs_that_differ(context_for: Callable[[int], ExecutionContext], inputs: list[dict], expected: list, runs: int,
                     same: Callable[[object, object], bool]) -> list[str]:
    """One thread per input set, each running ``context_for(thread)`` ``runs`` times on its inputs;
    returns the runs whose output ``y`` is not ``same`` as that thread's expected one."""
    failures: list[str] = []

    def work(t: int) -> None:
        context = context_for(t)
        for i in range(runs):
            if not same(context.run(inputs[t])["y"], expected[t]):
                failures.append(f"thread {t} run {i}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failures
