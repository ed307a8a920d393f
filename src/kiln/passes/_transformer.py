"""What the transformer fusions (``fuse_layernorm``, ``fuse_gelu``, ``fuse_attention``) share.

The rules are onnxscript rewrite rules (``RewriteRuleClassBase``: ``pattern``, ``check``,
``rewrite``) and run through onnxscript's own matcher, with two kiln changes:

- ``Scalar`` is a constant pattern that reads constants the way kiln keeps them (initializers and
  ``Constant`` nodes alike; onnxscript's matcher only sees initializers) and accepts a
  single-element tensor of any rank. With a value it matches within ``CONST_RTOL`` relative (or,
  for a float16/bfloat16 constant, within that type's epsilon, the most its rounding can move the
  value); without one it matches any single-element numeric constant and binds its name. Because
  constants are checked while matching, an alternative such as ``Mul(x, 0.5)`` vs ``Mul(0.5, x)``
  is decided by the values and onnxscript's backtracking picks the right one.
- ``find_sites`` walks the graph from its outputs back, tries each rule whose root op matches, and
  keeps matches that share no node with an earlier (later-in-graph, so larger) one. ``find()``
  reports exactly these sites and ``apply()`` rewrites exactly the ones that are not blocked, so
  the two never disagree.

A rule's ``check`` holds every condition for the rewrite to compute what the nodes compute; its
``blocked`` says why a site that matches cannot be rewritten under the current context (no op to
emit at the model's opset without ``--kiln-ops``, a scale computed at run time, ...): such sites
are reported by ``find()`` with that reason and left alone by ``apply()``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import RewriteRule, RewriteRuleClassBase, pattern

from kiln.passes.framework import PassContext
from kiln.passes.rewriting import Names, constant_array, record_fusion, remove_unused_producers

# Relative tolerance for constants a pattern names (0.5, sqrt(2), 0.044715, ...): float32
# rounding moves them by at most 6e-8, so 1e-6 accepts every exporter's spelling and rejects
# anything that is a different number.
CONST_RTOL = 1e-6

FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
_TYPE_EPS: dict[ir.DataType | None, float] = {ir.DataType.FLOAT16: 2.0**-10, ir.DataType.BFLOAT16: 2.0**-7}


def const_scalar(value: ir.Value | None) -> float | None:
    """A single-element numeric (not bool) constant as a float, whatever its rank, else None."""
    array = constant_array(value)
    if array is None or array.size != 1 or array.dtype.kind in "bOSU":
        return None
    try:
        return float(array.astype(np.float64).reshape(()))
    except (TypeError, ValueError):
        return None


def const_dtype(value: ir.Value) -> ir.DataType | None:
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.dtype


class Scalar(pattern.Constant):
    """A single-element constant in a pattern: equal to ``value`` within the tolerance, or (no
    value) any numeric constant, bound to ``name`` so ``check``/``rewrite`` can read it."""

    def __init__(self, value: float | None = None, name: str | None = None) -> None:
        super().__init__(0.0 if value is None else value)
        self.expected = value
        self._name = name

    def clone(self, node_map: dict) -> Scalar:
        del node_map
        return Scalar(self.expected, self._name)

    def __str__(self) -> str:
        return self._name or (str(self.expected) if self.expected is not None else "scalar")


class _Matcher(pattern.SimplePatternMatcher):
    """onnxscript's matcher; ``Scalar`` constants are read through ``Constant`` nodes too. This
    overrides the matcher's private ``_match_constant`` hook, which is why pyproject.toml pins
    onnxscript to one minor version."""

    def _match_constant(self, pattern_constant: pattern.Constant, value: ir.Value) -> bool:
        if not isinstance(pattern_constant, Scalar):
            return super()._match_constant(pattern_constant, value)
        number = const_scalar(value)
        if number is None:
            return self.fail(f"{value.name} is not a single-element constant")
        if pattern_constant.expected is None:
            return True
        expected = float(pattern_constant.expected)
        tol = max(CONST_RTOL, _TYPE_EPS.get(const_dtype(value), 0.0))
        if not math.isclose(number, expected, rel_tol=tol, abs_tol=0.0):
            return self.fail(f"{value.name} = {number}, expected {expected}")
        return True


def either(op_builder: Any, a: Any, b: Any) -> Any:
    """``op(a, b)`` or ``op(b, a)``: the two operand orders of a commutative op."""
    return pattern.OrValue([op_builder(a, b), op_builder(b, a)])


class FusionRule(RewriteRuleClassBase):
    """A kiln fusion rule: an onnxscript rule class whose matches become findings and rewrites.

    ``root_op`` is the op type of the pattern's output node (only such nodes are tried);
    ``target`` is the (domain, op_type) to emit, or None when the model's opset has no such op
    and ``--kiln-ops`` is off; ``blocked`` returns why a matching site cannot be rewritten."""

    root_op = ""
    # True: a match whose inner values are read outside it is still a site, blocked with the reason
    # (find() reports it); False: it is no match at all, so a smaller form of the pattern may match
    report_unremovable = False

    def __init__(self, name: str, target: tuple[str, str] | None) -> None:
        super().__init__(name)
        self.target = target
        self._compiled: RewriteRule | None = None

    def compiled(self) -> RewriteRule:
        if self._compiled is None:
            self._compiled = RewriteRule(self.pattern, self.rewrite, self.check, matcher=_Matcher, name=self.name)
        return self._compiled

    def blocked(self, bindings: dict[str, Any]) -> str | None:
        """Why this match cannot be rewritten under the current context, or None."""
        return None if self.target is not None else "no op to emit at this opset without --kiln-ops"


@dataclass
class Site:
    """One place a rule matched: its root node, its nodes in graph order, the pattern bindings."""

    rule: FusionRule
    root: ir.Node
    nodes: list[ir.Node]
    bindings: dict[str, Any]
    blocked: str | None
    output: ir.Value


def find_sites(model: ir.Model, rules: Sequence[FusionRule]) -> list[Site]:
    """Every non-overlapping match of ``rules`` in the main graph, in graph order. Nodes are tried
    from the last back, so the largest form of a pattern (LayerNorm with its bias Add) claims its
    nodes before a smaller one (the same LayerNorm without it) could."""
    graph = model.graph
    order = {id(node): i for i, node in enumerate(graph)}
    claimed: set[int] = set()
    sites: list[Site] = []
    for node in reversed(list(graph)):
        if id(node) in claimed:
            continue
        for rule in rules:
            if node.op_type != rule.root_op or node.domain not in ("", "ai.onnx"):
                continue
            match = rule.compiled().match(model, graph, node, check_nodes_are_removable=not rule.report_unremovable)
            if not match:
                continue
            nodes = sorted(match.nodes, key=lambda n: order[id(n)])
            if any(id(n) in claimed for n in nodes):
                continue
            claimed.update(id(n) for n in nodes)
            bindings = dict(match.bindings)
            blocked = outside_reader(nodes, match.outputs[0]) or rule.blocked(bindings)
            sites.append(Site(rule, node, nodes, bindings, blocked, match.outputs[0]))
            break
    sites.sort(key=lambda s: order[id(s.nodes[0])])
    return sites


def outside_reader(nodes: Sequence[ir.Node], output: ir.Value) -> str | None:
    """Why ``nodes`` cannot be replaced: an inner value read outside them or a graph output."""
    inside = {id(n) for n in nodes}
    for node in nodes:
        for value in node.outputs:
            if value is output:
                continue
            if value.is_graph_output():
                return f"the inner value {value.name} is a graph output"
            for user, _ in value.uses():
                if id(user) not in inside:
                    return f"the inner value {value.name} is also read by {user.name} ({user.op_type})"
    return None


def rewrite_sites(model: ir.Model, sites: Iterable[Site], ctx: PassContext) -> int:
    """Rewrite every site that is not blocked; returns how many were rewritten. New nodes get
    unique names derived from the site's root, new values names and (where the rule set them)
    dtypes and shapes; the replaced output keeps its name; nodes and initializers only the
    replaced nodes read are removed once unused."""
    graph = model.graph
    names = Names(graph)
    count = 0
    for site in sites:
        if site.blocked:
            continue
        delta = site.rule.compiled().try_rewrite(model, graph, site.root)
        if delta is None:  # the graph changed under the site (cannot happen for disjoint sites)
            ctx.log.append(f"{site.root.name}: no longer matches; left as it is")
            continue
        base = site.root.name or site.rule.name
        for node in delta.new_nodes:
            node.name = names.fresh(f"{base}/{node.op_type}")
            for i, value in enumerate(node.outputs):
                if not value.name:
                    value.name = names.fresh(f"{node.name}_output_{i}")
        inputs = [v for n in delta.match.nodes for v in n.inputs if v is not None]
        record_fusion(delta.new_nodes, delta.match.nodes)
        ir.convenience.replace_nodes_and_values(
            graph, site.root, delta.match.nodes, delta.new_nodes, delta.match.outputs, delta.new_outputs
        )
        remove_unused_producers(graph, inputs)
        count += 1
    return count


# -- shapes -------------------------------------------------------------------------------------
def numel(value: ir.Value | None, ctx: PassContext) -> int | None:
    """Elements of ``value`` with symbolic dims taken from ``ctx.dims``, or None if unknown."""
    if value is None:
        return None
    dims = ctx.concrete(value.shape)
    return None if dims is None else int(np.prod(dims, dtype=np.int64))


def rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)
