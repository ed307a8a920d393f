"""reduce_to_last_axis: a Reduce* over non-trailing axes becomes Transpose + Reduce over the last axes
(+ Unsqueeze for keepdims) when the measure hook says it is faster, or, without one, when the strided
reduction would read runs of at most 8 bytes; every such Reduce is reported, with the decision."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from families import export_family
from onnx import TensorProto, helper, numpy_helper

from kiln.passes.framework import PassContext, get_pass
from kiln.passes.reduce_to_last_axis import MAX_RUN_BYTES, REDUCE_OPS
from tests.passes.checks import assert_same, finding_cost, load, ops, run_pass

F = TensorProto.FLOAT


def _out_shape(shape, axes, keepdims):
    reduced = {a % len(shape) for a in axes}
    return [1 if i in reduced else d for i, d in enumerate(shape) if keepdims or i not in reduced]


def _reduce(op, shape, axes, keepdims=1, opset=18, elem=F, noop=None):
    """One Reduce node; axes as input from opset 18 (ReduceSum: 13), as attribute before."""
    as_input = opset >= (13 if op == "ReduceSum" else 18)
    attrs = {"keepdims": keepdims}
    inits = []
    if as_input:
        inits.append(numpy_helper.from_array(np.array(axes, np.int64), "axes"))
        if noop is not None:
            attrs["noop_with_empty_axes"] = noop
    elif axes is not None:
        attrs["axes"] = axes
    # ReduceLogSum reads |x| (the log of a sum of normals is often NaN)
    source = "ax" if op == "ReduceLogSum" else "x"
    nodes = [helper.make_node("Abs", ["x"], ["ax"], name="abs")] if source == "ax" else []
    nodes.append(helper.make_node(op, [source, "axes"] if as_input else [source], ["y"], name="red", **attrs))
    out = list(shape) if not axes and noop else _out_shape(shape, axes or range(len(shape)), keepdims)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, shape)],
                              [helper.make_tensor_value_info("y", elem, out)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _faster(calls):
    """A measure hook that says the transposed version is faster, after checking both callables
    compute the same reduction."""
    def measure(strided, transposed):
        a, b = strided(), transposed()
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, equal_nan=True)  # ReduceLogSum of normals
        calls.append((tuple(a.shape), tuple(b.shape)))
        return 1.0, 0.5
    return measure


@pytest.mark.parametrize("op", REDUCE_OPS)
@pytest.mark.parametrize("keepdims", [1, 0])
def test_every_reduce_op_is_rewritten_when_measured_faster(op, keepdims):
    proto = _reduce(op, [2, 6, 3, 5], [1], keepdims)
    calls = []
    model, count, ctx = run_pass(proto, "reduce_to_last_axis", measure=_faster(calls))
    assert count == 1 and calls == [((2, 3, 5), (2, 3, 5))]
    rewritten = ["Transpose", op, "Unsqueeze"] if keepdims else ["Transpose", op]
    assert ops(model) == (["Abs"] if op == "ReduceLogSum" else []) + rewritten
    transpose = next(n for n in model.graph if n.op_type == "Transpose")
    assert list(transpose.attributes["perm"].as_ints()) == [0, 2, 3, 1]
    assert ctx.log == [f"red ({op} over axes [1]): rewritten, measured on cpu: strided 1.0000 ms, transposed 0.5000 ms"]
    assert_same(proto, model)


@pytest.mark.parametrize("op,shape,axes,keepdims,opset", [
    ("ReduceSum", [2, 6, 2], [1], 1, 11),  # axes attribute, Unsqueeze with axes attribute
    ("ReduceSum", [3, 6, 2], [-2], 0, 13),  # axes input from 13, negative axis
    ("ReduceMean", [2, 6, 3, 2], [1, -1], 1, 17),  # attribute before 18; two axes, one trailing
    ("ReduceMax", [4, 3, 2], [0, 1], 1, 18),  # input from 18
    ("ReduceL2", [4, 2, 1], [0], 0, 13),
    ("ReduceSumSquare", [6, 2], [0], 1, 18),
    ("ReduceProd", [2, 3, 1, 2], [1, 2], 1, 18),  # a size-1 reduced axis
])
def test_rule_rewrites_short_runs(op, shape, axes, keepdims, opset):
    proto = _reduce(op, shape, axes, keepdims, opset)
    findings = get_pass("reduce_to_last_axis").find(load(proto), PassContext())
    model, count, ctx = run_pass(proto, "reduce_to_last_axis")
    assert count == 1 and ops(model)[:2] == ["Transpose", op] and (ops(model)[-1] == "Unsqueeze") == bool(keepdims)
    assert "not measured (no measure hook)" in ctx.log[0] and "rewritten" in ctx.log[0]
    assert findings[0].pass_name == "reduce_to_last_axis" and findings[0].details["run_bytes"] <= MAX_RUN_BYTES
    assert_same(proto, model)


def test_rule_keeps_long_runs_and_says_why():
    proto = _reduce("ReduceSum", [2, 6, 64], [1], 1, 13)
    model, count, ctx = run_pass(proto, "reduce_to_last_axis")
    assert count == 0 and ops(model) == ["ReduceSum"]
    assert ctx.log == ["red (ReduceSum over axes [1]): kept, not measured (no measure hook); "
                       "contiguous run 256 bytes > 8"]
    (finding,) = get_pass("reduce_to_last_axis").find(load(proto), PassContext())
    assert finding.pass_name is None and finding.details["rewrite"] is False and "left as is" in finding.fix


def test_size1_axes_do_not_count_in_the_run():
    """[2, 6, 16, 1] over axes 1 and 3: the size-1 last axis is no row; the run is the 16 kept."""
    proto = _reduce("ReduceSum", [2, 6, 16, 1], [1, 3], 1, 13)
    (finding,) = get_pass("reduce_to_last_axis").find(load(proto), PassContext())
    assert finding.details["run_bytes"] == 16 * 4 and finding.pass_name is None


def test_measured_slower_is_kept():
    proto = _reduce("ReduceMean", [2, 6, 2], [1], 1, 18)  # the rule alone would rewrite this one
    model, count, ctx = run_pass(proto, "reduce_to_last_axis", measure=lambda a, b: (1.0, 0.99))
    assert count == 0 and ops(model) == ["ReduceMean"]
    assert "kept, measured" in ctx.log[0]


def test_symbolic_sizes_use_context_dims():
    proto = _reduce("ReduceSum", [2, 6, "W"], [1], 1, 13)
    model, count, ctx = run_pass(proto, "reduce_to_last_axis")
    assert count == 0 and "contiguous run unknown" in ctx.log[0]  # unknown: never rewritten by rule
    model, count, ctx = run_pass(proto, "reduce_to_last_axis", dims={"W": 2})
    assert count == 1
    assert_same(proto, model, dims={"W": 2})
    assert_same(proto, model, dims={"W": 5})  # correct at any size, only the choice used W=2


def test_measure_is_skipped_without_a_concrete_shape():
    calls = []
    proto = _reduce("ReduceSum", ["B", 6, 2], [1], 1, 13)
    model, count, ctx = run_pass(proto, "reduce_to_last_axis", measure=_faster(calls))
    assert calls == [] and "not measured (shape not concrete)" in ctx.log[0] and count == 1
    model, count, ctx = run_pass(proto, "reduce_to_last_axis", measure=_faster(calls), dims={"B": 3})
    assert len(calls) == 1 and count == 1


@pytest.mark.parametrize("op,shape,axes,noop,opset", [
    ("ReduceSum", [2, 6, 3], [2], None, 13),  # already the last axis
    ("ReduceSum", [2, 6, 3], [1, 2], None, 13),  # already the trailing axes
    ("ReduceMean", [2, 6, 1, 1], [1], None, 18),  # only size-1 axes after it: already contiguous
    ("ReduceSum", [2, 6, 3], [], 1, 13),  # empty axes with noop_with_empty_axes: identity
    ("ReduceSum", [2, 6, 3], [], 0, 13),  # empty axes: all axes
    ("ReduceMax", [2, 6, 3], None, None, 17),  # no axes attribute: all axes
])
def test_not_candidates(op, shape, axes, noop, opset):
    proto = _reduce(op, shape, axes, 1, opset, noop=noop)
    model, count, ctx = run_pass(proto, "reduce_to_last_axis", measure=lambda a, b: (1.0, 0.0))
    assert count == 0 and ops(model) == [op] and ctx.log == []
    assert get_pass("reduce_to_last_axis").find(load(proto), PassContext()) == []


def test_non_constant_axes_are_left_alone():
    node = helper.make_node("ReduceSum", ["x", "axes"], ["y"], name="red", keepdims=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", F, [2, 6, 2]),
                                            helper.make_tensor_value_info("axes", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", F, ["d0", "d1"])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model, count, _ = run_pass(proto, "reduce_to_last_axis", measure=lambda a, b: (1.0, 0.0))
    assert count == 0 and ops(model) == ["ReduceSum"]


def test_integer_input_is_measured_and_rewritten():
    proto = _reduce("ReduceMax", [3, 5, 2], [1], 0, 18, elem=TensorProto.INT32)
    calls = []
    model, count, _ = run_pass(proto, "reduce_to_last_axis", measure=_faster(calls))
    assert count == 1 and len(calls) == 1
    assert_same(proto, model)


def test_find_reports_every_non_last_axis_reduce_and_marks_the_rewritten():
    nodes = [helper.make_node("ReduceSum", ["x", "a1"], ["r1"], name="short", keepdims=1),
             helper.make_node("ReduceSum", ["x", "a2"], ["r2"], name="long", keepdims=0),
             helper.make_node("ReduceSum", ["r2", "a3"], ["y"], name="last", keepdims=0)]
    inits = [numpy_helper.from_array(np.array(a, np.int64), n) for n, a in (("a1", [1]), ("a2", [0]), ("a3", [-1]))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [3, 40, 2])],
                              [helper.make_tensor_value_info("r1", F, [3, 1, 2]),
                               helper.make_tensor_value_info("y", F, [40])],
                              inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    findings = get_pass("reduce_to_last_axis").find(load(proto), PassContext())
    assert [f.nodes for f in findings] == [["short"], ["long"]]  # "last" already reduces the last axis
    assert all(f.rule == "reduce-not-last-axis" for f in findings)
    short, long = findings
    assert short.pass_name == "reduce_to_last_axis" and long.pass_name is None
    assert short.details["run_bytes"] == 8 and long.details["run_bytes"] == 320
    assert short.shapes == {"x": [3, 40, 2], "r1": [3, 1, 2]}
    cost = finding_cost(load(proto), short)
    assert cost.bytes == 4 * (3 * 40 * 2 + 3 * 2) + 8  # x, r1 and the int64 axes
    assert cost.flops == 3 * 40 * 2
    model, count, _ = run_pass(proto, "reduce_to_last_axis")
    assert count == 1 and ops(model) == ["Transpose", "ReduceSum", "Unsqueeze", "ReduceSum", "ReduceSum"]
    assert [v.name for v in model.graph.outputs] == ["r1", "y"]
    assert_same(proto, model)


@pytest.mark.parametrize("family,exporter", [("resnet", "dynamo"), ("regnet", "torchscript"), ("bert", "torchscript")])
def test_exported_families_stay_correct(tmp_path, family, exporter):
    proto = onnx.load(export_family(tmp_path, family, exporter))
    model, _, _ = run_pass(proto, "reduce_to_last_axis", dims={"batch": 2, "sequence": 8},
                           measure=lambda a, b: (1.0, 0.5))
    assert_same(proto, model, dims={"batch": 2, "sequence": 8})
