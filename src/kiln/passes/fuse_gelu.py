"""fuse_gelu: a GELU written out as elementwise ops becomes one ``Gelu`` node.

Playbook rule: fuse what the exporter decomposed (the notes' "fuse conv+bias+relu, LayerNorm,
attention"): each of the 5-9 ops of a decomposed GELU reads and writes the whole activation; one
``Gelu`` reads it once, and the builder can take it as the epilogue of the GEMM before it.

onnxscript's GELU rules (``rewriter.ort_fusions.gelu`` / ``erfgelu``) emit onnxruntime's
``com.microsoft`` ops and match one or two groupings with exact constants, so the rules here are
written in the same style (``RewriteRuleClassBase`` patterns run by onnxscript's matcher; see
``_transformer``) for every grouping and both torch exporters' constants.

Rewrites (``x`` any float tensor; every constant a single-element constant, matched within 1e-6
relative, or the epsilon of a float16/bfloat16 constant's type; see ``_transformer.CONST_RTOL``):

1. erf form ``0.5 * x * (1 + Erf(x / sqrt(2)))`` -> ``Gelu(x, approximate="none")``; the argument
   of Erf as ``Div(x, 1.4142135)`` or ``Mul(x, 0.70710677)``.
2. tanh form ``0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`` ->
   ``Gelu(x, approximate="tanh")``; ``x^3`` as ``Pow(x, 3)``, ``Mul(x, Mul(x, x))`` or
   ``Mul(Mul(x, x), x)``.

In both, every commutative operand order, and the three ways to group the product of ``0.5``,
``x`` and ``(1 + ...)`` (TorchScript: ``(x * (1 + e)) * 0.5``; dynamo: ``x * (0.5 * (1 + e))``;
by hand: ``(0.5 * x) * (1 + e)``), with the halving as ``Mul`` by 0.5 or ``Div`` by 2. The op is the
standard ``Gelu`` from opset 20; on older opsets the ``ai.kiln`` ``Gelu`` of the same semantics, only
with ``ctx.kiln_ops``.

Does NOT fire when: a constant differs from the formula's (beyond the tolerance) or is not a
single-element constant; an intermediate value has a consumer outside the pattern or is a graph
output; ``x`` is not float16/float/double/bfloat16; a constant has a higher rank than ``x`` (it would
broadcast the result to a new shape) or ``x``'s rank is unknown while a constant is not 0-d; the
opset is below 20 and ``ctx.kiln_ops`` is false (``find()`` still reports the place and says so).
"""

from __future__ import annotations

import math
from typing import Any

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, pattern

from kiln.passes._transformer import (
    FLOAT_TYPES,
    FusionRule,
    Scalar,
    either,
    find_sites,
    rank,
    rewrite_sites,
)
from kiln.passes.framework import Finding, Pass, PassContext, fused_op, register_pass
from kiln.passes.rewriting import constant_array, opset, shapes_of

_SQRT2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_CUBE_COEFF = 0.044715
_CONSTANTS = ("half", "two", "one", "sqrt2", "inv_sqrt2", "three", "cube_coeff", "tanh_coeff")
# how the product 0.5 * x * (1 + e) is grouped, and which operand the root node holds first
_FORMS = (("a", False), ("a", True), ("a-div", False), ("b", False), ("b", True), ("c", False), ("c", True))


class GeluRule(FusionRule):
    """One grouping of ``0.5 * x * (1 + e)`` for one GELU kind (``approximate`` "none" or "tanh")."""

    def __init__(self, approximate: str, form: str, swap: bool, target: tuple[str, str] | None) -> None:
        super().__init__(f"Gelu[{approximate}]{form}{'-swapped' if swap else ''}", target)
        self.approximate, self.form, self.swap = approximate, form, swap
        self.root_op = "Div" if form == "a-div" else "Mul"

    def _one_plus(self, op: Any, x: Any) -> Any:
        """``1 + Erf(x / sqrt 2)`` or ``1 + Tanh(sqrt(2/pi) * (x + 0.044715 x^3))``."""
        if self.approximate == "none":
            inv = Scalar(1.0 / _SQRT2, "inv_sqrt2")
            arg = pattern.OrValue([op.Div(x, Scalar(_SQRT2, "sqrt2")), op.Mul(x, inv), op.Mul(inv, x)])
            core = op.Erf(arg)
        else:
            square = op.Mul(x, x)
            cube = pattern.OrValue([op.Pow(x, Scalar(3.0, "three")), op.Mul(x, square), op.Mul(square, x)])
            inner = either(op.Add, x, either(op.Mul, Scalar(_CUBE_COEFF, "cube_coeff"), cube))
            core = op.Tanh(either(op.Mul, Scalar(_SQRT_2_OVER_PI, "tanh_coeff"), inner))
        return either(op.Add, core, Scalar(1.0, "one"))

    def pattern(self, op, x):
        e = self._one_plus(op, x)
        half, two = Scalar(0.5, "half"), Scalar(2.0, "two")
        pair = (lambda a, b: op.Mul(b, a)) if self.swap else op.Mul
        if self.form == "a":  # (x * e) * 0.5
            return pair(either(op.Mul, x, e), half)
        if self.form == "a-div":  # (x * e) / 2
            return op.Div(either(op.Mul, x, e), two)
        if self.form == "b":  # x * (0.5 * e)
            return pair(x, pattern.OrValue([op.Mul(half, e), op.Mul(e, half), op.Div(e, two)]))
        return pair(pattern.OrValue([op.Mul(half, x), op.Mul(x, half), op.Div(x, two)]), e)  # (0.5 * x) * e

    # onnxscript passes the match's bindings as keywords; its base class declares (op, *args, **kwargs)
    def check(self, context, x, **bindings) -> MatchResult:  # type: ignore[override]
        result = MatchResult()
        if x.dtype not in FLOAT_TYPES:
            return result.fail(f"{x.name} is not a float tensor")
        r = rank(x)
        for name in _CONSTANTS:
            array = constant_array(bindings.get(name))
            if array is not None and array.ndim > (0 if r is None else r):
                return result.fail(f"constant {name} has rank {array.ndim}, more than {x.name}'s")
        return result

    def rewrite(self, op, x, **_):
        domain, op_type = self.target
        return op.op(op_type, x, _domain=domain, approximate=self.approximate)


_RULES: dict[Any, list[GeluRule]] = {}


def gelu_rules(target: tuple[str, str] | None) -> list[GeluRule]:
    """The rules for both GELU kinds and every grouping, emitting ``target``."""
    if target not in _RULES:
        _RULES[target] = [GeluRule(kind, form, swap, target) for kind in ("none", "tanh") for form, swap in _FORMS]
    return _RULES[target]


@register_pass
class FuseGelu(Pass):
    """Decomposed GELU (erf or tanh form) -> ``Gelu``."""

    name = "fuse_gelu"
    rule = "fuse decomposed GELU (erf and tanh forms) into one Gelu op"

    def _sites(self, model: ir.Model, ctx: PassContext):
        return find_sites(model, gelu_rules(fused_op(model, ctx, "Gelu", 20)))

    def find(self, model: ir.Model, ctx: PassContext) -> list[Finding]:
        findings = []
        for site in self._sites(model, ctx):
            x = site.bindings["x"]
            approximate = site.rule.approximate
            if site.blocked:
                fix = (f"the model's opset ({opset(model)}) predates Gelu (opset 20): run with --kiln-ops "
                       "(kiln build does) to fuse it into ai.kiln's Gelu, or export at opset 20")
            else:
                fix = f"fused automatically by pass fuse_gelu into one Gelu(approximate=\"{approximate}\")"
            findings.append(Finding(
                rule="unfused-gelu",
                title=f"GELU ({'erf' if approximate == 'none' else 'tanh'} form) computed as "
                      f"{len(site.nodes)} elementwise ops",
                nodes=[n.name for n in site.nodes],
                why=f"each of the {len(site.nodes)} ops reads and writes the whole tensor; one Gelu reads it once "
                    "and can run as the epilogue of the GEMM before it",
                fix=fix,
                pass_name=None if site.blocked else self.name,
                shapes=shapes_of([x, site.output]),
                details={"approximate": approximate},
            ))
        return findings

    def apply(self, model: ir.Model, ctx: PassContext) -> int:
        sites = self._sites(model, ctx)
        blocked = sum(1 for s in sites if s.blocked)
        if blocked:
            ctx.log.append(f"{blocked} decomposed GELU left as they are: opset {opset(model)} has no Gelu "
                           "(needs opset 20 or --kiln-ops)")
        return rewrite_sites(model, sites, ctx)
