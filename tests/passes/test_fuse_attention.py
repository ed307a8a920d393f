"""fuse_attention: MatMul -> scale -> mask -> Softmax -> [NaN clean-up] -> MatMul becomes one
ai.kiln FusedAttention (kiln_ops) or one standard Attention (opset 23, where its semantics are the
pattern's), and nothing else does; find() reports every attention, fused or not, with the reason."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from families import export_family
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.passes.framework import PassContext, get_pass
from tests.passes.checks import assert_same, counts, finding_cost, load, ops, random_feeds, run_pass, to_proto

B, H, L, S, D = 2, 4, 5, 6, 8
F32 = TensorProto.FLOAT
LOWEST = float(np.finfo(np.float32).min)
SHAPES = {"q": (B, H, L, D), "kt": (B, H, D, S), "k": (B, H, S, D), "v": (B, H, S, D), "mask": (B, 1, 1, S),
          "cond": (B, 1, L, S), "keep": (B, 1, L, S)}


def n(op, inputs, output, **attrs):
    return helper.make_node(op, inputs, [output], name=output, **attrs)


def attention(nodes, consts=None, opset=17, outputs=("y",), elem=F32, shapes=None, y_shape=(B, H, L, D)):
    """A graph reading the inputs its nodes name (q, kt, k, v, mask, cond, keep: see SHAPES)."""
    shapes = {**SHAPES, **(shapes or {})}
    np_type = helper.tensor_dtype_to_np_dtype(elem)
    produced = {o for node in nodes for o in node.output}
    consts = {k: np.asarray(v, np_type) if not isinstance(v, np.ndarray) else v for k, v in (consts or {}).items()}
    names = []
    for node in nodes:
        names += [i for i in node.input if i and i not in produced and i not in consts and i not in names]
    for flag in ("cond", "keep"):  # random bool masks, with query row 0 always fully masked
        if flag in names:
            names[names.index(flag)] = flag + "_in"
            nodes = [n("And", [flag + "_in", "rows"], flag)] + nodes
            consts["rows"] = (np.arange(L) > 0).reshape(1, 1, L, 1)
    inputs = [helper.make_tensor_value_info(i, TensorProto.BOOL if i in ("cond_in", "keep_in") else elem,
                                            shapes[i.removesuffix("_in")]) for i in names]
    out_shapes = {"y": y_shape, "y2": y_shape, "shape": [4]}
    outs = [helper.make_tensor_value_info(o, TensorProto.INT64 if o == "shape" else elem, out_shapes.get(o, [None] * 4))
            for o in outputs]
    tensors = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    graph = helper.make_graph(nodes, "g", inputs, outs, tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def tail(scores, out="y", probs="p", v="v", cleanup=False):
    """Softmax over the last axis [-> Where(IsNaN(p), 0, p)] -> MatMul(p, v)."""
    nodes = [n("Softmax", [scores], probs, axis=-1)]
    if cleanup:
        nodes += [n("IsNaN", [probs], "nan"), n("Where", ["nan", "zero", probs], "pc")]
        probs = "pc"
    return nodes + [n("MatMul", [probs, v], out)]


ROOT = math.sqrt(1 / math.sqrt(D))
# name -> (nodes, constants, expected scale, expected nan_to_zero)
KILN_CASES = {
    "bert": ([n("MatMul", ["q", "kt"], "s"), n("Div", ["s", "c"], "sd"), n("Add", ["sd", "mask"], "sm")] + tail("sm"),
             {"c": math.sqrt(D)}, 1 / math.sqrt(D), 0),
    "sdpa-torchscript": ([n("Transpose", ["k"], "kt0", perm=[0, 1, 3, 2]), n("Mul", ["q", "r"], "qs"),
                          n("Mul", ["kt0", "r"], "ks"), n("MatMul", ["qs", "ks"], "s")] + tail("s"),
                         {"r": ROOT}, ROOT * ROOT, 0),
    "swapped": ([n("MatMul", ["q", "kt"], "s"), n("Mul", ["c", "s"], "sd"), n("Add", ["mask", "sd"], "sm")]
                + tail("sm"),
                {"c": 0.25}, 0.25, 0),
    "dynamo-vit": ([n("Mul", ["q", "r"], "qs"), n("Mul", ["r", "kt"], "ks"), n("MatMul", ["qs", "ks"], "s")]
                   + tail("s"),
                   {"r": np.array([0.5], np.float32)}, 0.25, 0),
    "div-q": ([n("Div", ["q", "c"], "qs"), n("MatMul", ["qs", "kt"], "s")] + tail("s"), {"c": 4.0}, 0.25, 0),
    "nan-cleanup": ([n("Where", ["keep", "zero", "ninf"], "mask4"), n("MatMul", ["q", "kt"], "s"),
                     n("Add", ["s", "mask4"], "sm")] + tail("sm", cleanup=True),
                    {"zero": 0.0, "ninf": -np.inf}, 1.0, 1),
    "where-keep": ([n("MatMul", ["q", "kt"], "s"), n("Div", ["s", "c"], "sd"), n("Where", ["cond", "sd", "fill"], "sm")]
                   + tail("sm"), {"c": math.sqrt(D), "fill": LOWEST}, 1 / math.sqrt(D), 0),
    "where-fill": ([n("MatMul", ["q", "kt"], "s"), n("Where", ["cond", "fill", "s"], "sm")] + tail("sm"),
                   {"fill": LOWEST}, 1.0, 0),
    "where-inf-cleanup": ([n("MatMul", ["q", "kt"], "s"), n("Where", ["keep", "s", "fill"], "sm")]
                          + tail("sm", cleanup=True), {"fill": -np.inf, "zero": 0.0}, 1.0, 1),
}


@pytest.mark.parametrize("case", list(KILN_CASES))
def test_kiln_fused_attention(case):
    nodes, consts, scale, nan_to_zero = KILN_CASES[case]
    proto = attention(nodes, consts)
    after, count, _ = run_pass(proto, "fuse_attention", kiln_ops=True)
    assert count == 1
    fusedops = [op for op in ops(after) if op != "ai.kiln::FusedAttention"]
    assert ops(after).count("ai.kiln::FusedAttention") == 1 and "Softmax" not in fusedops and "MatMul" not in fusedops
    node = next(node for node in after.graph if node.op_type == "FusedAttention")
    assert node.attributes["scale"].value == pytest.approx(scale, rel=1e-6)
    assert node.attributes["nan_to_zero"].value == nan_to_zero
    assert node.outputs[0].name == "y"
    assert node.inputs[0].name == "q" and node.inputs[2].name == "v"
    assert node.inputs[1].name in ("kt", "kt0")  # the unscaled K_T
    if case.startswith("where-"):  # the Where on the scores became an additive mask beside the fused node
        assert fusedops == ["And", "Constant", "Where"]
    assert_same(proto, after)


def test_rank_3_attention_and_a_runtime_scale_on_q():
    """(B*H, L, D) tensors; Q scaled by a value computed at run time stays outside, which is exact."""
    shapes = {"q": (B * H, L, D), "kt": (B * H, D, S), "v": (B * H, S, D), "g": ()}
    nodes = [n("Sqrt", ["g"], "rg"), n("Mul", ["q", "rg"], "qs"), n("MatMul", ["qs", "kt"], "s"),
             n("Mul", ["s", "c"], "sc")] + tail("sc")
    proto = attention(nodes, {"c": 0.5}, shapes=shapes, y_shape=(B * H, L, D))
    after, count, _ = run_pass(proto, "fuse_attention", kiln_ops=True)
    assert count == 1 and ops(after) == ["Sqrt", "Mul", "ai.kiln::FusedAttention"]
    node = next(node for node in after.graph if node.op_type == "FusedAttention")
    assert node.inputs[0].name == "qs" and node.attributes["scale"].value == 0.5
    assert_same(proto, after)


def test_opset_12_softmax_counts_its_axis_the_old_way():
    last = [n("MatMul", ["q", "kt"], "s"), n("Softmax", ["s"], "p", axis=3), n("MatMul", ["p", "v"], "y")]
    default = [n("MatMul", ["q", "kt"], "s"), n("Softmax", ["s"], "p"), n("MatMul", ["p", "v"], "y")]  # axis 1
    after, count, _ = run_pass(attention(last, opset=12), "fuse_attention", kiln_ops=True)
    assert count == 1 and ops(after) == ["ai.kiln::FusedAttention"]
    assert_same(attention(last, opset=12), after)
    after, count, _ = run_pass(attention(default, opset=12), "fuse_attention", kiln_ops=True)
    assert count == 0 and ops(after) == ["MatMul", "Softmax", "MatMul"]


BASE = [n("MatMul", ["q", "kt"], "s"), n("Div", ["s", "c"], "sd"), n("Add", ["sd", "mask"], "sm")]


@pytest.mark.parametrize("nodes, consts, outputs, shapes", [
    (BASE[:2] + [n("Add", ["sd", "mask"], "sm"), n("Softmax", ["sm"], "p", axis=2), n("MatMul", ["p", "v"], "y")],
     {"c": 2.0}, ("y",), None),  # Softmax not over the last axis
    (BASE + tail("sm"), {"c": 2.0}, ("y",), {"kt": (H, D, S)}),  # K_T of another rank (broadcast MatMul)
    (BASE + tail("sm"), {"c": 2.0}, ("y",), {"mask": (1, B, 1, 1, S)}),  # a mask of higher rank
    (BASE + tail("sm"), {"c": np.full(S, 2.0, np.float32)}, ("y",), None),  # a scale that is not one element
    (BASE + tail("sm"), {"c": 0.0}, ("y",), None),  # dividing by zero
    (BASE[:1] + [n("Where", ["cond", "s", "fill"], "sm")] + tail("sm"), {"fill": -10000.0}, ("y",), None),
    (BASE[:1] + [n("Where", ["cond", "s", "fill"], "sm")] + tail("sm"), {"fill": 1.0}, ("y",), None),
], ids=["softmax-axis", "ranks", "mask-rank", "vector-scale", "zero-scale", "fill-10000", "fill-1"])
def test_does_not_match(nodes, consts, outputs, shapes):
    proto = attention(nodes, consts, outputs=outputs, shapes=shapes)
    after, count, _ = run_pass(proto, "fuse_attention", kiln_ops=True)
    assert count == 0 and ops(after) == ops(load(proto))
    assert get_pass("fuse_attention").find(load(proto), PassContext(kiln_ops=True)) == []


def test_float16_lowest_fill_is_not_exact_as_an_additive_mask():
    nodes = BASE[:1] + [n("Where", ["cond", "s", "fill"], "sm")] + tail("sm")
    proto = attention(nodes, {"fill": float(np.finfo(np.float16).min)}, elem=TensorProto.FLOAT16)
    after, count, _ = run_pass(proto, "fuse_attention", kiln_ops=True)
    assert count == 0


@pytest.mark.parametrize("nodes, consts, outputs, reason", [
    (BASE + tail("sm"), {"c": 2.0}, ("y", "s"), "s is a graph output"),
    (BASE + tail("sm") + [n("Shape", ["sd"], "shape")], {"c": 2.0}, ("y", "shape"), "also read by shape (Shape)"),
    (BASE + tail("sm") + [n("Neg", ["p"], "z")], {"c": 2.0}, ("y", "z"), "also read by z (Neg)"),
    ([n("MatMul", ["q", "kt"], "s"), n("Sqrt", ["g"], "c"), n("Div", ["s", "c"], "sd")] + tail("sd"), {}, ("y",),
     "computed at run time"),
], ids=["graph-output", "shape-reader", "probs-reader", "runtime-scale"])
def test_blocked_attention_is_reported_not_rewritten(nodes, consts, outputs, reason):
    proto = attention(nodes, consts, outputs=outputs, shapes={"g": (1,)})
    m = load(proto)
    findings = get_pass("fuse_attention").find(m, PassContext(kiln_ops=True))
    assert len(findings) == 1 and findings[0].pass_name is None and reason in findings[0].fix
    assert findings[0].rule == "unfused-attention"
    ctx = PassContext(kiln_ops=True)
    assert get_pass("fuse_attention").apply(m, ctx) == 0 and ops(m) == ops(load(proto))
    assert reason in ctx.log[0]


def test_without_kiln_ops_below_opset_23_reports_but_does_not_fire():
    proto = attention(KILN_CASES["bert"][0], KILN_CASES["bert"][1])
    m = load(proto)
    ctx = PassContext()
    findings = get_pass("fuse_attention").find(m, ctx)
    assert len(findings) == 1 and findings[0].pass_name is None
    assert "--kiln-ops" in findings[0].fix and "opset 23" in findings[0].fix
    assert get_pass("fuse_attention").apply(m, ctx) == 0 and ops(m) == ops(load(proto)) and ctx.log


STANDARD_CASES = {
    # K_T = Transpose(K): Attention reads K itself and the Transpose goes
    "sdpa": ([n("Transpose", ["k"], "kt0", perm=[0, 1, 3, 2]), n("Mul", ["q", "r"], "qs"), n("Mul", ["kt0", "r"], "ks"),
              n("MatMul", ["qs", "ks"], "s")] + tail("s"), {"r": ROOT}, ["Attention"]),
    # K_T from elsewhere: a new Transpose gives K
    "kt-input": ([n("MatMul", ["q", "kt"], "s"), n("Mul", ["s", "c"], "sc")] + tail("sc"), {"c": 0.3},
                 ["Transpose", "Attention"]),
    # an additive mask of only 0 and -inf (TorchScript's SDPA export), with the clean-up
    "sdpa-mask": ([n("Where", ["keep", "zero", "ninf"], "mask4"), n("MatMul", ["q", "kt"], "s"),
                   n("Add", ["s", "mask4"], "sm")] + tail("sm", cleanup=True), {"zero": 0.0, "ninf": -np.inf},
                  ["And", "Where", "Transpose", "Attention"]),
    # Where(cond, scores, -inf) with the clean-up: cond is Attention's boolean mask; the other way round, Not(cond)
    "where-keep": ([n("MatMul", ["q", "kt"], "s"), n("Where", ["keep", "s", "fill"], "sm")] + tail("sm", cleanup=True),
                   {"fill": -np.inf, "zero": 0.0}, ["And", "Transpose", "Attention"]),
    "where-fill": ([n("MatMul", ["q", "kt"], "s"), n("Where", ["keep", "fill", "s"], "sm")] + tail("sm", cleanup=True),
                   {"fill": -np.inf, "zero": 0.0}, ["And", "Transpose", "Not", "Attention"]),
}


@pytest.mark.parametrize("case", list(STANDARD_CASES))
def test_standard_attention_at_opset_23(case):
    nodes, consts, expected = STANDARD_CASES[case]
    proto = attention(nodes, consts, opset=23)
    after, count, _ = run_pass(proto, "fuse_attention")
    assert count == 1 and sorted(ops(after)) == sorted(expected)
    node = next(node for node in after.graph if node.op_type == "Attention")
    assert node.inputs[0].name == "q" and list(node.inputs[1].shape) == [B, H, S, D]
    assert_same(proto, after)  # kiln's executor and onnxruntime, a fully masked row included


def same_with_nan(before, after):
    """kiln's executor on both graphs, NaN where the original has NaN (assert_same treats NaN as a mismatch)."""
    for seed in (0, 1):
        feeds = random_feeds(before, None, seed)
        want = kiln.Executor(load(before)).run(feeds)["y"]
        got = kiln.Executor(kiln.load_model_proto(to_proto(after), name="after")).run(feeds)["y"]
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("nodes, consts, shapes, reason", [
    (BASE + tail("sm"), {"c": 2.0}, None, "fully masked row"),  # an additive mask without the clean-up
    (BASE + tail("sm", cleanup=True), {"c": 2.0, "zero": 0.0}, None, "not known to be 0 or -inf"),
    ([n("MatMul", ["q", "kt"], "s"), n("Where", ["cond", "s", "fill"], "sm")] + tail("sm"), {"fill": -np.inf}, None,
     "fully masked row"),
    ([n("MatMul", ["q", "kt"], "s"), n("Where", ["cond", "s", "fill"], "sm")] + tail("sm", cleanup=True),
     {"fill": LOWEST, "zero": 0.0}, None, "onnxruntime's Attention gives zeros"),
    (BASE + tail("sm"), {"c": 2.0}, {"q": (B * H, L, D), "kt": (B * H, D, S), "v": (B * H, S, D), "mask": (1, S)},
     "4-D"),
    (BASE + tail("sm"), {"c": 2.0}, {"kt": (1, H, D, S)}, "not known to agree"),  # K_T broadcast over the batch
], ids=["add-mask", "runtime-mask", "inf-fill", "lowest-fill", "rank-3", "broadcast-batch"])
def test_standard_attention_only_where_exact(nodes, consts, shapes, reason):
    y_shape = (B * H, L, D) if reason == "4-D" else (B, H, L, D)
    proto = attention(nodes, consts, opset=23, shapes=shapes, y_shape=y_shape)
    m = load(proto)
    findings = get_pass("fuse_attention").find(m, PassContext())
    assert len(findings) == 1 and findings[0].pass_name is None and reason in findings[0].fix
    assert "--kiln-ops" in findings[0].fix
    assert get_pass("fuse_attention").apply(m, PassContext()) == 0
    after, count, _ = run_pass(proto, "fuse_attention", kiln_ops=True)  # the kiln op takes them all
    assert count == 1
    same_with_nan(proto, after)  # a fully masked row of a -inf Where without clean-up is NaN in both


def test_find_reports_what_apply_rewrites():
    second = [n("MatMul", ["y", "kt2"], "s2"), n("Sqrt", ["g"], "c2"), n("Div", ["s2", "c2"], "sd2"),
              n("Softmax", ["sd2"], "p2", axis=-1), n("MatMul", ["p2", "v"], "y2")]
    nodes = KILN_CASES["bert"][0] + second
    proto = attention(nodes, KILN_CASES["bert"][1], outputs=("y2",),
                      shapes={"kt2": (B, H, D, S), "g": (1,), "q": ("batch", H, L, D)}, y_shape=("batch", H, L, D))
    m = load(proto)
    ctx = PassContext(kiln_ops=True, dims={"batch": B})
    findings = get_pass("fuse_attention").find(m, ctx)
    assert ops(m) == ops(load(proto))
    assert [f.nodes for f in findings] == [["s", "sd", "sm", "p", "y"], ["s2", "sd2", "p2", "y2"]]
    assert [f.pass_name for f in findings] == ["fuse_attention", None]
    first = findings[0]
    assert first.shapes == {"q": ["batch", H, L, D], "kt": [B, H, D, S], "v": [B, H, S, D], "mask": [B, 1, 1, S]}
    assert first.details["Q"] == ["batch", H, L, D] and first.details["scale"] == pytest.approx(1 / math.sqrt(D))
    cost = finding_cost(load(proto), first, ctx.dims)
    assert cost.flops == 2 * B * H * L * S * (D + D) + 7 * B * H * L * S  # the two MatMuls; Div, Add, Softmax (5)
    assert first.details["score_matrix_bytes"] == B * H * L * S * 4
    scores, matmul = B * H * L * S, B * H * L * D + B * H * D * S + B * H * L * S  # each op's inputs and outputs
    assert cost.bytes == 4 * (2 * matmul + (2 * scores + 1) + (2 * scores + B * S) + 2 * scores)
    names = {node.name for node in m.graph}
    assert get_pass("fuse_attention").apply(m, ctx) == 1
    assert names - {node.name for node in m.graph} == set(first.nodes)
    assert_same(proto, m, dims={"batch": B})


# (family, exporter) -> fused attention blocks; the two that are not are reported with the reason
EXPORTS = {("bert", "torchscript"): 1, ("bert", "dynamo"): 1, ("distilbert", "dynamo"): 1, ("gpt2", "dynamo"): 1,
           ("vit", "torchscript"): 1, ("vit", "dynamo"): 1,
           ("distilbert", "torchscript"): "also read by",  # Shape(scores) sizes the masked_fill's Expand
           ("gpt2", "torchscript"): "computed at run time"}  # 1/sqrt(head size) from Shape


@pytest.mark.parametrize("family, exporter", list(EXPORTS))
def test_exported_models(tmp_path, family, exporter):
    proto = onnx.load(export_family(tmp_path, family, exporter))
    m = load(proto)
    ctx = PassContext(kiln_ops=True, dims={"batch": 2, "sequence": 8})
    findings = get_pass("fuse_attention").find(m, ctx)
    assert len(findings) == 1 and findings[0].rule == "unfused-attention"
    expected = EXPORTS[(family, exporter)]
    count = get_pass("fuse_attention").apply(m, ctx)
    if isinstance(expected, str):
        assert count == 0 and findings[0].pass_name is None and expected in findings[0].fix
        return
    assert count == expected and counts(m)["ai.kiln::FusedAttention"] == expected and "Softmax" not in counts(m)
    assert findings[0].pass_name == "fuse_attention"
    assert_same(proto, m, dims={"batch": 2, "sequence": 8})
