"""Drop shuffles that do nothing, and collapse shuffle chains into one.

Playbook rule: "a shuffle whose layout does not change needs no kernel". Identity, Transpose,
Reshape, Flatten, Squeeze and Unsqueeze only move data; a chain of them either keeps the memory
order of the elements (then it is one Reshape: a view, no kernel), is one permutation (one
Transpose), or does nothing at all.

Rewrites, along each chain of shuffles in which every value between two of them has that one
consumer (and is not a graph output):

1. Identity -> nothing.
2. Transpose with the identity permutation -> nothing.
3. Transpose(Transpose(x, p1), p2) (any number of them) -> one Transpose with the composed
   permutation ``p1[p2[i]]``, or nothing when that is the identity.
4. A Transpose that only moves size-1 axes (the other axes keep their order, so the memory layout
   is unchanged) -> one Reshape.
5. Runs of Reshape / Flatten / Squeeze / Unsqueeze (and the Transposes of 4.) -> one Reshape to
   the run's final shape, or nothing when the final shape is the input's shape. A single such op
   whose output shape equals its input shape -> nothing.

Runs that cancel make their neighbours meet: ``Reshape, Transpose(p), Transpose(p^-1), Reshape``
becomes one Reshape. A rewrite needs no knowledge of how each op spells its shape (Reshape's
``allowzero``, Squeeze/Unsqueeze axes as attribute before opset 13 or as input from 13, Flatten's
axis, negative axes): it reads the inferred shapes of the run's input and output, so it fires only
when those are known. The new Reshape's shape is a constant: known sizes written out, a symbolic
size at the same position as the same symbol in the input copied with 0, one other unknown size
as -1 (``allowzero`` stays 0). Shape arithmetic that fed a removed Reshape is removed when nothing
else reads it.

Graph outputs keep their names: when a run's output is a graph output and the run becomes
nothing, the run's input takes the output's name; when that input cannot be renamed (a graph
input, an initializer, another graph output) the run becomes one Identity instead (a lone Identity
then stays as it is).

Does not fire when: a value inside a run has another consumer or is a graph output (the run is
split there), the shapes of a run's input or output are unknown (rank unknown, or more than one
size unknown that is not the same symbol at the same position), a size is 0, or a Transpose's
``perm`` is missing and the rank unknown. Below opset 5 (no Reshape with a shape input) only the
rewrites that need no Reshape (1-3, and runs that do nothing) fire.

Hand-written rather than onnxscript rewrite rules: runs are of any length and mix op types, which a
fixed pattern cannot say (onnxscript's TransposeTranspose / ReshapeReshape rules take pairs and
leave Identity nodes behind). ``find()`` and ``apply()`` share one planner (``_rewrites``).

The shapes are the model's own (declared or inferred at load): a model that declares a wrong shape
for a value inside a run gets a Reshape to that wrong shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import onnx_ir as ir

from kiln.passes._shuffles import (
    compose,
    int64s,
    keeps_layout,
    perm_of,
    reshape_target,
    same_shape,
)
from kiln.passes.framework import Finding, Pass, PassContext, register_pass
from kiln.passes.rewriting import (
    Names,
    add_initializer,
    node_names,
    opset,
    record_fusion,
    remove_unused_producers,
    shapes_of,
    unique_node_names,
)

SHUFFLES = ("Identity", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze")


@dataclass
class _Unit:
    """Consecutive shuffles of one chain whose composite is one thing: "identity" (nothing),
    "perm" (one Transpose), "reshape" (one Reshape) or "opaque" (left alone)."""

    kind: str
    nodes: list[ir.Node]
    perm: list[int] | None = None
    changed: bool = False  # more than one node, or a single node that becomes something else
    notes: list[str] = field(default_factory=list)

    @property
    def source(self) -> ir.Value:
        source = self.nodes[0].inputs[0]
        assert source is not None, "_is_shuffle: a shuffle reads a data input"
        return source

    @property
    def out(self) -> ir.Value:
        return self.nodes[-1].outputs[0]


def _is_shuffle(node: ir.Node) -> bool:
    return (node.op_type in SHUFFLES and node.domain in ("", "ai.onnx") and len(node.outputs) == 1
            and bool(node.inputs) and node.inputs[0] is not None)


def _next_in_chain(node: ir.Node) -> ir.Node | None:
    """The shuffle that is the one consumer of ``node``'s output, reading it as its data input."""
    out = node.outputs[0]
    if out.is_graph_output():
        return None
    uses = list(out.uses())
    if len(uses) != 1:
        return None
    consumer, index = uses[0]
    if index != 0 or not _is_shuffle(consumer) or consumer.graph is not node.graph:
        return None
    return consumer


def _chains(graph: ir.Graph) -> list[list[ir.Node]]:
    """Maximal chains of shuffles linked through single-consumer values, in graph order."""
    followers = {}
    for node in graph:
        if _is_shuffle(node):
            nxt = _next_in_chain(node)
            if nxt is not None:
                followers[id(node)] = nxt
    linked = {id(n) for n in followers.values()}
    chains = []
    for node in graph:
        if _is_shuffle(node) and id(node) not in linked:
            chain = [node]
            while id(chain[-1]) in followers:
                chain.append(followers[id(chain[-1])])
            chains.append(chain)
    return chains


def _unit(node: ir.Node, reshape_ok: bool) -> _Unit:
    """The unit of one shuffle node."""
    x, y = node.inputs[0], node.outputs[0]
    assert x is not None, "_is_shuffle: a shuffle reads a data input"
    if node.op_type == "Identity":
        return _Unit("identity", [node])
    if node.op_type == "Transpose":
        perm = perm_of(node, None if x.shape is None else len(x.shape))
        if perm is None or sorted(perm) != list(range(len(perm))):
            return _Unit("opaque", [node])
        if perm == sorted(perm):
            return _Unit("identity", [node], notes=["identity permutation"])
        if reshape_ok and keeps_layout(perm, x.shape) and _expressible(x.shape, y.shape):
            return _Unit("reshape", [node], notes=["moves only size-1 axes"])
        return _Unit("perm", [node], perm=perm)
    if x.shape is None or y.shape is None:
        return _Unit("opaque", [node])
    if same_shape(x.shape, y.shape):
        return _Unit("identity", [node], notes=["output shape equals input shape"])
    return _Unit("reshape", [node]) if reshape_ok else _Unit("opaque", [node])


def _expressible(source: ir.Shape | None, target: ir.Shape | None) -> bool:
    return same_shape(source, target) or reshape_target(source, target) is not None


def _merge(below: _Unit, above: _Unit) -> _Unit | None:
    """One unit for ``below`` followed by ``above``, or None when they do not compose."""
    nodes = below.nodes + above.nodes
    notes = below.notes + above.notes
    if "opaque" in (below.kind, above.kind):
        return None
    if "identity" in (below.kind, above.kind):
        other = above if below.kind == "identity" else below
        if other.kind == "reshape" and not _expressible(below.source.shape, above.out.shape):
            return None
        return _Unit(other.kind, nodes, perm=other.perm, changed=True, notes=notes)
    if below.kind == above.kind == "perm":
        assert below.perm is not None and above.perm is not None, "a perm unit has its permutation"
        perm = compose(below.perm, above.perm)
        if perm == sorted(perm):
            return _Unit("identity", nodes, changed=True, notes=[*notes, "permutations cancel"])
        return _Unit("perm", nodes, perm=perm, changed=True, notes=notes)
    if below.kind == above.kind == "reshape":
        source, out = below.source.shape, above.out.shape
        if same_shape(source, out):
            return _Unit("identity", nodes, changed=True, notes=[*notes, "shapes cancel"])
        if reshape_target(source, out) is not None:
            return _Unit("reshape", nodes, changed=True, notes=notes)
    return None


def _units(chain: list[ir.Node], reshape_ok: bool) -> list[_Unit]:
    """Merge a chain's shuffles left to right; a unit that becomes nothing merges on downwards."""
    stack: list[_Unit] = []
    for node in chain:
        unit = _unit(node, reshape_ok)
        while stack:
            merged = _merge(stack[-1], unit)
            if merged is None:
                break
            stack.pop()
            unit = merged
        stack.append(unit)
    return stack


def _rewrites(model: ir.Model) -> list[_Unit]:
    """The units ``apply()`` rewrites, in graph order."""
    reshape_ok = opset(model) >= 5
    found = []
    for chain in _chains(model.graph):
        for unit in _units(chain, reshape_ok):
            if unit.kind == "opaque":
                continue
            if unit.kind == "reshape" and reshape_target(unit.source.shape, unit.out.shape) is None:
                continue  # same shape, but no constant Reshape says it (a zero-size axis)
            if unit.kind == "identity":
                if len(unit.nodes) == 1 and unit.nodes[0].op_type == "Identity" and not _can_vanish(unit):
                    continue  # must stay an Identity to keep a graph output's name
                found.append(unit)
            elif unit.changed or (unit.kind == "reshape" and unit.nodes[0].op_type == "Transpose"):
                found.append(unit)
    return found


def _can_vanish(unit: _Unit) -> bool:
    """Whether the unit's output can be replaced by its input outright (graph output names kept)."""
    if not unit.out.is_graph_output():
        return True
    source = unit.source
    producer = source.producer()
    return (producer is not None and producer.graph is unit.nodes[0].graph and not source.is_graph_output()
            and not source.is_graph_input() and not source.is_initializer())


def _describe(unit: _Unit) -> str:
    chain = " -> ".join(n.op_type for n in unit.nodes)
    if unit.kind == "identity":
        result = "nothing" if _can_vanish(unit) else "one Identity (keeps a graph output's name)"
    elif unit.kind == "perm":
        result = f"one Transpose (perm {unit.perm})"
    else:
        result = "one Reshape (a view)"
    notes = f" ({', '.join(dict.fromkeys(unit.notes))})" if unit.notes else ""
    return f"{chain} is {result}{notes}"


@register_pass
class DropNoopShuffles(Pass):
    name: ClassVar[str] = "drop_noop_shuffles"
    rule: ClassVar[str] = "a shuffle whose layout does not change needs no kernel"

    def find(self, model: ir.Model, ctx: PassContext) -> list[Finding]:
        unique_node_names(model)
        return [self._finding(unit, ctx) for unit in _rewrites(model)]

    def apply(self, model: ir.Model, ctx: PassContext) -> int:
        unique_node_names(model)
        graph = model.graph
        names = Names(graph)
        units = _rewrites(model)
        for unit in units:
            ctx.log.append(f"{unit.nodes[-1].name}: {_describe(unit)}")
            self._rewrite(graph, unit, names)
        return len(units)

    def _rewrite(self, graph: ir.Graph, unit: _Unit, names: Names) -> None:
        source, out, last = unit.source, unit.out, unit.nodes[-1]
        side_inputs = [v for n in unit.nodes for v in n.inputs[1:]]
        if unit.kind == "identity" and _can_vanish(unit):
            if out.is_graph_output():
                name = out.name
                out.name = names.fresh(f"{name}_dropped")
                ir.convenience.replace_all_uses_with(out, source, replace_graph_outputs=True)
                source.name = name
            else:
                ir.convenience.replace_all_uses_with(out, source)
            graph.remove(unit.nodes, safe=True)
        else:
            if unit.kind == "identity":
                new = ir.Node("", "Identity", [source])
            elif unit.kind == "perm":
                assert unit.perm is not None, "a perm unit has its permutation"
                new = ir.Node("", "Transpose", [source], attributes=[ir.AttrInt64s("perm", unit.perm)])
            else:
                target = reshape_target(source.shape, out.shape)
                assert target is not None, "_rewrites keeps only reshape units a constant target says"
                shape = add_initializer(graph, names, f"{last.name}/shape", int64s(target))
                new = ir.Node("", "Reshape", [source, shape])
            same = [n.name for n in unit.nodes if n.op_type == new.op_type]
            new.name = same[-1] if same else names.fresh(f"{last.name}/{new.op_type}")
            record_fusion([new], unit.nodes)
            ir.convenience.replace_nodes_and_values(graph, last, unit.nodes, [new], [out], [new.outputs[0]])
        remove_unused_producers(graph, side_inputs)

    def _finding(self, unit: _Unit, ctx: PassContext) -> Finding:
        return Finding(
            rule="noop-shuffle",
            title=_describe(unit),
            nodes=node_names(unit.nodes),
            why="each shuffle node is a kernel launch or a copy unless the runtime proves it a view; "
                "shuffles that cancel or keep the memory layout need no kernel at all",
            fix=f"fixed automatically by pass {self.name}",
            pass_name=self.name,
            shapes=shapes_of([unit.source, *(n.outputs[0] for n in unit.nodes)]),
            details={"kind": unit.kind, "perm": unit.perm},
        )

