"""fold_batchnorm: an inference BatchNormalization after Conv / ConvTranspose / Gemm disappears into the
producer's weights (epsilon and non-trivial statistics included), and stays where folding would be wrong
(training mode, a shared producer output, weights or statistics that are not constants)."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from families import build, example_inputs, export_family
from onnx import TensorProto, helper, numpy_helper

from kiln.passes.framework import PassContext, get_pass
from tests.passes.checks import assert_same, finding_cost, load, ops, run_pass

F = TensorProto.FLOAT


def _arr(shape, seed, low=None, high=None, dtype=np.float32):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape) if low is None else rng.uniform(low, high, shape)
    return a.astype(dtype)


def _stats(c, prefix="", dtype=np.float32, seed=10):
    """scale, bias, mean, var initializers that are far from the identity."""
    return [numpy_helper.from_array(_arr(c, seed, 0.5, 1.5, dtype), prefix + "s"),
            numpy_helper.from_array(_arr(c, seed + 1, dtype=dtype), prefix + "b"),
            numpy_helper.from_array(_arr(c, seed + 2, dtype=dtype), prefix + "m"),
            numpy_helper.from_array(_arr(c, seed + 3, 0.2, 3.0, dtype), prefix + "v")]


def _bn(x, y, prefix="", name="bn", **attrs):
    return helper.make_node("BatchNormalization", [x, prefix + "s", prefix + "b", prefix + "m", prefix + "v"], [y],
                            name=name, **attrs)


def _model(nodes, inits, x_shape, y_shape, opset=17, elem=F, extra_inputs=(), extra_outputs=()):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", elem, x_shape), *extra_inputs],
        [helper.make_tensor_value_info("y", elem, y_shape), *extra_outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _conv(spatial=2, bias=True, group=1, c_in=4, c_out=6, epsilon=1e-5, opset=17):
    k = [3] * spatial
    inits = [numpy_helper.from_array(_arr([c_out, c_in // group, *k], 0), "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(_arr([c_out], 1), "cb"))
        inputs.append("cb")
    nodes = [helper.make_node("Conv", inputs, ["c"], name="conv", pads=[1] * 2 * spatial, group=group),
             _bn("c", "y", epsilon=epsilon)]
    size = [5] * spatial
    return _model(nodes, inits + _stats(c_out), ["N", c_in, *size], ["N", c_out, *size], opset=opset)


def _conv_transpose(group=1, bias=True):
    c_in, c_out_per_group = 4, 3
    inits = [numpy_helper.from_array(_arr([c_in, c_out_per_group, 3, 3], 0), "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(_arr([c_out_per_group * group], 1), "cb"))
        inputs.append("cb")
    nodes = [helper.make_node("ConvTranspose", inputs, ["c"], name="conv", group=group, strides=[2, 2]),
             _bn("c", "y", epsilon=1e-3)]
    c_out = c_out_per_group * group
    return _model(nodes, inits + _stats(c_out), ["N", c_in, 4, 4], ["N", c_out, 9, 9])


def _gemm(trans_b=1, bias=True, alpha=1.0, beta=1.0):
    k, n = 5, 6
    inits = [numpy_helper.from_array(_arr([n, k] if trans_b else [k, n], 0), "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(_arr([n], 1), "cb"))
        inputs.append("cb")
    nodes = [helper.make_node("Gemm", inputs, ["c"], name="conv", transB=trans_b, alpha=alpha, beta=beta),
             _bn("c", "y", epsilon=0.01)]
    return _model(nodes, inits + _stats(n), ["N", k], ["N", n])


FIRES = {
    "conv2d-bias": (_conv(), "Conv"),
    "conv2d-no-bias": (_conv(bias=False), "Conv"),
    "conv1d": (_conv(spatial=1), "Conv"),
    "conv3d": (_conv(spatial=3, bias=False), "Conv"),
    "conv-grouped": (_conv(group=2), "Conv"),
    "conv-depthwise": (_conv(group=4, c_in=4, c_out=8), "Conv"),
    "conv-large-epsilon": (_conv(epsilon=0.5), "Conv"),
    "conv-opset9": (_conv(opset=9), "Conv"),
    "conv-transpose": (_conv_transpose(), "ConvTranspose"),
    "conv-transpose-grouped-no-bias": (_conv_transpose(group=2, bias=False), "ConvTranspose"),
    "gemm-transB": (_gemm(), "Gemm"),
    "gemm-no-transB-no-bias": (_gemm(trans_b=0, bias=False), "Gemm"),
    "gemm-alpha-beta": (_gemm(alpha=0.5, beta=2.0), "Gemm"),
}


@pytest.mark.parametrize("case", list(FIRES))
def test_batchnorm_folds_into_its_producer(case):
    proto, producer = FIRES[case]
    model, count, ctx = run_pass(proto, "fold_batchnorm")
    assert count == 1 and ops(model) == [producer]
    assert [n.name for n in model.graph] == ["conv"]  # the producer keeps its name
    assert ctx.log == [f"folded bn into {producer} conv"]
    assert "w" not in model.graph.initializers  # the old weight is gone, not kept beside the new one
    assert_same(proto, model, dims={"N": 3})


def test_statistics_from_constant_nodes_fold_too():
    inits = [numpy_helper.from_array(_arr([6, 4, 3, 3], 0), "w")]
    constants = [helper.make_node("Constant", [], [t.name], value=t, name=f"const_{t.name}") for t in _stats(6)]
    nodes = [*constants, helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), _bn("c", "y")]
    proto = _model(nodes, inits, ["N", 4, 5, 5], ["N", 6, 5, 5])
    model, count, _ = run_pass(proto, "fold_batchnorm")
    assert count == 1 and ops(model) == ["Conv"]  # the Constant nodes went with the BatchNorm
    assert_same(proto, model)


def test_float16_layer_with_float32_statistics_keeps_its_dtype():
    """BatchNormalization from opset 15 may hold its statistics in another float type than the data."""
    inits = [numpy_helper.from_array(_arr([6, 4, 3, 3], 0, dtype=np.float16), "w")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), _bn("c", "y")]
    proto = _model(nodes, inits + _stats(6), ["N", 4, 5, 5], ["N", 6, 5, 5], opset=15, elem=TensorProto.FLOAT16)
    model, count, _ = run_pass(proto, "fold_batchnorm")
    assert count == 1 and ops(model) == ["Conv"]
    conv = next(iter(model.graph))
    assert {v.dtype for v in conv.inputs} == {ir.DataType.FLOAT16}
    assert_same(proto, model, rtol=1e-2)


def test_bfloat16_layer_folds_in_bfloat16():
    import ml_dtypes

    bits = _arr([6, 4, 3, 3], 0).astype(ml_dtypes.bfloat16).view(np.uint16).flatten().tolist()
    w = helper.make_tensor("w", TensorProto.BFLOAT16, [6, 4, 3, 3], bits)
    nodes = [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16, name="cast_in"),
             helper.make_node("Conv", ["xb", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), _bn("c", "yb"),
             helper.make_node("Cast", ["yb"], ["y"], to=F, name="cast_out")]
    proto = _model(nodes, [w, *_stats(6)], ["N", 4, 5, 5], ["N", 6, 5, 5], opset=15)
    model, count, _ = run_pass(proto, "fold_batchnorm")
    assert count == 1 and ops(model) == ["Cast", "Conv", "Cast"]
    assert {v.dtype for v in list(model.graph)[1].inputs} == {ir.DataType.BFLOAT16}
    assert_same(proto, model, rtol=3e-2, onnxruntime=False)  # onnxruntime's CPU Conv has no bfloat16


def test_two_convs_sharing_a_weight_each_get_their_own():
    inits = [numpy_helper.from_array(_arr([4, 4, 3, 3], 0), "w"), *_stats(4, "a", seed=1), *_stats(4, "b", seed=7)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             _bn("c1", "h", prefix="a", name="bn1"),
             helper.make_node("Conv", ["h", "w"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             _bn("c2", "y", prefix="b", name="bn2")]
    proto = _model(nodes, inits, ["N", 4, 5, 5], ["N", 4, 5, 5])
    model, count, _ = run_pass(proto, "fold_batchnorm")
    assert count == 2 and ops(model) == ["Conv", "Conv"]
    first, second = list(model.graph)
    assert first.inputs[1] is not second.inputs[1]
    assert_same(proto, model)


def _unchanged(proto):
    model, count, _ = run_pass(proto, "fold_batchnorm")
    assert count == 0
    assert ops(model) == [n.op_type for n in proto.graph.node]
    assert get_pass("fold_batchnorm").find(load(proto), PassContext()) == []


def test_training_mode_is_left_alone():
    inits = [numpy_helper.from_array(_arr([6, 4, 3, 3], 0), "w")] + _stats(6)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             _bn("c", "y", training_mode=1)]
    _unchanged(_model(nodes, inits, [2, 4, 5, 5], [2, 6, 5, 5], opset=15))


def test_running_statistic_outputs_are_left_alone():
    inits = [numpy_helper.from_array(_arr([6, 4, 3, 3], 0), "w")] + _stats(6)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y", "rm", "rv"], name="bn",
                              training_mode=1)]
    extra = [helper.make_tensor_value_info("rm", F, [6]), helper.make_tensor_value_info("rv", F, [6])]
    _unchanged(_model(nodes, inits, [2, 4, 5, 5], [2, 6, 5, 5], opset=15, extra_outputs=extra))


def test_spatial_zero_is_left_alone():
    inits = [numpy_helper.from_array(_arr([6, 4, 1, 1], 0), "w")] + _stats(6)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), _bn("c", "y", spatial=0)]
    _unchanged(_model(nodes, inits, [2, 4, 1, 1], [2, 6, 1, 1], opset=8))


def test_conv_output_read_elsewhere_is_left_alone():
    inits = [numpy_helper.from_array(_arr([6, 4, 3, 3], 0), "w")] + _stats(6)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), _bn("c", "y"),
             helper.make_node("Relu", ["c"], ["r"], name="relu")]
    _unchanged(_model(nodes, inits, [2, 4, 5, 5], [2, 6, 5, 5],
                      extra_outputs=[helper.make_tensor_value_info("r", F, [2, 6, 5, 5])]))


def test_conv_output_that_is_a_graph_output_is_left_alone():
    inits = [numpy_helper.from_array(_arr([6, 4, 3, 3], 0), "w")] + _stats(6)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), _bn("c", "y")]
    _unchanged(_model(nodes, inits, [2, 4, 5, 5], [2, 6, 5, 5],
                      extra_outputs=[helper.make_tensor_value_info("c", F, [2, 6, 5, 5])]))


def test_weight_that_is_a_graph_input_is_left_alone():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), _bn("c", "y")]
    _unchanged(_model(nodes, _stats(6), [2, 4, 5, 5], [2, 6, 5, 5],
                      extra_inputs=[helper.make_tensor_value_info("w", F, [6, 4, 3, 3])]))


def test_statistics_that_are_graph_inputs_are_left_alone():
    inits = [numpy_helper.from_array(_arr([6, 4, 3, 3], 0), "w")] + [t for t in _stats(6) if t.name != "m"]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), _bn("c", "y")]
    _unchanged(_model(nodes, inits, [2, 4, 5, 5], [2, 6, 5, 5],
                      extra_inputs=[helper.make_tensor_value_info("m", F, [6])]))


def test_batchnorm_after_another_op_is_left_alone():
    nodes = [helper.make_node("Relu", ["x"], ["c"], name="relu"), _bn("c", "y")]
    _unchanged(_model(nodes, _stats(4), [2, 4, 5, 5], [2, 4, 5, 5]))


def test_find_reports_exactly_what_apply_folds():
    inits = [numpy_helper.from_array(_arr([4, 4, 3, 3], 0), "w"), numpy_helper.from_array(_arr([4, 4, 3, 3], 3), "w2"),
             *_stats(4, "a", seed=1), *_stats(4, "b", seed=7)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             _bn("c1", "h", prefix="a", name="bn1"),
             helper.make_node("Conv", ["h", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r"], name="relu"),
             _bn("c2", "y", prefix="b", name="bn2")]  # conv2's output is read twice: not folded
    proto = _model(nodes, inits, ["N", 4, 5, 5], ["N", 4, 5, 5],
                   extra_outputs=[helper.make_tensor_value_info("r", F, ["N", 4, 5, 5])])
    findings = get_pass("fold_batchnorm").find(load(proto), PassContext(dims={"N": 2}))
    model, count, ctx = run_pass(proto, "fold_batchnorm")
    assert count == len(findings) == 1
    (finding,) = findings
    assert finding.nodes == ["conv1", "bn1"] and finding.pass_name == "fold_batchnorm"
    assert finding.rule == "unfolded-batchnorm" and finding.fix == "fixed automatically by pass fold_batchnorm"
    assert finding.shapes["h"] == ["N", 4, 5, 5]
    cost = finding_cost(load(proto), finding, {"N": 2})
    # the Conv's input, weight and output; the BatchNormalization's input, statistics and output ([2, 4, 5, 5] fp32)
    assert cost.bytes == 4 * (2 * 4 * 5 * 5 + 4 * 4 * 3 * 3 + 2 * 4 * 5 * 5) + 4 * (2 * (2 * 4 * 5 * 5) + 4 * 4)
    assert cost.flops > 0
    assert ops(model) == ["Conv", "Conv", "Relu", "BatchNormalization"]
    assert_same(proto, model)


def test_folds_the_batchnorms_a_torch_export_keeps(tmp_path):
    """The TorchScript exporter keeps BatchNormalization without constant folding."""
    path = tmp_path / "resnet_bn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(build("resnet"), tuple(example_inputs("resnet").values()), str(path),
                          input_names=["pixel_values"], opset_version=17, dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.PRESERVE, dynamic_axes={"pixel_values": {0: "batch"}})
    proto = onnx.load(path)
    assert sum(n.op_type == "BatchNormalization" for n in proto.graph.node) == 4
    model, count, _ = run_pass(proto, "fold_batchnorm")
    assert count == 4 and "BatchNormalization" not in ops(model)
    assert_same(proto, model, dims={"batch": 2})


@pytest.mark.parametrize("family,exporter", [("resnet", "torchscript"), ("mobilenet_v2", "dynamo"),
                                             ("bert", "torchscript")])
def test_exported_families_stay_correct(tmp_path, family, exporter):
    proto = onnx.load(export_family(tmp_path, family, exporter))
    model, _, _ = run_pass(proto, "fold_batchnorm")
    assert_same(proto, model, dims={"batch": 2, "sequence": 8})
