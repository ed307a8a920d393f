"""pad_input_channels: a first conv on 3 channels reads 4 (a zero weight channel, the input padded by a
standard Pad) at low precision, exactly."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.passes.framework import PassContext, get_pass
from tests.passes.checks import assert_same, finding_cost, load, ops, run_pass


def _array(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _model(opset=17, channels=3, group=1, extra_nodes=(), outputs=(), weight_input=False):
    w = numpy_helper.from_array(_array([6, channels // group, 3, 3]), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2], group=group),
         *extra_nodes], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, 8, 8]),
         *([helper.make_tensor_value_info("w", TensorProto.FLOAT, [6, channels // group, 3, 3])]
           if weight_input else [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 4, 4]), *outputs],
        [] if weight_input else [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8", "fp8"])
def test_first_conv_with_three_channels_reads_four(precision):
    proto = _model()
    model, count, context = run_pass(proto, "pad_input_channels", precision=precision)
    assert count == 1 and ops(model) == ["Pad", "Conv"]
    pad, conv = list(model.graph)
    assert pad.inputs[0].name == "x" and list(pad.inputs[1].const_value.numpy()) == [0, 0, 0, 0, 0, 1, 0, 0]
    assert list(pad.outputs[0].shape)[1:] == [4, 8, 8]
    weights = conv.inputs[1].const_value.numpy()
    assert weights.shape == (6, 4, 3, 3)
    np.testing.assert_array_equal(weights[:, :3], _array([6, 3, 3, 3]))
    assert not weights[:, 3].any()
    assert "w" not in model.graph.initializers  # the 3-channel weight is gone
    assert "3 to 4 channels" in context.log[0]
    assert_same(proto, model, dims={"N": 2})


def test_before_opset_11_pads_is_an_attribute():
    proto = _model(opset=10)
    model, count, _ = run_pass(proto, "pad_input_channels", precision="fp16")
    assert count == 1 and ops(model) == ["Pad", "Conv"]
    pad = next(iter(model.graph))
    assert len(pad.inputs) == 1 and list(pad.attributes["pads"].value) == [0, 0, 0, 0, 0, 1, 0, 0]
    assert_same(proto, model, dims={"N": 2})


def test_other_readers_of_the_input_keep_it_unpadded_and_convs_share_one_pad():
    w2 = helper.make_node("Conv", ["x", "w"], ["y2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2])
    mean = helper.make_node("ReduceMean", ["x"], ["m"], name="mean", keepdims=0)
    proto = _model(extra_nodes=[w2, mean],
                   outputs=[helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["N", 6, 4, 4]),
                            helper.make_tensor_value_info("m", TensorProto.FLOAT, [])])
    model, count, _ = run_pass(proto, "pad_input_channels", precision="fp16")
    assert count == 2 and ops(model) == ["Pad", "Conv", "Conv", "ReduceMean"]
    pad, conv1, conv2, reduce = list(model.graph)
    assert conv1.inputs[0] is pad.outputs[0] and conv2.inputs[0] is pad.outputs[0]
    assert reduce.inputs[0].name == "x"
    assert_same(proto, model, dims={"N": 2})


def test_a_fused_conv_first_layer_is_padded_too():
    proto = _model(extra_nodes=[])
    proto.graph.node[0].output[0] = "c"
    proto.graph.node.append(helper.make_node("Relu", ["c"], ["y"]))
    model, _, _ = run_pass(proto, "fuse_conv_activation", kiln_ops=True)
    count = get_pass("pad_input_channels").apply(model, PassContext(precision="bf16", kiln_ops=True))
    assert count == 1 and ops(model) == ["Pad", "ai.kiln::FusedConv"]
    assert_same(proto, model, dims={"N": 2})


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_not_at_full_precision(precision):
    model, count, _ = run_pass(_model(), "pad_input_channels", precision=precision)
    assert count == 0 and ops(model) == ["Conv"]


@pytest.mark.parametrize("case", ["four-channels", "grouped", "weight-computed", "not-first"])
def test_not_where_the_precondition_fails(case):
    if case == "four-channels":
        proto = _model(channels=4)
    elif case == "grouped":
        proto = _model(group=3)
    elif case == "weight-computed":
        proto = _model(weight_input=True)
    else:
        proto = _model()
        proto.graph.node[0].input[0] = "r"
        proto.graph.node.insert(0, helper.make_node("Relu", ["x"], ["r"]))
    before = ops(load(proto))
    model, count, _ = run_pass(proto, "pad_input_channels", precision="fp16")
    assert count == 0 and ops(model) == before
    assert get_pass("pad_input_channels").find(load(proto), PassContext(precision="fp16")) == []


def test_not_with_an_unknown_channel_count():
    proto = _model()
    proto.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "C"
    model, count, _ = run_pass(proto, "pad_input_channels", precision="fp16")
    assert count == 0 and ops(model) == ["Conv"]


def test_find_reports_the_conv_apply_pads():
    proto = _model()
    ctx = PassContext(precision="fp16", dims={"N": 2})
    (finding,) = get_pass("pad_input_channels").find(load(proto), ctx)
    assert finding.rule == "first-conv-c3" and finding.pass_name == "pad_input_channels"
    assert finding.nodes == ["conv"]
    assert finding.shapes == {"x": ["N", 3, 8, 8], "w": [6, 3, 3, 3], "y": ["N", 6, 4, 4]}
    cost = finding_cost(load(proto), finding, ctx.dims)
    assert cost.flops == 2 * (2 * 6 * 4 * 4) * (3 * 3 * 3)
    assert cost.bytes == (2 * 3 * 8 * 8 + 6 * 3 * 3 * 3 + 2 * 6 * 4 * 4) * 4
    model, count, _ = run_pass(proto, "pad_input_channels", precision="fp16")
    assert count == 1 and [n.name for n in model.graph if n.op_type == "Conv"] == finding.nodes
    assert get_pass("pad_input_channels").find(model, ctx) == []
