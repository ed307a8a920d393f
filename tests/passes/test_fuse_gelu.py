"""fuse_gelu: erf and tanh GELU in every grouping the exporters write become one Gelu (standard at
opset 20, ai.kiln before with kiln_ops), and nothing else does."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from families import export_family
from onnx import TensorProto, helper, numpy_helper

from kiln.passes.framework import PassContext, get_pass
from tests.passes.checks import assert_same, counts, finding_cost, load, ops, run_pass

SQRT2 = math.sqrt(2.0)
C_TANH = math.sqrt(2.0 / math.pi)


def model(nodes, consts, opset=20, x_shape=(2, 3, 16), elem=TensorProto.FLOAT, outputs=("y",), as_nodes=False):
    """x -> nodes -> outputs; ``consts`` become initializers (or Constant nodes)."""
    np_type = helper.tensor_dtype_to_np_dtype(elem)
    tensors = [numpy_helper.from_array(np.array(v, dtype=np_type), name) for name, v in consts.items()]
    if as_nodes:
        nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in tensors] + nodes
        tensors = []
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, x_shape)],
                              [helper.make_tensor_value_info(o, elem, x_shape) for o in outputs], tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def n(op, inputs, output, **attrs):
    return helper.make_node(op, inputs, [output], name=output, **attrs)


ERF_FORMS = {
    # TorchScript: (x * (erf(x / sqrt2) + 1)) * 0.5
    "torchscript": ([n("Div", ["x", "s2"], "d"), n("Erf", ["d"], "e"), n("Add", ["e", "one"], "a"),
                     n("Mul", ["x", "a"], "m"), n("Mul", ["m", "half"], "y")], {"s2": SQRT2, "one": 1.0, "half": 0.5}),
    # dynamo: x * (0.5 * (erf(x / sqrt2) + 1))
    "dynamo": ([n("Div", ["x", "s2"], "d"), n("Erf", ["d"], "e"), n("Add", ["e", "one"], "a"),
                n("Mul", ["half", "a"], "h"), n("Mul", ["x", "h"], "y")], {"s2": SQRT2, "one": 1.0, "half": 0.5}),
    # by hand: (0.5 * x) * (1 + erf(x * 1/sqrt2)), operands swapped everywhere
    "hand": ([n("Mul", ["r2", "x"], "d"), n("Erf", ["d"], "e"), n("Add", ["one", "e"], "a"),
              n("Mul", ["x", "half"], "h"), n("Mul", ["a", "h"], "y")], {"r2": 1 / SQRT2, "one": 1.0, "half": 0.5}),
    # halved by Div: (x * (1 + erf)) / 2
    "div2": ([n("Div", ["x", "s2"], "d"), n("Erf", ["d"], "e"), n("Add", ["one", "e"], "a"),
              n("Mul", ["a", "x"], "m"), n("Div", ["m", "two"], "y")], {"s2": SQRT2, "one": 1.0, "two": 2.0}),
}
TANH_FORMS = {
    # TorchScript: x^3 as Mul(x, Mul(x, x)), 0.5 * (x * (1 + tanh(...)))
    "torchscript": ([n("Mul", ["x", "x"], "sq"), n("Mul", ["x", "sq"], "cube"), n("Mul", ["k", "cube"], "t"),
                     n("Add", ["x", "t"], "i"), n("Mul", ["c", "i"], "u"), n("Tanh", ["u"], "th"),
                     n("Add", ["one", "th"], "a"), n("Mul", ["x", "a"], "m"), n("Mul", ["half", "m"], "y")],
                    {"k": 0.044715, "c": C_TANH, "one": 1.0, "half": 0.5}),
    # dynamo: Pow(x, 3), x * (0.5 * (tanh(...) + 1))
    "dynamo": ([n("Pow", ["x", "three"], "cube"), n("Mul", ["k", "cube"], "t"), n("Add", ["x", "t"], "i"),
                n("Mul", ["c", "i"], "u"), n("Tanh", ["u"], "th"), n("Add", ["th", "one"], "a"),
                n("Mul", ["half", "a"], "h"), n("Mul", ["x", "h"], "y")],
               {"three": 3.0, "k": 0.044715, "c": C_TANH, "one": 1.0, "half": 0.5}),
    # Mul(Mul(x, x), x), constants on the right, (x * 0.5) * (1 + tanh)
    "hand": ([n("Mul", ["x", "x"], "sq"), n("Mul", ["sq", "x"], "cube"), n("Mul", ["cube", "k"], "t"),
              n("Add", ["t", "x"], "i"), n("Mul", ["i", "c"], "u"), n("Tanh", ["u"], "th"),
              n("Add", ["th", "one"], "a"), n("Mul", ["x", "half"], "h"), n("Mul", ["h", "a"], "y")],
             {"k": 0.044715, "c": C_TANH, "one": 1.0, "half": 0.5}),
}
CASES = ([(f"erf-{k}", "none", v) for k, v in ERF_FORMS.items()]
         + [(f"tanh-{k}", "tanh", v) for k, v in TANH_FORMS.items()])


@pytest.mark.parametrize("case, approximate, form", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("as_nodes", [False, True], ids=["initializers", "constant-nodes"])
def test_fires_on_every_grouping_at_opset_20(case, approximate, form, as_nodes):
    proto = model(*form, as_nodes=as_nodes)
    after, count, _ = run_pass(proto, "fuse_gelu")
    assert count == 1
    assert ops(after) == ["Gelu"]  # the constants went with the nodes that used them
    gelu = next(iter(after.graph))
    assert gelu.attributes["approximate"].value == approximate
    assert gelu.outputs[0].name == "y" and gelu.outputs[0].shape == [2, 3, 16]
    assert_same(proto, after)


@pytest.mark.parametrize("case, approximate, form", CASES, ids=[c[0] for c in CASES])
def test_kiln_gelu_before_opset_20(case, approximate, form):
    proto = model(*form, opset=17)
    after, count, _ = run_pass(proto, "fuse_gelu", kiln_ops=True)
    assert count == 1 and ops(after) == ["ai.kiln::Gelu"]
    assert after.opset_imports["ai.kiln"] == 1
    assert_same(proto, after)


def test_without_kiln_ops_before_opset_20_reports_but_does_not_fire():
    proto = model(*ERF_FORMS["torchscript"], opset=17)
    before = ops(load(proto))
    m = load(proto)
    ctx = PassContext()
    findings = get_pass("fuse_gelu").find(m, ctx)
    assert len(findings) == 1 and findings[0].pass_name is None and "--kiln-ops" in findings[0].fix
    assert get_pass("fuse_gelu").apply(m, ctx) == 0
    assert ops(m) == before and "Gelu" in ctx.log[0]


def _replace(form, name, value):
    nodes, consts = form
    return nodes, {**consts, name: value}


@pytest.mark.parametrize("proto", [
    model(*_replace(ERF_FORMS["torchscript"], "half", 0.6)),
    model(*_replace(ERF_FORMS["torchscript"], "s2", 1.5)),
    model(*_replace(ERF_FORMS["torchscript"], "one", 1.0001)),
    model(*_replace(TANH_FORMS["dynamo"], "k", 0.05)),
    model(*_replace(TANH_FORMS["dynamo"], "c", 0.8)),
    model(*_replace(TANH_FORMS["dynamo"], "three", 2.0)),
    model(*_replace(ERF_FORMS["dynamo"], "half", np.full(16, 0.5))),  # not a single-element constant
    # an intermediate is also a graph output, or read by another node
    model(*ERF_FORMS["torchscript"], outputs=("y", "e")),
    model(ERF_FORMS["dynamo"][0] + [n("Neg", ["a"], "z")], ERF_FORMS["dynamo"][1], outputs=("y", "z")),
    model(TANH_FORMS["torchscript"][0] + [n("Neg", ["cube"], "z")], TANH_FORMS["torchscript"][1], outputs=("y", "z")),
    # a rank-4 constant would broadcast a rank-3 x to rank 4
    model(*_replace(ERF_FORMS["torchscript"], "half", np.full((1, 1, 1, 1), 0.5))),
], ids=["half", "sqrt2", "one", "cube-coeff", "tanh-coeff", "power", "vector", "graph-output", "erf-consumer",
        "cube-consumer", "rank"])
def test_does_not_fire(proto):
    before = load(proto)
    after, count, _ = run_pass(proto, "fuse_gelu", kiln_ops=True)
    assert count == 0 and ops(after) == ops(before)
    assert get_pass("fuse_gelu").find(load(proto), PassContext(kiln_ops=True)) == []


def test_float16_constants_match_within_their_rounding():
    proto = model(*TANH_FORMS["dynamo"], elem=TensorProto.FLOAT16)
    assert np.float16(0.044715) != np.float32(0.044715)  # the constant really is rounded
    after, count, _ = run_pass(proto, "fuse_gelu")
    assert count == 1 and ops(after) == ["Gelu"]
    assert_same(proto, after, rtol=1e-2, onnxruntime=False)


def renamed(form, x, y, tag):
    """The form's nodes reading ``x`` and writing ``y``, its other values suffixed with ``tag``."""
    nodes, consts = form

    def name(v):
        return x if v == "x" else y if v == "y" else v if v in consts else v + tag

    return [n(node.op_type, [name(i) for i in node.input], name(node.output[0])) for node in nodes]


def test_find_reports_what_apply_rewrites():
    nodes = renamed(ERF_FORMS["torchscript"], "x", "h", "1") + renamed(TANH_FORMS["dynamo"], "h", "y", "2")
    proto = model(nodes, {**ERF_FORMS["torchscript"][1], **TANH_FORMS["dynamo"][1]})
    m = load(proto)
    ctx = PassContext(kiln_ops=True)
    findings = get_pass("fuse_gelu").find(m, ctx)
    assert ops(m) == ops(load(proto))  # find changes nothing
    assert [f.nodes for f in findings] == [["d1", "e1", "a1", "m1", "h"],
                                           ["cube2", "t2", "i2", "u2", "th2", "a2", "h2", "y"]]
    assert {f.pass_name for f in findings} == {"fuse_gelu"} and {f.rule for f in findings} == {"unfused-gelu"}
    assert [f.details["approximate"] for f in findings] == ["none", "tanh"]
    assert findings[0].shapes == {"x": [2, 3, 16], "h": [2, 3, 16]}
    cost = finding_cost(load(proto), findings[0])
    assert cost.flops == 5 * 96 and cost.bytes > 0
    names = {node.name for node in m.graph}
    assert get_pass("fuse_gelu").apply(m, ctx) == 2
    assert names - {node.name for node in m.graph} == {name for f in findings for name in f.nodes}
    assert ops(m) == ["Gelu", "Gelu"]
    assert_same(proto, m)


EXPORTS = [(family, exporter) for family in ("bert", "distilbert", "gpt2", "vit")
           for exporter in ("torchscript", "dynamo")]


@pytest.mark.parametrize("family, exporter", EXPORTS)
def test_exported_models(tmp_path, family, exporter):
    """Each miniature has one GELU (erf; tanh for GPT-2), decomposed by both exporters below opset 20."""
    proto = onnx.load(export_family(tmp_path, family, exporter))
    m = load(proto)
    assert get_pass("fuse_gelu").apply(m, PassContext(kiln_ops=True)) == 1
    assert counts(m)["ai.kiln::Gelu"] == 1 and "Erf" not in counts(m)
    assert family != "gpt2" or "Tanh" not in counts(m)
    gelu = next(node for node in m.graph if node.op_type == "Gelu")
    assert gelu.attributes["approximate"].value == ("tanh" if family == "gpt2" else "none")
    assert_same(proto, m, dims={"batch": 2, "sequence": 8})
