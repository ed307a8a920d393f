"""Fuse the residual Add before a LayerNormalization into one ``ai.kiln::AddLayerNormalization``.

Playbook rule: "fuse LayerNorm": a transformer block ends in ``LayerNorm(x + residual)``; the Add
writes the sum to memory and the LayerNorm reads it back. Fused, the builder's LayerNorm layer (one
Triton kernel) reads both operands and writes the normalized result once.

Rewrite, matched with onnxscript's pattern matcher (the LayerNormalization standard, or the
``ai.kiln`` op of the same semantics that ``fuse_layernorm`` writes for older opsets):

1. ``LayerNormalization(Add(A, R), Scale[, B])`` -> ``AddLayerNormalization(A, R, Scale[, B])``
   with the LayerNormalization's attributes (axis, epsilon, stash_type), named after the Add.

Does not fire when: the Add's output has another consumer or is a graph output; either operand of
the Add is a constant (a bias, not a residual); the operands' dtypes differ or are not float16,
bfloat16 or float; their shapes provably differ (known ranks or sizes that disagree); Scale, or B
where present, is not a constant; the LayerNormalization's Mean or InvStdDev output is read; the
Add has attributes (an old-opset broadcast). Only the main graph is rewritten; the rewrite needs an
``ai.kiln`` op, so the pass runs only when ``ctx.kiln_ops``.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.pattern import Pattern

from kiln.errors import KilnError
from kiln.passes.framework import KILN_DOMAIN, KILN_DOMAIN_VERSION, Finding, Pass, PassContext, register_pass
from kiln.passes.rewriting import constant_array, node_names, record_fusion, shapes_of, unique_node_names

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)

def _pattern(domain: str) -> Pattern:
    def build(op, a, r, scale):
        total = op.Add(a, r, _outputs=["sum"])
        return op.LayerNormalization(total, scale, _allow_other_inputs=True, _domain=domain, _outputs=["y"])

    return Pattern(build, name=f"add-layernorm{'-kiln' if domain else ''}")


_PATTERNS = {domain: _pattern(domain) for domain in ("", KILN_DOMAIN)}


def _provably_different(a: ir.Value, b: ir.Value) -> bool:
    if a.shape is None or b.shape is None:
        return False
    if len(a.shape) != len(b.shape):
        return True
    return any(isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(a.shape, b.shape, strict=True))


def _matches(model: ir.Model) -> list[tuple[ir.Node, ir.Node]]:
    """(Add, LayerNormalization) pairs to fuse (the one matcher of find and apply)."""
    found = []
    for node in model.graph:
        domain = KILN_DOMAIN if node.domain == KILN_DOMAIN else "" if node.domain in ("", "ai.onnx") else None
        if node.op_type != "LayerNormalization" or domain is None:
            continue
        match = _PATTERNS[domain].match(model, model.graph, node)
        if not match:
            continue
        b = dict(match.bindings)
        a, r, add = b["a"], b["r"], b["sum"].producer()
        if add.attributes or constant_array(a) is not None or constant_array(r) is not None:
            continue
        # Add takes one type (a pass may have left one operand's unset); LayerNormalization's X and Scale share it
        dtypes = {v.dtype for v in (a, r, b["scale"]) if v.dtype is not None}
        if len(dtypes) != 1 or not dtypes <= set(FLOAT_TYPES) or _provably_different(a, r):
            continue
        if any(v is not None and constant_array(v) is None for v in node.inputs[1:]):
            continue
        if any(v.uses() or v.is_graph_output() for v in node.outputs[1:]):
            continue
        found.append((add, node))
    return found


@register_pass
class FuseLayerNormResidual(Pass):
    name = "fuse_layernorm_residual"
    rule = "fuse the residual Add into the LayerNorm after it"
    needs_kiln_ops = True

    def find(self, model: ir.Model, ctx: PassContext) -> list[Finding]:
        unique_node_names(model)
        return [Finding(
            rule="layernorm-residual",
            title="residual Add + LayerNormalization run as 2 kernels",
            nodes=node_names([add, norm]),
            why="the Add writes the sum to memory and the LayerNorm reads it back; "
                "fused, the sum never leaves registers",
            fix=f"fixed automatically by pass {self.name} (emits ai.kiln::AddLayerNormalization: the builder, "
                "or kiln optimize --kiln-ops)",
            pass_name=self.name,
            shapes=shapes_of([*add.inputs, norm.outputs[0]]),
        ) for add, norm in _matches(model)]

    def apply(self, model: ir.Model, ctx: PassContext) -> int:
        if not ctx.kiln_ops:
            raise KilnError(
                f"pass {self.name} emits ai.kiln::AddLayerNormalization; run it with kiln_ops=True (--kiln-ops)")
        graph = model.graph
        unique_node_names(model)
        count = 0
        for add, norm in _matches(model):
            node = ir.Node(KILN_DOMAIN, "AddLayerNormalization", [*add.inputs, *norm.inputs[1:]],
                           attributes=list(norm.attributes.values()), name=add.name)
            record_fusion([node], [add, norm])
            old = norm.outputs[0]
            ir.convenience.replace_nodes_and_values(graph, norm, [add, norm], [node], [old], [node.outputs[0]])
            ctx.log.append(f"{norm.name}: residual Add {add.name} + LayerNormalization -> AddLayerNormalization")
            count += 1
        if count:
            model.opset_imports.setdefault(KILN_DOMAIN, KILN_DOMAIN_VERSION)
        return count
