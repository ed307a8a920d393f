"""Lowering: an ONNX graph becomes a list of layers, each the unit one tactic implements.

The graph passes (``kiln.passes``) run first and do the fusions the playbook names: conv + bias +
residual + activation become ``ai.kiln::FusedConv``, attention becomes ``ai.kiln::FusedAttention``,
decomposed GELU and LayerNorm become ``Gelu`` and ``LayerNormalization`` (standard, or the ai.kiln
op of the same semantics on older opsets). Lowering maps those one to one and adds the fusions that
exist only as kernels, as TensorRT's builder does before it picks them:

1. ``FusedConv`` (2-D, constant weights) and a plain ``Conv`` become Conv layers (the fused-conv
   tactics run conv + bias + add + relu as one cuDNN call).
2. ``Gemm``, and ``MatMul`` by a constant 2-D weight (any number of leading dims, viewed as 2-D),
   absorb a constant bias ``Add`` and an activation (Relu, Clip, LeakyRelu, Sigmoid, Tanh,
   HardSigmoid, HardSwish, Gelu, SiLU as ``x * Sigmoid(x)``): a cuBLASLt or Triton epilogue.
3. ``LayerNormalization`` over trailing dims absorbs the residual ``Add`` that feeds it.
4. ``FusedAttention`` becomes an attention layer, run on ``scaled_dot_product_attention`` (fused
   attention kernels on the GPU); ``Softmax`` / ``LogSoftmax`` over the last axis become softmax layers.
5. Chains of two or more elementwise float ops, where each inner value has one consumer, become
   one pointwise layer (one Triton kernel instead of one launch and one round trip per op).
6. Every other node is a layer of its own that runs kiln's reference op ("Node" layers).

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

from kiln.passes.rewriting import connected_components, fused_from

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
    # the model's own nodes, [name, op type], before the passes fused some into one (kiln inspect
    # shows these; per-layer precision constraints match them); ``nodes`` are the graph's after
    origins: list[list[str]] = field(default_factory=list)

    @property
    def fused(self) -> bool:
        return len(self.origins or self.nodes) > 1


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
            origins=[[name, op] for n in nodes for name, op in fused_from(n)],
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
        self._add_conv([node], [x.name], node.outputs[0], w, b, attrs, pads, None)

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
        if any(self.const(t) is not None for t in (q, k, v)):
            return  # a constant Q, K or V: the node's reference op takes it as a weight
        # A constant mask (a causal mask folded at static shapes) is a weight: no layer writes it.
        weights = {"mask": mask.name} if mask is not None and self.const(mask) is not None else {}
        attrs = {k: a.value for k, a in node.attributes.items()}
        self.add("Attention", [node], [q.name, k.name, v.name] + ([mask.name] if mask is not None and not weights else []),
                 [node.outputs[0].name], attrs={"scale": float(attrs.get("scale", 1.0)), "mask": mask is not None,
                                                "nan_to_zero": bool(attrs.get("nan_to_zero", 0))}, weights=weights)

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
        links = [(producer, node) for node in eligible for value in node.inputs
                 if (producer := value.producer() if value is not None else None) is not None
                 and id(producer) in ids and self.only_consumer(value) is node]
        for members in connected_components(eligible, links):
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
