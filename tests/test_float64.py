"""kiln.float64: the model with float32 made float64 everywhere (graphs, subgraphs, functions,
casts, constants) runs in float64 and computes what numpy computes in float64; the original model
is left as it was."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from kiln.executor import Executor
from kiln.float64 import distance, float64_model, widen
from kiln.onnx_io import load_model_proto

F = TensorProto.FLOAT


def _model() -> onnx.ModelProto:
    """y = If(flag, then: Cast<float>(x_int) * 0.1 + c, else: x_int as float * w) with a Constant value_float."""
    then = helper.make_graph(
        [helper.make_node("Cast", ["n"], ["nf"], to=F),
         helper.make_node("Constant", [], ["tenth"], value_float=0.1),
         helper.make_node("Mul", ["nf", "tenth"], ["scaled"]),
         helper.make_node("Add", ["scaled", "c"], ["t_out"])],
        "then", [], [helper.make_tensor_value_info("t_out", F, [3])],
        [numpy_helper.from_array(np.array([1 / 3, 2 / 3, 1.0], np.float32), "c")])
    other = helper.make_graph(
        [helper.make_node("Cast", ["n"], ["nf2"], to=F), helper.make_node("Mul", ["nf2", "w"], ["e_out"])],
        "else", [], [helper.make_tensor_value_info("e_out", F, [3])])
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["picked"], then_branch=then, else_branch=other),
         helper.make_node("Div", ["picked", "x"], ["y"])],
        "g", [helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
              helper.make_tensor_value_info("n", TensorProto.INT64, [3]),
              helper.make_tensor_value_info("x", F, [3])],
        [helper.make_tensor_value_info("y", F, [3])],
        [numpy_helper.from_array(np.array([0.7, 1.3, 2.9], np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_the_float64_model_computes_in_float64_and_leaves_the_original_alone():
    model = load_model_proto(_model(), name="m")
    wide = float64_model(model)
    n, x = np.array([1, 2, 7], np.int64), np.array([3.0, 7.0, 11.0], np.float32)
    c = np.array([1 / 3, 2 / 3, 1.0], np.float32).astype(np.float64)
    for flag, expected in ((True, (n * np.float64(np.float32(0.1)) + c) / x),
                           (False, n * np.array([0.7, 1.3, 2.9], np.float32).astype(np.float64) / x)):
        feeds = {"flag": np.array(flag), "n": n, "x": x}
        got = Executor(wide).run(widen(feeds))["y"]
        assert str(got.dtype) == "torch.float64"
        assert np.abs(got.numpy() - expected).max() < 1e-15
        narrow = Executor(model).run(feeds)["y"]  # the original still runs, in float32
        assert str(narrow.dtype) == "torch.float32"
        assert 0 < distance(narrow, got) < 1e-6


def test_widen_and_distance():
    fed = widen({"a": np.ones(2, np.float32), "b": np.ones(2, np.int32)})
    assert fed["a"].dtype == np.float64 and fed["b"].dtype == np.int32
    assert distance(np.array([1.0, 2.0]), np.array([1.0, 4.0])) == 0.5
    assert distance(np.zeros(0), np.zeros(0)) == 0.0


def test_model_local_functions_are_made_float64_too():
    halve = helper.make_function(
        "local", "Halve", ["a"], ["b"],
        [helper.make_node("Constant", [], ["half"], value_float=0.5), helper.make_node("Mul", ["a", "half"], ["b"])],
        [helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("Halve", ["x"], ["y"], domain="local")], "g",
                              [helper.make_tensor_value_info("x", F, [2])],
                              [helper.make_tensor_value_info("y", F, [2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[halve], ir_version=9)
    wide = float64_model(ir.from_proto(proto))  # as it is: kiln's loader would inline the function
    constant = next(iter(wide.functions.values()))[0]
    assert constant.attributes["value"].value.dtype == ir.DataType.DOUBLE
    assert wide.graph.inputs[0].dtype == ir.DataType.DOUBLE
