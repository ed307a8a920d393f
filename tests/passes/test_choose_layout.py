"""choose_layout: conv regions at low precision are annotated NHWC, with a layout change only where NCHW
data enters or leaves a region; the model stays standard ONNX and computes the same."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from families import export_family
from onnx import TensorProto, helper, numpy_helper

from kiln.passes.framework import PassContext, get_pass
from tests.passes.checks import assert_same, finding_cost, load, run_pass, to_proto

F = TensorProto.FLOAT


def _init(name, shape, seed=0):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def _net():
    """conv1 -> Relu -> MaxPool -> conv2 -> Add(residual from the pool) -> Relu -> GAP -> Flatten -> Gemm."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "p1"], ["a2"], name="add"),
        helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", F, ["N", 10])],
                              [_init("w1", [8, 3, 3, 3], 1), _init("w2", [8, 8, 3, 3], 2), _init("wf", [10, 8], 3),
                               _init("bf", [10], 4)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _layouts(model):
    nodes = {n.name: n.metadata_props.get("kiln.layout") for n in model.graph}
    values = {}
    for v in [*model.graph.inputs, *(o for n in model.graph for o in n.outputs)]:
        if "kiln.layout_change" in v.metadata_props:
            values[v.name] = v.metadata_props["kiln.layout_change"]
    return {k for k, v in nodes.items() if v == "nhwc"}, values


REGION = {"conv1", "relu1", "pool", "conv2", "add", "relu2", "gap"}


@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8", "fp8"])
def test_one_region_with_a_layout_change_at_each_border(precision):
    proto = _net()
    model, count, context = run_pass(proto, "choose_layout", precision=precision)
    assert count == 1
    nhwc, changes = _layouts(model)
    assert nhwc == REGION  # Flatten and the Gemm head stay NCHW
    assert changes == {"x": "to_nhwc", "g": "to_nchw"}
    assert "layout changes 4 per-conv -> 2 at its borders" in context.log[0]
    assert_same(proto, model, dims={"N": 2})  # unchanged math, onnxruntime included


def test_annotations_survive_serialization_as_standard_onnx():
    model, _, _ = run_pass(_net(), "choose_layout", precision="fp16")
    proto = to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    assert {
        n.name for n in proto.graph.node if any(p.key == "kiln.layout" and p.value == "nhwc" for p in n.metadata_props)
    } == REGION
    value_infos = {
        v.name: {p.key: p.value for p in v.metadata_props} for v in [*proto.graph.input, *proto.graph.value_info]
    }
    assert value_infos["x"] == {"kiln.layout_change": "to_nhwc"} and value_infos["g"] == {
        "kiln.layout_change": "to_nchw"
    }
    again = load(proto)
    assert _layouts(again) == _layouts(model)


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_not_at_full_precision(precision):
    model, count, context = run_pass(_net(), "choose_layout", precision=precision)
    assert count == 0 and _layouts(model) == (set(), {}) and context.log == []
    assert get_pass("choose_layout").find(load(_net()), PassContext(precision=precision)) == []


def test_not_for_a_region_without_a_conv():
    nodes = [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Relu", ["p"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 8, 8, 8])],
                              [helper.make_tensor_value_info("y", F, [1, 8, 4, 4])])
    model, count, _ = run_pass(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "choose_layout",
                               precision="fp16")
    assert count == 0 and _layouts(model) == (set(), {})


def _split_net():
    """conv1 -> Relu, read by a Reshape (ends the region) and a graph output; Reshape -> conv2 + residual r."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Reshape", ["r1", "shape"], ["s"], name="reshape"),
             helper.make_node("Conv", ["s", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "r"], ["y"], name="add")]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F, [2, 4, 8, 8]), helper.make_tensor_value_info("r", F, [2, 8, 8, 8])],
        [helper.make_tensor_value_info("y", F, [2, 8, 8, 8]), helper.make_tensor_value_info("r1", F, [2, 8, 8, 8])],
        [
            _init("w1", [8, 4, 3, 3], 1),
            _init("w2", [8, 8, 3, 3], 2),
            numpy_helper.from_array(np.asarray([2, 8, 8, 8], dtype=np.int64), "shape"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_two_regions_split_by_a_reshape_and_values_entering_from_outside():
    proto = _split_net()
    model, count, context = run_pass(proto, "choose_layout", precision="fp16")
    assert count == 2
    nhwc, changes = _layouts(model)
    assert nhwc == {"conv1", "relu1", "conv2", "add"}
    # r1 leaves region 1 (read by the Reshape and a graph output); s and the residual r enter region 2
    assert changes == {"x": "to_nhwc", "r1": "to_nchw", "s": "to_nhwc", "r": "to_nhwc", "y": "to_nchw"}
    assert context.log[-1] == "2 NHWC regions: layout changes 4 per-conv -> 5 at region borders"
    assert_same(proto, model)


def test_find_reports_each_region_apply_annotates():
    proto = _net()
    ctx = PassContext(precision="fp16", dims={"N": 2})
    (finding,) = get_pass("choose_layout").find(m := load(proto), ctx)
    assert finding.rule == "nchw-conv-low-precision" and finding.pass_name == "choose_layout"
    assert finding.nodes[0] == "conv1" and set(finding.nodes) == REGION
    assert finding.details["convs"] == 2 and finding.details["layout_changes_per_conv"] == 4
    assert finding.details["layout_changes_region"] == 2 and finding.details["layout_changes_saved"] == 2
    assert finding.shapes == {"x": ["N", 3, 16, 16], "g": ["N", 8, 1, 1]}
    cost = finding_cost(m, finding, ctx.dims)
    # what kiln doctor reports (kiln.cost): the two convs, one per element for Relu, Add, Relu and the global
    # pool, four per output for the 2x2 MaxPool; bytes: each node's distinct inputs and outputs
    assert cost.flops == (2 * (2 * 8 * 16 * 16) * 27 + 2 * (2 * 8 * 8 * 8) * 72
                          + 2 * 8 * 16 * 16 + 4 * (2 * 8 * 8 * 8) + 3 * (2 * 8 * 8 * 8))
    assert cost.bytes == 4 * ((2 * 3 * 16 * 16 + 8 * 3 * 3 * 3 + 2 * 8 * 16 * 16) + 2 * (2 * 8 * 16 * 16)
                              + (2 * 8 * 16 * 16 + 2 * 8 * 8 * 8) + (2 * 8 * 8 * 8 + 8 * 8 * 3 * 3 + 2 * 8 * 8 * 8)
                              + 3 * (2 * 8 * 8 * 8) + 2 * (2 * 8 * 8 * 8) + (2 * 8 * 8 * 8 + 2 * 8))
    model, count, _ = run_pass(proto, "choose_layout", precision="fp16")
    assert count == 1 and _layouts(model)[0] == set(finding.nodes)
    assert get_pass("choose_layout").find(model, ctx) == []
    assert get_pass("choose_layout").apply(model, ctx) == 0  # already annotated


def test_fused_convs_from_an_exported_resnet_form_one_region(tmp_path):
    proto = onnx.load(export_family(tmp_path, "resnet", "torchscript"))
    model, _, _ = run_pass(proto, "fuse_conv_activation", kiln_ops=True)
    count = get_pass("choose_layout").apply(model, PassContext(precision="fp16", kiln_ops=True))
    assert count == 1
    nhwc, changes = _layouts(model)
    convs = {n.name for n in model.graph if n.op_type in ("Conv", "FusedConv")}
    assert len(convs) == 4 and convs <= nhwc
    assert [k for k, v in changes.items() if v == "to_nhwc"] == ["pixel_values"]
    assert len([v for v in changes.values() if v == "to_nchw"]) == 1
    assert_same(proto, model, dims={"batch": 2})


def test_a_resize_with_computed_scales_stays_in_the_region():
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["c1", "", "scales"], ["u"], name="up", mode="nearest"),
             helper.make_node("Conv", ["u", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 4, 4, 4]),
                                           helper.make_tensor_value_info("scales", F, [4])],
                              [helper.make_tensor_value_info("y", F, [1, 8, "h", "w"])],
                              [_init("w1", [8, 4, 3, 3], 1), _init("w2", [8, 8, 3, 3], 2)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model, count, _ = run_pass(proto, "choose_layout", precision="fp16")
    assert count == 1
    nhwc, changes = _layouts(model)
    assert nhwc == {"conv1", "up", "conv2"}
    assert changes == {"x": "to_nhwc", "y": "to_nchw"}  # the scales are a parameter, not data


def test_the_conv_layout_rule_the_conv_tactics_follow():
    """runs_nhwc is the one decider: a conv this pass marked runs NHWC at any precision; unmarked, NHWC
    on the CPU and at fp16/bf16/tf32 on the GPU, NCHW at fp32 on the GPU (today's ResNet choices)."""
    from kiln.passes.choose_layout import runs_nhwc

    assert runs_nhwc("nhwc", "fp32", "cuda")
    assert all(runs_nhwc(None, p, "cuda") for p in ("fp16", "bf16", "tf32"))
    assert all(runs_nhwc(None, p, "cpu") for p in ("fp32", "tf32", "fp16", "bf16"))
    assert not runs_nhwc(None, "fp32", "cuda")
