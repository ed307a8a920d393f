"""flatten_matmul: an N-D x 2-D MatMul becomes Reshape -> 2-D MatMul -> Reshape (with its bias Add kept
beside the MatMul), with a constant target shape where the sizes allow and a Shape-computed one for
dynamic batch and sequence; batched, rank-2 and unknown-K MatMuls stay."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from families import export_family
from onnx import TensorProto, helper, numpy_helper

from kiln.passes.framework import PassContext, get_pass
from tests.passes.checks import assert_same, finding_cost, load, ops, run_pass

F = TensorProto.FLOAT


def _w(shape, name="w", seed=0):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def _model(nodes, inits, a_shape, y_shape, opset=17, extra_inputs=(), y_name="y"):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", F, a_shape), *extra_inputs],
                              [helper.make_tensor_value_info(y_name, F, y_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _matmul(a_shape, k=6, n=7, opset=17):
    nodes = [helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")]
    return _model(nodes, [_w([k, n])], a_shape, [*a_shape[:-1], n], opset)


@pytest.mark.parametrize("a_shape,opset,expected", [
    ([2, 5, 6], 17, ["Reshape", "MatMul", "Reshape"]),  # static: constant target
    ([2, 3, 5, 6], 13, ["Reshape", "MatMul", "Reshape"]),  # 4-D, old opset: still constant
    (["B", 5, 6], 17, ["Reshape", "MatMul", "Reshape"]),  # one unknown size: -1 in a constant target
    (["B", "S", 6], 17, ["Reshape", "MatMul", "Shape", "Concat", "Reshape"]),  # Shape(start, end) from 15
    (["B", "S", 6], 14, ["Reshape", "MatMul", "Shape", "Slice", "Concat", "Reshape"]),  # Shape + Slice before
])
def test_nd_matmul_becomes_one_2d_matmul(a_shape, opset, expected):
    proto = _matmul(a_shape, opset=opset)
    model, count, ctx = run_pass(proto, "flatten_matmul")
    assert count == 1 and ops(model) == expected
    mm = next(n for n in model.graph if n.op_type == "MatMul")
    assert mm.name == "mm" and len(mm.inputs[0].shape) == 2 and len(mm.outputs[0].shape) == 2
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert ctx.log and ctx.log[0].startswith("flattened mm")
    for dims in ({"B": 3, "S": 4}, {"B": 1, "S": 9}):  # any batch and sequence, not just one
        assert_same(proto, model, dims=dims)


def test_constant_target_uses_minus_one_for_the_unknown_size():
    model, _, _ = run_pass(_matmul(["B", 5, 6]), "flatten_matmul")
    first, _, last = list(model.graph)
    assert first.inputs[1].const_value.numpy().tolist() == [-1, 6]
    assert last.inputs[1].const_value.numpy().tolist() == [-1, 5, 7]


def test_dynamic_target_reshapes_with_allowzero():
    model, _, _ = run_pass(_matmul(["B", "S", 6]), "flatten_matmul")
    last = list(model.graph)[-1]
    assert last.op_type == "Reshape" and last.attributes["allowzero"].as_int() == 1


def test_bias_add_stays_next_to_its_matmul():
    """The Add of a bias broadcast over the last axis commutes with the reshape: it moves inside, so the
    builder still fuses MatMul + bias."""
    for bias_shape, left in (([7], False), ([1, 1, 7], True), ([], False)):
        bias = numpy_helper.from_array(np.random.default_rng(2).standard_normal(bias_shape).astype(np.float32), "bias")
        add = helper.make_node("Add", ["bias", "h"] if left else ["h", "bias"], ["y"], name="add")
        nodes = [helper.make_node("MatMul", ["a", "w"], ["h"], name="mm"), add]
        proto = _model(nodes, [_w([6, 7]), bias], ["B", "S", 6], ["B", "S", 7])
        model, count, _ = run_pass(proto, "flatten_matmul")
        assert count == 1 and ops(model) == ["Reshape", "MatMul", "Add", "Shape", "Concat", "Reshape"]
        assert [n.name for n in model.graph if n.op_type in ("MatMul", "Add")] == ["mm", "add"]
        assert_same(proto, model, dims={"B": 2, "S": 3})


def test_full_shaped_add_stays_after_the_reshape():
    other = numpy_helper.from_array(np.ones([5, 7], np.float32), "bias")
    nodes = [
        helper.make_node("MatMul", ["a", "w"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "bias"], ["y"], name="add"),
    ]
    proto = _model(nodes, [_w([6, 7]), other], ["B", 5, 6], ["B", 5, 7])
    model, count, _ = run_pass(proto, "flatten_matmul")
    assert count == 1 and ops(model) == ["Reshape", "MatMul", "Reshape", "Add"]
    assert_same(proto, model, dims={"B": 2})


def test_matmuls_reading_one_input_share_the_view_and_the_target():
    nodes = [helper.make_node("MatMul", ["a", f"w{i}"], [f"h{i}"], name=f"mm{i}") for i in range(3)]
    nodes += [
        helper.make_node("Add", ["h0", "h1"], ["s"], name="add1"),
        helper.make_node("Add", ["s", "h2"], ["y"], name="add2"),
    ]
    proto = _model(nodes, [_w([6, 7], f"w{i}", i) for i in range(3)], ["B", "S", 6], ["B", "S", 7])
    model, count, _ = run_pass(proto, "flatten_matmul")
    assert count == 3
    assert ops(model).count("Shape") == 1 and ops(model).count("Reshape") == 1 + 3
    assert_same(proto, model, dims={"B": 2, "S": 3})


def test_non_constant_rank2_b_and_symbolic_n():
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")]
    proto = _model(
        nodes, [], ["B", "S", 6], ["B", "S", "N"], extra_inputs=[helper.make_tensor_value_info("b", F, [6, "N"])]
    )
    model, count, _ = run_pass(proto, "flatten_matmul")
    assert count == 1 and ops(model).count("Shape") == 2  # N comes from B's shape
    assert_same(proto, model, dims={"B": 2, "S": 3, "N": 5})


@pytest.mark.parametrize("case", ["rank2", "batched-b", "unknown-k", "old-opset-dynamic", "vector-b"])
def test_left_alone(case):
    if case == "rank2":
        proto = _matmul([4, 6])
    elif case == "batched-b":
        nodes = [helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")]
        proto = _model(nodes, [_w([2, 6, 7])], [2, 5, 6], [2, 5, 7])
    elif case == "unknown-k":
        nodes = [helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")]
        proto = _model(
            nodes, [], [2, 5, "K"], [2, 5, 7], extra_inputs=[helper.make_tensor_value_info("b", F, ["K", 7])]
        )
    elif case == "old-opset-dynamic":
        proto = _matmul(["B", "S", 6], opset=13)
    else:
        nodes = [helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")]
        proto = _model(nodes, [_w([6])], [2, 5, 6], [2, 5])
    model, count, _ = run_pass(proto, "flatten_matmul")
    assert count == 0 and ops(model) == ["MatMul"]
    assert get_pass("flatten_matmul").find(load(proto), PassContext()) == []


def test_find_reports_exactly_what_apply_rewrites():
    bias = numpy_helper.from_array(np.zeros([7], np.float32), "bias")
    nodes = [helper.make_node("MatMul", ["a", "w"], ["h"], name="mm3d"),
             helper.make_node("Add", ["h", "bias"], ["h2"], name="add"),
             helper.make_node("ReduceSum", ["h2"], ["r"], name="sum", keepdims=0, axes=[1]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2d")]
    proto = _model(nodes, [_w([6, 7]), _w([7, 3], "w2", 1), bias], ["B", 5, 6], ["B", 3], opset=12)
    findings = get_pass("flatten_matmul").find(load(proto), PassContext(dims={"B": 4}))
    cost = finding_cost(load(proto), findings[0], {"B": 4})
    model, count, _ = run_pass(proto, "flatten_matmul")
    assert count == len(findings) == 1
    (finding,) = findings
    assert finding.nodes == ["mm3d", "add"] and finding.pass_name == "flatten_matmul" and finding.rule == "matmul-nd"
    assert finding.shapes == {"a": ["B", 5, 6], "w": [6, 7], "h": ["B", 5, 7]}
    assert cost.flops == 2 * 4 * 5 * 6 * 7 + 4 * 5 * 7  # the MatMul and its bias Add
    assert cost.bytes == 4 * (4 * 5 * 6 + 6 * 7 + 4 * 5 * 7) + 4 * (2 * 4 * 5 * 7 + 7)
    assert ops(model) == ["Reshape", "MatMul", "Add", "Reshape", "ReduceSum", "MatMul"]
    assert_same(proto, model, dims={"B": 3})


@pytest.mark.parametrize(
    "family,exporter", [("bert", "torchscript"), ("bert", "dynamo"), ("gpt2", "dynamo"), ("vit", "torchscript")]
)
def test_exported_families_stay_correct(tmp_path, family, exporter):
    proto = onnx.load(export_family(tmp_path, family, exporter))
    model, count, _ = run_pass(proto, "flatten_matmul")
    assert count >= 2  # the transformer's projections and feed-forward layers
    assert_same(proto, model, dims={"batch": 2, "sequence": 8})
    assert_same(proto, model, dims={"batch": 3, "sequence": 5})
