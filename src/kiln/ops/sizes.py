"""Output sizes known before an op runs: the tensor-size ceiling checked ahead of the allocation.

A few bytes of ONNX can ask for any amount of memory: a ConstantOfShape of [4, 2^30], an Expand
to [2^40], a Tile by 2^20, an Add of [N, 1] and [1, N], a MatMul of [N, 1] by [1, N], an Einsum
outer product, a Gather of a million rows. For every op whose output shape follows in a few
lines from its inputs' shapes, its attributes or a small value input (a shape, a count), this
module has a rule; the executor binds each such op to ``checked(fn, rule)``, which computes the
shape and refuses it with ``ResourceLimitError`` (``kiln.limits``) before the op allocates
anything. The engine's Node layers run the same bound functions, so engines are covered too.

Ops that work out their output shape by their own logic (Resize, Pad, CenterCropPad, Col2Im,
ConvTranspose, pooling pads, DFT, MaxUnpool, RoiAlign, TfIdfVectorizer) and ops whose output
grows as they run (Loop and Scan outputs, ConcatFromSequence) call ``OpContext.check_output``
themselves, where the shape is known. Ops whose output is no larger than an input (elementwise
unary ops, reductions, slices, reshapes, scatters, gathers along an index of the output's shape)
need no rule: their inputs already fit.

A rule returns ``(shape, dtype)`` for output 0, or None when it cannot tell (a shape the op
itself will refuse, a legacy broadcast): then the op runs and fails or succeeds on its own.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from kiln import dtypes
from kiln.ops.registry import OpContext

Rule = Callable[[OpContext, Sequence[Any]], "tuple[Sequence[int], Any] | None"]


def _shape(x: Any) -> tuple[int, ...] | None:
    return tuple(x.shape) if isinstance(x, (torch.Tensor, np.ndarray)) else None


def _ints(x: Any) -> list[int]:
    return [int(v) for v in (x.reshape(-1).tolist() if isinstance(x, (torch.Tensor, np.ndarray)) else x)]


def _dtype(x: Any) -> Any:
    return x.dtype


def _onnx_type(code: Any, default: Any) -> Any:
    """The torch dtype of an ONNX type attribute (``default`` when it is absent)."""
    kind = default if code is None else ir.DataType(int(code))
    return dtypes.TORCH_DTYPES.get(kind, kind) if isinstance(kind, ir.DataType) else kind


def _broadcast(dtype: Callable[[Sequence[Any]], Any] | None = None, first: int = 0) -> Rule:
    """Output = the broadcast of the tensor inputs' shapes (from input ``first`` on); its dtype is
    ``dtype(args)`` or that of input ``first``."""

    def rule(op, args):
        if op.opset < 7 and op.op_type in _LEGACY_BROADCAST:  # B broadcasts into A: A's shape
            return None
        shapes = [s for s in map(_shape, args[first:]) if s is not None]
        if not shapes:
            return None
        return torch.broadcast_shapes(*shapes), dtype(args) if dtype is not None else _dtype(args[first])

    return rule


_LEGACY_BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "And", "Or", "Xor", "Equal", "Greater", "Less"}


def _bool(args):
    return torch.bool


def _matmul_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """numpy's matmul shape rule (1-D operands promoted, then their axis dropped)."""
    a2 = (1, *a) if len(a) == 1 else a
    b2 = (*b, 1) if len(b) == 1 else b
    batch = torch.broadcast_shapes(a2[:-2], b2[:-2])
    out = (*batch, a2[-2], b2[-1])
    if len(b) == 1:
        out = out[:-1]
    if len(a) == 1:
        out = out[:-1] if len(b) == 1 else (*out[:-2], out[-1])
    return out


def _matmul(a_index: int = 0, b_index: int = 1, dtype: Any = None) -> Rule:
    def rule(op, args):
        a, b = _shape(args[a_index]), _shape(args[b_index])
        if a is None or b is None or not a or not b:
            return None
        return _matmul_shape(a, b), dtype if dtype is not None else _dtype(args[a_index])

    return rule


def _gemm(op, args):
    a, b = _shape(args[0]), _shape(args[1])
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None
    m = a[1] if op.attr("transA", 0) else a[0]
    n = b[0] if op.attr("transB", 0) else b[1]
    return (m, n), _dtype(args[0])


def _einsum(op, args):
    """The shape torch.einsum gives, worked out on meta tensors (nothing allocated)."""
    shapes = [_shape(x) for x in args]
    if any(s is None for s in shapes):
        return None
    equation = op.attr("equation")
    equation = equation.decode() if isinstance(equation, bytes) else str(equation)
    meta = [torch.empty(s, device="meta") for s in shapes]
    return tuple(torch.einsum(equation.replace(" ", ""), *meta).shape), _dtype(args[0])


def _concat(op, args):
    xs = [x for x in args if x is not None]
    shapes = [_shape(x) for x in xs]
    if not shapes or any(s is None or len(s) != len(shapes[0]) for s in shapes) or not shapes[0]:
        return None
    rank = len(shapes[0])
    axis = op.attr("axis", 1)
    axis = axis + rank if axis < 0 else axis
    if not 0 <= axis < rank:
        return None
    out = list(shapes[0])
    out[axis] = sum(s[axis] for s in shapes)
    return out, _dtype(xs[0])


def _gather(op, args):
    data, indices = _shape(args[0]), _shape(args[1])
    if data is None or indices is None or not data:
        return None
    axis = op.attr("axis", 0)
    axis = axis + len(data) if axis < 0 else axis
    return (*data[:axis], *indices, *data[axis + 1:]), _dtype(args[0])


def _gather_nd(op, args):
    data, indices = _shape(args[0]), _shape(args[1])
    if data is None or indices is None or not indices:
        return None
    batch = op.attr("batch_dims", 0)
    return (*indices[:-1], *data[batch + indices[-1]:]), _dtype(args[0])


def _grid_sample(op, args):
    x, grid = _shape(args[0]), _shape(args[1])
    if x is None or grid is None or len(x) < 2 or len(grid) < 2:
        return None
    return (x[0], x[1], *grid[1:-1]), _dtype(args[0])


def _constant_of_shape(op, args):
    value = op.attr("value")
    return _ints(args[0]), value.dtype if isinstance(value, torch.Tensor) else torch.float32


def _expand(op, args):
    return torch.broadcast_shapes(_shape(args[0]), tuple(_ints(args[1]))), _dtype(args[0])


def _tile(op, args):
    shape = _shape(args[0])
    if op.opset < 6:
        repeats = [1] * len(shape)
        repeats[int(args[2].reshape(()).item()) % len(shape)] = int(args[1].reshape(()).item())
    else:
        repeats = _ints(args[1])
    if len(repeats) != len(shape):
        return None
    return [n * r for n, r in zip(shape, repeats)], _dtype(args[0])


def _range(op, args):
    start, limit, delta = (float(a.reshape(()).item()) if a.is_floating_point() else int(a.reshape(()).item())
                           for a in args[:3])
    if delta == 0:
        return None
    count = math.ceil((limit - start) / delta) if isinstance(start, float) else -((start - limit) // delta)
    return (max(count, 0),), torch.float64 if args[0].is_floating_point() else torch.int64


def _one_hot(op, args):
    indices = _shape(args[0])
    depth = int(args[1].reshape(-1)[0].item())
    rank = len(indices) + 1
    axis = op.attr("axis", -1)
    axis = axis + rank if axis < 0 else axis
    if not 0 <= axis < rank:
        return None
    return (*indices[:axis], depth, *indices[axis:]), _dtype(args[2])


def _eye_like(op, args):
    return _shape(args[0]), _onnx_type(op.attr("dtype"), _dtype(args[0]))


def _random(op, args):
    return list(op.attr("shape")), _onnx_type(op.attr("dtype"), ir.DataType.FLOAT)


def _random_like(op, args):
    return _shape(args[0]), _onnx_type(op.attr("dtype"), _dtype(args[0]))


def _multinomial(op, args):
    shape = _shape(args[0])
    return (shape[0], op.attr("sample_size", 1)), _onnx_type(op.attr("dtype"), ir.DataType.INT32)


def _window(op, args):
    return (int(args[0].reshape(()).item()),), _onnx_type(op.attr("output_datatype"), ir.DataType.FLOAT)


def _mel_weight_matrix(op, args):
    bins, dft_length = int(args[0].reshape(()).item()), int(args[1].reshape(()).item())
    return (dft_length // 2 + 1, bins), _onnx_type(op.attr("output_datatype"), ir.DataType.FLOAT)


def _affine_grid(op, args):
    size = _ints(args[1])
    if len(size) not in (4, 5):
        return None
    return (size[0], *size[2:], len(size) - 2), _dtype(args[0])


RULES: dict[tuple[str, str], Rule] = {
    **{("", name): _broadcast() for name in (
        "Add", "Sub", "Mul", "Div", "Pow", "Mod", "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "Max", "Min",
        "Sum", "Mean", "PRelu")},
    **{("", name): _broadcast(_bool) for name in (
        "And", "Or", "Xor", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual")},
    ("", "Where"): _broadcast(lambda args: _dtype(args[1])),
    ("", "StringConcat"): _broadcast(),
    ("", "MatMul"): _matmul(),
    ("", "MatMulInteger"): _matmul(dtype=torch.float64),  # computed in float64, then narrowed
    ("", "QLinearMatMul"): _matmul(0, 3, dtype=torch.float64),
    ("", "Gemm"): _gemm,
    ("", "Einsum"): _einsum,
    ("", "Concat"): _concat,
    ("", "Gather"): _gather,
    ("", "GatherND"): _gather_nd,
    ("", "GridSample"): _grid_sample,
    ("", "ConstantOfShape"): _constant_of_shape,
    ("", "Expand"): _expand,
    ("", "Tile"): _tile,
    ("", "Range"): _range,
    ("", "OneHot"): _one_hot,
    ("", "EyeLike"): _eye_like,
    ("", "RandomNormal"): _random,
    ("", "RandomUniform"): _random,
    ("", "RandomNormalLike"): _random_like,
    ("", "RandomUniformLike"): _random_like,
    ("", "Multinomial"): _multinomial,
    ("", "HannWindow"): _window,
    ("", "HammingWindow"): _window,
    ("", "BlackmanWindow"): _window,
    ("", "MelWeightMatrix"): _mel_weight_matrix,
    ("", "AffineGrid"): _affine_grid,
}


def checked(fn: Callable[..., Any], rule: Rule) -> Callable[..., Any]:
    """``fn`` preceded by ``rule``'s output size against the ceiling (see the module docstring)."""

    @functools.wraps(fn)
    def run(op: OpContext, *args: Any) -> Any:
        try:
            found = rule(op, args)
        except Exception:  # noqa: BLE001 - a shape the rule cannot read: the op says what is wrong with it
            found = None
        if found is not None:
            shape, dtype = found
            if all(isinstance(d, int) and d >= 0 for d in shape):
                op.check_output(shape, dtype)
        return fn(op, *args)

    return run


def bind(domain: str, op_type: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, checked against the ceiling first where this module has a rule for the op."""
    rule = RULES.get((domain, op_type))
    return fn if rule is None else checked(fn, rule)
