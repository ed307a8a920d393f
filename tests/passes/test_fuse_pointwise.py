"""fuse_pointwise: chains of elementwise ops become one ai.kiln::FusedPointwise whose program computes
what the unfused chain computes; a chain splits where an inner value is read elsewhere."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.passes.framework import PassContext, get_pass
from tests.passes.checks import assert_matches_unfused, load, ops, run_pass

F = TensorProto.FLOAT


def _model(nodes, inits=(), outputs=("y",), opset=18):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["N", 4, 5]),
                                           helper.make_tensor_value_info("r", F, [4, 5])],
                              [helper.make_tensor_value_info(o, F, ["N", 4, 5]) for o in outputs], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _const(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _fused(proto):
    model, count, _ = run_pass(proto, "fuse_pointwise", kiln_ops=True)
    return model, count


def test_bias_gelu_and_scale_are_one_node():
    inits = [_const("half", 0.5), _const("bias", np.random.default_rng(0).standard_normal(5))]
    proto = _model(
        [
            helper.make_node("Add", ["x", "bias"], ["xb"]),
            helper.make_node("Gelu", ["xb"], ["g"], approximate="tanh"),
            helper.make_node("Mul", ["g", "half"], ["y"]),
        ],
        inits,
        opset=20,
    )
    model, count = _fused(proto)
    assert count == 1 and ops(model) == ["ai.kiln::FusedPointwise"]
    (node,) = model.graph
    program = json.loads(node.attributes["program"].value)
    # the computed input first, then the non-scalar constant; scalars are inline
    assert [v.name for v in node.inputs] == ["x", "bias"]
    assert [s["op"] for s in program] == ["input", "input", "Add", "Gelu", "const", "Mul"]
    assert program[3]["attrs"] == {"approximate": "tanh"}
    assert_matches_unfused(proto, model, dims={"N": 2})


BINARY = ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"]
UNARY = ["Neg", "Abs", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Exp", "Sqrt", "Erf", "HardSigmoid", "HardSwish", "Elu",
         "Selu", "Softplus", "Softsign", "Floor", "Ceil", "Sin", "Cos", "Mish", "ThresholdedRelu", "Celu"]


@pytest.mark.parametrize("op", BINARY + UNARY)
def test_each_op_in_a_chain_with_a_broadcast_input(op):
    first = helper.make_node(op, ["x", "r"] if op in BINARY else ["x"], ["a"])
    proto = _model([first, helper.make_node("Add", ["a", "r"], ["y"])])
    model, count = _fused(proto)
    assert count == 1 and ops(model) == ["ai.kiln::FusedPointwise"]
    assert_matches_unfused(proto, model, dims={"N": 2})


def test_clip_with_constant_bounds_joins_the_chain():
    proto = _model([helper.make_node("Mul", ["x", "r"], ["a"]), helper.make_node("Clip", ["a", "lo", "hi"], ["y"])],
                   [_const("lo", -0.5), _const("hi", 0.5)])
    model, count = _fused(proto)
    assert count == 1
    assert_matches_unfused(proto, model, dims={"N": 2})


def test_a_chain_splits_at_a_graph_output():
    proto = _model([helper.make_node("Mul", ["x", "x"], ["a"]), helper.make_node("Exp", ["a"], ["b"]),
                    helper.make_node("Neg", ["b"], ["y"])], outputs=("y", "b"))
    model, count = _fused(proto)
    assert count == 1 and ops(model) == ["ai.kiln::FusedPointwise", "Neg"]
    assert_matches_unfused(proto, model, dims={"N": 2})


DOES_NOT_FIRE = {
    "one-op": [helper.make_node("Relu", ["x"], ["y"])],
    "inner-value-read-twice": [helper.make_node("Exp", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"]),
                               helper.make_node("Sum", ["a", "b"], ["y"])],
    "non-constant-clip-bound": [helper.make_node("Exp", ["x"], ["a"]), helper.make_node("Clip", ["a", "r"], ["y"])],
}


@pytest.mark.parametrize("case", list(DOES_NOT_FIRE))
def test_does_not_fire(case):
    proto = _model(DOES_NOT_FIRE[case])
    if case == "non-constant-clip-bound":  # Clip's min must be a scalar
        proto.graph.input[1].type.tensor_type.shape.ClearField("dim")
    before = ops(load(proto))
    model, count = _fused(proto)
    assert count == 0 and ops(model) == before
    assert get_pass("fuse_pointwise").find(load(proto), PassContext(kiln_ops=True)) == []
