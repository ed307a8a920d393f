"""Errors raised inside ops name the model or engine file once, first, then the node (or layer) and
its op: through kiln run on an ONNX file and on a built engine (exit code 2 for kiln's own
refusals, one line either way)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.cli import main

F = TensorProto.FLOAT


def _save(path, nodes, initializers, x_shape=("n", "m")):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, list(x_shape))],
                              [helper.make_tensor_value_info("y", F, ["a", "b"])],
                              [numpy_helper.from_array(a, n) for n, a in initializers])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    return path


MODELS = {
    # crops two columns: fine for m >= 2, an op error below
    "pad": ([helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Pad", ["r", "pads"], ["y"], name="pad")],
            [("pads", np.array([0, -2, 0, 0], np.int64))], "node 'pad' (op ai.onnx::Pad, opset 17): pads [0, -2, 0, 0] "
            "crop more than the input shape [2, 1]"),
    # a fixed last dim of 4: fine when n * m is a multiple of 4
    "reshape": ([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                 helper.make_node("Reshape", ["r", "shape"], ["y"], name="reshape")],
                [("shape", np.array([-1, 4], np.int64))],
                "(op Reshape) failed: RuntimeError: shape '[-1, 4]' is invalid for input of size 2"),
}


@pytest.mark.parametrize("case", sorted(MODELS))
def test_kiln_run_names_the_model_file_then_node_and_op(case, tmp_path, capsys):
    nodes, initializers, expected = MODELS[case]
    path = _save(tmp_path / f"{case}.onnx", nodes, initializers)
    assert main(["run", str(path), "--device", "cpu", "--shapes", "x:2x1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    where = "node 'reshape' " if case == "reshape" else ""
    assert err.startswith(f"kiln: error: {path}: {where}{expected}"), err
    assert err.count(str(path)) == 1


@pytest.mark.parametrize("case", sorted(MODELS))
def test_kiln_run_of_an_engine_names_the_engine_file_then_layer_and_op(case, tmp_path, capsys):
    nodes, initializers, expected = MODELS[case]
    path = _save(tmp_path / f"{case}.onnx", nodes, initializers)
    engine_path = tmp_path / f"{case}.kiln"
    profile = kiln.Profile.from_lists(min_shapes={"x": (1, 1)}, opt_shapes={"x": (2, 4)}, max_shapes={"x": (8, 8)})
    kiln.build(path, kiln.BuildConfig(device="cpu", opt_level=0, profiles=[profile])).save(engine_path)
    assert main(["run", str(engine_path), "--shapes", "x:2x1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    where = "layer 'reshape' " if case == "reshape" else ""
    assert err.startswith(f"kiln: error: {engine_path}: {where}{expected}"), err
    assert err.count(str(engine_path)) == 1 and "pad.onnx" not in err and "reshape.onnx" not in err
