"""fuse_gemm_activation: MatMul/Gemm + bias Add + activation become one ai.kiln::FusedGemm that computes
what the unfused graph computes, and nothing else fuses."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.errors import KilnError
from kiln.passes.framework import PassContext, get_pass
from tests.passes.checks import assert_matches_unfused, load, ops, run_pass

F = TensorProto.FLOAT


def _init(name, shape, seed=0):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def _model(nodes, inits, x_shape=("N", 3, 8), y_shape=("N", 3, 16), opset=17, outputs=("y",)):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, list(x_shape))],
                              [helper.make_tensor_value_info(o, F, list(y_shape)) for o in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _fused(proto):
    model, count, _ = run_pass(proto, "fuse_gemm_activation", kiln_ops=True)
    return model, count


def _attrs(model):
    (node,) = [n for n in model.graph if n.op_type == "FusedGemm"]
    return node, {k: a.value for k, a in node.attributes.items()}


ACTIVATIONS = [
    ("Relu", [helper.make_node("Relu", ["h"], ["y"])], [], "Relu", []),
    (
        "Relu6",
        [helper.make_node("Clip", ["h", "lo", "hi"], ["y"])],
        [numpy_helper.from_array(np.float32(0.0), "lo"), numpy_helper.from_array(np.float32(6.0), "hi")],
        "Clip",
        [0.0, 6.0],
    ),
    ("LeakyRelu", [helper.make_node("LeakyRelu", ["h"], ["y"], alpha=0.2)], [], "LeakyRelu", [0.2]),
    ("Sigmoid", [helper.make_node("Sigmoid", ["h"], ["y"])], [], "Sigmoid", []),
    ("Tanh", [helper.make_node("Tanh", ["h"], ["y"])], [], "Tanh", []),
    (
        "HardSigmoid",
        [helper.make_node("HardSigmoid", ["h"], ["y"], alpha=0.3, beta=0.4)],
        [],
        "HardSigmoid",
        [0.3, 0.4],
    ),
    ("HardSwish", [helper.make_node("HardSwish", ["h"], ["y"])], [], "HardSwish", []),
    ("SiLU", [helper.make_node("Sigmoid", ["h"], ["s"]), helper.make_node("Mul", ["s", "h"], ["y"])], [], "SiLU", []),
    ("Gelu-tanh", [helper.make_node("Gelu", ["h"], ["y"], approximate="tanh")], [], "Gelu", [1.0]),
]


@pytest.mark.parametrize("case", ACTIVATIONS, ids=[c[0] for c in ACTIVATIONS])
@pytest.mark.parametrize("bias_first", [False, True])
def test_matmul_bias_activation_is_one_fused_gemm(case, bias_first):
    _, act_nodes, act_inits, activation, params = case
    add = helper.make_node("Add", ["b", "m"] if bias_first else ["m", "b"], ["h"])
    proto = _model([helper.make_node("MatMul", ["x", "w"], ["m"]), add, *act_nodes],
                   [_init("w", [8, 16]), _init("b", [16], 1), *act_inits], opset=20 if activation == "Gelu" else 17)
    model, count = _fused(proto)
    assert count == 1 and ops(model) == ["ai.kiln::FusedGemm"]
    node, attrs = _attrs(model)
    assert attrs["activation"] == activation and list(attrs.get("activation_params", [])) == pytest.approx(params)
    assert [v.name for v in node.inputs] == ["x", "w", "b"]
    assert_matches_unfused(proto, model, dims={"N": 2})


def test_matmul_with_bias_only_and_with_activation_only():
    bias_only = _model([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
                       [_init("w", [8, 16]), _init("b", [1, 1, 16], 1)])
    act_only = _model([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
                      [_init("w", [8, 16])])
    for proto, activation in ((bias_only, None), (act_only, "Relu")):
        model, count = _fused(proto)
        assert count == 1
        assert _attrs(model)[1].get("activation") == activation
        assert_matches_unfused(proto, model, dims={"N": 2})


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_with_alpha_beta_and_transpose_takes_its_activation(trans_b):
    w = _init("w", [16, 8] if trans_b else [8, 16])
    proto = _model([helper.make_node("Gemm", ["x", "w", "c"], ["g"], transB=trans_b, alpha=0.5, beta=2.0),
                    helper.make_node("Relu", ["g"], ["y"])], [w, _init("c", [16], 1)], x_shape=(4, 8), y_shape=(4, 16))
    model, count = _fused(proto)
    assert count == 1
    _, attrs = _attrs(model)
    assert (attrs["alpha"], attrs["beta"], attrs["transB"]) == (0.5, 2.0, trans_b)
    assert_matches_unfused(proto, model)


def test_a_chain_of_two_layers_fuses_both():
    proto = _model([helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["h1"]),
                    helper.make_node("Relu", ["h1"], ["r1"]), helper.make_node("MatMul", ["r1", "w2"], ["m2"]),
                    helper.make_node("Add", ["m2", "b2"], ["h2"]), helper.make_node("Relu", ["h2"], ["y"])],
                   [_init("w1", [8, 16]), _init("b1", [16], 1), _init("w2", [16, 16], 2), _init("b2", [16], 3)])
    model, count = _fused(proto)
    assert count == 2 and ops(model) == ["ai.kiln::FusedGemm", "ai.kiln::FusedGemm"]
    assert_matches_unfused(proto, model, dims={"N": 2})


DOES_NOT_FIRE = {
    "alone": ([helper.make_node("MatMul", ["x", "w"], ["y"])], [_init("w", [8, 16])], ("y",)),
    "full-tensor-add": ([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
                        [_init("w", [8, 16]), _init("b", [2, 3, 16], 1)], ("y",)),
    "weight-not-constant": ([helper.make_node("MatMul", ["x", "v"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
                            [], ("y",)),
    "inner-value-read-twice": ([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
                               [_init("w", [8, 16])], ("y", "m")),
}


@pytest.mark.parametrize("case", list(DOES_NOT_FIRE))
def test_does_not_fire(case):
    nodes, inits, outputs = DOES_NOT_FIRE[case]
    proto = _model(nodes, inits, x_shape=(2, 3, 8), y_shape=(2, 3, 16), outputs=outputs)
    if case == "weight-not-constant":
        proto.graph.input.append(helper.make_tensor_value_info("v", F, [8, 16]))
    before = ops(load(proto))
    model, count = _fused(proto)
    assert count == 0 and ops(model) == before
    assert get_pass("fuse_gemm_activation").find(load(proto), PassContext(kiln_ops=True)) == []


def test_findings_match_rewrites_and_apply_needs_kiln_ops():
    proto = _model([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
                   [_init("w", [8, 16])])
    (finding,) = get_pass("fuse_gemm_activation").find(load(proto), PassContext())
    assert finding.rule == "gemm-epilogue" and len(finding.nodes) == 2
    with pytest.raises(KilnError, match="kiln_ops"):
        get_pass("fuse_gemm_activation").apply(load(proto), PassContext())
