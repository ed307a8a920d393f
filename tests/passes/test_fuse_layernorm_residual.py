"""fuse_layernorm_residual: the residual Add before a LayerNormalization becomes one
ai.kiln::AddLayerNormalization that computes what the unfused graph computes."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.passes.framework import PassContext, get_pass
from tests.passes.checks import assert_matches_unfused, load, ops, run_pass

F = TensorProto.FLOAT
SHAPE = ["N", 5, 16]


def _init(name, shape, seed=0, offset=0.0):
    return numpy_helper.from_array(
        (np.random.default_rng(seed).standard_normal(shape) + offset).astype(np.float32), name
    )


def _model(nodes, inits, r_shape=SHAPE, outputs=("y",), opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, SHAPE),
                                           helper.make_tensor_value_info("r", F, r_shape)],
                              [helper.make_tensor_value_info(o, F, SHAPE) for o in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("axis", [-1, -2])
def test_residual_add_and_layernorm_are_one_node(bias, axis):
    norm_shape = [16] if axis == -1 else [5, 16]
    inits = [_init("g", norm_shape, 1, 1.0)] + ([_init("b", norm_shape, 2)] if bias else [])
    proto = _model([helper.make_node("Add", ["x", "r"], ["s"]),
                    helper.make_node("LayerNormalization", ["s", "g"] + (["b"] if bias else []), ["y"],
                                     axis=axis, epsilon=1e-3)], inits)
    model, count, _ = run_pass(proto, "fuse_layernorm_residual", kiln_ops=True)
    assert count == 1 and ops(model) == ["ai.kiln::AddLayerNormalization"]
    (node,) = model.graph
    assert [v.name for v in node.inputs][:3] == ["x", "r", "g"]
    assert {k: a.value for k, a in node.attributes.items()} == pytest.approx({"axis": axis, "epsilon": 1e-3})
    assert_matches_unfused(proto, model, dims={"N": 2})


DOES_NOT_FIRE = {
    "sum-read-again": (
        [
            helper.make_node("Add", ["x", "r"], ["s"]),
            helper.make_node("LayerNormalization", ["s", "g"], ["n"]),
            helper.make_node("Add", ["n", "s"], ["y"]),
        ],
        SHAPE,
        ("y",),
    ),
    "sum-is-an-output": (
        [helper.make_node("Add", ["x", "r"], ["s"]), helper.make_node("LayerNormalization", ["s", "g"], ["y"])],
        SHAPE,
        ("y", "s"),
    ),
    "broadcast-operand": (
        [helper.make_node("Add", ["x", "r"], ["s"]), helper.make_node("LayerNormalization", ["s", "g"], ["y"])],
        [1, 16],
        ("y",),
    ),
    "constant-operand": (
        [
            helper.make_node("Add", ["x", "c"], ["s"]),
            helper.make_node("LayerNormalization", ["s", "g"], ["y"]),
            helper.make_node("Identity", ["r"], ["unused"]),
        ],
        SHAPE,
        ("y",),
    ),
}


@pytest.mark.parametrize("case", list(DOES_NOT_FIRE))
def test_does_not_fire(case):
    nodes, r_shape, outputs = DOES_NOT_FIRE[case]
    proto = _model(nodes, [_init("g", [16], 1, 1.0), _init("c", [16], 3)], r_shape=r_shape, outputs=outputs)
    if case == "constant-operand":
        proto.graph.output.append(helper.make_tensor_value_info("unused", F, r_shape))
    before = ops(load(proto))
    model, count, _ = run_pass(proto, "fuse_layernorm_residual", kiln_ops=True)
    assert count == 0 and ops(model) == before
    assert get_pass("fuse_layernorm_residual").find(load(proto), PassContext(kiln_ops=True)) == []
