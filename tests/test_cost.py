"""kiln.cost: exact FLOP and byte counts on small graphs, symbolic dims from a mapping or taken as 1."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.cost import Cost, model_cost, node_cost, resolve_dim

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializers=(), opset=17, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return kiln.load_model_proto(helper.make_model(graph, opset_imports=opsets, ir_version=10))


def _w(name, shape):
    return numpy_helper.from_array(np.ones(shape, dtype=np.float32), name)


def _vi(name, shape, dtype=F):
    return helper.make_tensor_value_info(name, dtype, shape)


def _only(model, op_type):
    return next(n for n in model.graph if n.op_type == op_type)


def test_batched_matmul_symbolic_dims():
    # [B, 4, 6] @ [6, 8] -> [B, 4, 8]: 2*K*numel(Y) = 2*6*(B*32)
    m = _model([helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")], [_vi("a", ["B", 4, 6])],
               [_vi("y", ["B", 4, 8])],
               [_w("w", (6, 8))])
    node = _only(m, "MatMul")
    assert node_cost(node, {"B": 3}) == Cost(2 * 6 * 3 * 32, 4 * (3 * 24 + 48 + 3 * 32))
    total = model_cost(m)  # B unknown: taken as 1, and said so
    assert total.flops == 2 * 6 * 32 and total.assumed == ["B"]
    assert model_cost(m, {"B": 3}).assumed == []


def test_matmul_of_two_activations_broadcasts_batches():
    m = _model([helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
               [_vi("a", [2, 3, 5, 7]), _vi("b", [1, 3, 7, 4])],
               [_vi("y", [2, 3, 5, 4])])
    assert node_cost(_only(m, "MatMul")).flops == 2 * 7 * (2 * 3 * 5 * 4)


def test_gemm_with_bias_and_transposes():
    m = _model([helper.make_node("Gemm", ["a", "w", "c"], ["y"], name="gemm", transA=1, transB=1)],
               [_vi("a", [6, 5])], [_vi("y", [5, 10])], [_w("w", (10, 6)), _w("c", (10,))])
    # M=5, K=6, N=10: 2*M*N*K + M*N for C
    assert node_cost(_only(m, "Gemm")) == Cost(2 * 5 * 10 * 6 + 50, 4 * (30 + 60 + 10 + 50))


@pytest.mark.parametrize("group", [1, 2])
def test_conv_2d_grouped_with_bias(group):
    # N=2, Cin=4, 9x9 input, Cout=6, 3x3, stride 2, pads 1 -> 5x5 output
    m = _model([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", group=group, strides=[2, 2],
                                 pads=[1, 1, 1, 1])],
               [_vi("x", [2, 4, 9, 9])], [_vi("y", [2, 6, 5, 5])], [_w("w", (6, 4 // group, 3, 3)), _w("b", (6,))])
    y = 2 * 6 * 5 * 5
    assert node_cost(_only(m, "Conv")).flops == 2 * y * (4 // group) * 9 + y


def test_conv_1d_and_3d():
    m1 = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="c1")], [_vi("x", [1, 3, 10])], [_vi("y", [1, 8, 8])],
                [_w("w", (8, 3, 3))])
    assert node_cost(_only(m1, "Conv")).flops == 2 * (8 * 8) * 3 * 3
    m3 = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="c3")], [_vi("x", [1, 2, 4, 4, 4])],
                [_vi("y", [1, 5, 3, 3, 3])], [_w("w", (5, 2, 2, 2, 2))])
    assert node_cost(_only(m3, "Conv")).flops == 2 * (5 * 27) * 2 * 8


def test_conv_transpose():
    # X [1, 4, 3, 3], W [4, 6, 2, 2] (Cin, Cout/group, kh, kw): each input element feeds 6*4 outputs
    m = _model([helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="ct", strides=[2, 2])],
               [_vi("x", [1, 4, 3, 3])],
               [_vi("y", [1, 6, 6, 6])], [_w("w", (4, 6, 2, 2))])
    assert node_cost(_only(m, "ConvTranspose")).flops == 2 * 36 * 6 * 4


def test_fused_attention_and_standard_attention():
    # Q [B=1, H=2, L=4, D=8], K_T [1, 2, 8, S=6], V [1, 2, 6, 8]
    m = _model([helper.make_node("FusedAttention", ["q", "k", "v"], ["y"], name="att", domain="ai.kiln", scale=0.5)],
               [_vi("q", [1, 2, 4, 8]), _vi("k", [1, 2, 8, 6]), _vi("v", [1, 2, 6, 8])], [_vi("y", [1, 2, 4, 8])],
               domains=["ai.kiln"])
    expected = 2 * 64 * 6 + 2 * 64 * 6 + 5 * (2 * 4 * 6)
    assert node_cost(_only(m, "FusedAttention")).flops == expected
    # opset-23 Attention, 4-D: K is [B, H, S, D]
    m4 = _model([helper.make_node("Attention", ["q", "k", "v"], ["y"], name="att")],
                [_vi("q", [1, 2, 4, 8]), _vi("k", [1, 2, 6, 8]), _vi("v", [1, 2, 6, 8])], [_vi("y", [1, 2, 4, 8])],
                opset=23)
    assert node_cost(_only(m4, "Attention")).flops == expected
    # 3-D with heads as attributes: Q [1, 4, 2*8], K/V [1, 6, 2*8]
    m3 = _model([helper.make_node("Attention", ["q", "k", "v"], ["y"], name="att", q_num_heads=2, kv_num_heads=2)],
                [_vi("q", [1, 4, 16]), _vi("k", [1, 6, 16]), _vi("v", [1, 6, 16])], [_vi("y", [1, 4, 16])], opset=23)
    assert node_cost(_only(m3, "Attention")).flops == expected


def test_pointwise_reduction_normalization_movement():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("ReduceMean", ["r"], ["m"], name="mean", axes=[1], keepdims=1),
        helper.make_node("LayerNormalization", ["r", "s"], ["n"], name="ln", axis=-1),
        helper.make_node("Transpose", ["n"], ["y"], name="t", perm=[1, 0]),
    ]
    m = _model(nodes, [_vi("x", [3, 4])], [_vi("y", [4, 3]), _vi("m", [3, 1])], [_w("s", (4,))])
    cost = model_cost(m)
    assert {n: c.flops for n, c in cost.nodes.items()} == {"relu": 12, "mean": 12, "ln": 60, "t": 0}
    assert cost.nodes["relu"].bytes == 4 * 24 and cost.nodes["t"].bytes == 4 * 24
    assert cost.flops == 84 and cost.bytes == sum(c.bytes for c in cost.nodes.values())
    assert cost.unmodelled == {}


def test_pool_and_lstm():
    m = _model([helper.make_node("MaxPool", ["x"], ["y"], name="pool", kernel_shape=[2, 2], strides=[2, 2])],
               [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 3, 4, 4])])
    assert node_cost(_only(m, "MaxPool")).flops == 48 * 4
    # LSTM: seq 5, batch 2, input 3, hidden 4, one direction: 2*10*(4*4)*(3+4)
    lstm = _model([helper.make_node("LSTM", ["x", "w", "r"], ["y"], name="lstm", hidden_size=4)],
                  [_vi("x", [5, 2, 3])], [_vi("y", [5, 1, 2, 4])], [_w("w", (1, 16, 3)), _w("r", (1, 16, 4))])
    assert node_cost(_only(lstm, "LSTM")).flops == 2 * 10 * 16 * 7


def test_if_counts_the_costlier_branch():
    then = helper.make_graph([helper.make_node("Relu", ["x"], ["a"], name="r1")], "then", [], [_vi("a", [4, 4])])
    other = helper.make_graph([helper.make_node("Relu", ["x"], ["b0"], name="r2"),
                               helper.make_node("Neg", ["b0"], ["b"], name="n2")],
                              "else", [], [_vi("b", [4, 4])])
    m = _model([helper.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=other)],
               [_vi("c", [], TensorProto.BOOL), _vi("x", [4, 4])], [_vi("y", [4, 4])])
    assert node_cost(_only(m, "If")).flops == 32


def test_unknown_op_counts_bytes_only_and_is_listed():
    m = _model([helper.make_node("Einsum", ["a", "b"], ["y"], name="e", equation="ij,jk->ik")],
               [_vi("a", [2, 3]), _vi("b", [3, 4])], [_vi("y", [2, 4])])
    cost = model_cost(m)
    assert cost.flops == 0 and cost.bytes == 4 * (6 + 12 + 8) and cost.unmodelled == {"Einsum": 1}


def test_resolve_dim_expressions():
    import onnx_ir as ir

    assert resolve_dim(ir.SymbolicDim("2*s0"), {"s0": 3}) == 6
    assert resolve_dim(ir.SymbolicDim("(s0 + 1)//2"), {"s0": 5}) == 3
    assert resolve_dim(ir.SymbolicDim("s9"), {"s0": 5}) == 1
    assert resolve_dim(ir.SymbolicDim("__import__('os')"), {}) == 1
    assert resolve_dim(7, {}) == 7


def test_fp16_bytes():
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [_vi("x", [8], TensorProto.FLOAT16)],
               [_vi("y", [8], TensorProto.FLOAT16)])
    assert model_cost(m).bytes == 2 * 16


def test_of_sums_named_nodes():
    m = _model([helper.make_node("Relu", ["x"], ["r"], name="a"), helper.make_node("Neg", ["r"], ["y"], name="b")],
               [_vi("x", [5])], [_vi("y", [5])])
    cost = model_cost(m)
    assert cost.of(["a", "b", "a", "missing"]) == Cost(10, 80)


def test_recorded_shapes_take_precedence():
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [_vi("x", ["n", 4])], [_vi("y", ["n", 4])])
    cost = model_cost(m, shapes={"x": (3, 4), "y": (3, 4)})
    assert cost.flops == 12 and cost.bytes == 4 * 24 and cost.assumed == []
