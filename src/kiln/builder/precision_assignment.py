"""Each layer's precision before tactics are chosen: the config's default, a per-layer constraint
(``--layer-precision``), fp32 for shape arithmetic and control flow, or (strongly typed) the model's
own types; and which of its fp32 inputs are cast to that precision.

The automatic fallback that follows it lives with the runs that measure it: the walk moves a layer
whose output overflows or drifts at fp16/bf16 towards fp32, and the end-to-end check moves the
layers that drifted most until the outputs are within tolerance (``kiln.builder.walk``); a layer
faster wide runs wide (``kiln.builder.choose_tactic``).
"""

from __future__ import annotations

import onnx_ir as ir

from kiln.builder.layers import Layer
from kiln.builder.record import has_subgraph
from kiln.builder.state import BuildState, PlannedLayer
from kiln.builder.tactics.node import castable
from kiln.errors import KilnError
from kiln.ops.registry import op_facts
from kiln.precision import loosest

_REDUCED_TYPES = {ir.DataType.FLOAT16: "fp16", ir.DataType.BFLOAT16: "bf16"}


def assign_precisions(state: BuildState, layers: list[Layer]) -> list[PlannedLayer]:
    """Every layer planned at its precision (see the module docstring); constraints that name no
    node or op of the model are an error. Sets ``state.output_precision``: what the engine's
    outputs are judged at, its loosest precision before any fallback."""
    shape_nodes = _shape_nodes(state.model.graph)
    planned = [_assign(state, layer, shape_nodes) for layer in layers]
    _check_constraints_used(state, layers)
    state.output_precision = loosest(_judged_precision(state, item) for item in planned)
    return planned


def _shape_nodes(graph: ir.Graph) -> set[str]:
    """The nodes computing a shape, size, index or axis (the ops' ``shape_inputs`` facts), back to the
    metadata ops (``Shape``/``Size``)."""
    names: set[str] = set()
    stack = []
    for node in graph:
        for index in op_facts(node.op_type).shape_inputs:
            if index < len(node.inputs) and node.inputs[index] is not None:
                stack.append(node.inputs[index])
    seen: set[int] = set()
    while stack:
        value = stack.pop()
        producer = value.producer() if value is not None else None
        if producer is None or id(producer) in seen:
            continue
        seen.add(id(producer))
        names.add(producer.name or "")
        if op_facts(producer.op_type).metadata:
            continue
        stack.extend(v for v in producer.inputs if v is not None)
    return names


def _assign(state: BuildState, layer: Layer, shape_nodes: set[str]) -> PlannedLayer:
    config = state.config
    facts = state.facts[0]
    constraint = None
    for key in layer.nodes + layer.op_types + [key for origin in layer.origins for key in origin]:
        if key in config.layer_precisions:
            constraint = config.layer_precisions[key]
            break
    if config.strongly_typed:
        precision = _native_precision(state, layer)
    elif constraint is not None:
        precision = constraint
    elif any(n in shape_nodes for n in layer.nodes) or (
            layer.kind == "Node" and has_subgraph(state.steps[layer.nodes[0]].op.node)):
        # shape arithmetic; and If/Loop/Scan, whose bodies run reference ops on the fp32 weights
        # they capture (casting the node's inputs alone would mix precisions inside)
        precision = "fp32"
    else:
        precision = config.default_precision()
    item = PlannedLayer(layer, precision, constrained=constraint is not None)
    if precision != "native":
        for i, name in enumerate(layer.inputs):
            if facts.dtypes.get(name) == ir.DataType.FLOAT and (layer.kind != "Node" or _castable_input(layer, i)):
                item.cast_inputs.append(i)
    item.shapes = {n: list(facts.shapes[n]) for n in layer.inputs + layer.outputs if n in facts.shapes}
    return item


def _castable_input(layer: Layer, runtime_index: int) -> bool:
    for slot, arg in enumerate(layer.attrs.get("args", [])):
        if arg is not None and arg.get("input") == runtime_index:
            return castable(layer.op_types[0], slot)
    return True  # captured values


def _judged_precision(state: BuildState, item: PlannedLayer) -> str:
    """A layer's precision, a strongly typed Node layer's the types it computes in."""
    if item.precision != "native":
        return item.precision
    kinds = state.facts[0].dtypes
    return loosest(_REDUCED_TYPES.get(kinds[n], "fp32") if n in kinds else "fp32" for n in item.layer.outputs if n)


def _native_precision(state: BuildState, layer: Layer) -> str:
    if layer.kind == "Node":
        return "native"
    facts = state.facts[0]
    dtype = facts.dtypes.get(layer.outputs[0] if layer.kind == "Pointwise" else layer.inputs[0])
    if dtype is None:
        return "fp32"
    return {ir.DataType.FLOAT16: "fp16", ir.DataType.BFLOAT16: "bf16"}.get(dtype, "fp32")


def _check_constraints_used(state: BuildState, layers: list[Layer]) -> None:
    known = {n for layer in layers for n in layer.nodes} | {o for layer in layers for o in layer.op_types}
    known |= {key for layer in layers for origin in layer.origins for key in origin}
    known |= {n.name or "" for n in state.model.graph} | {n.op_type for n in state.model.graph}
    unknown = sorted(set(state.config.layer_precisions) - known)
    if unknown:
        raise KilnError(f"{state.name}: --layer-precision names {unknown}, which are neither node names nor op types "
                        f"of the model")
