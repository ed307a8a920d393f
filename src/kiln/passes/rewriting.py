"""What the passes use to read and edit the onnx-ir graph: unique node names and fresh names for new
nodes and values, constants and single consumers, shapes for findings, the model's opset, new
initializers, removing what a rewrite left unused, and the record of which original nodes a fused
node stands for (``kiln inspect`` and per-layer precision constraints read it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass


class _NodeNames:
    """onnx-ir's ``NameFixPass`` names: an unnamed node of the main graph is called ``<Op>_<index>``
    (its position), so names stay readable and stable; a repeated name gets ``_1``, ``_2``, ..."""

    def __init__(self, graph: ir.Graph) -> None:
        self.index = {id(node): i for i, node in enumerate(graph)}

    def generate_node_name(self, node: ir.Node) -> str:
        if node.name:
            return node.name
        index = self.index.get(id(node))
        return f"{node.op_type}_{index}" if index is not None else node.op_type

    def generate_value_name(self, value: ir.Value) -> str:
        return value.name or "v"


def unique_node_names(model: ir.Model) -> None:
    """Give every node a unique, non-empty name (passes and findings refer to nodes by name), with
    onnx-ir's ``NameFixPass`` (which also names unnamed values and subgraph nodes)."""
    NameFixPass(_NodeNames(model.graph))(model)


def node_names(nodes: Iterable[ir.Node]) -> list[str]:
    """The names of nodes that ``unique_node_names`` has named (a finding lists its nodes by name)."""
    names = []
    for node in nodes:
        assert node.name is not None, "unique_node_names runs before a finding names its nodes"
        names.append(node.name)
    return names


def opset(model: ir.Model, domain: str = "") -> int:
    if domain == "":
        return model.opset_imports.get(domain, model.opset_imports.get("ai.onnx", 0))
    return model.opset_imports.get(domain, 0)


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


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of an initializer or a ``Constant`` node's output, else None."""
    if value is None:
        return None
    try:
        tensor = ir.convenience.get_const_tensor(value)
    except ValueError:  # a malformed Constant node: not a constant we can read
        return None
    return None if tensor is None else np.asarray(tensor.numpy())


def itemsize(value: ir.Value) -> float:
    """Bytes per element of ``value`` for estimates (4 when its dtype is unknown)."""
    dtype = value.dtype
    return float(dtype.itemsize) if dtype is not None else 4.0


def symbol(d: int | ir.SymbolicDim | None) -> str | None:
    """The name of a named symbolic dimension, else None (an int, or an unnamed unknown)."""
    value = getattr(d, "value", None)
    return value if isinstance(value, str) and value else None


def same_dim(a: int | ir.SymbolicDim | None, b: int | ir.SymbolicDim | None) -> bool:
    """Provably equal: equal ints, or the same named symbolic dimension (ONNX: one name, one size)."""
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    return symbol(a) is not None and symbol(a) == symbol(b)


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


def remove_unused_producers(graph: ir.Graph, values: Iterable[ir.Value | None]) -> list[ir.Node]:
    """Remove what a rewrite left unused: the initializers among ``values`` and the nodes of
    ``graph`` that produced them, transitively (a weight's Constant, the shape arithmetic that fed
    a removed Reshape), when nothing reads them any more and they are not graph outputs or inputs;
    returns the removed nodes.

    onnx-ir's ``RemoveUnusedNodesPass`` does this for the whole model; passes call this inside
    their rewrite loop, where sweeping the whole graph after every rewrite would cost O(nodes) each
    time, and where a dead producer left until the end would still read its inputs and make a later
    match in the same sweep see a second consumer. ``run_passes`` runs onnx-ir's passes at the end."""
    removed: list[ir.Node] = []
    stack = [v for v in values if v is not None]
    while stack:
        value = stack.pop()
        if value.uses() or value.is_graph_output():
            continue
        node = value.producer()
        if node is None:
            if (value.is_initializer() and not value.is_graph_input() and value.name is not None
                    and graph.initializers.get(value.name) is value):
                del graph.initializers[value.name]
            continue
        if node.graph is not graph or any(out.uses() or out.is_graph_output() for out in node.outputs):
            continue
        inputs = [v for v in node.inputs if v is not None]
        graph.remove(node, safe=True)
        removed.append(node)
        stack.extend(inputs)
    return removed
