"""Fuse a convolution with its bias, residual Add and activation into one ``ai.kiln::FusedConv``.

Playbook rule: "fuse conv + bias + relu": a Conv followed by an Add and an activation costs one
kernel and one round trip of the conv's output through memory per op; fused (cuDNN's
conv-bias-add-activation, kiln's fused-conv tactics) the output is written once.

Rewrites, each matched with onnxscript's pattern matcher (``Conv`` is the standard op, ``act`` one of
the activations below, ``b`` a constant per-channel bias, ``Z`` a residual of the conv output's shape):

1. ``act(Conv(X, W[, B]))``                    -> ``FusedConv(X, W, [B], activation=act)``
2. ``act(Conv(X, W[, B]) + Z)``                -> ``FusedConv(X, W, [B], Z, activation=act)``
3. ``act(Conv(X, W) + b)``                     -> ``FusedConv(X, W, b, activation=act)``
4. ``act((Conv(X, W) + b) + Z)``               -> ``FusedConv(X, W, b, Z, activation=act)``
5. the same four without an activation         -> ``FusedConv`` with ``activation=""``, except
6. ``Conv(X, W) + b`` alone                    -> the standard ``Conv(X, W, b)`` (no kiln op needed).

Both operand orders of every Add are matched. ``b`` is a constant that broadcasts along the
channel axis only (``[C,1,1]``, ``[1,C,1,1]``, a scalar, ...). The activations and their
``activation_params`` are ``kiln.passes.match_activation``'s (the table of ``kiln.activations``).
Where several chains
could start at one Conv the longest wins (an activation is never left behind a fused Add).

Does not fire (leaves the place alone) when: W, or B where present, is not constant; the Conv has an
attribute outside Conv's own; an intermediate value has a consumer outside the chain or is a graph
output; the Add's other operand broadcasts (its shape is not provably the conv output's, and it is
not a constant per-channel bias of a Conv without B) or is computed by the chain itself; the
activation has an attribute it does not model, a non-constant Clip bound, or an unknown GELU
approximation; or the Conv stands alone (nothing to fuse). Only the main graph is rewritten.
Rewrites 1-5 need ``ai.kiln`` ops, so the pass runs only when ``ctx.kiln_ops``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter.pattern import Pattern

from kiln.errors import KilnError
from kiln.passes._conv import elements
from kiln.passes.framework import KILN_DOMAIN, KILN_DOMAIN_VERSION, Finding, Pass, PassContext, register_pass
from kiln.passes.match_activation import PATTERNS, activation_of, match_chains
from kiln.passes.rewriting import (
    Names,
    add_initializer,
    constant_array,
    node_names,
    record_fusion,
    remove_unused_producers,
    shapes_of,
    unique_node_names,
)

CONV_ATTRIBUTES = {"auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"}
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)

# epilogue -> the Add chains between Conv and activation: each a tuple of (operand name, conv side first)
_EPILOGUES: dict[str, list[tuple[tuple[str, bool], ...]]] = {
    "": [()],
    "add": [(("z", True),), (("z", False),)],
    "bias+add": [(("b", s1), ("z", s2)) for s1 in (True, False) for s2 in (True, False)],
}


@dataclass(frozen=True)
class _Spec:
    epilogue: str  # "", "add" (residual or bias), "bias+add"
    adds: tuple[tuple[str, bool], ...]
    activation: str  # a key of PATTERNS or ""

    @property
    def root(self) -> tuple[str, str]:
        return (PATTERNS[self.activation][0], PATTERNS[self.activation][1]) if self.activation else ("", "Add")

    def pattern(self) -> Pattern:
        def build(op, x, w, z, b):
            y = op.Conv(x, w, _allow_other_inputs=True, _outputs=["conv_out"])
            for operand, conv_first in self.adds:
                other = z if operand == "z" else b
                out = "add_out" if operand == "z" else "bias_out"
                y = op.Add(y, other, _outputs=[out]) if conv_first else op.Add(other, y, _outputs=[out])
            return PATTERNS[self.activation][2](op, y) if self.activation else y

        return Pattern(build, name=f"conv-{self.epilogue or 'none'}-{self.activation or 'none'}")


def _phases() -> list[dict[tuple[str, str], list[tuple[_Spec, Pattern]]]]:
    """Pattern groups tried in turn, each indexed by its root op: first every chain that ends in an
    activation, then Conv + bias + residual, then Conv + one Add; so the longest chain wins."""
    groups = [[(e, a) for e in ("bias+add", "add", "") for a in PATTERNS], [("bias+add", "")], [("add", "")]]
    phases = []
    for group in groups:
        index: dict[tuple[str, str], list[tuple[_Spec, Pattern]]] = {}
        for epilogue, activation in group:
            for adds in _EPILOGUES[epilogue]:
                spec = _Spec(epilogue, adds, activation)
                index.setdefault(spec.root, []).append((spec, spec.pattern()))
        phases.append(index)
    return phases


_PHASES = _phases()


@dataclass
class _Fusion:
    """One matched chain and what FusedConv gets for it."""

    conv: ir.Node
    nodes: list[ir.Node]  # the matched nodes, in graph order (conv first)
    x: ir.Value
    w: ir.Value
    bias: ir.Value | None  # the Conv's own B
    bias_array: np.ndarray | None  # a folded per-channel bias Add, as [C]
    bias_source: ir.Value | None  # the constant that bias_array came from
    z: ir.Value | None  # the residual
    activation: str  # FusedConv's activation name ("" for none)
    params: list[float] = field(default_factory=list)
    output: ir.Value | None = None  # the chain's last value (replaced by FusedConv's output)
    extra_inputs: list[ir.Value | None] = field(default_factory=list)  # Clip bounds, to clean up

    @property
    def standard_conv(self) -> bool:
        """Only a bias Add folded: a standard Conv with B does it."""
        return self.bias_array is not None and self.z is None and not self.activation

    def describe(self) -> str:
        parts = ["Conv"]
        if self.bias_array is not None:
            parts.append("bias Add")
        if self.z is not None:
            parts.append("residual Add")
        if self.activation:
            parts.append(self.activation)
        return " + ".join(parts)


def _channel_bias(value: ir.Value | None, channels: int, rank: int, dtype: ir.DataType | None) -> np.ndarray | None:
    """A constant that broadcasts against [N, C, ...] along the channel axis only, as a [C] array."""
    array = constant_array(value)
    if array is None or value is None or value.dtype != dtype or array.ndim > rank:
        return None
    aligned = [1] * (rank - array.ndim) + list(array.shape)
    if any(d != 1 for i, d in enumerate(aligned) if i != 1) or aligned[1] not in (1, channels):
        return None
    return np.broadcast_to(array.reshape(-1), (channels,)).copy() if array.size else None


def _same_shape(a: ir.Value | None, b: ir.Value | None) -> bool:
    """Whether two values provably have one shape: same rank, each dim the same int or the same
    named symbolic dim (an unnamed dim proves nothing)."""
    if a is None or b is None or a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return False
    for x, y in zip(a.shape, b.shape, strict=True):
        if isinstance(x, int) or isinstance(y, int):
            if x != y:
                return False
        elif x.value is None or x.value != y.value:
            return False
    return True


def _analyse(model: ir.Model, spec: _Spec, bindings: dict, nodes: list[ir.Node]) -> _Fusion | None:
    """The fusion a structural match stands for, or None where a precondition fails."""
    conv_out: ir.Value = bindings["conv_out"]
    conv = conv_out.producer()
    assert conv is not None, "the pattern binds conv_out to the Conv's output"
    x, w = bindings["x"], bindings["w"]
    weights = constant_array(w)
    if weights is None or x.dtype not in FLOAT_TYPES or len(conv.inputs) > 3 or weights.ndim < 3:
        return None
    if not set(conv.attributes) <= CONV_ATTRIBUTES:
        return None
    bias = conv.inputs[2] if len(conv.inputs) == 3 else None
    if bias is not None and constant_array(bias) is None:
        return None
    channels, rank = int(weights.shape[0]), int(weights.ndim)
    computed = {id(v) for n in nodes for v in n.outputs}
    fusion = _Fusion(conv, nodes, x, w, bias, None, None, None, "")
    if spec.epilogue == "bias+add":
        if bias is not None:
            return None
        fusion.bias_array = _channel_bias(bindings["b"], channels, rank, conv_out.dtype)
        fusion.bias_source = bindings["b"]
        if fusion.bias_array is None:
            return None
    if spec.epilogue:
        z = bindings["z"]
        if z is None or id(z) in computed:
            return None
        folded = _channel_bias(z, channels, rank, conv_out.dtype) if spec.epilogue == "add" and bias is None else None
        if folded is not None:
            fusion.bias_array, fusion.bias_source = folded, z
        elif _same_shape(z, conv_out) and z.dtype == conv_out.dtype:
            fusion.z = z
        else:
            return None
    act = activation_of(model, spec.activation, bindings)
    if act is None:
        return None
    fusion.activation, fusion.params, fusion.extra_inputs = act
    fusion.output = bindings["act_out"] if spec.activation else nodes[-1].outputs[0]
    return fusion


def _fusions(model: ir.Model) -> list[_Fusion]:
    """Every chain this pass fuses, in graph order of the phases (the one matcher of find and apply)."""
    return match_chains(model, _PHASES, _analyse)


@register_pass
class FuseConvActivation(Pass):
    name = "fuse_conv_activation"
    rule = "fuse conv + bias + residual add + activation into one kernel"
    needs_kiln_ops = True

    def find(self, model: ir.Model, ctx: PassContext) -> list[Finding]:
        unique_node_names(model)
        findings = []
        for f in _fusions(model):
            out = f.output
            assert out is not None, "_analyse sets every fusion's output"
            _, known = elements(out.shape, ctx)
            findings.append(Finding(
                rule="conv-without-fused-epilogue",
                title=f"{f.describe()} run as {len(f.nodes)} kernels",
                nodes=node_names(f.nodes),
                why="each op after the Conv writes the conv-sized tensor to memory and reads it back; "
                    "a fused conv applies bias, residual and activation before writing once",
                fix=f"fixed automatically by pass {self.name}"
                    + ("" if f.standard_conv
                       else " (emits ai.kiln::FusedConv: the builder, or kiln optimize --kiln-ops)"),
                pass_name=self.name,
                shapes=shapes_of([f.x, f.w, f.z, out]),
                details={"activation": f.activation, "activation_params": list(f.params),
                         "residual": f.z is not None, "bias_folded": f.bias_array is not None,
                         "ops_fused": len(f.nodes) - 1, "shape_known": known},
            ))
        return findings

    def apply(self, model: ir.Model, ctx: PassContext) -> int:
        if not ctx.kiln_ops:
            raise KilnError(f"pass {self.name} emits ai.kiln::FusedConv; run it with kiln_ops=True (--kiln-ops)")
        graph = model.graph
        unique_node_names(model)
        names = Names(graph)
        replaced: dict[int, ir.Value] = {}  # id(old value) -> the value now computing it

        def current(value: ir.Value | None) -> ir.Value | None:
            while value is not None and id(value) in replaced:
                value = replaced[id(value)]
            return value

        count = 0
        for f in _fusions(model):
            bias = f.bias
            if f.bias_array is not None:
                bias = add_initializer(graph, names, f"{f.conv.name}_bias", f.bias_array)
            attributes = [a for k, a in f.conv.attributes.items() if k in CONV_ATTRIBUTES]
            inputs = [current(f.x), f.w, bias] if bias is not None else [current(f.x), f.w]
            if f.standard_conv:
                node = ir.Node("", "Conv", inputs, attributes=attributes, name=f.conv.name)
            else:
                if f.z is not None:
                    inputs = [current(f.x), f.w, bias, current(f.z)]
                attributes.append(ir.AttrString("activation", f.activation))
                if f.params:
                    attributes.append(ir.AttrFloat32s("activation_params", [float(p) for p in f.params]))
                node = ir.Node(KILN_DOMAIN, "FusedConv", inputs, attributes=attributes, name=f.conv.name)
            new_out, output = node.outputs[0], f.output
            assert output is not None, "_analyse sets every fusion's output"
            record_fusion([node], f.nodes)
            ir.convenience.replace_nodes_and_values(graph, f.nodes[-1], f.nodes, [node], [output], [new_out])
            replaced[id(output)] = new_out
            remove_unused_producers(graph, [*f.extra_inputs, f.bias_source])
            ctx.log.append(f"{f.conv.name}: {f.describe()} -> "
                           f"{'Conv with bias' if f.standard_conv else 'FusedConv'} ({len(f.nodes)} nodes -> 1)")
            count += 1
        if any(n.domain == KILN_DOMAIN for n in graph):
            model.opset_imports.setdefault(KILN_DOMAIN, KILN_DOMAIN_VERSION)
        return count
