"""Fold what is computed from constants alone, and remove nodes whose results nothing uses.

Playbook rule: work that does not depend on the input is done once at build time, not on every
run; a node nobody reads is not run at all.

Rewrites, in this order:

1. onnxscript's constant folder (``onnxscript.optimizer.fold_constants``): every node whose
   inputs are all constants (initializers, Constant nodes, values it folded already) is evaluated
   once (onnx's reference evaluator) and becomes an initializer of the same name. Its partial
   evaluators also fold shape arithmetic where shapes are static (``Shape`` / ``Size`` of a value
   whose shape is known -> constant) and simplify nodes that do nothing (Identity, Dropout in
   inference, Cast to the same type, Reshape/Expand to the shape the value already has), wiring
   consumers to the input directly.
2. Constant nodes the folder created (for folded shapes) become initializers too, so every folded
   value is an initializer.
3. Dead-code removal (``kiln.passes._cleanup.remove_dead_code``, onnx-ir's passes): nodes none of
   whose outputs is used (transitively) or is a graph output are removed, subgraphs included, then
   unused initializers, and optional outputs nothing reads are dropped from the nodes that stay.
   Anything a graph output depends on stays. A weight that only the untaken branch of an ``If``
   the folder resolved read goes too (it would otherwise be stored beside its folded copy).

Size limit: a folded result is kept only when it does not make the model hold a large constant
twice. Folding a node whose constant inputs exceed ``INPUT_SIZE_LIMIT`` elements (16 Mi) is not
tried (it would take long in the reference evaluator), except a Transpose that is its large
input's only reader. A result larger than ``OUTPUT_SIZE_LIMIT`` elements (1 Mi, 4 MB in fp32) is
stored only when the inputs that become unused free at least as many elements as it adds (a Cast
or Transpose of a weight read only there is folded; one of a weight that is also read elsewhere,
e.g. GPT-2's tied embedding, is not). ConstantOfShape, QuantizeLinear and DequantizeLinear are
never folded (onnxscript's default: they keep models small and quantization visible), nor are
random ops, control flow, or nodes reading a graph input.

Graph outputs keep their names (the folder renames the value that replaces one to the output's
name). ``find()`` runs the same rewrite on a clone of the model (weights shared, not copied) and
reports what it removed, one finding per group:

- "constant-subgraph": connected nodes computed from constants alone, folded into initializers;
- "static-shape": shape arithmetic on a value whose shape is static (a Shape/Size of an activation);
- "simplified-node": nodes the folder's partial evaluators removed or replaced (Identity, ...);
- "dead-node": one per node whose results nothing used to begin with;
- "dead-output": a node that stays but loses optional outputs nothing reads.

Does not fire on nodes of domains onnx's reference evaluator does not know (ai.kiln, custom ops),
on nodes past the size limits, or when nothing is constant and nothing is dead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import onnx_ir as ir
import onnxscript.optimizer

from kiln.ops import op_facts
from kiln.passes._cleanup import remove_dead_code
from kiln.passes.framework import Finding, Pass, PassContext, register_pass
from kiln.passes.rewriting import connected_components, unique_node_names

INPUT_SIZE_LIMIT = 1 << 24  # elements of a constant input above which folding is not tried
OUTPUT_SIZE_LIMIT = 1 << 20  # elements of a folded result above which it must free as much as it adds


@dataclass
class _Before:
    """What a node was before the rewrite (its inputs are detached once it is removed)."""

    node: ir.Node
    name: str
    op_type: str
    outputs: list[ir.Value]
    output_info: list[tuple[str, ir.Shape | None, ir.DataType | None]]  # names are cleared on removal
    inputs: list[ir.Value | None]
    const_inputs: list[bool]
    dead: bool


@dataclass
class _Group:
    rule: str
    nodes: list[_Before] = field(default_factory=list)


def _dead_nodes(graph: ir.Graph) -> set[int]:
    """Ids of the nodes of ``graph`` none of whose outputs is (transitively) used or a graph output."""
    dead: set[int] = set()
    for node in reversed(graph):
        live = False
        for out in node.outputs:
            if out.is_graph_output() or any(id(user) not in dead or user.graph is not graph for user, _ in out.uses()):
                live = True
                break
        if not live:
            dead.add(id(node))
    return dead


def _snapshot(model: ir.Model) -> list[_Before]:
    dead: set[int] = _dead_nodes(model.graph)
    for sub in model.graph.subgraphs():
        dead |= _dead_nodes(sub)
    out = []
    for node in model.graph.all_nodes():
        inputs = list(node.inputs)
        const = [v is not None and not v.is_graph_input() and ir.convenience.get_const_tensor(v) is not None
                 for v in inputs]
        info = [(v.name or "", v.shape, v.dtype) for v in node.outputs]
        out.append(_Before(node, node.name or node.op_type, node.op_type, list(node.outputs), info, inputs, const,
                           id(node) in dead))
    return out


def _lift_new_constants(graph: ir.Graph, existing: set[int]) -> None:
    """Constant nodes created by the folder -> initializers of the same name."""
    for node in list(graph):
        if id(node) in existing or node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        out = node.outputs[0]
        tensor = ir.convenience.get_const_tensor(out)
        if tensor is None or out.is_graph_output():
            continue
        name = out.name
        # a TensorProtocol's dims are typed as SymbolicDimProtocol, which ir.Shape's signature does not list
        shape = ir.Shape(tensor.shape.dims)  # type: ignore[arg-type]
        value = ir.Value(name=None, type=ir.TensorType(tensor.dtype), shape=shape, const_value=tensor)
        ir.convenience.replace_all_uses_with(out, value)
        graph.remove(node, safe=True)
        out.name = None
        value.name = name
        graph.register_initializer(value)


_HIDDEN_DOMAIN = "kiln.not_folded"


def _fold(model: ir.Model) -> list[_Group]:
    """Run the rewrite on ``model`` in place; return what it removed, grouped for findings."""
    before = _snapshot(model)
    existing = {id(b.node) for b in before}
    folder = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folder.level
    folder.setLevel(logging.ERROR)  # its "skipping op X" notes are not the user's business
    # The folder's partial evaluators run on sequence ops (kiln.ops' ``sequence`` fact) whatever
    # should_fold says, and some raise (SplitToSequence); folding a sequence gains nothing, and kiln's
    # executor runs them as they are. Those nodes sit in a domain the model does not import while it
    # runs, which the folder skips, and get their own domain back afterwards.
    hidden = [n for n in model.graph.all_nodes() if n.domain in ("", "ai.onnx") and op_facts(n.op_type).sequence]
    domains = [n.domain for n in hidden]
    for node in hidden:
        node.domain = _HIDDEN_DOMAIN
    try:
        onnxscript.optimizer.fold_constants(
            model, input_size_limit=INPUT_SIZE_LIMIT, output_size_limit=OUTPUT_SIZE_LIMIT
        )
    finally:
        folder.setLevel(level)
        for node, domain in zip(hidden, domains):
            node.domain = domain
    _lift_new_constants(model.graph, existing)
    remove_dead_code(model)

    removed = [b for b in before if b.node.graph is None]
    groups: list[_Group] = [_Group("dead-node", [b]) for b in removed if b.dead]
    live = [b for b in removed if not b.dead]
    producer_of = {id(out): b for b in live for out in b.outputs}
    links = [(producer_of[id(value)], b) for b in live for value in b.inputs
             if value is not None and id(value) in producer_of]
    for nodes in connected_components(live, links):
        group = _Group("", nodes)
        inside = {id(out) for b in group.nodes for out in b.outputs}
        outside = [(b, i) for b in group.nodes for i, v in enumerate(b.inputs) if v is not None and id(v) not in inside]
        if all(b.const_inputs[i] for b, i in outside):
            group.rule = "constant-subgraph"
        elif all(b.const_inputs[i] or b.op_type in ("Shape", "Size") for b, i in outside):
            group.rule = "static-shape"
        else:
            group.rule = "simplified-node"
        groups.append(group)
    for b in before:
        if b.node.graph is not None and len(b.node.outputs) < len(b.outputs):
            groups.append(_Group("dead-output", [b]))
    order = {id(b.node): i for i, b in enumerate(before)}
    groups.sort(key=lambda g: order[id(g.nodes[0].node)])
    return groups


_TITLES = {
    "constant-subgraph": "computed from constants alone: folded into initializers at build time",
    "static-shape": "shape arithmetic on static shapes: folded into constants",
    "simplified-node": "does nothing at run time (identity, no-op cast/reshape/expand, inference dropout)",
    "dead-node": "result never used: removed",
    "dead-output": "optional outputs never used: dropped",
}


@register_pass
class FoldConstants(Pass):
    name: ClassVar[str] = "fold_constants"
    rule: ClassVar[str] = "compute once at build time what depends only on constants; drop dead nodes"

    def find(self, model: ir.Model, ctx: PassContext) -> list[Finding]:
        unique_node_names(model)
        return [self._finding(group, ctx) for group in _fold(model.clone())]

    def apply(self, model: ir.Model, ctx: PassContext) -> int:
        unique_node_names(model)
        groups = _fold(model)
        for group in groups:
            ctx.log.append(f"{group.rule}: {', '.join(b.name for b in group.nodes)}")
        return len(groups)

    def _finding(self, group: _Group, ctx: PassContext) -> Finding:
        ops = sorted({b.op_type for b in group.nodes})
        outputs = [info for b in group.nodes for info in b.output_info]
        if group.rule == "dead-output":
            outputs = outputs[len(group.nodes[0].node.outputs):]
        shapes = {name: [d if isinstance(d, int) else str(getattr(d, "value", d)) for d in shape]
                  for name, shape, _ in outputs if name and shape is not None}
        return Finding(
            rule=group.rule,
            title=f"{'/'.join(ops)} ({len(group.nodes)} node{'s' * (len(group.nodes) > 1)}): {_TITLES[group.rule]}",
            nodes=[b.name for b in group.nodes],
            why="every run recomputes it (or computes something nobody reads), launching kernels and moving "
                "bytes for a result that is the same each time",
            fix=f"fixed automatically by pass {self.name}",
            pass_name=self.name,
            shapes=shapes,
            details={"ops": ops},
        )
