"""Fuse chains of elementwise ops into one ``ai.kiln::FusedPointwise``.

Playbook rule: "fuse what has no fused op" (TensorRT's pointwise fusion): each elementwise op reads
its inputs from memory and writes its output back; a chain of them fused into one kernel reads each
input once and writes the result once, whatever its length (the builder runs it as one generated
Triton kernel, ``kiln.kernels.pointwise``).

No onnxscript pattern fits (a chain is any tree of any of ~35 ops), so the pass groups nodes itself:

1. Nodes of the ops in ``kiln.activations.ELEMENTWISE`` (standard, and ``ai.kiln::Gelu``) that read
   and write float tensors are joined where one's output is read by exactly one node, the other.
2. Every group of two or more nodes becomes one ``FusedPointwise`` whose ``program`` attribute (JSON)
   lists the steps in graph order: ``input`` steps for the chain's outside inputs (computed values
   first, then non-scalar constants), ``const`` steps for one-element constants, one step per op
   with its float (and Gelu's ``approximate``) attributes, and Clip's bounds as ``min``/``max``.
   The fused node, named after the chain's first node, stands where its last node stood and
   computes its output.

Runs last in ``ORDER``: the fusions with a fused op of their own (conv, GEMM and LayerNorm epilogues,
GELU, attention) take their elementwise ops first.

Does not fire when: a group has one node; an inner value has another consumer (a subgraph's too) or
is a graph output (the chain splits there); a node has an attribute the chain does not model (an
old-opset Add's broadcast/axis), a non-constant Clip bound, a non-float input or output, or more
than two inputs (Max/Min). Only the main graph is rewritten; the pass needs ``ai.kiln`` ops, so it
runs only when ``ctx.kiln_ops``.
"""

from __future__ import annotations

import json

import onnx_ir as ir

from kiln.activations import ELEMENTWISE, FLOAT_ATTRS, OTHER_ATTRS
from kiln.errors import KilnError
from kiln.passes.framework import KILN_DOMAIN, KILN_DOMAIN_VERSION, Finding, Pass, PassContext, register_pass
from kiln.passes.rewriting import (
    connected_components,
    constant_array,
    node_names,
    record_fusion,
    shapes_of,
    unique_node_names,
)

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _elementwise(node: ir.Node) -> bool:
    return node.op_type in ELEMENTWISE and (node.domain in ("", "ai.onnx") or (node.domain == KILN_DOMAIN
                                                                                and node.op_type == "Gelu"))


def _clip_bounds(node: ir.Node) -> tuple[float | None, float | None] | None:
    """Clip's (min, max), None for an absent bound; None when a bound is not a constant scalar."""
    if "min" in node.attributes or "max" in node.attributes:  # opset < 11
        lo, hi = node.attributes.get("min"), node.attributes.get("max")
        return (float(lo.value) if lo else None, float(hi.value) if hi else None)
    bounds: list[float | None] = []
    for value in list(node.inputs[1:3]) + [None] * (3 - len(node.inputs)):
        if value is None or not value.name:
            bounds.append(None)
            continue
        array = constant_array(value)
        if array is None or array.size != 1:
            return None
        bounds.append(float(array.reshape(())))
    return bounds[0], bounds[1]


def _eligible(node: ir.Node) -> bool:
    if not _elementwise(node) or len(node.outputs) != 1:
        return False
    if node.op_type in ("Max", "Min") and len(node.inputs) != 2:
        return False
    if set(node.attributes) - set(FLOAT_ATTRS.get(node.op_type, {})) - OTHER_ATTRS.get(node.op_type, set()):
        return False
    if node.op_type == "Clip" and _clip_bounds(node) is None:
        return False
    if any(v is not None and v.name and v.dtype not in FLOAT_TYPES for v in node.inputs):
        return False
    return node.op_type == "Identity" or node.outputs[0].dtype in FLOAT_TYPES


def _only_reader(value: ir.Value) -> ir.Node | None:
    """The one node reading ``value`` (however many of its inputs), unless it is a graph output."""
    if value.is_graph_output():
        return None
    readers = {id(node): node for node, _ in value.uses()}
    return next(iter(readers.values())) if len(readers) == 1 else None


def _chains(model: ir.Model) -> list[list[ir.Node]]:
    """The groups to fuse, each in graph order (the one matcher of find and apply)."""
    nodes = list(model.graph)
    eligible = [n for n in nodes if _eligible(n)]
    ids = {id(n) for n in eligible}
    links = [(producer, node) for node in eligible for value in node.inputs
             if value is not None and (producer := value.producer()) is not None
             and id(producer) in ids and _only_reader(value) is node]
    return [group for group in connected_components(eligible, links) if len(group) >= 2]


def _program(members: list[ir.Node]) -> tuple[list[dict], list[ir.Value]]:
    """The chain's program and the node's inputs (computed values, then non-scalar constants)."""
    program: list[dict] = []
    slot: dict[int, int] = {}
    computed: list[ir.Value] = []
    constants: list[ir.Value] = []
    inputs: list[tuple[int, bool, int]] = []  # (step, is constant, index in its list)

    def operand(value: ir.Value) -> int:
        if id(value) in slot:
            return slot[id(value)]
        array = constant_array(value)
        if array is not None and array.size == 1:
            program.append({"op": "const", "value": float(array.reshape(()))})
        else:
            target = constants if array is not None else computed
            target.append(value)
            inputs.append((len(program), array is not None, len(target) - 1))
            program.append({"op": "input", "index": -1})
        slot[id(value)] = len(program) - 1
        return slot[id(value)]

    for node in members:
        if node.op_type == "Clip":
            bounds = _clip_bounds(node)
            x = node.inputs[0]
            assert bounds is not None and x is not None, "_eligible takes a Clip of X with constant bounds"
            lo, hi = bounds
            args, attrs = [operand(x)], {"min": lo, "max": hi}
        else:
            args = [operand(v) for v in node.inputs if v is not None and v.name]
            attrs = {k: a.value for k, a in node.attributes.items()
                     if a.type in (ir.AttributeType.FLOAT, ir.AttributeType.INT, ir.AttributeType.STRING)}
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
        program.append({"op": node.op_type, "args": args, "attrs": attrs})
        slot[id(node.outputs[0])] = len(program) - 1
    for step, is_constant, index in inputs:
        program[step]["index"] = len(computed) + index if is_constant else index
    return program, computed + constants


@register_pass
class FusePointwise(Pass):
    name = "fuse_pointwise"
    rule = "fuse chains of elementwise ops into one kernel"
    needs_kiln_ops = True

    def find(self, model: ir.Model, ctx: PassContext) -> list[Finding]:
        unique_node_names(model)
        return [Finding(
            rule="pointwise-chain",
            title=f"a chain of {len(chain)} elementwise ops ({', '.join(n.op_type for n in chain)}) "
                  f"runs as {len(chain)} kernels",
            nodes=node_names(chain),
            why="each elementwise op reads its inputs from memory and writes its output back; one fused kernel "
                "reads each input once and writes once",
            fix=f"fixed automatically by pass {self.name} "
                "(emits ai.kiln::FusedPointwise: the builder, or kiln optimize --kiln-ops)",
            pass_name=self.name,
            shapes=shapes_of([chain[-1].outputs[0]]),
            details={"ops": [n.op_type for n in chain]},
        ) for chain in _chains(model)]

    def apply(self, model: ir.Model, ctx: PassContext) -> int:
        if not ctx.kiln_ops:
            raise KilnError(f"pass {self.name} emits ai.kiln::FusedPointwise; run it with kiln_ops=True (--kiln-ops)")
        graph = model.graph
        unique_node_names(model)
        count = 0
        for chain in _chains(model):
            program, inputs = _program(chain)
            if not inputs or constant_array(inputs[0]) is not None:
                continue  # all constants: fold_constants' work, not a chain's
            last = chain[-1]
            node = ir.Node(KILN_DOMAIN, "FusedPointwise", inputs,
                           attributes=[ir.AttrString("program", json.dumps(program))], name=chain[0].name)
            record_fusion([node], chain)
            ir.convenience.replace_nodes_and_values(graph, last, chain, [node], [last.outputs[0]], [node.outputs[0]])
            ctx.log.append(f"{chain[0].name}: {len(chain)} elementwise ops -> FusedPointwise")
            count += 1
        if count:
            model.opset_imports.setdefault(KILN_DOMAIN, KILN_DOMAIN_VERSION)
        return count
