"""Lowering: an ONNX graph becomes a list of layers, each the unit one tactic implements.

The graph passes (``kiln.passes``) run first and do every fusion, each into an ``ai.kiln`` op (or a
standard one): conv + bias + residual + activation become ``FusedConv``, GEMM + bias + activation
``FusedGemm``, attention ``FusedAttention``, the residual Add before a LayerNorm
``AddLayerNormalization``, chains of elementwise ops ``FusedPointwise``; decomposed GELU and
LayerNorm become ``Gelu`` and ``LayerNormalization``. Lowering maps one node to one layer:

1. ``FusedConv`` (2-D, constant weights) and a plain ``Conv`` become Conv layers (the fused-conv
   tactics run conv + bias + add + activation as one cuDNN call).
2. ``FusedGemm``, ``Gemm`` and ``MatMul`` by a constant 2-D weight become Gemm layers (an input of
   any number of leading dims is viewed as 2-D); bias and activation run in a cuBLASLt or Triton epilogue.
3. ``LayerNormalization`` and ``AddLayerNormalization`` over trailing dims become LayerNorm layers.
4. ``FusedAttention`` becomes an attention layer, run on ``scaled_dot_product_attention`` (fused
   attention kernels on the GPU); ``Softmax`` / ``LogSoftmax`` over the last axis become softmax layers.
5. ``FusedPointwise`` becomes a pointwise layer (one Triton kernel for the whole chain).
6. Every other node, and one of the above that a layer cannot hold (an unknown shape, a weight that
   is not constant, SAME padding, ...), is a layer that runs kiln's reference op ("Node" layers).

A Conv layer carries the ``layout`` that ``choose_layout`` marked on its node; the conv tactics
follow it. Layers keep the graph's topological order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import onnx_ir as ir
import torch

from kiln.activations import FUSED, layer_spec
from kiln.passes.choose_layout import LAYOUT
from kiln.passes.rewriting import fused_from, node_names

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
KILN_DOMAIN = "ai.kiln"
_STANDARD = ("", "ai.onnx")
# ai.kiln ops whose Gemm, LayerNorm and Pointwise layers are named by the model's first op they
# compute (MatMul for MatMul+Add+Relu), as the plan did when lowering fused them; ``origins`` lists
# them all. A Node layer names the op it runs.
_NAMED_BY_ORIGINS = ("FusedGemm", "AddLayerNormalization", "FusedPointwise")
# ai.kiln ops with the semantics of the standard op of the same name (for opsets before it)
_KILN_STANDARD_OPS = ("Gelu", "LayerNormalization")


@dataclass
class Layer:
    """One unit of the plan. ``inputs`` are runtime values (activations); ``weights`` maps a role to
    the constant it is made from. ``attrs`` is plain JSON."""

    name: str
    kind: str  # Conv | Gemm | LayerNorm | Softmax | Attention | Pointwise | Node
    nodes: list[str]
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, str] = field(default_factory=dict)
    op_types: list[str] = field(default_factory=list)
    position: int = 0
    # the model's own nodes, [name, op type], before the passes fused some into one (kiln inspect
    # shows these; per-layer precision constraints match them); ``nodes`` are the graph's after
    origins: list[list[str]] = field(default_factory=list)

    @property
    def fused(self) -> bool:
        return len(self.origins or self.nodes) > 1

    @property
    def described_ops(self) -> str:
        """What the layer computes, for messages: the model's ops a pass fused into it where the layer
        is named after them (``MatMul+Add+Relu`` for a FusedGemm), else its own op types."""
        named_by_origins = self.kind != "Node" and bool(self.origins) and self.op_types[:1] == self.origins[0][1:]
        return "+".join(op for _, op in self.origins) if named_by_origins else "+".join(self.op_types)


@dataclass
class GraphFacts:
    """What lowering needs to know beyond the graph: recorded shapes and dtypes of every value
    (from a reference run at the opt shapes) and the values of constants."""

    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, ir.DataType]
    constants: Mapping[str, torch.Tensor]


def _name(value: ir.Value | None) -> str:
    """A value's name in the plan: "" for an unnamed or absent one, as in the ONNX file."""
    return value.name or "" if value is not None else ""


def lower(graph: ir.Graph, facts: GraphFacts, opset: int) -> list[Layer]:
    """The graph's layers, in execution order. Node names must be unique (the builder ensures it)."""
    return _Lowering(graph, facts, opset).run()


class _Lowering:
    def __init__(self, graph: ir.Graph, facts: GraphFacts, opset: int) -> None:
        self.graph = graph
        self.opset = opset
        self.facts = facts
        self.nodes = list(graph)
        self.index = {id(n): i for i, n in enumerate(self.nodes)}
        self.graph_outputs = {_name(v) for v in graph.outputs}
        self.layers: list[Layer] = []

    # -- helpers ------------------------------------------------------------------------------
    def const(self, value: ir.Value | None) -> torch.Tensor | None:
        if value is None or not value.name:
            return None
        return self.facts.constants.get(value.name)

    def is_float(self, value: ir.Value | None) -> TypeGuard[ir.Value]:
        return value is not None and self.facts.dtypes.get(_name(value)) in FLOAT_TYPES

    def shape(self, value: ir.Value | None) -> tuple[int, ...] | None:
        return self.facts.shapes.get(_name(value))

    def add(self, kind: str, node: ir.Node, inputs: list[str], outputs: list[str], attrs=None, weights=None) -> bool:
        origins = [[name, op] for name, op in fused_from(node)]
        op_types = [origins[0][1]] if kind != "Node" and node.op_type in _NAMED_BY_ORIGINS else [node.op_type]
        self.layers.append(Layer(
            name=node_names([node])[0], kind=kind, nodes=node_names([node]), inputs=inputs, outputs=outputs,
            attrs=attrs or {}, weights=weights or {}, op_types=op_types, position=self.index[id(node)], origins=origins,
        ))
        return True

    # -- the driver ---------------------------------------------------------------------------
    def run(self) -> list[Layer]:
        for node in self.nodes:
            if not self._lower(node):
                self._add_node(node)
        return _drop_dead(self.layers, self.graph_outputs)

    def _lower(self, node: ir.Node) -> bool:
        """Add the node's layer of its own kind; False where it is a Node layer."""
        if node.domain == KILN_DOMAIN:
            lower = {"FusedConv": self._conv, "FusedAttention": self._fused_attention, "FusedGemm": self._gemm,
                     "AddLayerNormalization": self._layernorm, "FusedPointwise": self._pointwise,
                     "LayerNormalization": self._layernorm}.get(node.op_type)
            return lower is not None and lower(node)
        if not _standard(node):
            return False
        lower = {"Conv": self._conv, "Gemm": self._gemm, "MatMul": self._gemm, "LayerNormalization": self._layernorm,
                 "Softmax": self._softmax, "LogSoftmax": self._softmax}.get(node.op_type)
        return lower is not None and lower(node)

    def _add_node(self, node: ir.Node) -> None:
        """A layer for one node: constant inputs become weights, the rest runtime inputs; values its
        subgraphs capture from outside are inputs too (so they stay alive until it runs)."""
        constants = self.facts.constants
        args: list[dict | None] = []
        inputs: list[str] = []
        weights: dict[str, str] = {}
        for value in node.inputs:
            if value is None or not value.name:
                args.append(None)
            elif value.name in constants:
                args.append({"weight": value.name})
                weights[value.name] = value.name
            else:
                args.append({"input": len(inputs)})
                inputs.append(value.name)
        from kiln.executor import _captured_names

        captured = sorted(_captured_names(node))
        captured_weights = [name for name in captured if name in constants]
        captured_inputs = [name for name in captured if name not in constants]
        weights.update({name: name for name in captured_weights})
        self.add("Node", node, inputs + captured_inputs, [_name(v) for v in node.outputs], attrs={
            "args": args, "captured": captured_inputs, "captured_weights": captured_weights,
        }, weights=weights)

    # -- Conv ---------------------------------------------------------------------------------
    def _conv(self, node: ir.Node) -> bool:
        """Conv(X, W, [B]), or ai.kiln::FusedConv(X, W, [B], [Z]) as the fuse_conv_activation pass
        wrote it: one Conv layer where the conv layer can hold it (2-D, explicit padding, constant weights)."""
        x, w = node.inputs[0], node.inputs[1]
        b = node.inputs[2] if len(node.inputs) > 2 else None
        z = node.inputs[3] if len(node.inputs) > 3 else None
        weight = self.const(w)
        geometry = self._conv_geometry(node, weight) if weight is not None and weight.ndim == 4 else None
        activation = _fused_activation(node) if node.domain == KILN_DOMAIN else None
        if (
            geometry is None
            or activation is False
            or not self.is_float(x)
            or (b is not None and b.name and self.const(b) is None)
        ):
            return False
        attrs, pads = geometry
        inputs = [_name(x)] + ([z.name] if z is not None and z.name else [])
        weights = {"w": _name(w)}
        if b is not None and b.name:
            weights["b"] = b.name
        layout = node.metadata_props.get(LAYOUT)
        return self.add("Conv", node, inputs, [_name(node.outputs[0])], attrs={
            "strides": list(attrs.get("strides", [1, 1])), "pads": pads,
            "dilations": list(attrs.get("dilations", [1, 1])), "group": int(attrs.get("group", 1)),
            "residual": len(inputs) == 2, "activation": activation, **({"layout": layout} if layout else {}),
        }, weights=weights)

    def _conv_geometry(self, node: ir.Node, weight: torch.Tensor) -> tuple[dict, list[int]] | None:
        """A 2-D conv node's attributes and explicit pads, or None where the conv layer cannot hold it."""
        attrs = {k: a.value for k, a in node.attributes.items()}
        auto_pad = attrs.get("auto_pad", "NOTSET")
        if isinstance(auto_pad, bytes):
            auto_pad = auto_pad.decode()
        if auto_pad not in ("NOTSET", "VALID"):
            return None
        if "kernel_shape" in attrs and list(attrs["kernel_shape"]) != list(weight.shape[2:]):
            return None
        return attrs, [0, 0, 0, 0] if auto_pad == "VALID" else list(attrs.get("pads", [0, 0, 0, 0]))

    def _fused_attention(self, node: ir.Node) -> bool:
        """ai.kiln::FusedAttention(Q, K_T, V, [mask]) as the fuse_attention pass wrote it: one attention layer."""
        q, k, v = node.inputs[:3]
        mask = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3] is not None and node.inputs[3].name else None
        shapes = [self.shape(t) for t in (q, k, v)]
        if any(s is None or len(s) != 4 for s in shapes) or not all(self.is_float(t) for t in (q, k, v)):
            return False
        if any(self.const(t) is not None for t in (q, k, v)):
            return False  # a constant Q, K or V: the node's reference op takes it as a weight
        # A constant mask (a causal mask folded at static shapes) is a weight: no layer writes it.
        weights = {"mask": mask.name} if mask is not None and self.const(mask) is not None else {}
        attrs = {k: a.value for k, a in node.attributes.items()}
        return self.add(
            "Attention",
            node,
            [_name(q), _name(k), _name(v)] + ([_name(mask)] if mask is not None and not weights else []),
            [_name(node.outputs[0])],
            attrs={
                "scale": float(attrs.get("scale", 1.0)),
                "mask": mask is not None,
                "nan_to_zero": bool(attrs.get("nan_to_zero", 0)),
            },
            weights=weights,
        )

    # -- Gemm / MatMul ------------------------------------------------------------------------
    def _gemm(self, node: ir.Node) -> bool:
        """Gemm, MatMul by a constant 2-D weight, or ai.kiln::FusedGemm as fuse_gemm_activation wrote it."""
        a, w = node.inputs[0], node.inputs[1]
        weight = self.const(w)
        if (
            weight is None
            or weight.ndim != 2
            or not self.is_float(a)
            or self.facts.dtypes.get(_name(w)) not in FLOAT_TYPES
        ):
            return False
        a_shape = self.shape(a)
        if a_shape is None or len(a_shape) < 2:
            return False
        attrs: dict[str, Any] = {"alpha": 1.0, "beta": 1.0, "trans_b": False, "activation": None}
        weights = {"w": _name(w)}
        if node.op_type != "MatMul":
            g = {k: a.value for k, a in node.attributes.items()}
            if g.get("transA", 0) or (node.op_type == "Gemm" and len(a_shape) != 2):
                return False
            attrs.update(
                alpha=float(g.get("alpha", 1.0)), beta=float(g.get("beta", 1.0)), trans_b=bool(g.get("transB", 0))
            )
            c = node.inputs[2] if len(node.inputs) > 2 else None
            if c is not None and c.name:
                bias = self.const(c)
                n = weight.shape[0] if attrs["trans_b"] else weight.shape[1]
                if bias is None or not _is_bias(bias, n) or bias.ndim > len(a_shape):
                    return False
                weights["b"] = c.name
        if node.domain == KILN_DOMAIN:
            attrs["activation"] = _fused_activation(node)
            if attrs["activation"] is False:
                return False
        attrs["k"] = int(weight.shape[1] if attrs["trans_b"] else weight.shape[0])
        attrs["n"] = int(weight.shape[0] if attrs["trans_b"] else weight.shape[1])
        return self.add("Gemm", node, [_name(a)], [_name(node.outputs[0])], attrs=attrs, weights=weights)

    # -- LayerNormalization -------------------------------------------------------------------
    def _layernorm(self, node: ir.Node) -> bool:
        """LayerNormalization(X, Scale, [B]), or ai.kiln::AddLayerNormalization(A, R, Scale, [B]) as
        fuse_layernorm_residual wrote it (both operands of one shape and dtype)."""
        if any(v.uses() or _name(v) in self.graph_outputs for v in node.outputs[1:]):
            return False
        residual = node.op_type == "AddLayerNormalization"
        operands = list(node.inputs[:2] if residual else node.inputs[:1])
        x = operands[0]
        scale = node.inputs[len(operands)]
        bias = node.inputs[len(operands) + 1] if len(node.inputs) > len(operands) + 1 else None
        shape = self.shape(x)
        scale_weight = self.const(scale)
        if shape is None or not shape or not all(self.is_float(v) for v in operands) or scale_weight is None \
                or (bias is not None and bias.name and self.const(bias) is None):
            return False
        if residual and (any(self.const(v) is not None or self.shape(v) != shape for v in operands)
                         or self.facts.dtypes.get(_name(operands[0])) != self.facts.dtypes.get(_name(operands[1]))):
            return False
        g = {k: a.value for k, a in node.attributes.items()}
        axis = int(g.get("axis", -1)) % len(shape)
        normalized = list(shape[axis:])
        if list(scale_weight.shape) != normalized[len(normalized) - scale_weight.ndim:]:
            return False
        weights = {"scale": _name(scale)}
        if bias is not None and bias.name:
            weights["bias"] = bias.name
        return self.add("LayerNorm", node, [_name(v) for v in operands], [_name(node.outputs[0])], attrs={
            "axis": axis, "epsilon": float(g.get("epsilon", 1e-5)), "residual": residual,
        }, weights=weights)

    # -- Softmax ------------------------------------------------------------------------------
    def _softmax(self, node: ir.Node) -> bool:
        x = node.inputs[0]
        shape = self.shape(x)
        if shape is None or not shape or not self.is_float(x):
            return False
        default = -1 if self.opset >= 13 else 1
        axis = int(node.attributes["axis"].value) if "axis" in node.attributes else default
        if axis % len(shape) != len(shape) - 1:
            return False
        return self.add("Softmax", node, [_name(x)], [_name(node.outputs[0])],
                        attrs={"log": node.op_type == "LogSoftmax"})

    # -- pointwise chains ---------------------------------------------------------------------
    def _pointwise(self, node: ir.Node) -> bool:
        """ai.kiln::FusedPointwise as fuse_pointwise wrote it: the kernel reads the runtime inputs
        first, then the constants (weights ``c0``, ``c1``, ...)."""
        if not all(self.is_float(v) for v in node.inputs) or not self.is_float(node.outputs[0]):
            return False
        text = node.attributes["program"].value
        program = json.loads(text.decode() if isinstance(text, bytes) else text)
        runtime = [i for i, v in enumerate(node.inputs) if self.const(v) is None]
        constant = [i for i, v in enumerate(node.inputs) if self.const(v) is not None]
        if not runtime:
            return False
        position = {old: new for new, old in enumerate(runtime + constant)}
        for step in program:
            if step["op"] == "input":
                step["index"] = position[step["index"]]
        return self.add("Pointwise", node, [_name(node.inputs[i]) for i in runtime], [_name(node.outputs[0])],
                        attrs={"program": program},
                        weights={f"c{k}": _name(node.inputs[i]) for k, i in enumerate(constant)})


def _standard(node: ir.Node) -> bool:
    """A default-domain node, or an ai.kiln op with the semantics of the standard op of its name."""
    return node.domain in _STANDARD or (node.domain == KILN_DOMAIN and node.op_type in _KILN_STANDARD_OPS)


def _fused_activation(node: ir.Node) -> dict | None | bool:
    """The activation spec of a FusedConv or FusedGemm node, None for none, False for one the layer cannot hold."""
    name = node.attributes["activation"].value if "activation" in node.attributes else ""
    name = name.decode() if isinstance(name, bytes) else name
    params = (
        [float(p) for p in node.attributes["activation_params"].value] if "activation_params" in node.attributes else []
    )
    if name != "" and name not in FUSED:
        return False
    return layer_spec(name, params)


def _drop_dead(layers: list[Layer], graph_outputs: set[str]) -> list[Layer]:
    """Layers whose outputs nothing reads (a Constant folded into a weight, say) are dropped."""
    used = set(graph_outputs)
    kept: list[Layer] = []
    for layer in reversed(layers):
        if layer.kind == "Node" and not any(name and name in used for name in layer.outputs):
            continue
        used.update(layer.inputs)
        kept.append(layer)
    return kept[::-1]


def _is_bias(array: torch.Tensor, n: int) -> bool:
    """A constant that broadcasts along the last axis only: shape [N], [1, N], [1, 1, N], or a scalar."""
    if array.numel() == 1:
        return True
    return array.numel() == n and array.shape[-1] == n
