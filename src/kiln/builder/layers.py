"""Lowering: an ONNX graph becomes a list of layers, each the unit one tactic implements.

This is where the builder fuses, as TensorRT's builder does before it picks kernels:

1. ``Conv`` (2-D, constant weights) absorbs a following residual ``Add`` and an activation
   (Relu, Clip, LeakyRelu, Sigmoid, Tanh, HardSigmoid, HardSwish, Gelu, SiLU as ``x * Sigmoid(x)``):
   the fused-conv tactics run conv + bias + add + relu as one cuDNN call.
2. ``Gemm``, and ``MatMul`` by a constant 2-D weight (any number of leading dims, flattened to 2-D),
   absorb a constant bias ``Add`` and an activation: a cuBLASLt or Triton epilogue.
3. ``LayerNormalization`` over trailing dims absorbs the residual ``Add`` that feeds it.
4. ``MatMul(q, k) -> scale -> + mask -> Softmax -> [NaN clean-up] -> MatMul(., v)`` (what both torch
   exporters write for scaled_dot_product_attention) becomes one attention layer, which runs on
   ``scaled_dot_product_attention`` (fused attention kernels on the GPU); other ``Softmax`` /
   ``LogSoftmax`` over the last axis become softmax layers. GELU decomposed with Erf is recognised as
   a GEMM activation.
5. Chains of two or more elementwise float ops, where each inner value has one consumer, become
   one pointwise layer (one Triton kernel instead of one launch and one round trip per op).
6. Every other node is a layer of its own that runs kiln's reference op ("Node" layers).

The graph passes (``kiln.passes``) run first and leave fused ``ai.kiln`` ops: ``FusedConv`` becomes
a Conv layer and ``FusedAttention`` an attention layer, one to one; the domain's ``Gelu`` and
``LayerNormalization`` (for opsets before the standard ones) are treated as the standard ops.

A fusion fires only when it can prove the result is the same: inner values must have a single
consumer and must not be graph outputs, weights must be constants, shapes must be as required.
Layers keep the graph's topological order: a fused layer runs where its last node stood.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir
import torch

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
KILN_DOMAIN = "ai.kiln"
_STANDARD = ("", "ai.onnx")
# ai.kiln ops with the semantics of the standard op of the same name (for opsets before it)
_KILN_STANDARD_OPS = ("Gelu", "LayerNormalization")

# Elementwise ops a pointwise layer may hold (kiln.kernels.pointwise implements each of them).
POINTWISE_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt",
    "Reciprocal", "Erf", "Pow", "Clip", "HardSigmoid", "HardSwish", "Gelu", "Elu", "Selu", "Softplus",
    "Softsign", "Max", "Min", "Identity", "Floor", "Ceil", "Sin", "Cos", "Mish", "ThresholdedRelu", "Celu",
})
_BINARY_MINMAX = ("Max", "Min")
# The attributes each pointwise op may carry; a node with any other (an old-opset Add's
# broadcast/axis, say) is left to its reference op.
_POINTWISE_ATTRS = {"LeakyRelu": {"alpha"}, "HardSigmoid": {"alpha", "beta"}, "Elu": {"alpha"}, "Selu": {"alpha", "gamma"},
                    "Gelu": {"approximate"}, "ThresholdedRelu": {"alpha"}, "Celu": {"alpha"}, "Clip": {"min", "max"}}


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

    @property
    def fused(self) -> bool:
        return len(self.nodes) > 1


@dataclass
class GraphFacts:
    """What lowering needs to know beyond the graph: recorded shapes and dtypes of every value
    (from a reference run at the opt shapes) and the values of constants."""

    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, ir.DataType]
    constants: Mapping[str, torch.Tensor]


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
        self.graph_outputs = {v.name for v in graph.outputs}
        self.consumers: dict[str, list[ir.Node]] = {}
        for node in self.nodes:
            for name in _read_names(node):
                self.consumers.setdefault(name, []).append(node)
        self.claimed: set[int] = set()
        self.layers: list[Layer] = []

    # -- helpers ------------------------------------------------------------------------------
    def const(self, value: ir.Value | None) -> torch.Tensor | None:
        if value is None or not value.name:
            return None
        return self.facts.constants.get(value.name)

    def only_consumer(self, value: ir.Value) -> ir.Node | None:
        """The one node reading ``value``, if it has exactly one and is not a graph output."""
        if value.name in self.graph_outputs:
            return None
        users = self.consumers.get(value.name, [])
        if len(users) != 1 or id(users[0]) in self.claimed:
            return None
        return users[0]

    def is_float(self, value: ir.Value | None) -> bool:
        return value is not None and self.facts.dtypes.get(value.name) in FLOAT_TYPES

    def shape(self, value: ir.Value) -> tuple[int, ...] | None:
        return self.facts.shapes.get(value.name)

    def add(self, kind: str, nodes: list[ir.Node], inputs: list[str], outputs: list[str], attrs=None, weights=None) -> None:
        for node in nodes:
            self.claimed.add(id(node))
        self.layers.append(Layer(
            name=nodes[0].name, kind=kind, nodes=[n.name for n in nodes], inputs=inputs, outputs=outputs,
            attrs=attrs or {}, weights=weights or {}, op_types=[n.op_type for n in nodes],
            position=max(self.index[id(n)] for n in nodes),
        ))

    # -- the driver ---------------------------------------------------------------------------
    def run(self) -> list[Layer]:
        for node in self.nodes:
            if id(node) in self.claimed:
                continue
            if node.domain == KILN_DOMAIN and node.op_type == "FusedConv":
                self._fused_conv(node)
                continue
            if node.domain == KILN_DOMAIN and node.op_type == "FusedAttention":
                self._fused_attention(node)
                continue
            if not _standard(node):
                continue
            if node.op_type == "Conv":
                self._try_conv(node)
            elif node.op_type in ("Gemm", "MatMul"):
                self._try_gemm(node)
            elif node.op_type == "LayerNormalization":
                self._try_layernorm(node)
            elif node.op_type == "Softmax" and self._try_attention(node):
                continue
            elif node.op_type in ("Softmax", "LogSoftmax"):
                self._try_softmax(node)
        self._pointwise_groups()
        for node in self.nodes:
            if id(node) not in self.claimed:
                self._add_node(node)
        self.layers.sort(key=lambda layer: layer.position)
        return _drop_dead(self.layers, self.graph_outputs)

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
        self.add("Node", [node], inputs + captured_inputs, [v.name for v in node.outputs], attrs={
            "args": args, "captured": captured_inputs, "captured_weights": captured_weights,
        }, weights=weights)

    # -- epilogues ----------------------------------------------------------------------------
    def _activation(self, value: ir.Value) -> tuple[dict | None, list[ir.Node], ir.Value]:
        """An activation applied to ``value`` alone: (spec, nodes, output) or (None, [], value)."""
        users = [] if value.name in self.graph_outputs else self.consumers.get(value.name, [])
        if len(users) == 2 and not any(id(u) in self.claimed for u in users):
            sig = next((u for u in users if u.op_type == "Sigmoid"), None)
            mul = next((u for u in users if u.op_type == "Mul"), None)
            if sig is not None and mul is not None and self.only_consumer(sig.outputs[0]) is mul \
                    and {v.name for v in mul.inputs} == {value.name, sig.outputs[0].name}:
                return {"op": "silu"}, [sig, mul], mul.outputs[0]
            gelu = self._erf_gelu(value, users)
            if gelu is not None:
                return {"op": "gelu_erf"}, gelu, gelu[-1].outputs[0]
            return None, [], value
        user = self.only_consumer(value)
        if user is None or not _standard(user):
            return None, [], value
        op = user.op_type
        attrs = {k: a.value for k, a in user.attributes.items()}
        spec = None
        if op == "Relu":
            spec = {"op": "relu"}
        elif op in ("Sigmoid", "Tanh", "HardSwish"):
            spec = {"op": op.lower()}
        elif op == "LeakyRelu":
            spec = {"op": "leaky_relu", "alpha": float(attrs.get("alpha", 0.01))}
        elif op == "HardSigmoid":
            spec = {"op": "hardsigmoid", "alpha": float(attrs.get("alpha", 0.2)), "beta": float(attrs.get("beta", 0.5))}
        elif op == "Gelu":
            spec = {"op": "gelu_tanh" if attrs.get("approximate", "none") == "tanh" else "gelu_erf"}
        elif op == "Clip":
            bounds = self._clip_bounds(user)
            if bounds is not None:
                spec = {"op": "clip", "min": bounds[0], "max": bounds[1]}
        if spec is None or user.inputs[0] is not value:
            return None, [], value
        return spec, [user], user.outputs[0]

    def _scalar(self, value: ir.Value | None) -> float | None:
        array = self.const(value)
        return float(array.reshape(())) if array is not None and array.numel() == 1 else None

    def _other(self, node: ir.Node, value: ir.Value) -> ir.Value | None:
        """The other input of a binary node that reads ``value`` once."""
        if len(node.inputs) != 2 or node.inputs[0] is node.inputs[1]:
            return None
        return node.inputs[1] if node.inputs[0] is value else node.inputs[0] if node.inputs[1] is value else None

    def _near(self, value: ir.Value | None, target: float) -> bool:
        got = self._scalar(value)
        return got is not None and abs(got - target) <= 1e-4 * abs(target)

    def _erf_gelu(self, x: ir.Value, users: list[ir.Node]) -> list[ir.Node] | None:
        """GELU as the exporters decompose it, ``0.5 * x * (1 + erf(x / sqrt(2)))``, in either order
        of the two products: the nodes in order, or None."""
        scale = next((u for u in users if (u.op_type == "Div" and u.inputs[0] is x and self._near(u.inputs[1], 2 ** 0.5))
                      or (u.op_type == "Mul" and self._near(self._other(u, x), 2 ** -0.5))), None)
        other = next((u for u in users if u is not scale), None)
        if scale is None or other is None or other.op_type != "Mul":
            return None
        erf = self.only_consumer(scale.outputs[0])
        add = self.only_consumer(erf.outputs[0]) if erf is not None and erf.op_type == "Erf" else None
        if add is None or add.op_type != "Add" or not self._near(self._other(add, erf.outputs[0]), 1.0):
            return None
        last = self.only_consumer(add.outputs[0])
        if last is None or last.op_type != "Mul":
            return None
        if self._near(self._other(other, x), 0.5) and self._other(last, add.outputs[0]) is other.outputs[0] \
                and self.only_consumer(other.outputs[0]) is last:  # (0.5 * x) * (1 + erf)
            return [scale, erf, add, other, last]
        if self._other(other, x) is add.outputs[0] and last is not other:
            return None
        if other is last and self._other(last, x) is add.outputs[0]:  # x * (1 + erf), then * 0.5
            final = self.only_consumer(last.outputs[0])
            if final is not None and final.op_type == "Mul" and self._near(self._other(final, last.outputs[0]), 0.5):
                return [scale, erf, add, last, final]
        return None

    def _clip_bounds(self, node: ir.Node) -> tuple[float | None, float | None] | None:
        if "min" in node.attributes or "max" in node.attributes:  # opset < 11
            lo, hi = node.attributes.get("min"), node.attributes.get("max")
            return (float(lo.value) if lo else None, float(hi.value) if hi else None)
        bounds = []
        for value in list(node.inputs[1:3]) + [None] * (3 - len(node.inputs)):
            if value is None or not value.name:
                bounds.append(None)
                continue
            array = self.const(value)
            if array is None or array.numel() != 1:
                return None
            bounds.append(float(array.reshape(())))
        return bounds[0], bounds[1]

    # -- Conv ---------------------------------------------------------------------------------
    def _try_conv(self, node: ir.Node) -> None:
        x, w = node.inputs[0], node.inputs[1]
        b = node.inputs[2] if len(node.inputs) > 2 else None
        weight = self.const(w)
        if weight is None or weight.ndim != 4 or not self.is_float(x) or (b is not None and b.name and self.const(b) is None):
            return
        geometry = self._conv_geometry(node, weight)
        if geometry is None:
            return
        attrs, pads = geometry
        nodes = [node]
        out = node.outputs[0]
        inputs = [x.name]
        # residual: Add(conv, z) with z an activation of the same shape
        user = self.only_consumer(out)
        if user is not None and user.op_type == "Add" and len(user.inputs) == 2:
            other = user.inputs[1] if user.inputs[0] is out else user.inputs[0]
            if other is not out and other.name not in self.facts.constants and self.shape(other) == self.shape(out) \
                    and self.facts.dtypes.get(other.name) == self.facts.dtypes.get(out.name):
                nodes.append(user)
                inputs.append(other.name)
                out = user.outputs[0]
        activation, act_nodes, out = self._activation(out)
        self._add_conv(nodes + act_nodes, inputs, out, w, b, attrs, pads, activation)

    def _add_conv(self, nodes, inputs, out, w, b, attrs, pads, activation) -> None:
        weights = {"w": w.name}
        if b is not None and b.name:
            weights["b"] = b.name
        layout = nodes[0].metadata_props.get("kiln.layout")
        self.add("Conv", nodes, inputs, [out.name], attrs={
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

    def _fused_conv(self, node: ir.Node) -> None:
        """ai.kiln::FusedConv(X, W, [B], [Z]) as the fuse_conv_activation pass wrote it: one Conv layer
        (a reference Node layer where the conv layer cannot hold it: 1-D/3-D, SAME padding, ...)."""
        x, w = node.inputs[0], node.inputs[1]
        b = node.inputs[2] if len(node.inputs) > 2 else None
        z = node.inputs[3] if len(node.inputs) > 3 else None
        weight = self.const(w)
        geometry = self._conv_geometry(node, weight) if weight is not None and weight.ndim == 4 else None
        activation = _fused_activation(node)
        if geometry is None or activation is False or not self.is_float(x) or (b is not None and b.name and self.const(b) is None):
            return
        inputs = [x.name] + ([z.name] if z is not None and z.name else [])
        self._add_conv([node], inputs, node.outputs[0], w, b, geometry[0], geometry[1], activation)

    def _fused_attention(self, node: ir.Node) -> None:
        """ai.kiln::FusedAttention(Q, K_T, V, [mask]) as the fuse_attention pass wrote it: one attention layer."""
        q, k, v = node.inputs[:3]
        mask = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3] is not None and node.inputs[3].name else None
        shapes = [self.shape(t) for t in (q, k, v)]
        if any(s is None or len(s) != 4 for s in shapes) or not all(self.is_float(t) for t in (q, k, v)):
            return
        attrs = {k: a.value for k, a in node.attributes.items()}
        self.add("Attention", [node], [q.name, k.name, v.name] + ([mask.name] if mask is not None else []),
                 [node.outputs[0].name], attrs={"scale": float(attrs.get("scale", 1.0)), "mask": mask is not None,
                                                "nan_to_zero": bool(attrs.get("nan_to_zero", 0))})

    # -- Gemm / MatMul ------------------------------------------------------------------------
    def _try_gemm(self, node: ir.Node) -> None:
        a, w = node.inputs[0], node.inputs[1]
        weight = self.const(w)
        if weight is None or weight.ndim != 2 or not self.is_float(a) or self.facts.dtypes.get(w.name) not in FLOAT_TYPES:
            return
        a_shape = self.shape(a)
        if a_shape is None or len(a_shape) < 2:
            return
        attrs: dict[str, Any] = {"alpha": 1.0, "beta": 1.0, "trans_b": False}
        weights = {"w": w.name}
        nodes = [node]
        out = node.outputs[0]
        if node.op_type == "Gemm":
            g = {k: a.value for k, a in node.attributes.items()}
            if g.get("transA", 0) or len(a_shape) != 2:
                return
            attrs.update(alpha=float(g.get("alpha", 1.0)), beta=float(g.get("beta", 1.0)), trans_b=bool(g.get("transB", 0)))
            c = node.inputs[2] if len(node.inputs) > 2 else None
            if c is not None and c.name:
                bias = self.const(c)
                n = weight.shape[0] if attrs["trans_b"] else weight.shape[1]
                if bias is None or not _is_bias(bias, n):
                    return
                weights["b"] = c.name
        else:
            user = self.only_consumer(out)
            if user is not None and user.op_type == "Add" and len(user.inputs) == 2:
                other = user.inputs[1] if user.inputs[0] is out else user.inputs[0]
                bias = self.const(other)
                if bias is not None and other is not out and _is_bias(bias, weight.shape[1]) \
                        and self.shape(user.outputs[0]) == self.shape(out):
                    nodes.append(user)
                    weights["b"] = other.name
                    out = user.outputs[0]
        activation, act_nodes, out = self._activation(out)
        nodes += act_nodes
        attrs["activation"] = activation
        attrs["k"] = int(weight.shape[1] if attrs["trans_b"] else weight.shape[0])
        attrs["n"] = int(weight.shape[0] if attrs["trans_b"] else weight.shape[1])
        self.add("Gemm", nodes, [a.name], [out.name], attrs=attrs, weights=weights)

    # -- LayerNormalization -------------------------------------------------------------------
    def _try_layernorm(self, node: ir.Node) -> None:
        if any(v.name and v.name in self.consumers or v.name in self.graph_outputs for v in node.outputs[1:]):
            return
        x = node.inputs[0]
        shape = self.shape(x)
        scale = node.inputs[1]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if shape is None or not shape or not self.is_float(x) or self.const(scale) is None \
                or (bias is not None and bias.name and self.const(bias) is None):
            return
        g = {k: a.value for k, a in node.attributes.items()}
        axis = int(g.get("axis", -1)) % len(shape)
        normalized = list(shape[axis:])
        if list(self.const(scale).shape) != normalized[len(normalized) - self.const(scale).ndim:]:
            return
        nodes = [node]
        inputs = [x.name]
        producer = x.producer()
        if producer is not None and producer.op_type == "Add" and id(producer) not in self.claimed \
                and _standard(producer) and self.only_consumer(x) is node:
            p, q = producer.inputs
            if p.name not in self.facts.constants and q.name not in self.facts.constants \
                    and self.shape(p) == shape and self.shape(q) == shape \
                    and self.facts.dtypes.get(p.name) == self.facts.dtypes.get(q.name) == self.facts.dtypes.get(x.name):
                nodes.insert(0, producer)
                inputs = [p.name, q.name]
        weights = {"scale": scale.name}
        if bias is not None and bias.name:
            weights["bias"] = bias.name
        self.add("LayerNorm", nodes, inputs, [node.outputs[0].name], attrs={
            "axis": axis, "epsilon": float(g.get("epsilon", 1e-5)), "residual": len(inputs) == 2,
        }, weights=weights)

    # -- attention ----------------------------------------------------------------------------
    def _scaled(self, value: ir.Value) -> tuple[ir.Value, float, list[ir.Node]]:
        """``value`` = ``source * s`` (or ``/ s``) by a scalar constant: (source, s, [node]); else (value, 1, [])."""
        node = value.producer()
        if node is None or id(node) in self.claimed or node.op_type not in ("Mul", "Div") or self.only_consumer(value) is None:
            return value, 1.0, []
        for i, j in ((0, 1), (1, 0)):
            if node.op_type == "Div" and i == 1:
                break
            factor = self._scalar(node.inputs[j])
            if factor is not None and node.inputs[i].name not in self.facts.constants:
                if node.op_type == "Div":
                    return (node.inputs[0], 1.0 / factor, [node]) if factor != 0 else (value, 1.0, [])
                return node.inputs[i], factor, [node]
        return value, 1.0, []

    def _try_attention(self, softmax: ir.Node) -> bool:
        """MatMul(q*s1, k*s2) [* s3] [+ mask] -> Softmax(last axis) [-> Where(IsNaN(p), 0, p)] -> MatMul(p, v),
        as both torch exporters write scaled_dot_product_attention, becomes one attention layer."""
        x = softmax.inputs[0]
        shape = self.shape(x)
        axis = int(softmax.attributes["axis"].value) if "axis" in softmax.attributes else (-1 if self.opset >= 13 else 1)
        if shape is None or len(shape) != 4 or axis % 4 != 3 or not self.is_float(x) or self.only_consumer(x) is not softmax:
            return False
        nodes: list[ir.Node] = []
        mask = None
        scores = x
        add = x.producer()
        if add is not None and add.op_type == "Add" and id(add) not in self.claimed:
            for i, j in ((0, 1), (1, 0)):
                producer = self._scaled(add.inputs[i])[0].producer()
                if producer is not None and producer.op_type == "MatMul":
                    scores, mask = add.inputs[i], add.inputs[j]
                    break
            if mask is None or mask is scores or not self.is_float(mask) or self.only_consumer(scores) is not add:
                return False
            nodes.append(add)
        source, post, post_nodes = self._scaled(scores)
        matmul = source.producer()
        if matmul is None or matmul.op_type != "MatMul" or id(matmul) in self.claimed or self.only_consumer(source) is not (
                post_nodes[0] if post_nodes else (add if nodes else softmax)):
            return False
        q, qs, q_nodes = self._scaled(matmul.inputs[0])
        k, ks, k_nodes = self._scaled(matmul.inputs[1])
        p = softmax.outputs[0]
        cleanup: list[ir.Node] = []
        user = self.only_consumer(p)
        if user is None:  # Where(IsNaN(p), 0, p) reads p twice
            users = self.consumers.get(p.name, [])
            isnan = next((u for u in users if u.op_type == "IsNaN"), None)
            where = next((u for u in users if u.op_type == "Where"), None)
            if len(users) != 2 or isnan is None or where is None or self.only_consumer(isnan.outputs[0]) is not where \
                    or where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not p or self._scalar(where.inputs[1]) != 0.0:
                return False
            cleanup = [isnan, where]
            p = where.outputs[0]
            user = self.only_consumer(p)
        if user is None or user.op_type != "MatMul" or user.inputs[0] is not p:
            return False
        v = user.inputs[1]
        qshape, kshape, vshape = self.shape(q), self.shape(k), self.shape(v)
        if qshape is None or kshape is None or vshape is None or not (len(qshape) == len(kshape) == len(vshape) == 4) \
                or not (qshape[:2] == kshape[:2] == vshape[:2]) or qshape[3] != kshape[2] or kshape[3] != vshape[2] \
                or any(n.name in self.facts.constants for n in (q, k, v)) or not all(self.is_float(t) for t in (q, k, v)):
            return False
        if mask is not None:
            mshape = self.shape(mask)
            if mshape is None or len(mshape) > 4 or any(m not in (1, s) for m, s in zip(mshape[::-1], shape[::-1])):
                return False
        ordered = q_nodes + k_nodes + [matmul] + post_nodes + nodes + [softmax] + cleanup + [user]
        inputs = [q.name, k.name, v.name] + ([mask.name] if mask is not None else [])
        self.add("Attention", ordered, inputs, [user.outputs[0].name], attrs={
            "scale": qs * ks * post, "mask": mask is not None, "nan_to_zero": bool(cleanup),
        })
        return True

    # -- Softmax ------------------------------------------------------------------------------
    def _try_softmax(self, node: ir.Node) -> None:
        x = node.inputs[0]
        shape = self.shape(x)
        if shape is None or not shape or not self.is_float(x):
            return
        default = -1 if self.opset >= 13 else 1
        axis = int(node.attributes["axis"].value) if "axis" in node.attributes else default
        if axis % len(shape) != len(shape) - 1:
            return
        self.add("Softmax", [node], [x.name], [node.outputs[0].name], attrs={"log": node.op_type == "LogSoftmax"})

    # -- pointwise chains ---------------------------------------------------------------------
    def _pointwise_groups(self) -> None:
        eligible = [n for n in self.nodes if id(n) not in self.claimed and self._pointwise_ok(n)]
        ids = {id(n) for n in eligible}
        parent = {id(n): id(n) for n in eligible}

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for node in eligible:
            for value in node.inputs:
                producer = value.producer() if value is not None else None
                if producer is not None and id(producer) in ids and self.only_consumer(value) is node:
                    parent[find(id(producer))] = find(id(node))
        groups: dict[int, list[ir.Node]] = {}
        for node in eligible:
            groups.setdefault(find(id(node)), []).append(node)
        for members in groups.values():
            if len(members) >= 2:
                self._add_pointwise(members)

    def _pointwise_ok(self, node: ir.Node) -> bool:
        if not _standard(node) or node.op_type not in POINTWISE_OPS or len(node.outputs) != 1:
            return False
        if node.op_type in _BINARY_MINMAX and len(node.inputs) != 2:
            return False
        if set(node.attributes) - _POINTWISE_ATTRS.get(node.op_type, set()):
            return False
        if node.op_type == "Clip" and self._clip_bounds(node) is None:
            return False
        if any(v is not None and v.name and not self.is_float(v) for v in node.inputs):
            return False
        if node.op_type in ("Identity",) or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                                                for a in node.attributes.values()):
            return node.op_type == "Identity"
        return self.is_float(node.outputs[0])

    def _add_pointwise(self, members: list[ir.Node]) -> None:
        members.sort(key=lambda n: self.index[id(n)])
        program: list[dict] = []
        slot: dict[str, int] = {}
        inputs: list[str] = []
        weight_names: list[str] = []

        def operand(value: ir.Value) -> int:
            if value.name in slot:
                return slot[value.name]
            array = self.const(value)
            if array is not None and array.numel() == 1:
                program.append({"op": "const", "value": float(array.reshape(()))})
            elif array is not None:
                weight_names.append(value.name)
                program.append({"op": "weight", "index": len(weight_names) - 1})
            else:
                inputs.append(value.name)
                program.append({"op": "input", "index": len(inputs) - 1})
            slot[value.name] = len(program) - 1
            return slot[value.name]

        for node in members:
            attrs = {k: a.value for k, a in node.attributes.items() if a.type in (
                ir.AttributeType.FLOAT, ir.AttributeType.INT, ir.AttributeType.STRING)}
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
            if node.op_type == "Clip":
                lo, hi = self._clip_bounds(node)
                args = [operand(node.inputs[0])]
                attrs = {"min": lo, "max": hi}
            else:
                args = [operand(v) for v in node.inputs if v is not None and v.name]
            program.append({"op": node.op_type, "args": args, "attrs": attrs})
            slot[node.outputs[0].name] = len(program) - 1
        output = members[-1].outputs[0].name
        # weights come after activations in the kernel's input list
        for step in program:
            if step["op"] == "weight":
                step["op"] = "input"
                step["index"] = len(inputs) + step["index"]
        self.add("Pointwise", members, inputs, [output], attrs={"program": program},
                 weights={f"c{i}": name for i, name in enumerate(weight_names)})


def _standard(node: ir.Node) -> bool:
    """A default-domain node, or an ai.kiln op with the semantics of the standard op of its name."""
    return node.domain in _STANDARD or (node.domain == KILN_DOMAIN and node.op_type in _KILN_STANDARD_OPS)


# FusedConv's activation attribute -> the layers' activation spec (see kiln.ops.kiln_domain)
def _fused_activation(node: ir.Node) -> dict | None | bool:
    """The activation spec of a FusedConv node, None for none, False for one the layer cannot hold."""
    name = node.attributes["activation"].value if "activation" in node.attributes else ""
    name = name.decode() if isinstance(name, bytes) else name
    params = [float(p) for p in node.attributes["activation_params"].value] if "activation_params" in node.attributes else []

    def param(i: int, default: float) -> float:
        return params[i] if len(params) > i else default

    if name == "":
        return None
    if name in ("Relu", "Sigmoid", "Tanh", "HardSwish"):
        return {"op": name.lower()}
    if name == "SiLU":
        return {"op": "silu"}
    if name == "LeakyRelu":
        return {"op": "leaky_relu", "alpha": param(0, 0.01)}
    if name == "HardSigmoid":
        return {"op": "hardsigmoid", "alpha": param(0, 0.2), "beta": param(1, 0.5)}
    if name == "Clip":
        lo, hi = param(0, float("-inf")), param(1, float("inf"))
        return {"op": "clip", "min": None if lo == float("-inf") else lo, "max": None if hi == float("inf") else hi}
    if name == "Gelu":
        return {"op": "gelu_tanh" if param(0, 0.0) == 1 else "gelu_erf"}
    return False


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


def _read_names(node: ir.Node) -> set[str]:
    """Every value name a node reads, including those its subgraphs capture from outside."""
    names = {v.name for v in node.inputs if v is not None and v.name}
    from kiln.executor import _captured_names

    return names | _captured_names(node)
