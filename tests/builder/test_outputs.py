"""Graph outputs that no layer computes: an initializer, a value folded from constants, a graph
input passed straight out, and a value listed twice. They build, save, load and run, match
onnxruntime, and the engine hands out copies (writing to an output never changes the engine or
the caller's input). The schema refuses a constant output that does not fit the file."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln import EngineLoadError
from kiln.compare import run_onnxruntime
from tests.builder.test_engine_file import read_engine, write_forged

F = TensorProto.FLOAT


def _model() -> onnx.ModelProto:
    """Outputs: w (an initializer), x (the input), y = x + w, y again, z = w * 2 (folded from constants)."""
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"], name="add"),
         helper.make_node("Mul", ["w", "two"], ["z"], name="double")],
        "outputs", [helper.make_tensor_value_info("x", F, [2, 3])],
        [helper.make_tensor_value_info(name, F, [2, 3]) for name in ("w", "x", "y", "y", "z")],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(2, np.float32), "two")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("outputs")
    onnx.save(_model(), folder / "outputs.onnx")
    kiln.build(folder / "outputs.onnx", kiln.BuildConfig(device="cpu", opt_level=1)).save(folder / "outputs.kiln")
    return folder / "outputs.onnx", folder / "outputs.kiln"


def test_outputs_no_layer_computes_build_save_load_run_and_match_onnxruntime(files):
    model_path, engine_path = files
    engine = kiln.load_engine(engine_path)
    assert [o["name"] for o in engine.outputs] == ["w", "x", "y", "z"]  # y listed twice is one output
    assert {o["name"]: "constant" in o for o in engine.outputs} == {"w": True, "x": False, "y": False, "z": True}
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    reference = run_onnxruntime(model_path, {"x": x})
    for outputs in (engine.run({"x": x}), engine.create_context().run({"x": x})):
        assert set(outputs) == set(reference)
        for name, ref in reference.items():
            np.testing.assert_allclose(outputs[name].numpy(), ref, rtol=1e-6, atol=0)


def test_constant_and_passthrough_outputs_are_copies(files):
    engine = kiln.load_engine(files[1])
    x = np.ones((2, 3), np.float32)
    outputs = engine.run({"x": x})
    with torch.inference_mode():  # outputs are inference tensors
        outputs["w"].fill_(-1)
        outputs["x"].fill_(-1)
    assert x.tolist() == [[1.0] * 3] * 2  # the caller's input is untouched
    again = engine.run({"x": x})
    assert again["w"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert torch.equal(again["x"], torch.ones(2, 3))


@pytest.mark.parametrize("mutate,match", [
    (lambda plan, stored: plan["outputs"][0].update(constant="nothing.here"),
     "plan.outputs[0].constant names \"nothing.here\", not a stored tensor"),
    (lambda plan, stored: plan["outputs"][0].update(dtype="float16"), "plan.outputs[0].constant is torch.float32"),
    (lambda plan, stored: plan["outputs"][2].update(constant=plan["outputs"][0]["constant"]),
     "plan.outputs[2].name names \"y\", which is also an input or a layer's output"),
    (lambda plan, stored: plan["outputs"][0].update(constant=7), "plan.outputs[0].constant"),
], ids=["missing tensor", "wrong dtype", "also computed", "not a string"])
def test_the_schema_refuses_constant_outputs_that_do_not_fit(files, tmp_path, mutate, match):
    header, stored = read_engine(files[1])
    mutate(header["plan"], stored)
    path = tmp_path / "forged.kiln"
    write_forged(path, header, stored)
    with pytest.raises(EngineLoadError, match=re.escape(match)):
        kiln.load_engine(path)
