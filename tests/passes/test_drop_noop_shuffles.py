"""drop_noop_shuffles: Identity and identity Transposes vanish, Transpose chains compose, layout-keeping
shuffle chains (Reshape/Flatten/Squeeze/Unsqueeze and Transposes of size-1 axes) become one Reshape or
nothing; values read twice, unknown shapes and graph-output names are respected."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from families import export_family
from onnx import TensorProto, helper, numpy_helper

from kiln.passes.framework import PassContext, get_pass
from tests.passes.checks import assert_same, finding_cost, load, ops, run_pass

F = TensorProto.FLOAT
node = helper.make_node


def _i64(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _model(nodes, x_shape, y_shape, inits=(), opset=17, extra_outputs=()):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, x_shape)],
                              [helper.make_tensor_value_info("y", F, y_shape), *extra_outputs], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _out(name, shape):
    return helper.make_tensor_value_info(name, F, shape)


def _check(proto, expected_ops, rewrites, dims=None):
    findings = get_pass("drop_noop_shuffles").find(load(proto), PassContext())
    model, count, ctx = run_pass(proto, "drop_noop_shuffles")
    assert ops(model) == expected_ops
    assert count == rewrites == len(findings) == len(ctx.log)
    assert [v.name for v in model.graph.outputs] == [v.name for v in proto.graph.output]
    assert_same(proto, model, dims=dims or {"B": 3, "S": 5})
    return model, findings


def test_identity_vanishes():
    proto = _model([node("Identity", ["x"], ["a"], name="id"), node("Relu", ["a"], ["y"], name="relu")], [2, 3], [2, 3])
    _check(proto, ["Relu"], 1)


def test_identity_before_a_graph_output_hands_its_name_to_the_producer():
    proto = _model([node("Relu", ["x"], ["a"], name="relu"), node("Identity", ["a"], ["y"], name="id")], [2, 3], [2, 3])
    model, _ = _check(proto, ["Relu"], 1)
    assert next(iter(model.graph)).outputs[0].name == "y"


def test_identity_from_input_to_output_stays():
    proto = _model([node("Identity", ["x"], ["y"], name="id")], [2, 3], [2, 3])
    _check(proto, ["Identity"], 0)


def test_chain_from_input_to_output_that_cancels_becomes_one_identity():
    nodes = [node("Unsqueeze", ["x", "ax"], ["a"], name="unsq"), node("Squeeze", ["a", "ax"], ["y"], name="sq")]
    _check(_model(nodes, ["B", 6], ["B", 6], [_i64("ax", [1])]), ["Identity"], 1)


def test_identity_transpose_vanishes():
    nodes = [node("Transpose", ["x"], ["a"], perm=[0, 1, 2], name="t"), node("Relu", ["a"], ["y"], name="relu")]
    _check(_model(nodes, [2, 3, 4], [2, 3, 4]), ["Relu"], 1)


def test_transposes_compose():
    nodes = [node("Transpose", ["x"], ["a"], perm=[0, 2, 1], name="t1"),
             node("Transpose", ["a"], ["b"], perm=[1, 0, 2], name="t2"),
             node("Transpose", ["b"], ["y"], name="t3")]  # no perm: reversed axes
    model, (finding,) = _check(_model(nodes, [2, 3, 4], [3, 2, 4]), ["Transpose"], 1)
    assert list(next(iter(model.graph)).attributes["perm"].as_ints()) == [1, 0, 2]
    assert finding.nodes == ["t1", "t2", "t3"] and finding.details["perm"] == [1, 0, 2]
    # each Transpose reads and writes 24 floats
    assert finding_cost(load(_model(nodes, [2, 3, 4], [3, 2, 4])), finding).bytes == 3 * 2 * 24 * 4


def test_transposes_that_cancel_vanish():
    nodes = [node("Relu", ["x"], ["r"], name="relu"), node("Transpose", ["r"], ["a"], perm=[0, 2, 1], name="t1"),
             node("Transpose", ["a"], ["y"], perm=[0, 2, 1], name="t2")]
    _check(_model(nodes, ["B", 3, 4], ["B", 3, 4]), ["Relu"], 1)


def test_transpose_of_size1_axes_is_a_reshape():
    nodes = [node("Transpose", ["x"], ["y"], perm=[0, 2, 1, 3], name="t")]
    model, (finding,) = _check(_model(nodes, ["B", 1, 3, 4], ["B", 3, 1, 4]), ["Reshape"], 1)
    assert next(iter(model.graph)).inputs[1].const_value.numpy().tolist() == [0, 3, 1, 4]
    assert finding.details["kind"] == "reshape"
    assert finding_cost(load(_model(nodes, ["B", 1, 3, 4], ["B", 3, 1, 4])), finding).bytes == 2 * 12 * 4


def test_transpose_of_size1_axes_of_an_empty_tensor_is_left_alone():
    # no constant Reshape shape says [1, 1, 0] (0 means "copy"): the pass used to fail on it
    proto = _model([node("Transpose", ["x"], ["y"], perm=[1, 0, 2], name="t")], [1, 1, 0], [1, 1, 0])
    model, count, _ = run_pass(proto, "drop_noop_shuffles")
    assert count == 0 and ops(model) == ["Transpose"]
    assert get_pass("drop_noop_shuffles").find(load(proto), PassContext()) == []


def test_reshape_chain_becomes_one_reshape():
    nodes = [node("Reshape", ["x", "s"], ["a"], name="r1"), node("Unsqueeze", ["a", "ax"], ["b"], name="unsq"),
             node("Flatten", ["b"], ["c"], axis=2, name="flat"), node("Squeeze", ["c", "ax1"], ["y"], name="sq")]
    proto = _model(nodes, ["B", 6, 4], ["N"], [_i64("s", [0, 24]), _i64("ax", [2]), _i64("ax1", [1])])
    model, (finding,) = _check(proto, ["Reshape"], 1)
    assert next(iter(model.graph)).inputs[1].const_value.numpy().tolist() == [-1]
    assert finding.nodes == ["r1", "unsq", "flat", "sq"] and finding.shapes["x"] == ["B", 6, 4]
    assert set(load(proto).graph.initializers) - set(model.graph.initializers) == {"s", "ax", "ax1"}


def test_old_opset_squeeze_unsqueeze_attributes():
    nodes = [node("Unsqueeze", ["x"], ["a"], axes=[0], name="unsq"), node("Squeeze", ["a"], ["y"], axes=[3], name="sq")]
    _check(_model(nodes, [2, 3, 1], [1, 2, 3], opset=11), ["Reshape"], 1)


def test_reshape_with_allowzero_keeps_the_meaning():
    nodes = [node("Reshape", ["x", "s"], ["a"], allowzero=1, name="r1"),
             node("Unsqueeze", ["a", "ax"], ["y"], name="unsq")]
    proto = _model(nodes, [2, 6], [3, 4, 1], [_i64("s", [3, 4]), _i64("ax", [2])], opset=14)
    _check(proto, ["Reshape"], 1)


def test_symbolic_sizes_are_copied_with_zero():
    nodes = [node("Shape", ["x"], ["sh"], name="shape"), node("Reshape", ["x", "sh"], ["a"], name="r1"),
             node("Unsqueeze", ["a", "ax"], ["y"], name="unsq")]
    model, _ = _check(_model(nodes, ["B", "S", 4], ["B", "S", 1, 4], [_i64("ax", [2])]), ["Reshape"], 1)
    assert next(iter(model.graph)).inputs[1].const_value.numpy().tolist() == [0, 0, 1, 4]  # Shape went with it


def test_cancelling_transposes_let_reshapes_meet():
    nodes = [node("Reshape", ["x", "s"], ["a"], name="r1"), node("Transpose", ["a"], ["b"], perm=[1, 0], name="t1"),
             node("Transpose", ["b"], ["c"], perm=[1, 0], name="t2"), node("Reshape", ["c", "s2"], ["y"], name="r2")]
    _check(_model(nodes, [2, 3, 4], [4, 6], [_i64("s", [6, 4]), _i64("s2", [4, 6])]), ["Reshape"], 1)


def test_single_reshape_to_the_same_shape_vanishes():
    nodes = [node("Reshape", ["x", "s"], ["a"], name="r"), node("Relu", ["a"], ["y"], name="relu")]
    _check(_model(nodes, [2, 6], [2, 6], [_i64("s", [2, -1])]), ["Relu"], 1)


def test_several_chains_in_one_graph():
    nodes = [node("Identity", ["x"], ["a"], name="id"), node("Relu", ["a"], ["r"], name="relu"),
             node("Transpose", ["r"], ["b"], perm=[1, 0], name="t1"),
             node("Transpose", ["b"], ["y"], perm=[1, 0], name="t2")]
    _check(_model(nodes, [2, 3], [2, 3]), ["Relu"], 2)


def test_left_alone():
    # a real transpose, a lone real reshape, a chain broken by a second reader, an unknown shape
    nodes = [node("Transpose", ["x"], ["t"], perm=[1, 0, 2], name="t"),
             node("Reshape", ["t", "s"], ["r"], name="r"),
             node("Unsqueeze", ["r", "ax"], ["u"], name="unsq"),  # r is also a graph output: the chain breaks
             node("Relu", ["u"], ["y"], name="relu"),
             node("Reshape", ["x", "dyn"], ["d"], name="dyn_reshape"),
             node("Unsqueeze", ["d", "ax"], ["e"], name="dyn_unsq")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2, 3, 4]),
                                           helper.make_tensor_value_info("dyn", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", F, [3, 8, 1]), _out("r", [3, 8]),
                               _out("e", ["d0", "d1", "d2"])],
                              [_i64("s", [3, 8]), _i64("ax", [2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model, count, _ = run_pass(proto, "drop_noop_shuffles")
    assert count == 0 and ops(model) == [n.op_type for n in proto.graph.node]
    assert get_pass("drop_noop_shuffles").find(load(proto), PassContext()) == []


def test_shape_tensor_input_of_reshape_is_not_part_of_a_chain():
    """An Unsqueeze feeding a Reshape's shape input is shape arithmetic, not a shuffle of the data."""
    nodes = [node("Shape", ["x"], ["sh"], name="shape"), node("Gather", ["sh", "zero"], ["n"], name="gather", axis=0),
             node("Unsqueeze", ["n", "ax0"], ["n1"], name="unsq"),
             node("Concat", ["n1", "m1"], ["target"], axis=0, name="cat"),
             node("Reshape", ["x", "target"], ["y"], name="r")]
    proto = _model(nodes, ["B", 3, 4], ["B", 12], [_i64("zero", 0), _i64("ax0", [0]), _i64("m1", [-1])])
    model, count, _ = run_pass(proto, "drop_noop_shuffles")
    assert count == 0 and ops(model) == ["Shape", "Gather", "Unsqueeze", "Concat", "Reshape"]


@pytest.mark.parametrize("family,exporter", [("vit", "torchscript"), ("vit", "dynamo"), ("bert", "torchscript"),
                                             ("resnet", "dynamo")])
def test_exported_families_stay_correct(tmp_path, family, exporter):
    proto = onnx.load(export_family(tmp_path, family, exporter))
    model, count, _ = run_pass(proto, "drop_noop_shuffles")
    assert count == len(get_pass("drop_noop_shuffles").find(load(proto), PassContext()))
    assert_same(proto, model, dims={"batch": 2, "sequence": 8})
