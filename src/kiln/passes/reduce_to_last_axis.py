"""Reduce over the last axes: a Reduce* over non-trailing axes becomes Transpose + Reduce over the
trailing axes, where that is faster.

Playbook rule: "reduce on the last axis (transpose first)". A reduction over a strided axis reads
memory in short runs; moving the reduced axes to the end (one transpose copy) makes every
reduction read contiguous rows.

Rewrite (one onnxscript rewrite rule per Reduce op: ReduceSum, ReduceMean, ReduceMax, ReduceMin,
ReduceProd, ReduceL1, ReduceL2, ReduceLogSum, ReduceLogSumExp, ReduceSumSquare):

    ReduceX(x, axes=R, keepdims=k)
      -> Transpose(x, perm=kept axes + R) -> ReduceX(., axes=last |R| axes, keepdims=0)
         [-> Unsqueeze(., axes=R) when k=1, so the output has the original layout: a view]

Axes come as an attribute before opset 18 (ReduceSum: 13) and as a constant input from then on;
the new Reduce uses the form the node used, the Unsqueeze the form of the model's opset (input from
13). Negative axes are normalized. Every Reduce* is symmetric in its reduced elements, so the order
the reduced axes end up in does not matter.

A Reduce is a candidate (and ``find()`` reports it, rule "reduce-not-last-axis") when an axis that
is kept and may be larger than 1 lies after a reduced axis larger than 1. Whether it is rewritten:

- **measured** when ``ctx.measure`` is set (the builder sets it on a GPU) and the input's shape is
  concrete (``ctx.concrete``): the strided reduction (torch's equivalent of the op on the model's
  dtype, e.g. ``torch.sum(x, dim=R)``) and the transposed one (``x.permute(p).contiguous()``
  reduced over its last axes) run at that shape on ``ctx.device``; the rewrite is kept only when it
  is at least 3% faster (so timing noise does not churn the graph). Ops torch has no multi-axis form
  of, and integer inputs, are timed with ``sum``: the memory access is what is being decided.
- **by rule** otherwise ("not measured" in the log): rewrite when the contiguous run the strided
  reduction reads is at most ``MAX_RUN_BYTES`` = 8 bytes. The run is the product of the kept axes
  after the last reduced axis (the elements a warp reads side by side for neighbouring outputs),
  or, when the last axis is reduced, of the trailing reduced axes (size-1 axes ignored). GPU memory is fetched
  in 32-byte sectors: a run of r bytes uses r/32 of each sector fetched, so the strided reduction moves
  32/r times the tensor, while the rewrite moves it three times (transpose read and write, then a
  contiguous read). 32/r > 3 holds for r <= 10 bytes; with power-of-two element sizes that is
  r <= 8 (at most 2 fp32 or 4 fp16 elements). Unknown sizes (not in ``ctx.dims``): not rewritten.

Every decision is written to ``ctx.log`` by ``apply()``; ``find()`` puts it in the finding's
details and sets ``pass_name`` only for the places ``apply()`` rewrites.

Does not fire when: the axes are not constant, the input's rank is unknown, the axes are empty
with ``noop_with_empty_axes=1`` (identity) or absent (all axes: already trailing), the reduced axes
are already the trailing ones (up to size-1 axes), or the decision above says no.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase

from kiln.passes._shuffles import apply_rules, int64s
from kiln.passes.framework import Finding, Pass, PassContext, register_pass
from kiln.passes.rewriting import Names, node_names, opset, shapes_of, unique_node_names

REDUCE_OPS = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
MAX_RUN_BYTES = 8  # see the module docstring: 32-byte sectors, 3 passes for the rewrite
MIN_SPEEDUP = 0.97  # measured: the rewrite must take at most 97% of the strided time


@dataclass
class _Plan:
    node: ir.Node
    axes: list[int]  # sorted, non-negative
    perm: list[int]
    keepdims: bool
    axes_as_input: bool
    run_dims: list  # the sizes whose product is the contiguous run the strided reduction reads
    rewrite: bool = False
    how: str = ""  # "measured ..." or "not measured ..."
    details: dict[str, Any] = field(default_factory=dict)


def _axes(node: ir.Node) -> tuple[list[int] | None, bool] | None:
    """(axes or None for "not given", given as input) or None when they are not constant."""
    attr = node.attributes.get("axes")
    if attr is not None:
        return (None if attr.is_ref() else [int(a) for a in attr.as_ints()]), False
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        value = node.inputs[1]
        tensor = None if value.is_graph_input() else ir.convenience.get_const_tensor(value)
        if tensor is None:
            return None
        return [int(a) for a in np.asarray(tensor.numpy()).reshape(-1)], True
    return None, True


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _candidate(node: ir.Node) -> _Plan | None:
    """The transpose plan for a Reduce over non-trailing axes, or None when it is not one."""
    if node.op_type not in REDUCE_OPS or node.domain not in ("", "ai.onnx"):
        return None
    x = node.inputs[0]
    if x is None or x.shape is None or x.dtype is None:
        return None
    shape = x.shape
    rank = len(shape)
    found = _axes(node)
    if found is None:
        return None
    axes, as_input = found
    if not axes:  # absent or empty: all axes (already trailing), or identity with noop_with_empty_axes
        return None
    if any(not -rank <= a < rank for a in axes):
        return None
    reduced = sorted({a % rank for a in axes})

    def big(axis: int) -> bool:
        d = shape[axis]
        return not (isinstance(d, int) and d == 1)

    kept = [i for i in range(rank) if i not in reduced]
    last_reduced = max((a for a in reduced if big(a)), default=None)
    if last_reduced is None or not any(big(i) and i > min(a for a in reduced if big(a)) for i in kept):
        return None
    bigs = [i for i in range(rank) if big(i)]  # size-1 axes do not change the memory order
    if bigs[-1] in reduced:  # rows of the trailing reduced axes, strided over the others
        run_dims = []
        for a in reversed(bigs):
            if a not in reduced:
                break
            run_dims.append(shape[a])
    else:  # neighbouring outputs side by side: the kept axes after the last reduced one
        run_dims = [shape[i] for i in bigs if i > last_reduced]
    return _Plan(node=node, axes=reduced, perm=kept + reduced, keepdims=bool(_int_attr(node, "keepdims", 1)),
                 axes_as_input=as_input, run_dims=run_dims)


def _product(dims) -> int | None:
    n = 1
    for d in dims:
        if not isinstance(d, int):
            return None
        n *= d
    return n


def _torch_reduce(op_type: str, floating: bool) -> Callable:
    """torch's equivalent of a Reduce op over several axes, for timing."""
    import torch

    if not floating:
        return lambda x, dims: torch.sum(x, dim=dims)
    table = {
        "ReduceSum": lambda x, dims: torch.sum(x, dim=dims),
        "ReduceMean": lambda x, dims: torch.mean(x, dim=dims),
        "ReduceMax": lambda x, dims: torch.amax(x, dim=dims),
        "ReduceMin": lambda x, dims: torch.amin(x, dim=dims),
        "ReduceL1": lambda x, dims: torch.sum(torch.abs(x), dim=dims),
        "ReduceL2": lambda x, dims: torch.linalg.vector_norm(x, 2, dim=dims),
        "ReduceLogSum": lambda x, dims: torch.log(torch.sum(x, dim=dims)),
        "ReduceLogSumExp": lambda x, dims: torch.logsumexp(x, dim=dims),
        "ReduceSumSquare": lambda x, dims: torch.sum(x * x, dim=dims),
    }
    return table.get(op_type, lambda x, dims: torch.sum(x, dim=dims))


class _Decider:
    """Decides, once per op/dtype/shape/axes within one find() or apply(), whether to rewrite."""

    def __init__(self, ctx: PassContext) -> None:
        self.ctx = ctx
        self.cache: dict[tuple, tuple[bool, str, dict]] = {}

    def __call__(self, plan: _Plan) -> _Plan:
        x = plan.node.inputs[0]
        assert x is not None and x.shape is not None, "_candidate found the reduced input's shape and dtype"
        concrete = self.ctx.concrete(x.shape)
        key = (plan.node.op_type, x.dtype, tuple(concrete) if concrete else tuple(map(str, x.shape)), tuple(plan.axes))
        if key not in self.cache:
            self.cache[key] = self._decide(plan, concrete)
        plan.rewrite, plan.how, plan.details = self.cache[key]
        return plan

    def _decide(self, plan: _Plan, concrete: list[int] | None) -> tuple[bool, str, dict]:
        x = plan.node.inputs[0]
        assert x is not None and x.dtype is not None, "_candidate found the reduced input's shape and dtype"
        if self.ctx.measure is not None and concrete is not None:
            strided, transposed = self.ctx.measure(*self._callables(plan, concrete))
            rewrite = transposed <= MIN_SPEEDUP * strided
            how = f"measured on {self.ctx.device}: strided {strided:.4f} ms, transposed {transposed:.4f} ms"
            return rewrite, how, {"measured_ms": {"strided": strided, "transposed": transposed}}
        run = _product([self.ctx.dim(d) for d in plan.run_dims])  # symbolic sizes from ctx.dims
        why = "shape not concrete" if self.ctx.measure is not None else "no measure hook"
        if run is None:
            return False, f"not measured ({why}); contiguous run unknown", {"run_bytes": None}
        run_bytes = run * x.dtype.itemsize
        rewrite = run_bytes <= MAX_RUN_BYTES
        how = f"not measured ({why}); contiguous run {run_bytes:g} bytes {'<=' if rewrite else '>'} {MAX_RUN_BYTES}"
        return rewrite, how, {"run_bytes": run_bytes}

    def _callables(self, plan: _Plan, shape: list[int]) -> tuple[Callable[[], Any], Callable[[], Any]]:
        import torch

        from kiln import dtypes

        x_value = plan.node.inputs[0]
        assert x_value is not None and x_value.dtype is not None, "_candidate found the reduced input's shape and dtype"
        try:
            dtype = dtypes.to_torch_dtype(x_value.dtype)
        except (KeyError, TypeError, ValueError):  # a dtype torch lacks: time the access pattern in fp32
            dtype = torch.float32
        floating = dtype.is_floating_point
        if floating:
            x = torch.randn(shape, device=self.ctx.device, dtype=dtype)
        else:
            dtype = torch.int32 if dtype == torch.bool else dtype
            x = torch.randint(0, 3, shape, device=self.ctx.device, dtype=dtype)
        reduce = _torch_reduce(plan.node.op_type, floating)
        k = len(plan.axes)
        rank = len(shape)
        last = list(range(rank - k, rank))
        return (lambda: reduce(x, plan.axes)), (lambda: reduce(x.permute(plan.perm).contiguous(), last))


class _ReduceToLastAxis(RewriteRuleClassBase):
    """``ReduceX(x, axes=R)`` -> ``ReduceX(Transpose(x, kept + R), last axes)`` [+ ``Unsqueeze``]."""

    def __init__(self, op_type: str, model_opset: int, decide: _Decider) -> None:
        super().__init__(name=f"reduce_to_last_axis_{op_type}")
        self.op_type, self.opset, self.decide = op_type, model_opset, decide

    def pattern(self, op, x):
        return getattr(op, self.op_type)(x, _allow_other_inputs=True, _outputs=["y"])

    def check(self, context, x: ir.Value, y: ir.Value) -> MatchResult:
        node = y.producer()
        assert node is not None, "the pattern matched y's producer"
        plan = _candidate(node)
        if plan is None:
            return MatchResult().fail("not a reduction over non-trailing axes")
        if not self.decide(plan).rewrite:
            return MatchResult().fail(plan.how)
        return MatchResult()

    def rewrite(self, op, x: ir.Value, y: ir.Value):
        node = y.producer()
        assert node is not None, "the pattern matched y's producer"
        plan = _candidate(node)
        assert plan is not None  # check() accepted this node
        assert x.shape is not None, "_candidate found the reduced input's shape and dtype"
        rank, k = len(x.shape), len(plan.axes)
        base = node.name or self.op_type
        t = op.Transpose(x, perm=plan.perm)
        t.dtype, t.shape = x.dtype, ir.Shape([x.shape[p] for p in plan.perm])
        last = list(range(rank - k, rank))
        extra = {}
        if "noop_with_empty_axes" in node.attributes:
            extra["noop_with_empty_axes"] = node.attributes["noop_with_empty_axes"]
        if plan.axes_as_input:
            axes = op.initializer(ir.tensor(int64s(last)), name=f"{base}/axes")
            reduced = op.op(self.op_type, t, axes, keepdims=0, **extra)
        else:
            reduced = op.op(self.op_type, t, axes=last, keepdims=0, **extra)
        reduced.dtype = y.dtype
        reduced.shape = ir.Shape([x.shape[p] for p in plan.perm[: rank - k]])
        if not plan.keepdims:
            return reduced
        if self.opset >= 13:
            return op.Unsqueeze(reduced, op.initializer(ir.tensor(int64s(plan.axes)), name=f"{base}/unsqueeze_axes"))
        return op.Unsqueeze(reduced, axes=plan.axes)


@register_pass
class ReduceToLastAxis(Pass):
    name: ClassVar[str] = "reduce_to_last_axis"
    rule: ClassVar[str] = "reduce on the last axis: transpose the reduced axes to the end where that is faster"

    def find(self, model: ir.Model, ctx: PassContext) -> list[Finding]:
        unique_node_names(model)
        decide = _Decider(ctx)
        findings = []
        for node in model.graph:
            plan = _candidate(node)
            if plan is not None:
                findings.append(self._finding(decide(plan), ctx))
        return findings

    def apply(self, model: ir.Model, ctx: PassContext) -> int:
        unique_node_names(model)
        decide = _Decider(ctx)
        for node in model.graph:  # every decision goes to the log, the ones kept and the ones not
            plan = _candidate(node)
            if plan is not None:
                decide(plan)
                verdict = "rewritten" if plan.rewrite else "kept"
                ctx.log.append(f"{node.name} ({node.op_type} over axes {plan.axes}): {verdict}, {plan.how}")
        names = Names(model.graph)
        model_opset = opset(model)
        rules = [_ReduceToLastAxis.rule(op_type, model_opset, decide) for op_type in REDUCE_OPS]
        return len(apply_rules(model, rules, names))

    def _finding(self, plan: _Plan, ctx: PassContext) -> Finding:
        node = plan.node
        x, y = node.inputs[0], node.outputs[0]
        assert x is not None and x.shape is not None, "_candidate found the reduced input's shape and dtype"
        return Finding(
            rule="reduce-not-last-axis",
            title=f"{node.op_type} over axes {plan.axes} of a rank-{len(x.shape)} tensor, not the last axes",
            nodes=node_names([node]),
            why="a reduction over a strided axis reads memory in short runs; reducing contiguous rows "
                "after one transpose can be faster",
            fix=(f"fixed automatically by pass {self.name}" if plan.rewrite
                 else f"left as is by pass {self.name}: {plan.how}"),
            pass_name=self.name if plan.rewrite else None,
            shapes=shapes_of([x, y]),
            details={"axes": plan.axes, "perm": plan.perm, "rewrite": plan.rewrite, "decision": plan.how,
                     **plan.details},
        )
