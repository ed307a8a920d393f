"""fuse_layernorm: decomposed LayerNorm and RMSNorm in their spelled-out variants become one
LayerNormalization / RMSNormalization (standard at opsets 17 / 23, ai.kiln before with kiln_ops),
and places the fused ops cannot express are left alone."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from families import build, example_inputs, export, export_family
from onnx import TensorProto, helper, numpy_helper

from kiln.passes.framework import PassContext, get_pass
from tests.passes.checks import assert_same, counts, finding_cost, load, ops, run_pass

RNG = np.random.default_rng(7)
SCALE = RNG.uniform(0.5, 1.5, 16).astype(np.float32)
BIAS = RNG.uniform(-0.5, 0.5, 16).astype(np.float32)


def n(op, inputs, output, **attrs):
    return helper.make_node(op, inputs, [output], name=output, **attrs)


def reduce_mean(x, out, axes, opset, keepdims=None):
    """ReduceMean over ``axes``: an attribute before opset 18, a constant input from 18."""
    extra = {} if keepdims is None else {"keepdims": keepdims}
    if axes is None:
        return [n("ReduceMean", [x], out, **extra)], {}
    if opset >= 18:
        return [n("ReduceMean", [x, out + "_axes"], out, **extra)], {out + "_axes": np.array(axes, np.int64)}
    return [n("ReduceMean", [x], out, axes=list(axes), **extra)], {}


def layernorm(opset=17, axes=(-1,), x_shape=(2, 3, 16), square="pow", norm="div", scale=SCALE, bias=BIAS,
              swap=False, eps=1e-5, elem=TensorProto.FLOAT, center=True, keepdims=None, outputs=("y",),
              extra_nodes=(), as_nodes=False, axes2=None):
    """A decomposed LayerNorm (``center=False``: RMSNorm) of graph input x; ``swap`` writes every
    commutative op with its operands the other way round."""
    np_type = helper.tensor_dtype_to_np_dtype(elem)
    consts: dict[str, np.ndarray] = {}
    nodes = []
    pair = (lambda a, b: [b, a]) if swap else (lambda a, b: [a, b])
    centred = "x"
    if center:
        r, c = reduce_mean("x", "mean", axes, opset, keepdims)
        nodes += r + [n("Sub", ["x", "mean"], "diff")]
        consts.update(c)
        centred = "diff"
    if square == "pow":
        nodes.append(n("Pow", [centred, "two"], "sq"))
        consts["two"] = np.array(2.0, np_type)
    else:
        nodes.append(n("Mul", [centred, centred], "sq"))
    r, c = reduce_mean("sq", "var", axes if axes2 is None else axes2, opset, keepdims)
    nodes += r
    consts.update(c)
    if isinstance(eps, str):
        nodes.append(n("Add", pair("var", eps), "ve"))
    else:
        consts["eps"] = np.array(eps, np_type)
        nodes.append(n("Add", pair("var", "eps"), "ve"))
    nodes.append(n("Sqrt", ["ve"], "std"))
    if norm == "div":
        nodes.append(n("Div", [centred, "std"], "norm"))
    else:
        if norm == "reciprocal":
            nodes.append(n("Reciprocal", ["std"], "inv"))
        else:
            consts["unit"] = np.array(1.0, np_type)
            nodes.append(n("Div", ["unit", "std"], "inv"))
        nodes.append(n("Mul", pair(centred, "inv"), "norm"))
    last = "norm"
    if scale is not None:
        if isinstance(scale, str):
            nodes.append(n("Mul", pair(last, scale), "scaled"))
        else:
            consts["scale"] = np.asarray(scale, np_type)
            nodes.append(n("Mul", pair(last, "scale"), "scaled"))
        last = "scaled"
    if bias is not None:
        consts["bias"] = np.asarray(bias, np_type)
        nodes.append(n("Add", pair(last, "bias"), "biased"))
        last = "biased"
    nodes.append(n("Identity", [last], "y"))
    nodes += list(extra_nodes)
    tensors = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    if as_nodes:
        nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in tensors] + nodes
        tensors = []
    inputs = [helper.make_tensor_value_info("x", elem, x_shape)]
    for name in (scale, eps):
        if isinstance(name, str):
            inputs.append(helper.make_tensor_value_info(name, elem, [16] if name == "gamma" else [1]))
    outs = [helper.make_tensor_value_info(o, elem, x_shape if o.startswith("y") else [None] * len(x_shape))
            for o in outputs]
    graph = helper.make_graph(nodes, "g", inputs, outs, tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def fused(model):
    """The model's ops without the Identity the builders end with."""
    return [op for op in ops(model) if op != "Identity"]


LN_VARIANTS = {
    "torchscript": {},
    "axes-input": {"opset": 18},
    "mul-square": {"square": "mul", "opset": 18},
    "reciprocal": {"norm": "reciprocal", "swap": True},
    "div-one": {"norm": "div1", "square": "mul"},
    "swapped": {"swap": True, "opset": 18},
    "constant-nodes": {"as_nodes": True, "keepdims": 1},
    "two-axes": {"axes": (-2, -1), "scale": np.ones((3, 16)) * 0.5, "bias": BIAS},
    "positive-axes": {"axes": (1, 2), "opset": 18, "scale": SCALE, "bias": None},
    "mixed-axes": {"axes": (2, -2), "scale": None, "bias": 0.25},
}


@pytest.mark.parametrize("variant", list(LN_VARIANTS), ids=list(LN_VARIANTS))
def test_layernorm_fires(variant):
    options = {"opset": 17, **LN_VARIANTS[variant]}
    proto = layernorm(**options)
    after, count, _ = run_pass(proto, "fuse_layernorm")
    assert count == 1
    assert fused(after)[-1] == "LayerNormalization" and set(fused(after)[:-1]) <= {"Constant"}
    node = [node for node in after.graph if node.op_type == "LayerNormalization"][0]
    k = len(options.get("axes", (-1,)))
    assert node.attributes["axis"].value == -k
    assert node.attributes["epsilon"].value == pytest.approx(1e-5)
    assert len(node.inputs) == (3 if options.get("bias", BIAS) is not None else 2)
    assert list(node.inputs[1].shape) == [3, 16][-k:]  # the scale (ones or expanded) has the normalized shape
    assert_same(proto, after)


@pytest.mark.parametrize("scale, bias", [(None, None), (SCALE, None), (None, BIAS), (np.float32(2.0), [0.5])],
                         ids=["plain", "scale-only", "bias-only", "broadcast-constants"])
@pytest.mark.parametrize("norm", ["div", "reciprocal"])
def test_layernorm_optional_scale_and_bias(scale, bias, norm):
    proto = layernorm(scale=scale, bias=bias, norm=norm, swap=norm == "reciprocal")
    after, count, _ = run_pass(proto, "fuse_layernorm")
    assert count == 1 and fused(after)[-1] == "LayerNormalization"
    assert_same(proto, after)


def test_layernorm_over_every_axis_when_axes_are_empty():
    proto = layernorm(opset=18, axes=None, x_shape=(3, 16), scale=None, bias=None)
    after, count, _ = run_pass(proto, "fuse_layernorm")
    assert count == 1
    node = [node for node in after.graph if node.op_type == "LayerNormalization"][0]
    assert node.attributes["axis"].value == -2 and list(node.inputs[1].shape) == [3, 16]
    assert_same(proto, after)


def test_runtime_scale_of_the_normalized_shape_passes_as_it_is():
    proto = layernorm(scale="gamma", bias=None)
    after, count, _ = run_pass(proto, "fuse_layernorm")
    assert count == 1 and fused(after) == ["LayerNormalization"]
    assert [v.name for v in next(iter(after.graph)).inputs] == ["x", "gamma"]
    assert_same(proto, after)


def test_kiln_layernorm_before_opset_17():
    proto = layernorm(opset=13, as_nodes=True)
    after, count, _ = run_pass(proto, "fuse_layernorm", kiln_ops=True)
    assert count == 1 and fused(after)[-1] == "ai.kiln::LayerNormalization"
    assert set(fused(after)[:-1]) == {"Constant"}  # the scale and bias, now read by the fused op
    assert_same(proto, after)


def test_float16_layernorm_computes_its_statistics_in_float32():
    proto = layernorm(elem=TensorProto.FLOAT16, eps=1e-3)
    after, count, _ = run_pass(proto, "fuse_layernorm")
    assert count == 1 and fused(after) == ["LayerNormalization"]
    assert next(iter(after.graph)).attributes["stash_type"].value == TensorProto.FLOAT
    assert_same(proto, after, rtol=1e-2, onnxruntime=False)


def test_without_kiln_ops_before_opset_17_reports_but_does_not_fire():
    proto = layernorm(opset=16)
    m = load(proto)
    ctx = PassContext()
    findings = get_pass("fuse_layernorm").find(m, ctx)
    assert len(findings) == 1 and findings[0].pass_name is None
    assert "--kiln-ops" in findings[0].fix and "opset 17" in findings[0].fix
    assert get_pass("fuse_layernorm").apply(m, ctx) == 0 and ops(m) == ops(load(proto))
    assert "LayerNormalization" in ctx.log[0]


def _output(name):
    return n("Neg", [name], "z")


@pytest.mark.parametrize("options", [
    {"outputs": ("y", "mean")},  # the mean is a graph output
    {"outputs": ("y", "z"), "extra_nodes": [_output("mean")]},  # ... or read elsewhere
    {"outputs": ("y", "z"), "extra_nodes": [_output("diff")]},
    {"outputs": ("y", "z"), "extra_nodes": [_output("var")]},
    {"outputs": ("y", "z"), "extra_nodes": [_output("std")]},
    {"axes": (1,)},  # not the trailing axis
    {"axes": (0, 1), "scale": None, "bias": None},
    {"eps": "eps_in"},  # epsilon is not a constant
    {"eps": np.array([1e-5, 1e-5, 1e-5], np.float32).reshape(3, 1)},  # nor a single element
    {"elem": TensorProto.DOUBLE},  # LayerNormalization cannot keep double statistics
    {"x_shape": (4, 4), "keepdims": 0, "scale": None, "bias": None},  # the mean is not broadcast back per row
], ids=["mean-output", "mean-read", "diff-read", "var-read", "std-read", "middle-axis", "leading-axes",
        "runtime-eps", "vector-eps", "double", "keepdims-0"])
def test_layernorm_does_not_fire(options):
    proto = layernorm(**options)
    after, count, _ = run_pass(proto, "fuse_layernorm", kiln_ops=True)
    assert fused(after).count("LayerNormalization") == 0 and "ai.kiln::LayerNormalization" not in fused(after)
    assert "RMSNormalization" not in fused(after) and "ai.kiln::RMSNormalization" not in fused(after)
    assert count == 0 and fused(after) == fused(load(proto))


@pytest.mark.parametrize("options, expected", [
    ({"bias": RNG.uniform(size=(3, 1))}, ["LayerNormalization", "Add"]),  # a per-row bias stays an Add
    ({"scale": RNG.uniform(size=(3, 16))}, ["Constant", "LayerNormalization", "Mul", "Add"]),  # per-row scale
    ({"scale": RNG.uniform(size=(2, 1, 16))}, ["Constant", "LayerNormalization", "Mul", "Add"]),  # per-batch
    ({"scale": "gamma_1"}, ["Constant", "LayerNormalization", "Mul", "Add"]),  # runtime, would need expanding
], ids=["row-bias", "row-scale", "batch-scale", "runtime-broadcast-scale"])
def test_scale_or_bias_the_op_cannot_take_stays_outside(options, expected):
    proto = layernorm(**options)
    after, count, _ = run_pass(proto, "fuse_layernorm")
    assert count == 1 and fused(after) == expected
    assert_same(proto, after)


RMS_VARIANTS = {
    "dynamo": {"opset": 23, "norm": "reciprocal"},
    "torchscript": {"opset": 23, "norm": "div1", "swap": True},
    "mul-square": {"opset": 23, "square": "mul", "scale": None},
    "two-axes": {"opset": 23, "axes": (-2, -1), "scale": np.full((3, 16), 0.5)},
}


@pytest.mark.parametrize("variant", list(RMS_VARIANTS), ids=list(RMS_VARIANTS))
def test_rmsnorm_fires_at_opset_23(variant):
    options = {**RMS_VARIANTS[variant], "center": False, "bias": None}
    proto = layernorm(**options)
    after, count, _ = run_pass(proto, "fuse_layernorm")
    assert count == 1 and fused(after)[-1] == "RMSNormalization" and set(fused(after)[:-1]) <= {"Constant"}
    node = [node for node in after.graph if node.op_type == "RMSNormalization"][0]
    assert node.attributes["axis"].value == -len(options.get("axes", (-1,)))
    assert_same(proto, after)


def test_kiln_rmsnorm_before_opset_23_and_double_statistics():
    proto = layernorm(opset=17, center=False, bias=None, elem=TensorProto.DOUBLE)
    after, count, _ = run_pass(proto, "fuse_layernorm", kiln_ops=True)
    assert count == 1 and fused(after) == ["ai.kiln::RMSNormalization"]
    assert next(iter(after.graph)).attributes["stash_type"].value == TensorProto.DOUBLE
    assert_same(proto, after, rtol=1e-10)
    m = load(proto)
    findings = get_pass("fuse_layernorm").find(m, PassContext())
    assert [f.rule for f in findings] == ["unfused-rmsnorm"] and "opset 23" in findings[0].fix


def test_different_axes_make_no_layernorm_but_an_rmsnorm_of_the_difference():
    """mean over the last axis, variance over the last two: no LayerNorm, but what follows the Sub
    is exactly an RMSNorm (over two axes) of x - mean."""
    proto = layernorm(axes=(-1,), axes2=(-2, -1), scale=None, bias=None, opset=23)
    after, count, _ = run_pass(proto, "fuse_layernorm")
    assert count == 1 and fused(after) == ["ReduceMean", "Sub", "Constant", "RMSNormalization"]
    assert_same(proto, after)


def test_rmsnorm_tail_of_an_unfusable_layernorm_is_left_alone():
    proto = layernorm(outputs=("y", "z"), extra_nodes=[_output("mean")], opset=23)
    after, count, _ = run_pass(proto, "fuse_layernorm")
    assert count == 0 and fused(after) == fused(load(proto))


def test_find_reports_what_apply_rewrites():
    proto = layernorm(opset=17, x_shape=("batch", 3, 16))
    graph = proto.graph
    second = layernorm(opset=17, x_shape=("batch", 3, 16), center=False, bias=None, scale=None)
    rename = {v: v + "2" for node in second.graph.node for v in [*node.output, *node.input] if v != "x"}
    for node in second.graph.node:
        node.input[:] = ["y" if i == "x" else rename[i] for i in node.input]
        node.output[:] = [rename[o] for o in node.output]
        node.name = node.output[0]
        graph.node.append(node)
    for t in second.graph.initializer:
        t.name = rename[t.name]
        graph.initializer.append(t)
    graph.output[0].name = "y2"
    m = load(proto)
    ctx = PassContext(kiln_ops=True, dims={"batch": 2})
    findings = get_pass("fuse_layernorm").find(m, ctx)
    assert ops(m) == ops(load(proto))
    assert [f.rule for f in findings] == ["unfused-layernorm", "unfused-rmsnorm"]
    assert findings[0].nodes == ["mean", "diff", "sq", "var", "ve", "std", "norm", "scaled", "biased"]
    assert findings[1].nodes == ["sq2", "var2", "ve2", "std2", "norm2"]
    assert {f.pass_name for f in findings} == {"fuse_layernorm"}
    assert findings[0].shapes == {"x": ["batch", 3, 16], "biased": ["batch", 3, 16]}
    cost = finding_cost(load(proto), findings[0], ctx.dims)
    assert cost.flops == 7 * 96 + 2 * 6  # 7 ops over x's 96 elements, Add and Sqrt over 6 rows
    assert cost.bytes > 2 * 96 * 4
    assert findings[1].details["axis"] == -1
    names = {node.name for node in m.graph}
    assert get_pass("fuse_layernorm").apply(m, ctx) == 2
    assert names - {node.name for node in m.graph} == {name for f in findings for name in f.nodes}
    assert fused(m) == ["LayerNormalization", "Constant", "ai.kiln::RMSNormalization"]
    assert_same(proto, m, dims={"batch": 2})


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "vit"])
def test_torchscript_opset_14_layernorms(tmp_path, family):
    """Before opset 17 the TorchScript exporter writes every nn.LayerNorm out (3 per miniature)."""
    path = tmp_path / f"{family}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(build(family), example_inputs(family), path, "torchscript", 14)
    proto = onnx.load(path)
    m = load(proto)
    assert counts(m).get("ReduceMean") == 6
    assert get_pass("fuse_layernorm").apply(m, PassContext(kiln_ops=True)) == 3
    assert counts(m)["ai.kiln::LayerNormalization"] == 3 and "ReduceMean" not in counts(m)
    assert_same(proto, m, dims={"batch": 2, "sequence": 8})


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_exporters_usual_opsets_already_have_layernormalization(tmp_path, exporter):
    proto = onnx.load(export_family(tmp_path, "bert", exporter))
    m = load(proto)
    assert counts(m)["LayerNormalization"] == 3
    assert get_pass("fuse_layernorm").find(m, PassContext(kiln_ops=True)) == []
