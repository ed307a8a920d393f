"""The activation at the end of a fused chain, as onnxscript patterns and as a fused op's attributes.

``fuse_conv_activation`` and ``fuse_gemm_activation`` end their patterns with one of ``PATTERNS``
(each names its last output ``act_out``; SiLU's Sigmoid output is ``sig_out``) and turn the matched
node into ``activation`` + ``activation_params`` with ``activation_of``. The names and defaults are
``kiln.activations.FUSED``'s: Relu; Clip with min/max as attributes (before opset 11, absent = the
spec's +-FLT_MAX) or constant scalar inputs (absent = unbounded), Relu6 being Clip(0, 6); LeakyRelu
(alpha); Sigmoid; Tanh; HardSigmoid (alpha, beta); HardSwish; SiLU written as ``Mul(x, Sigmoid(x))``
in either order; Gelu (the standard op, or ``ai.kiln::Gelu`` that ``fuse_gelu`` writes for older
opsets) with ``approximate`` "none" or "tanh".

``match_chains`` is the two passes' one matcher: phases of patterns indexed by their root op, tried
in turn over the graph, each node claimed by at most one chain.

``activation_of`` returns None (the chain must not fuse) for an attribute the fused op does not
model, a non-constant Clip bound, or an unknown GELU approximation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import onnx_ir as ir

from kiln.activations import FUSED
from kiln.passes.framework import KILN_DOMAIN
from kiln.passes.rewriting import constant_array, opset

FLT_MAX = float(np.finfo(np.float32).max)

# activation pattern name -> (root op domain, root op type, pattern builder)
PATTERNS: dict[str, tuple[str, str, Callable]] = {
    "Relu": ("", "Relu", lambda op, y: op.Relu(y, _outputs=["act_out"])),
    "Clip": ("", "Clip", lambda op, y: op.Clip(y, _allow_other_inputs=True, _outputs=["act_out"])),
    "LeakyRelu": ("", "LeakyRelu", lambda op, y: op.LeakyRelu(y, _outputs=["act_out"])),
    "Sigmoid": ("", "Sigmoid", lambda op, y: op.Sigmoid(y, _outputs=["act_out"])),
    "Tanh": ("", "Tanh", lambda op, y: op.Tanh(y, _outputs=["act_out"])),
    "HardSigmoid": ("", "HardSigmoid", lambda op, y: op.HardSigmoid(y, _outputs=["act_out"])),
    "HardSwish": ("", "HardSwish", lambda op, y: op.HardSwish(y, _outputs=["act_out"])),
    "Gelu": ("", "Gelu", lambda op, y: op.Gelu(y, _outputs=["act_out"])),
    "kiln.Gelu": (KILN_DOMAIN, "Gelu", lambda op, y: op.Gelu(y, _domain=KILN_DOMAIN, _outputs=["act_out"])),
    "SiLU": ("", "Mul", lambda op, y: op.Mul(y, op.Sigmoid(y, _outputs=["sig_out"]), _outputs=["act_out"])),
    "SiLU-swapped": ("", "Mul", lambda op, y: op.Mul(op.Sigmoid(y, _outputs=["sig_out"]), y, _outputs=["act_out"])),
}


def _scalar_constant(value: ir.Value | None) -> float | None:
    """A constant holding one element, as a float (else None)."""
    array = constant_array(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def _only_attributes(node: ir.Node, allowed: set[str]) -> bool:
    return set(node.attributes) <= allowed


def activation_of(model: ir.Model, name: str, bindings: dict) -> tuple[str, list[float], list] | None:
    """(activation, params, constant inputs it consumed) for the matched pattern ``name`` (a key of
    ``PATTERNS``, or "" for none), or None when the node has something the fused op cannot express."""
    if not name:
        return "", [], []
    node = bindings["act_out"].producer()
    if name in ("Relu", "Sigmoid", "Tanh", "HardSwish"):
        return (name, [], []) if not node.attributes else None
    if name in ("SiLU", "SiLU-swapped"):
        sigmoid = bindings["sig_out"].producer()
        return ("SiLU", [], []) if not node.attributes and not sigmoid.attributes else None
    attrs = {k: a.value for k, a in node.attributes.items()}
    if name in ("LeakyRelu", "HardSigmoid"):
        params = FUSED[name].params
        if not _only_attributes(node, {p for p, _ in params}):
            return None
        return name, [float(attrs.get(p, default)) for p, default in params], []
    if name in ("Gelu", "kiln.Gelu"):
        approximate = attrs.get("approximate", "none")
        approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
        if not _only_attributes(node, {"approximate"}) or approximate not in ("none", "tanh"):
            return None
        return "Gelu", [0.0 if approximate == "none" else 1.0], []
    if name == "Clip":
        if opset(model) < 11:
            if len(node.inputs) != 1 or not _only_attributes(node, {"min", "max"}):
                return None
            return "Clip", [float(attrs.get("min", -FLT_MAX)), float(attrs.get("max", FLT_MAX))], []
        if node.attributes or len(node.inputs) > 3:
            return None
        bounds = []
        for index, (_, default) in zip((1, 2), FUSED["Clip"].params, strict=True):
            value = node.inputs[index] if len(node.inputs) > index else None
            if value is None:
                bounds.append(default)
                continue
            bound = _scalar_constant(value)
            if bound is None:
                return None
            bounds.append(bound)
        return "Clip", bounds, list(node.inputs[1:])
    raise AssertionError(name)


_Spec = TypeVar("_Spec")
_Fusion = TypeVar("_Fusion")


def match_chains(model: ir.Model, phases: Sequence[Mapping[tuple[str, str], list[tuple[_Spec, Any]]]],
                 analyse: Callable[[ir.Model, _Spec, dict, list[ir.Node]], _Fusion | None]) -> list[_Fusion]:
    """Every chain to fuse, phase by phase (an earlier phase's longer chains win): at each node not yet
    claimed, the phase's patterns rooted at its op are tried in order; the first whose match
    ``analyse(model, spec, bindings, nodes in graph order)`` accepts claims its nodes."""
    graph = model.graph
    claimed: set[int] = set()
    found: list[_Fusion] = []
    order = {id(n): i for i, n in enumerate(graph)}
    for phase in phases:
        for node in graph:
            if id(node) in claimed:
                continue
            for spec, pattern in phase.get((node.domain if node.domain != "ai.onnx" else "", node.op_type), []):
                match = pattern.match(model, graph, node)
                if not match or any(id(n) in claimed for n in match.nodes):
                    continue
                nodes = sorted(match.nodes, key=lambda n: order[id(n)])
                fusion = analyse(model, spec, dict(match.bindings), nodes)
                if fusion is None:
                    continue
                claimed.update(id(n) for n in nodes)
                found.append(fusion)
                break
    return found
