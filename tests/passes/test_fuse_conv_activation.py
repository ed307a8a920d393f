"""fuse_conv_activation: Conv + bias + residual Add + activation become one ai.kiln::FusedConv, and
nothing else does."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from families import export_family
from onnx import TensorProto, helper, numpy_helper

from kiln.errors import KilnError
from kiln.passes.framework import PassContext, get_pass
from tests.passes.checks import assert_same, finding_cost, load, ops, run_pass, to_proto

C_IN, C_OUT, HW = 4, 8, 6
OUT = ["N", C_OUT, HW, HW]


def _array(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _model(nodes, inits=(), opset=17, inputs=(), output="y", out_shape=None, conv_bias=False, domains=()):
    """x [N,4,6,6] -> Conv(w[, cb]) -> "c" -> ``nodes`` -> ``output``."""
    conv_inputs = ["x", "w", "cb"] if conv_bias else ["x", "w"]
    graph = helper.make_graph(
        [helper.make_node("Conv", conv_inputs, ["c"], name="conv", pads=[1, 1, 1, 1]), *nodes], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C_IN, HW, HW]), *inputs],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, out_shape or OUT)],
        [numpy_helper.from_array(_array([C_OUT, C_IN, 3, 3]), "w"),
         *([numpy_helper.from_array(_array([C_OUT], 1), "cb")] if conv_bias else []), *inits],
    )
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=imports)


def _scalar(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _fused(proto, **ctx):
    model, count, context = run_pass(proto, "fuse_conv_activation", kiln_ops=True, **ctx)
    return model, count, context


def _attrs(model):
    (node,) = [n for n in model.graph if n.op_type == "FusedConv"]
    attrs = {k: a.value for k, a in node.attributes.items()}
    return node, attrs


def _check_fused(proto, activation, params, n_inputs=2):
    model, count, _ = _fused(proto)
    assert count == 1
    assert ops(model) == ["ai.kiln::FusedConv"]
    node, attrs = _attrs(model)
    assert attrs["activation"] == activation
    assert list(attrs.get("activation_params", [])) == pytest.approx(params)
    assert list(attrs["pads"]) == [1, 1, 1, 1]
    assert len(node.inputs) == n_inputs
    assert model.graph.outputs[0].name == "y"
    assert_same(proto, model, dims={"N": 2})
    return model


ACTIVATIONS = [
    ("Relu", [helper.make_node("Relu", ["c"], ["y"])], [], 17, "Relu", []),
    ("Relu6-inputs", [helper.make_node("Clip", ["c", "lo", "hi"], ["y"])], [_scalar("lo", 0.0), _scalar("hi", 6.0)], 17,
     "Clip", [0.0, 6.0]),
    ("Clip-min-only", [helper.make_node("Clip", ["c", "lo"], ["y"])], [_scalar("lo", -0.5)], 13,
     "Clip", [-0.5, float("inf")]),
    ("Clip-max-only", [helper.make_node("Clip", ["c", "", "hi"], ["y"])], [_scalar("hi", 0.7)], 12,
     "Clip", [float("-inf"), 0.7]),
    ("Relu6-attributes", [helper.make_node("Clip", ["c"], ["y"], min=0.0, max=6.0)], [], 10, "Clip", [0.0, 6.0]),
    ("Clip-attribute-default-max", [helper.make_node("Clip", ["c"], ["y"], min=0.25)], [], 6,
     "Clip", [0.25, float(np.finfo(np.float32).max)]),
    ("LeakyRelu", [helper.make_node("LeakyRelu", ["c"], ["y"], alpha=0.2)], [], 17, "LeakyRelu", [0.2]),
    ("LeakyRelu-default", [helper.make_node("LeakyRelu", ["c"], ["y"])], [], 17, "LeakyRelu", [0.01]),
    ("Sigmoid", [helper.make_node("Sigmoid", ["c"], ["y"])], [], 17, "Sigmoid", []),
    ("Tanh", [helper.make_node("Tanh", ["c"], ["y"])], [], 17, "Tanh", []),
    ("HardSigmoid", [helper.make_node("HardSigmoid", ["c"], ["y"], alpha=0.3, beta=0.4)], [], 17,
     "HardSigmoid", [0.3, 0.4]),
    ("HardSwish", [helper.make_node("HardSwish", ["c"], ["y"])], [], 14, "HardSwish", []),
    ("SiLU", [helper.make_node("Sigmoid", ["c"], ["s"]), helper.make_node("Mul", ["c", "s"], ["y"])], [], 17,
     "SiLU", []),
    ("SiLU-swapped", [helper.make_node("Sigmoid", ["c"], ["s"]), helper.make_node("Mul", ["s", "c"], ["y"])], [], 17,
     "SiLU", []),
    ("Gelu-erf", [helper.make_node("Gelu", ["c"], ["y"])], [], 20, "Gelu", [0.0]),
    ("Gelu-tanh", [helper.make_node("Gelu", ["c"], ["y"], approximate="tanh")], [], 20, "Gelu", [1.0]),
]


@pytest.mark.parametrize("case", ACTIVATIONS, ids=[c[0] for c in ACTIVATIONS])
def test_each_activation_fuses_into_one_fused_conv(case):
    _, nodes, inits, opset, activation, params = case
    _check_fused(_model(nodes, inits, opset=opset), activation, params)


def test_kiln_gelu_from_fuse_gelu_fuses_at_older_opsets():
    proto = _model([helper.make_node("Gelu", ["c"], ["y"], domain="ai.kiln", approximate="tanh")], opset=17,
                   domains=["ai.kiln"])
    _check_fused(proto, "Gelu", [1.0])


def test_clip_bounds_from_constant_nodes_are_read_and_the_constants_removed():
    nodes = [helper.make_node("Constant", [], ["lo"], value=numpy_helper.from_array(np.float32(0.0))),
             helper.make_node("Constant", [], ["hi"], value=numpy_helper.from_array(np.float32(6.0))),
             helper.make_node("Clip", ["c", "lo", "hi"], ["y"])]
    _check_fused(_model(nodes), "Clip", [0.0, 6.0])


@pytest.mark.parametrize("order", [["c", "r"], ["r", "c"]], ids=["conv-first", "residual-first"])
@pytest.mark.parametrize("activation", [None, "Relu"])
def test_residual_add_in_either_order(order, activation):
    residual = helper.make_tensor_value_info("r", TensorProto.FLOAT, OUT)
    nodes = [helper.make_node("Add", order, ["a" if activation else "y"])]
    if activation:
        nodes.append(helper.make_node(activation, ["a"], ["y"]))
    model = _check_fused(_model(nodes, inputs=[residual], conv_bias=True), activation or "", [], n_inputs=4)
    node, _ = _attrs(model)
    assert [v.name for v in node.inputs] == ["x", "w", "cb", "r"]


def test_residual_without_conv_bias_leaves_b_empty():
    residual = helper.make_tensor_value_info("r", TensorProto.FLOAT, OUT)
    nodes = [helper.make_node("Add", ["r", "c"], ["a"]), helper.make_node("Sigmoid", ["a"], ["s"]),
             helper.make_node("Mul", ["a", "s"], ["y"])]
    model = _check_fused(_model(nodes, inputs=[residual]), "SiLU", [], n_inputs=4)
    node, _ = _attrs(model)
    assert node.inputs[2] is None and node.inputs[3].name == "r"


@pytest.mark.parametrize("shape", [[C_OUT, 1, 1], [1, C_OUT, 1, 1], [1]], ids=["C11", "1C11", "scalar"])
@pytest.mark.parametrize("order", [["c", "b"], ["b", "c"]], ids=["conv-first", "bias-first"])
def test_a_per_channel_bias_add_alone_folds_into_a_standard_conv(shape, order):
    bias = numpy_helper.from_array(_array(shape, 2), "b")
    proto = _model([helper.make_node("Add", order, ["y"])], [bias])
    model, count, _ = run_pass(proto, "fuse_conv_activation", kiln_ops=True)
    assert count == 1 and ops(model) == ["Conv"]
    conv = next(iter(model.graph))
    assert len(conv.inputs) == 3 and conv.inputs[2].const_value.numpy().shape == (C_OUT,)
    assert "b" not in model.graph.initializers  # the folded constant is gone
    assert_same(proto, model, dims={"N": 2})


def test_bias_add_then_activation_fuses_with_the_bias_as_b():
    bias = numpy_helper.from_array(_array([1, C_OUT, 1, 1], 2), "b")
    proto = _model([helper.make_node("Add", ["b", "c"], ["a"]), helper.make_node("Relu", ["a"], ["y"])], [bias])
    model = _check_fused(proto, "Relu", [], n_inputs=3)
    node, _ = _attrs(model)
    np.testing.assert_array_equal(node.inputs[2].const_value.numpy(), _array([1, C_OUT, 1, 1], 2).reshape(-1))


@pytest.mark.parametrize("activation", [None, "Tanh"])
def test_bias_add_then_residual_add(activation):
    bias = numpy_helper.from_array(_array([C_OUT, 1, 1], 2), "b")
    residual = helper.make_tensor_value_info("r", TensorProto.FLOAT, OUT)
    nodes = [helper.make_node("Add", ["c", "b"], ["cb1"]),
             helper.make_node("Add", ["r", "cb1"], ["a" if activation else "y"])]
    if activation:
        nodes.append(helper.make_node(activation, ["a"], ["y"]))
    _check_fused(_model(nodes, [bias], inputs=[residual]), activation or "", [], n_inputs=4)


def test_one_dimensional_conv_fuses_too():
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1]), helper.make_node("Relu", ["c"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 10])],
        [numpy_helper.from_array(_array([8, 4, 3]), "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model, count, _ = _fused(proto)
    assert count == 1 and ops(model) == ["ai.kiln::FusedConv"]
    assert_same(proto, model)


def _unchanged(proto, before=None):
    model, count, _ = _fused(proto)
    assert count == 0
    assert ops(model) == (before or ops(load(proto)))
    return model


def test_a_lone_conv_is_left_alone():
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C_IN, HW, HW])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, OUT)],
                              [numpy_helper.from_array(_array([C_OUT, C_IN, 3, 3]), "w")])
    _unchanged(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_not_when_the_conv_output_is_also_a_graph_output():
    proto = _model([helper.make_node("Relu", ["c"], ["y"])])
    proto.graph.output.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, OUT))
    _unchanged(proto)


def test_not_when_an_intermediate_has_another_consumer():
    residual = helper.make_tensor_value_info("r", TensorProto.FLOAT, OUT)
    nodes = [helper.make_node("Add", ["c", "r"], ["a"]), helper.make_node("Relu", ["a"], ["y1"]),
             helper.make_node("Neg", ["a"], ["y"])]
    proto = _model(nodes, inputs=[residual])
    proto.graph.output.append(helper.make_tensor_value_info("y1", TensorProto.FLOAT, OUT))
    # the Add still fuses (its output is the chain's end); the Relu, whose input has two readers, does not
    model, count, _ = _fused(proto)
    assert count == 1 and ops(model) == ["ai.kiln::FusedConv", "Relu", "Neg"]
    assert _attrs(model)[1]["activation"] == ""
    assert_same(proto, model, dims={"N": 2})


def test_not_when_the_weight_is_computed():
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5]),
                                    helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 4, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 3, 3])])
    _unchanged(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_not_when_the_add_operand_broadcasts():
    gate = helper.make_tensor_value_info("g", TensorProto.FLOAT, ["N", C_OUT, 1, 1])
    _unchanged(_model([helper.make_node("Add", ["c", "g"], ["a"]), helper.make_node("Relu", ["a"], ["y"])],
                      inputs=[gate]))


def test_not_a_per_channel_constant_when_the_conv_has_its_own_bias():
    bias = numpy_helper.from_array(_array([C_OUT, 1, 1], 2), "b")
    _unchanged(_model([helper.make_node("Add", ["c", "b"], ["a"]), helper.make_node("Relu", ["a"], ["y"])], [bias],
                      conv_bias=True))


def test_not_a_constant_that_is_not_per_channel():
    bias = numpy_helper.from_array(_array([1, 1, HW, HW], 2), "b")
    _unchanged(_model([helper.make_node("Add", ["c", "b"], ["y"])], [bias]))


def test_not_when_a_clip_bound_is_computed():
    lo = helper.make_tensor_value_info("lo", TensorProto.FLOAT, [])
    _unchanged(_model([helper.make_node("Clip", ["c", "lo"], ["y"])], inputs=[lo]))


def test_add_of_the_conv_output_to_itself_is_not_a_residual():
    _unchanged(_model([helper.make_node("Add", ["c", "c"], ["y"])]))


def test_activation_is_left_behind_only_when_it_cannot_be_fused():
    residual = helper.make_tensor_value_info("r", TensorProto.FLOAT, OUT)
    lo = helper.make_tensor_value_info("lo", TensorProto.FLOAT, [])
    proto = _model([helper.make_node("Add", ["c", "r"], ["a"]), helper.make_node("Clip", ["a", "lo"], ["y"])],
                   inputs=[residual, lo])
    model, count, _ = _fused(proto)
    assert count == 1 and ops(model) == ["ai.kiln::FusedConv", "Clip"]
    assert_same(proto, model, dims={"N": 2})


def test_apply_refuses_without_kiln_ops():
    with pytest.raises(KilnError, match="kiln_ops"):
        run_pass(_model([helper.make_node("Relu", ["c"], ["y"])]), "fuse_conv_activation")


def _chain_net():
    """conv1 + Relu; conv2 + bias + residual(conv1 path) + Relu; conv3 alone; conv4 + SiLU."""
    w = lambda name, seed, co=8, ci=8: numpy_helper.from_array(_array([co, ci, 3, 3], seed), name)  # noqa: E731
    b = numpy_helper.from_array(_array([8, 1, 1], 9), "b2")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "b2"], ["c2b"], name="bias2"),
        helper.make_node("Add", ["r1", "c2b"], ["a2"], name="res2"),
        helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c3", "w4"], ["c4"], name="conv4", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c4"], ["s4"], name="sig4"),
        helper.make_node("Mul", ["s4", "c4"], ["y"], name="mul4"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 6, 6])],
                              [w("w1", 1, ci=4), w("w2", 2), w("w3", 3), w("w4", 4), b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_find_reports_exactly_what_apply_fuses_with_shapes_flops_and_bytes():
    proto = _chain_net()
    findings = get_pass("fuse_conv_activation").find(load(proto), PassContext(kiln_ops=True))
    assert [f.nodes for f in findings] == [["conv1", "relu1"], ["conv2", "bias2", "res2", "relu2"],
                                           ["conv4", "sig4", "mul4"]]
    assert {f.rule for f in findings} == {"conv-without-fused-epilogue"}
    assert {f.pass_name for f in findings} == {"fuse_conv_activation"}
    conv2 = findings[1]
    assert conv2.shapes["w2"] == [8, 8, 3, 3] and conv2.shapes["r2"] == [2, 8, 6, 6]
    cost = finding_cost(load(proto), conv2)
    assert cost.flops == 2 * (2 * 8 * 6 * 6) * (8 * 3 * 3) + 3 * (2 * 8 * 6 * 6)  # the Conv; bias, residual, Relu
    n = 2 * 8 * 6 * 6
    assert cost.bytes == 4 * ((n + 8 * 8 * 3 * 3 + n) + (n + 8 + n) + 3 * n + 2 * n)  # each op's inputs and outputs
    assert conv2.details["residual"] and conv2.details["bias_folded"] and conv2.details["activation"] == "Relu"
    model, count, context = _fused(proto)
    assert count == len(findings) == len(context.log)
    assert ops(model) == ["ai.kiln::FusedConv", "ai.kiln::FusedConv", "Conv", "ai.kiln::FusedConv"]
    assert [n.name for n in model.graph if n.op_type == "FusedConv"] == [f.nodes[0] for f in findings]
    assert get_pass("fuse_conv_activation").find(model, PassContext(kiln_ops=True)) == []
    assert_same(proto, model)
    onnx.checker.check_model(to_proto(model))


# Exporter output (both exporters fold BatchNorm into the conv in eval mode, so the pass runs alone
# here: fold_batchnorm has not run): FusedConv count per family.
FAMILIES = [
    ("resnet", "torchscript", 3, ["Conv"]),  # stem+Relu, a+Relu, b+residual(downsample conv)+Relu
    ("resnet", "dynamo", 3, ["Conv"]),
    ("mobilenet_v2", "torchscript", 4, []),  # three Conv+Clip(0,6) (Constant bounds), project+residual
    ("efficientnet", "torchscript", 6, []),  # SiLU as Sigmoid*x, SE gate Conv+Sigmoid, project+residual
    ("efficientnet", "dynamo", 6, []),
]


@pytest.mark.parametrize("family,exporter,fused,convs_left", FAMILIES, ids=[f"{f}-{e}" for f, e, *_ in FAMILIES])
def test_exported_families(tmp_path, family, exporter, fused, convs_left):
    proto = onnx.load(export_family(tmp_path, family, exporter))
    assert "BatchNormalization" not in [n.op_type for n in proto.graph.node]
    model, count, _ = _fused(proto)
    assert count == fused
    assert [op for op in ops(model) if op in ("Conv", "ai.kiln::FusedConv")].count("ai.kiln::FusedConv") == fused
    assert [op for op in ops(model) if op == "Conv"] == convs_left
    assert not {"Relu", "Clip", "Sigmoid", "Add"} & set(ops(model))  # every activation and residual Add fused
    assert_same(proto, model, dims={"batch": 3})


def test_not_an_unknown_gelu_approximation():
    _unchanged(_model([helper.make_node("Gelu", ["c"], ["y"], approximate="sigmoid")], opset=20))
