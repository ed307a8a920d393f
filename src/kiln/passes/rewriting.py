"""What the passes use to read and edit the onnx-ir graph: unique node names and fresh names for new
nodes and values, constants and single consumers, shapes for findings, the model's opset, new
initializers, removing what a rewrite left unused, and the record of which original nodes a fused
node stands for (``kiln inspect`` and per-layer precision constraints read it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import onnx_ir as ir


def unique_node_names(graph: ir.Graph) -> None:
    """Give every node of ``graph`` a unique, non-empty name (passes and findings refer to nodes by name)."""
    seen: set[str] = set()
    for index, node in enumerate(graph):
        name = node.name or f"{node.op_type}_{index}"
        base, k = name, 1
        while name in seen:
            name = f"{base}_{k}"
            k += 1
        node.name = name
        seen.add(name)


def opset(model: ir.Model, domain: str = "") -> int:
    return model.opset_imports.get(domain, model.opset_imports.get("ai.onnx", 0)) if domain == "" else model.opset_imports.get(domain, 0)


def shape_of(value: ir.Value | None) -> list[int | str] | None:
    """A value's shape for findings: ints, and names for symbolic dims."""
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else str(getattr(d, "value", d)) for d in value.shape]


def shapes_of(values: Iterable[ir.Value | None]) -> dict[str, list[int | str]]:
    out = {}
    for v in values:
        s = shape_of(v)
        if v is not None and v.name and s is not None:
            out[v.name] = s
    return out


def constant_array(value: ir.Value | None):
    """The numpy value of an initializer or Constant output, or None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def single_consumer(value: ir.Value) -> ir.Node | None:
    """The one node reading ``value``, when it has exactly one use and is not a graph output."""
    if value.is_graph_output():
        return None
    users = {id(node): node for node, _ in value.uses()}
    if len(users) != 1 or len(list(value.uses())) != 1:
        return None
    return next(iter(users.values()))


_T = TypeVar("_T")


def connected_components(items: Sequence[_T], links: Iterable[tuple[_T, _T]]) -> list[list[_T]]:
    """``items`` split into the groups that ``links`` (pairs of items) join, by identity; each group
    keeps the order of ``items``, and groups come in the order of their first item."""
    index = {id(item): i for i, item in enumerate(items)}
    parent = list(range(len(items)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in links:
        parent[root(index[id(a)])] = root(index[id(b)])
    groups: dict[int, list[_T]] = {}
    for i, item in enumerate(items):
        groups.setdefault(root(i), []).append(item)
    return list(groups.values())


def attrs_of(node: ir.Node) -> Mapping[str, Any]:
    """A node's attributes as plain Python values."""
    return {name: attr.value for name, attr in node.attributes.items()}


FUSED_FROM = "kiln.fused_from"  # node metadata: JSON list of [name, op_type] of the nodes it replaced


def fused_from(node: ir.Node) -> list[tuple[str, str]]:
    """The original (name, op type) pairs a node stands for: what a pass fused into it, else itself."""
    text = node.metadata_props.get(FUSED_FROM)
    if text:
        try:
            return [(str(n), str(t)) for n, t in json.loads(text)]
        except (ValueError, TypeError):
            pass
    return [(node.name or "", node.op_type)]


def record_fusion(new_nodes: Sequence[ir.Node], old_nodes: Sequence[ir.Node]) -> None:
    """Note on each new node which original nodes it replaces (kiln inspect lists them per layer,
    and per-layer precision constraints still find them by name)."""
    if len(old_nodes) < 2 and all(FUSED_FROM not in n.metadata_props for n in old_nodes):
        return
    originals: list[tuple[str, str]] = []
    for node in old_nodes:
        for item in fused_from(node):
            if item not in originals:
                originals.append(item)
    for node in new_nodes:
        node.metadata_props[FUSED_FROM] = json.dumps(originals)


class Names:
    """Fresh node and value names for one graph: every name already used by an input, initializer,
    graph output, node or node output (subgraphs included) is taken."""

    def __init__(self, graph: ir.Graph) -> None:
        self.taken: set[str] = set()
        for value in [*graph.inputs, *graph.initializers.values(), *graph.outputs]:
            if value.name:
                self.taken.add(value.name)
        for node in graph.all_nodes():
            self.taken.update(v.name for v in node.outputs if v.name)
            if node.name:
                self.taken.add(node.name)

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            name = f"{base}_{k}"
            k += 1
        self.taken.add(name)
        return name


def add_initializer(graph: ir.Graph, names: Names, base: str, array) -> ir.Value:
    """A new initializer of ``graph`` holding the numpy ``array`` under a fresh name derived from ``base``."""
    name = names.fresh(base)
    value = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     shape=ir.Shape(array.shape), const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value
