"""Pad GEMM and convolution dimensions to what tensor cores need, with zero weights, exactly.

Playbook rule: "tensor cores need aligned dims: TF32 x4, FP16/BF16 x8, INT8/FP8 x16; FP16 MatMul: K
(and N) multiples of 8, else pad". A cuBLAS GEMM or cuDNN convolution whose K (reduction) or N
(output columns / channels) is not a multiple of the alignment runs a slower kernel, or none on
tensor cores at all; padding with zero weights makes the same math aligned.

Rewrites (``ctx.alignment`` = A; a dimension d is padded to the next multiple of A):

1. ``MatMul(X, W)`` with ``W`` a constant ``[K, N]``:
   N misaligned -> zero columns in W, then ``Slice`` the output back to N on the last axis;
   K misaligned -> zero rows in W and X padded with zeros on its last axis.
2. ``Gemm(A, B[, C])`` with ``B`` constant (``transA``/``transB`` honoured): the same, with C padded
   with zeros where it spans N (a constant is padded in place of a copy, a computed C by ``Pad``).
3. ``Conv`` / ``ai.kiln::FusedConv`` with ``W`` constant and ``group`` 1: output channels padded with
   zero filters (and zero bias, and the residual padded), then ``Slice`` back on axis 1; input
   channels padded with zero weight channels and the input padded on axis 1. A first layer's four
   input channels (a graph input, or one through a Pad) are left as they are: cuDNN has dedicated
   C=4 kernels, which is what ``pad_input_channels`` gives RGB.

An input that needs padding is padded by a ``Pad`` node, except where the padding folds into
constants: when the value comes (directly, or through single-consumer pointwise ops: activations,
BatchNormalization, Add/Sub/Mul/Div/Max/Min by constants) from a ``Slice`` this pass wrote, the
consumer reads the unsliced, already padded tensor (constants on the way are padded too: zeros, ones
for a divisor or a variance). The padded entries there are finite and meet zero weights, so every
rewrite is exact. Only standard ONNX ops are written (Pad and Slice in the opset's own form).

Decision: when ``ctx.measure`` is set (the builder on a GPU), the original op and the padded one,
with the copies its Pad and Slice make, are timed with kiln's reference ops (cuBLAS/cuDNN) on
``ctx.device`` at the concrete shapes in the precision's dtype; a rewrite is kept only when it is
faster. Without ``measure``, or where a shape is not concrete, or for int8/fp8 (torch has no
general kernel to time at a misaligned shape), the rule decides: misaligned -> pad. Each decision
is in ``ctx.log``.

Does not fire: at fp32 (alignment 1); when the weight is not a constant 2-D matrix (MatMul/Gemm) or
constant (Conv); for grouped and depthwise convs; when a shape the rewrite needs (rank, the padded
dim, a computed Gemm C's last dim) is unknown; at opset 1; in subgraphs. ``find`` also reports
misaligned GEMMs it cannot fix (both operands computed, grouped convs), saying what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from kiln.ops import OpContext, lookup
from kiln.passes._conv import (
    can_pad,
    elements,
    is_conv,
    make_pad,
    pad_array,
    with_dim,
)
from kiln.passes.framework import KILN_DOMAIN, Finding, Pass, PassContext, register_pass
from kiln.passes.rewriting import (
    Names,
    add_initializer,
    attrs_of,
    constant_array,
    node_names,
    opset,
    remove_unused_producers,
    shapes_of,
    unique_node_names,
)
from kiln.precision import PRECISION_DTYPES, tf32_for

FOLD_DEPTH = 8  # pointwise ops a padded value may pass through between a Slice and its consumer

# Pointwise ops a padded tensor may flow through: finite on finite input, one computed input.
_UNARY = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Gelu", "Erf", "Neg", "Abs",
          "Identity", "Softsign", "Elu", "Selu", "Celu", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign",
          "Clip", "Dropout"}
# binary op -> the fill for a constant operand that spans the padded axis
_BINARY_FILL = {"Add": 0.0, "Sub": 0.0, "Mul": 0.0, "Div": 1.0, "Max": 0.0, "Min": 0.0, "PRelu": 0.0}
# BatchNormalization scale, B, mean, var: padded channels get 0 * (0 - 0) / sqrt(1 + eps) + 0
_BATCHNORM_FILL = (0.0, 0.0, 0.0, 1.0)


def _aligned(d: int, a: int) -> int:
    return -(-d // a) * a


@dataclass
class _Input:
    """A computed input of the op that has to be padded: input index, axis, size before and after."""

    index: int
    axis: int
    size: int
    padded: int


@dataclass
class _Site:
    """One misaligned MatMul/Gemm/Conv; ``fixable`` when this pass can rewrite it."""

    node: ir.Node
    kind: str  # "MatMul", "Gemm", "Conv"
    k: int
    n: int
    alignment: int
    fixable: bool
    fix: str = ""
    c4_first_layer: bool = False
    weight_pads: list[tuple[int, int, int, float]] = field(default_factory=list)  # (input, axis, size, fill)
    inputs: list[_Input] = field(default_factory=list)  # computed inputs to pad
    out_axis: int = -1  # the output axis sliced back when N is padded
    n_padded: int = 0
    k_padded: int = 0

    @property
    def pad_k(self) -> bool:
        """K (input channels) misaligned, a first layer's C=4 excepted."""
        return self.k % self.alignment != 0 and not self.c4_first_layer

    @property
    def pad_n(self) -> bool:
        return self.n % self.alignment != 0

    def describe(self) -> str:
        k_name, n_name = ("C_in", "C_out") if self.kind == "Conv" else ("K", "N")
        dims = []
        if self.pad_k:
            dims.append(f"{k_name} {self.k}->{_aligned(self.k, self.alignment)}")
        if self.pad_n:
            dims.append(f"{n_name} {self.n}->{_aligned(self.n, self.alignment)}")
        return f"{self.kind} " + ", ".join(dims)


def _make_slice(model: ir.Model, names: Names, y: ir.Value, axis: int, size: int, out: ir.Value, base: str) -> ir.Node:
    """A standard ``Slice`` node keeping the first ``size`` entries of ``y`` on ``axis`` into ``out``.
    The node is not inserted."""
    if opset(model) >= 10:
        graph = model.graph
        starts = add_initializer(graph, names, f"{base}_starts", np.asarray([0], dtype=np.int64))
        ends = add_initializer(graph, names, f"{base}_ends", np.asarray([size], dtype=np.int64))
        axes = add_initializer(graph, names, f"{base}_axes", np.asarray([axis], dtype=np.int64))
        return ir.Node("", "Slice", [y, starts, ends, axes], outputs=[out], name=names.fresh(f"{base}/slice"))
    return ir.Node("", "Slice", [y], attributes=[ir.AttrInt64s("starts", [0]), ir.AttrInt64s("ends", [size]),
                                                  ir.AttrInt64s("axes", [axis])],
                   outputs=[out], name=names.fresh(f"{base}/slice"))


def _known(d: int | ir.SymbolicDim | None) -> int | None:
    """A static size, or None: symbolic, unknown, and negative dims (an in-memory model's ``-1``;
    files have theirs made unknown at load time) are no size to pad to or build a tensor of."""
    return d if isinstance(d, int) and d >= 0 else None


def _static(shape: ir.Shape | None, axis: int) -> int | None:
    if shape is None or not -len(shape) <= axis < len(shape):
        return None
    return _known(shape[axis])


def _site(model: ir.Model, node: ir.Node, ctx: PassContext) -> _Site | None:
    """The misalignment at ``node`` (None when aligned, unknown, or not a GEMM/conv)."""
    a = ctx.alignment
    if node.domain in ("", "ai.onnx") and node.op_type == "MatMul":
        return _matmul_site(node, a, ctx)
    if node.domain in ("", "ai.onnx") and node.op_type == "Gemm":
        return _gemm_site(node, a, ctx)
    if is_conv(node):
        return _conv_site(model, node, a, ctx)
    return None


def _matmul_site(node: ir.Node, a: int, ctx: PassContext) -> _Site | None:
    x, w = node.inputs[0], node.inputs[1]
    if x is None or w is None:
        return None
    weights = constant_array(w)
    k: int | None
    n: int | None
    if weights is not None and weights.ndim == 2:
        k, n = (int(d) for d in weights.shape)
    else:
        k, n = _static(x.shape, -1), _static(w.shape, -1)
        if k is None or n is None or w.shape is None or len(w.shape) < 2:
            return None
    if k % a == 0 and n % a == 0:
        return None
    rows, _ = elements(x.shape, ctx)
    site = _Site(node, "MatMul", k, n, a, False)
    y = node.outputs[0]
    if weights is None or weights.ndim != 2:
        site.fix = (f"the weight operand is computed ({w.name}): choose sizes (hidden size, head dim, vocabulary) "
                    f"that are multiples of {a}, or pad them in the model")
        return site
    if x.shape is None or _static(x.shape, -1) != k or y.shape is None:
        site.fix = f"shapes unknown; choose K and N that are multiples of {a}"
        return site
    _plan_gemm(site, k_axis=0, n_axis=1, x_index=0, x_axis=len(x.shape) - 1, out_axis=len(y.shape) - 1)
    return site


def _gemm_site(node: ir.Node, a: int, ctx: PassContext) -> _Site | None:
    attrs = attrs_of(node)
    trans_a, trans_b = int(attrs.get("transA", 0)), int(attrs.get("transB", 0))
    x, w = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if x is None or w is None:
        return None
    weights = constant_array(w)
    k: int | None
    n: int | None
    if weights is not None and weights.ndim == 2:
        k, n = (int(d) for d in (weights.shape[::-1] if trans_b else weights.shape))
    else:
        k, n = _static(x.shape, 0 if trans_a else 1), _static(w.shape, 0 if trans_b else 1)
        if k is None or n is None:
            return None
    if k % a == 0 and n % a == 0:
        return None
    site = _Site(node, "Gemm", k, n, a, False)
    if weights is None or weights.ndim != 2:
        site.fix = (f"the weight operand is computed ({w.name}): choose sizes that are multiples of {a}, "
                    f"or pad them in the model")
        return site
    if x.shape is None or len(x.shape) != 2 or _static(x.shape, 0 if trans_a else 1) != k:
        site.fix = f"shapes unknown; choose K and N that are multiples of {a}"
        return site
    _plan_gemm(site, k_axis=1 if trans_b else 0, n_axis=0 if trans_b else 1, x_index=0,
               x_axis=0 if trans_a else 1, out_axis=1)
    if c is not None and n % a:
        c_const = constant_array(c)
        c_last = int(c_const.shape[-1]) if c_const is not None and c_const.ndim else (
            _static(c.shape, -1) if c.shape is not None and len(c.shape) else 1)
        if c_last is None:
            site.fixable = False
            site.fix = f"the bias C has an unknown last dimension; choose N a multiple of {a}"
            return site
        if c_last == n and n > 1:
            if c_const is not None:
                site.weight_pads.append((2, c_const.ndim - 1, site.n_padded, 0.0))
            else:
                assert c.shape is not None, "c_last came from C's shape"
                site.inputs.append(_Input(2, len(c.shape) - 1, n, site.n_padded))
    return site


def _plan_gemm(site: _Site, k_axis: int, n_axis: int, x_index: int, x_axis: int, out_axis: int) -> None:
    a = site.alignment
    site.fixable = True
    site.k_padded, site.n_padded = _aligned(site.k, a), _aligned(site.n, a)
    if site.k % a:
        site.weight_pads.append((1, k_axis, site.k_padded, 0.0))
        site.inputs.append(_Input(x_index, x_axis, site.k, site.k_padded))
    if site.n % a:
        site.weight_pads.append((1, n_axis, site.n_padded, 0.0))
        site.out_axis = out_axis
    site.fix = "fixed automatically by pass pad_for_tensor_cores (kept where the builder measures a gain)"


def _first_layer(model: ir.Model, x: ir.Value) -> bool:
    """Whether ``x`` is a graph input, or a graph input through one Pad (``pad_input_channels``)."""
    inputs = {id(v) for v in model.graph.inputs}
    source: ir.Value | None = x
    producer = x.producer()
    if producer is not None and producer.op_type == "Pad" and producer.domain in ("", "ai.onnx"):
        source = producer.inputs[0]
    return id(source) in inputs


def _conv_site(model: ir.Model, node: ir.Node, a: int, ctx: PassContext) -> _Site | None:
    x, w = node.inputs[0], node.inputs[1]
    if x is None or w is None:
        return None
    weights = constant_array(w)
    w_shape = list(weights.shape) if weights is not None else (
        [_known(d) for d in w.shape] if w is not None and w.shape is not None else None)
    if w_shape is None or len(w_shape) < 3 or w_shape[0] is None or w_shape[1] is None:
        return None
    group = int(attrs_of(node).get("group", 1))
    cout, cin_per_group = int(w_shape[0]), int(w_shape[1])
    if cin_per_group == 1 and group > 1:
        return None  # depthwise: not a GEMM, tensor cores do not apply
    cout_per_group = cout // group
    k_misaligned = cin_per_group % a != 0 and not (cin_per_group == 4 and group == 1 and _first_layer(model, x))
    if not k_misaligned and cout_per_group % a == 0:
        return None
    site = _Site(node, "Conv", cin_per_group, cout_per_group, a, False,
                 c4_first_layer=cin_per_group % a != 0 and not k_misaligned)
    if group != 1:
        site.fix = f"grouped conv: choose channels per group that are multiples of {a}"
        return site
    if weights is None:
        site.fix = f"the conv weight is computed ({w.name}); choose channel counts that are multiples of {a}"
        return site
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    z = node.inputs[3] if len(node.inputs) > 3 else None
    if (bias is not None and constant_array(bias) is None) or x.shape is None or len(x.shape) != weights.ndim \
            or _static(x.shape, 1) != cin_per_group or node.outputs[0].shape is None \
            or (z is not None and (z.shape is None or _static(z.shape, 1) != cout)):
        site.fix = f"shapes unknown or bias computed; choose channel counts that are multiples of {a}"
        return site
    site.fixable = True
    site.fix = "fixed automatically by pass pad_for_tensor_cores (kept where the builder measures a gain)"
    site.k_padded = _aligned(cin_per_group, a) if k_misaligned else cin_per_group
    site.n_padded = _aligned(cout, a)
    if k_misaligned:
        site.weight_pads.append((1, 1, site.k_padded, 0.0))
        site.inputs.append(_Input(0, 1, cin_per_group, site.k_padded))
    if cout % a:
        site.weight_pads.append((1, 0, site.n_padded, 0.0))
        if bias is not None:
            site.weight_pads.append((2, 0, site.n_padded, 0.0))
        if z is not None:
            site.inputs.append(_Input(3, 1, cout, site.n_padded))
        site.out_axis = 1
    return site


def _sites(model: ir.Model, ctx: PassContext) -> list[_Site]:
    """Every misaligned GEMM/conv of the main graph (the one matcher of find and apply)."""
    if ctx.alignment <= 1:
        return []
    sites = []
    for node in model.graph:
        site = _site(model, node, ctx)
        if site is not None:
            if site.fixable and not can_pad(model):
                site.fixable, site.fix = False, f"opset 1: choose sizes that are multiples of {ctx.alignment}"
            sites.append(site)
    return sites


# --- folding a pad into the Slice that produced the value -----------------------------------------------


@dataclass
class _Fold:
    """How a consumer reads a padded value without a Pad: the Slice it came from and the pointwise
    ops in between (in data order) with the constants to pad."""

    slice_node: ir.Node
    padded: ir.Value  # the Slice's input: the tensor before it was cut back
    chain: list[tuple[ir.Node, int]]  # (node, index of its input on the path)


def _constant_fill(node: ir.Node, index: int) -> float | None:
    if node.op_type == "BatchNormalization":
        return _BATCHNORM_FILL[index - 1] if 1 <= index <= 4 else None
    return _BINARY_FILL.get(node.op_type)


def _constant_padding(node: ir.Node, index: int, rank: int, axis: int,
                      size: int) -> tuple[int, float] | None | Literal[False]:
    """For a constant input of a pointwise op on the path: (axis of the constant to pad, fill), None
    when it needs no padding (broadcast on that axis), False when it cannot be padded."""
    array = constant_array(node.inputs[index])
    if array is None:
        return False
    if node.op_type == "Clip" or node.op_type == "Dropout":
        return None if array.size == 1 else False
    fill = _constant_fill(node, index)
    if fill is None:
        return False
    if node.op_type == "BatchNormalization":
        return (0, fill) if axis == 1 and array.shape == (size,) else False
    if array.ndim > rank:
        return False
    position = axis - (rank - array.ndim)
    if position < 0 or array.shape[position] == 1:
        return None
    return (position, fill) if array.shape[position] == size else False


def _fold(value: ir.Value, consumer: ir.Node, axis: int, size: int, padded: int,
          slices: dict[int, tuple[ir.Value, int, int]]) -> _Fold | None:
    """The fold for ``value`` (read by ``consumer``) padded on ``axis`` from ``size`` to ``padded``, or None."""
    chain: list[tuple[ir.Node, int]] = []
    rank = len(value.shape) if value.shape is not None else None
    if rank is None:
        return None
    current = value
    for _ in range(FOLD_DEPTH + 1):
        node = current.producer()
        if node is None or current.shape is None or len(current.shape) != rank:
            return None
        if id(node) in slices:  # the Slice's output may have other readers: the Slice stays for them
            source, s_axis, s_padded = slices[id(node)]
            return _Fold(node, source, chain[::-1]) if (s_axis, s_padded) == (axis, padded) else None
        if current.is_graph_output():
            return None
        users = list(current.uses())
        if len(users) != 1 or (chain and users[0].node is not chain[-1][0]) \
                or (not chain and users[0].node is not consumer):
            return None
        if len(chain) == FOLD_DEPTH or node.domain not in ("", "ai.onnx", KILN_DOMAIN):
            return None
        if node.domain == KILN_DOMAIN and node.op_type != "Gelu":
            return None
        if node.op_type not in _UNARY and node.op_type not in _BINARY_FILL and node.op_type != "BatchNormalization":
            return None
        if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            return None
        computed = [i for i, v in enumerate(node.inputs) if v is not None and constant_array(v) is None]
        if len(computed) != 1:
            return None
        for i, v in enumerate(node.inputs):
            if v is not None and i != computed[0] and _constant_padding(node, i, rank, axis, size) is False:
                return None
        chain.append((node, computed[0]))
        upstream = node.inputs[computed[0]]
        assert upstream is not None, "computed lists present inputs"
        current = upstream
    return None


def _commit_fold(model: ir.Model, names: Names, fold: _Fold, axis: int, size: int, padded: int) -> ir.Value:
    """Rewire the path onto the unsliced tensor; returns the padded value the consumer should read."""
    graph = model.graph
    current = fold.padded
    # _fold found the Slice's output of known rank; the Slice's input (its shape with one dim padded) has it too
    assert current.shape is not None, "a fold's padded value has a known rank"
    rank = len(current.shape)
    for node, index in fold.chain:
        node.replace_input_with(index, current)
        for i, v in enumerate(list(node.inputs)):
            if v is None or i == index:
                continue
            padding = _constant_padding(node, i, rank, axis, size)
            if padding:
                p_axis, fill = padding
                array = constant_array(v)
                assert array is not None, "_constant_padding pads only a constant"
                new = add_initializer(graph, names, f"{v.name or node.name}_padded",
                                      pad_array(array, p_axis, padded, fill))
                node.replace_input_with(i, new)
                remove_unused_producers(graph, [v])
        out = node.outputs[0]
        out.shape = with_dim(out.shape, axis, padded)
        current = out
    return current


def _drop_unused_slice(graph: ir.Graph, node: ir.Node) -> None:
    """Remove one of this pass's Slices once every reader takes the padded tensor instead."""
    sliced = node.outputs[0]
    if node.graph is graph and not sliced.uses() and not sliced.is_graph_output():
        inputs = list(node.inputs[1:])
        graph.remove(node, safe=True)
        remove_unused_producers(graph, inputs)


# --- timing -------------------------------------------------------------------------------------------------


def _measured(site: _Site, model: ir.Model, ctx: PassContext, padded_weights: dict[int, np.ndarray],
              folded: set[int]) -> tuple[bool, str]:
    """(keep, log text): time the original op against the padded one (with its Pad and Slice copies)."""
    if ctx.measure is None:
        return True, "not measured (no measure hook): padded by rule"
    dtype = PRECISION_DTYPES.get(ctx.precision)  # none for int8/fp8: no layer runs at them yet
    if dtype is None:
        return True, f"not measured (torch has no general {ctx.precision} kernel at misaligned shapes): padded by rule"
    node = site.node
    shapes = {}
    for i, v in enumerate(node.inputs):
        if v is not None and constant_array(v) is None:
            shape = ctx.concrete(v.shape)
            if shape is None:
                return True, f"not measured (input {v.name} has no concrete shape; give its dims): padded by rule"
            shapes[i] = shape
    device = torch.device(ctx.device)
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    version = max(opset(model, domain), 1) if domain else opset(model)
    fn = lookup(domain, node.op_type, version)
    assert fn is not None, "kiln runs MatMul, Gemm and Conv at every opset"
    op = OpContext(node, version, device)
    generator = torch.Generator().manual_seed(0)

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype)

    original: list[Any] = []
    padded: list[Any] = []
    pads: dict[int, tuple[int, int]] = {p.index: (p.axis, p.padded - p.size) for p in site.inputs}
    for i, v in enumerate(node.inputs):
        if v is None:
            original.append(None)
            padded.append(None)
        elif i in shapes:
            t = torch.randn(shapes[i], generator=generator).to(device=device, dtype=dtype)
            original.append(t)
            if i in pads and i in folded:
                padded.append(_pad_tensor(t, *pads[i]))  # produced padded upstream: no copy here
            else:
                padded.append(t)
        else:
            array = constant_array(v)
            assert array is not None, "an input without a shape to time is a constant"
            original.append(tensor(array))
            padded.append(tensor(padded_weights.get(i, array)))
    copies = {i: p for i, p in pads.items() if i not in folded}

    def run_original() -> torch.Tensor:
        return fn(op, *original)

    def run_padded() -> torch.Tensor:
        args = [(_pad_tensor(t, *copies[i]) if i in copies else t) for i, t in enumerate(padded)]
        y = fn(op, *args)
        return y.narrow(site.out_axis, 0, site.n).contiguous() if site.out_axis >= 0 else y

    with tf32_for(ctx.precision):
        ms_original, ms_padded = ctx.measure(run_original, run_padded)
    keep = ms_padded < ms_original
    verdict = "kept" if keep else "dropped"
    return keep, f"measured {ms_original:.4f} ms -> {ms_padded:.4f} ms padded: {verdict}"


def _pad_tensor(t: torch.Tensor, axis: int, amount: int) -> torch.Tensor:
    widths = [0, 0] * (t.ndim - 1 - axis) + [0, amount]
    return F.pad(t, widths)


# --- the pass ----------------------------------------------------------------------------------------------


@register_pass
class PadForTensorCores(Pass):
    name = "pad_for_tensor_cores"
    rule = "tensor cores need aligned dims (TF32 x4, FP16/BF16 x8, INT8/FP8 x16): pad K/N and channels with zeros"

    def find(self, model: ir.Model, ctx: PassContext) -> list[Finding]:
        unique_node_names(model)
        findings = []
        for s in _sites(model, ctx):
            node = s.node
            values = [v for v in node.inputs[:2]] + [node.outputs[0]]
            findings.append(Finding(
                rule="misaligned-dims",
                title=f"{node.name}: {s.describe()} (multiples of {s.alignment} for {ctx.precision} tensor cores)",
                nodes=node_names([node]),
                why=f"{ctx.precision} tensor-core kernels need K and N (channels for a conv) to be multiples of "
                    f"{s.alignment}; otherwise a slower kernel, or no tensor-core kernel at all, runs",
                fix=s.fix,
                pass_name=self.name if s.fixable else None,
                shapes=shapes_of(values),
                details={"k": s.k, "n": s.n, "alignment": s.alignment, "op": s.kind},
            ))
        return findings

    def apply(self, model: ir.Model, ctx: PassContext) -> int:
        graph = model.graph
        unique_node_names(model)
        names = Names(graph)
        slices: dict[int, tuple[ir.Value, int, int]] = {}  # id(our Slice node) -> (unsliced value, axis, size)
        count = 0
        for site in _sites(model, ctx):
            if not site.fixable:
                continue
            node = site.node
            padded_weights: dict[int, np.ndarray] = {}
            for index, axis, size, fill in site.weight_pads:
                array = padded_weights.get(index, constant_array(node.inputs[index]))
                assert array is not None, "the site pads only constant weights"
                padded_weights[index] = pad_array(array, axis, size, fill)
            folds = {}
            for p in site.inputs:
                value = node.inputs[p.index]
                assert value is not None, "the site pads only inputs it read"
                fold = _fold(value, node, p.axis, p.size, p.padded, slices)
                if fold is not None:
                    folds[p.index] = fold
            keep, how = _measured(site, model, ctx, padded_weights, set(folds))
            ctx.log.append(f"{node.name}: {site.describe()}: {how}")
            if not keep:
                continue
            self._rewrite(model, names, site, padded_weights, folds, slices)
            count += 1
        return count

    def _rewrite(self, model: ir.Model, names: Names, site: _Site, padded_weights: dict[int, np.ndarray],
                 folds: dict[int, _Fold], slices: dict[int, tuple[ir.Value, int, int]]) -> None:
        graph = model.graph
        node = site.node
        inputs = list(node.inputs)
        old_constants = []
        for index, array in padded_weights.items():
            weight = inputs[index]
            assert weight is not None, "the site pads only constant weights"
            old_constants.append(weight)
            inputs[index] = add_initializer(graph, names, f"{weight.name or node.name}_aligned", array)
        for p in site.inputs:
            if p.index in folds:
                inputs[p.index] = _commit_fold(model, names, folds[p.index], p.axis, p.size, p.padded)
            else:
                x = inputs[p.index]
                assert x is not None, "the site pads only inputs it read"
                pad = make_pad(model, names, x, p.axis, p.padded, f"{node.name}_in{p.index}")
                graph.insert_before(node, pad)
                inputs[p.index] = pad.outputs[0]
        y = node.outputs[0]
        sliced = site.out_axis >= 0
        out = ir.Value(name=names.fresh(f"{y.name}_aligned") if sliced else None, type=y.type,
                       shape=with_dim(y.shape, site.out_axis, site.n_padded) if sliced else y.shape)
        new = ir.Node(node.domain, node.op_type, inputs, attributes=list(node.attributes.values()),
                      outputs=[out], name=node.name, metadata_props=dict(node.metadata_props))
        new_nodes = [new]
        final = out
        if sliced:
            final = ir.Value(type=y.type, shape=y.shape)
            cut = _make_slice(model, names, out, site.out_axis, site.n, final, node_names([node])[0])
            new_nodes.append(cut)
            slices[id(cut)] = (out, site.out_axis, site.n_padded)
        ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [y], [final])
        remove_unused_producers(graph, old_constants)
        for fold in folds.values():
            _drop_unused_slice(graph, fold.slice_node)

