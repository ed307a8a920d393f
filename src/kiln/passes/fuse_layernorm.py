"""fuse_layernorm: LayerNorm and RMSNorm written out as reductions and elementwise ops become one
``LayerNormalization`` / ``RMSNormalization`` node.

Playbook rule: "fuse LayerNorm" (TensorRT fuses the decomposed form into one normalization layer):
the 9-11 ops of a decomposed LayerNorm each read and write the whole activation and two of them are
reductions; one fused op reads it once, and the builder runs it as one (Triton) kernel that also
absorbs the residual Add before it.

onnxscript ships ``rules.fusion._layer_norm`` and ``._rms_normalization``; they are not used because
they only match ReduceMean with its axes as an input (opset 18+) and over the last axis only, need
the scale Mul, emit the standard op whatever the opset, and do not check that scale and bias
broadcast as the fused ops require. The rules here are written in the same style (onnxscript
``RewriteRuleClassBase`` patterns, matched by onnxscript's matcher; see ``_transformer``).

Rewrites (``axes`` the last ``k`` axes of ``x``, given as an attribute before opset 18 and as a
constant input from 18, negative or not, equal in both reductions, ``keepdims=1``; an empty axes
list with ``noop_with_empty_axes=0`` means every axis):

1. LayerNorm: ``d = x - ReduceMean(x, axes)``; ``v = ReduceMean(Pow(d, 2) | Mul(d, d), axes)``;
   ``n = d / Sqrt(v + eps)`` or ``d * Reciprocal(Sqrt(v + eps))`` (``Reciprocal`` also as ``Div(1, .)``);
   then optionally ``* scale`` and optionally ``+ bias`` -> ``LayerNormalization(x, scale, bias,
   axis=-k, epsilon=eps)``. No scale: a ones constant; no bias: no bias input. Standard op from opset
   17 (``stash_type`` float: float16/bfloat16 statistics are computed in float32, as exactly or more
   so than the decomposition); before 17 the ``ai.kiln`` op of the same semantics, only with
   ``ctx.kiln_ops``.
2. RMSNorm: ``x / Sqrt(ReduceMean(Pow(x, 2) | Mul(x, x), axes) + eps)`` (or ``x * Reciprocal(...)``)
   [``* scale``] -> ``RMSNormalization(x, scale, axis=-k, epsilon=eps)`` (``stash_type`` double for
   double inputs, else float). Standard from opset 23, else the ``ai.kiln`` op with ``ctx.kiln_ops``.

Commutative operands in either order. A scale or bias of exactly the normalized shape
``x.shape[-k:]`` is passed as it is; a constant one that broadcasts to it (fewer dims, or dims of 1)
is expanded into a new constant of that shape.

Does NOT fire when: an intermediate (mean, diff, squares, variance, ...) has a consumer outside the
pattern or is a graph output; the axes are not the trailing ones, differ between the two
reductions, are not constant, or ``keepdims=0``; ``eps`` (or the 2 of ``Pow``, the 1 of ``Div``) is
not a single-element constant; ``x``'s rank is unknown; ``x`` is not a float type (and, for
LayerNorm, double: the op's statistics cannot be double); scale or bias has another dtype, more dims
than the normalized ones or a dim that neither is 1 nor equals the normalized one, or has to be
expanded or created while it is not constant or the normalized dims are not all known; for RMSNorm,
``x`` is itself ``a - ReduceMean(a)`` over the same axes (a LayerNorm whose mean the rule 1 could not
take: fusing only its tail would hide that); the model's opset predates the op and ``ctx.kiln_ops``
is false (``find()`` still reports the place and says what is needed).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, pattern

from kiln.passes._transformer import (
    FLOAT_TYPES,
    FusionRule,
    Scalar,
    const_scalar,
    either,
    find_sites,
    rank,
    rewrite_sites,
)
from kiln.passes.framework import Finding, Pass, PassContext, fused_op, register_pass
from kiln.passes.rewriting import constant_array, opset, same_dim, shapes_of

_LN_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
# root forms: the op whose output is the result, and whether its operands are written swapped
_LN_FORMS = (("bias", False), ("bias", True), ("scale", False), ("scale", True), ("div", False), ("mul", False),
             ("mul", True))
_RMS_FORMS = (("scale", False), ("scale", True), ("div", False), ("mul", False), ("mul", True))


def reduce_axes(node: ir.Node, r: int) -> list[int] | None:
    """The sorted non-negative axes a ReduceMean with ``keepdims=1`` reduces over, or None when they
    are not constant, out of range, or the node does not reduce (or drops the reduced dims)."""
    attrs = node.attributes
    if "keepdims" in attrs and int(attrs["keepdims"].value) != 1:
        return None
    if "axes" in attrs:
        axes = [int(a) for a in attrs["axes"].value]
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        array = constant_array(node.inputs[1])
        if array is None or array.dtype.kind not in "iu":
            return None
        axes = [int(a) for a in array.reshape(-1)]
    else:
        axes = []
    if not axes:
        if "noop_with_empty_axes" in attrs and int(attrs["noop_with_empty_axes"].value):
            return None
        return list(range(r))
    if any(not -r <= a < r for a in axes):
        return None
    normalized = sorted({a % r for a in axes})
    return normalized if len(normalized) == len(axes) else None


def trailing_count(axes: list[int] | None, r: int) -> int | None:
    """k when ``axes`` are exactly the last k axes of a rank-r tensor, else None."""
    if not axes or axes != list(range(r - len(axes), r)):
        return None
    return len(axes)


def _reduced_last(x: ir.Value | None, reductions: list[ir.Value]) -> int | None:
    """k when every ReduceMean producing ``reductions`` reduces ``x``'s last k axes, else None."""
    r = rank(x)
    if r is None or r == 0:
        return None
    ks = set()
    for v in reductions:
        node = v.producer()
        assert node is not None, "each reduction is the output of a matched ReduceMean"
        ks.add(trailing_count(reduce_axes(node, r), r))
    return ks.pop() if len(ks) == 1 and None not in ks else None


def _param_plan(param: ir.Value | None, x: ir.Value, k: int) -> tuple[str, np.ndarray | None] | str:
    """How a scale/bias reaches the fused op: ("as-is", None), ("constant", array of the normalized
    shape), ("absent", None); or a string saying why it cannot."""
    assert x.shape is not None, "_reduced_last found x's rank"
    normalized = list(x.shape)[-k:]
    sizes = [d for d in normalized if isinstance(d, int)]
    static = len(sizes) == len(normalized)
    if param is None:
        return ("absent", None) if static else "the normalized dims are not all known"
    if param.dtype != x.dtype:
        return f"{param.name} has dtype {param.dtype}, {x.name} has {x.dtype}"
    array = constant_array(param)
    shape = list(array.shape) if array is not None else (list(param.shape) if param.shape is not None else None)
    if shape is None:
        return f"{param.name} has an unknown shape"
    if len(shape) > k:
        return f"{param.name} has {len(shape)} dims, more than the {k} normalized ones"
    tail = normalized[k - len(shape):]
    if len(shape) == k and all(same_dim(a, b) for a, b in zip(shape, tail)):
        return ("as-is", None)
    if array is None or not static:
        return f"{param.name} would need expanding to the normalized shape, which needs a constant and known dims"
    if any(a != 1 and a != b for a, b in zip(shape, tail)):
        return f"{param.name} of shape {shape} does not broadcast to the normalized shape {normalized}"
    return ("constant", np.ascontiguousarray(np.broadcast_to(array, sizes)))


def _constant(op: Any, array: np.ndarray) -> ir.Value:
    value = op.Constant(value=ir.tensor(array))
    value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
    value.shape = ir.Shape(list(array.shape))
    return value


def _param_value(op: Any, plan: tuple[str, np.ndarray | None], param: ir.Value | None, x: ir.Value, k: int,
                 fill: float | None) -> ir.Value | None:
    kind, array = plan
    if kind == "as-is":
        return param
    if kind == "constant":
        assert array is not None, "a constant plan holds its array"
        return _constant(op, array)
    if fill is None:
        return None
    assert x.shape is not None and x.dtype is not None, "_reduced_last found x's rank; x is a float tensor"
    sizes = [d for d in list(x.shape)[-k:] if isinstance(d, int)]
    assert len(sizes) == k, "_param_plan found x's normalized dims all known"
    return _constant(op, np.full(sizes, fill, dtype=x.dtype.numpy()))


class _NormRule(FusionRule):
    """Shared by both norms: the ``n = centred / Sqrt(mean-of-squares + eps)`` core and the roots."""

    kind = ""
    op_name = ""

    def __init__(self, form: str, swap: bool, target: tuple[str, str] | None) -> None:
        super().__init__(f"{self.kind}[{form}{'-swapped' if swap else ''}]", target)
        self.form, self.swap = form, swap
        self.root_op = {"bias": "Add", "scale": "Mul", "div": "Div", "mul": "Mul"}[form]

    def _core(self, op: Any, centred: Any) -> tuple[Any, Any]:
        """(the mean of squares, the Sqrt of it plus eps) of ``centred``."""
        squares = pattern.OrValue([op.Pow(centred, Scalar(2.0, "two")), op.Mul(centred, centred)])
        meansq = op.ReduceMean(squares, _allow_other_inputs=True, _outputs=["meansq"])
        return meansq, op.Sqrt(either(op.Add, meansq, Scalar(None, "eps")))

    def _root(self, op: Any, centred: Any, root: Any) -> Any:
        """The normalized value (every spelling when it is not the root), then scale and bias."""
        recip = pattern.OrValue([op.Reciprocal(root), op.Div(Scalar(1.0, "unit"), root)])
        if self.form == "div":
            return op.Div(centred, root)
        if self.form == "mul":
            return op.Mul(recip, centred) if self.swap else op.Mul(centred, recip)
        normalized = pattern.OrValue([op.Div(centred, root), op.Mul(centred, recip), op.Mul(recip, centred)])
        scale, bias = pattern.Var("scale"), pattern.Var("bias")
        if self.form == "scale":
            return op.Mul(scale, normalized) if self.swap else op.Mul(normalized, scale)
        scaled = pattern.OrValue([op.Mul(normalized, scale), op.Mul(scale, normalized), normalized])
        return op.Add(bias, scaled) if self.swap else op.Add(scaled, bias)

    def _common(self, x: ir.Value, bindings: dict[str, Any], reductions: list[ir.Value]) -> dict[str, Any] | str:
        """Everything both norms need to hold; the plan for the rewrite, or why not."""
        k = _reduced_last(x, reductions)
        if k is None:
            return "the reductions are not over the same trailing axes of a tensor of known rank"
        r = rank(x)
        assert r is not None, "_reduced_last found x's rank"
        eps = const_scalar(bindings.get("eps"))
        if eps is None or not np.isfinite(eps):
            return "epsilon is not a finite single-element constant"
        for name in ("eps", "two", "unit"):
            array = constant_array(bindings.get(name))
            if array is not None and array.ndim > r:
                return f"constant {name} has more dims than {x.name}"
        plans = {}
        for name, fill in (("scale", 1.0), ("bias", None)):
            plan = _param_plan(bindings.get(name), x, k)
            if isinstance(plan, str):
                return plan
            if plan[0] == "absent" and fill is None:
                plan = ("none", None)
            plans[name] = plan
        return {"k": k, "eps": eps, "plans": plans}

    def rewrite(self, op, x, **bindings):
        plan = self.plan(x, bindings)
        assert not isinstance(plan, str), plan  # check() passed, so the plan exists
        k, plans = plan["k"], plan["plans"]
        scale = _param_value(op, plans["scale"], bindings.get("scale"), x, k, 1.0)
        inputs = [x, scale]
        if plans["bias"][0] != "none":
            inputs.append(_param_value(op, plans["bias"], bindings.get("bias"), x, k, None))
        domain, op_type = self.target
        stash = ir.DataType.DOUBLE if x.dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT
        return op.op(op_type, *inputs, _domain=domain, axis=-k, epsilon=float(plan["eps"]), stash_type=int(stash))

    def plan(self, x: ir.Value, bindings: dict[str, Any]) -> dict[str, Any] | str:
        """The plan for the rewrite, or why the match cannot be fused (each norm's own)."""
        raise NotImplementedError

    # onnxscript passes the match's bindings as keywords; its base class declares (op, *args, **kwargs)
    def check(self, context, x, **bindings) -> MatchResult:  # type: ignore[override]
        result = MatchResult()
        plan = self.plan(x, bindings)
        return result.fail(plan) if isinstance(plan, str) else result


class LayerNormRule(_NormRule):
    """Decomposed LayerNorm in one root form."""

    kind = "LayerNorm"
    op_name = "LayerNormalization"

    def pattern(self, op, x):
        mean = op.ReduceMean(x, _allow_other_inputs=True, _outputs=["mean"])
        centred = op.Sub(x, mean)
        _, root = self._core(op, centred)
        return self._root(op, centred, root)

    def plan(self, x: ir.Value, bindings: dict[str, Any]) -> dict[str, Any] | str:
        if x.dtype not in _LN_TYPES:
            return f"{x.name} is {x.dtype}: LayerNormalization computes float16/bfloat16/float inputs only exactly"
        return self._common(x, bindings, [bindings["mean"], bindings["meansq"]])


class RMSNormRule(_NormRule):
    """Decomposed RMSNorm in one root form."""

    kind = "RMSNorm"
    op_name = "RMSNormalization"

    def pattern(self, op, x):
        _, root = self._core(op, x)
        return self._root(op, x, root)

    def plan(self, x: ir.Value, bindings: dict[str, Any]) -> dict[str, Any] | str:
        if x.dtype not in FLOAT_TYPES:
            return f"{x.name} is not a float tensor"
        common = self._common(x, bindings, [bindings["meansq"]])
        if isinstance(common, str):
            return common
        sub = x.producer()
        if sub is not None and sub.op_type == "Sub" and sub.inputs[1] is not None:
            mean = sub.inputs[1].producer()
            if mean is not None and mean.op_type == "ReduceMean" and mean.inputs[0] is sub.inputs[0] \
                    and _reduced_last(sub.inputs[0], [sub.inputs[1]]) == common["k"]:
                return "the input is x - mean(x): a LayerNorm that could not be fused as one"
        return common


_RULES: dict[Any, list[_NormRule]] = {}


def norm_rules(ln_target: tuple[str, str] | None, rms_target: tuple[str, str] | None) -> list[_NormRule]:
    """LayerNorm rules first (an RMSNorm core sits inside every LayerNorm), largest forms first."""
    key = (ln_target, rms_target)
    if key not in _RULES:
        _RULES[key] = [LayerNormRule(f, s, ln_target) for f, s in _LN_FORMS] + \
                      [RMSNormRule(f, s, rms_target) for f, s in _RMS_FORMS]
    return _RULES[key]


@register_pass
class FuseLayerNorm(Pass):
    """Decomposed LayerNorm -> ``LayerNormalization``; decomposed RMSNorm -> ``RMSNormalization``."""

    name = "fuse_layernorm"
    rule = "fuse decomposed LayerNorm and RMSNorm into one normalization op"

    def _sites(self, model: ir.Model, ctx: PassContext):
        return find_sites(model, norm_rules(fused_op(model, ctx, "LayerNormalization", 17),
                                            fused_op(model, ctx, "RMSNormalization", 23)))

    def find(self, model: ir.Model, ctx: PassContext) -> list[Finding]:
        findings = []
        for site in self._sites(model, ctx):
            rule = site.rule
            x = site.bindings["x"]
            plan = rule.plan(x, site.bindings)
            since = 17 if rule.kind == "LayerNorm" else 23
            if site.blocked:
                fix = (f"the model's opset ({opset(model)}) predates {rule.op_name} (opset {since}): run with "
                       f"--kiln-ops (kiln build does) to fuse it into ai.kiln's {rule.op_name}, "
                       f"or export at opset {since}")
            else:
                fix = f"fused automatically by pass fuse_layernorm into one {rule.op_name}"
            findings.append(Finding(
                rule="unfused-layernorm" if rule.kind == "LayerNorm" else "unfused-rmsnorm",
                title=f"{rule.kind} over the last {plan['k']} axis(es) computed as {len(site.nodes)} ops",
                nodes=[n.name for n in site.nodes],
                why=f"each of the {len(site.nodes)} ops reads and writes the whole tensor and the reductions run "
                    "as separate kernels; one fused normalization reads it once",
                fix=fix,
                pass_name=None if site.blocked else self.name,
                shapes=shapes_of([x, site.output]),
                details={"axis": -plan["k"], "epsilon": plan["eps"], "op": rule.op_name},
            ))
        return findings

    def apply(self, model: ir.Model, ctx: PassContext) -> int:
        sites = self._sites(model, ctx)
        blocked = [s for s in sites if s.blocked]
        if blocked:
            names = sorted({s.rule.op_name for s in blocked})
            ctx.log.append(f"{len(blocked)} decomposed normalization(s) left as they are: opset {opset(model)} "
                           f"has no {' / '.join(names)} (needs a newer opset or --kiln-ops)")
        return rewrite_sites(model, sites, ctx)
