"""Elementwise math: unary and binary arithmetic, comparisons, logic, bitwise ops and activations.

torch cannot compute with uint16/uint32/uint64: integer ops go through ``dtypes.computable`` (uint16
and uint32 widen to int64 exactly, uint64 becomes an int64 bit view) and ``dtypes.restore``. The bit
view is exact for +, -, *, bitwise ops and shifts; order (compare, Max, Min, Clip) flips the sign bit
first (``dtypes.ordered``) and division uses an unsigned 64-bit long division (``_udiv64``).
Opsets before 7 broadcast binary ops by the ``broadcast``/``axis`` attributes (``_legacy``).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from kiln.dtypes import UNSIGNED_WIDE, computable, ordered, restore, unordered
from kiln.ops.registry import OpContext, register

_I64_MIN = -(2**63)
_I64_MAX = 2**63 - 1
_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz)


def _is_int(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _is_unsigned(dtype: torch.dtype) -> bool:
    return dtype == torch.uint8 or dtype in UNSIGNED_WIDE


# -- helpers for unsigned types -------------------------------------------------------------------
def _u64_less(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Unsigned a < b on int64 bit views of uint64."""
    return (a ^ _I64_MIN) < (b ^ _I64_MIN)


def _udiv64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Unsigned 64-bit quotient on int64 bit views (Hacker's Delight 9-3)."""
    a, b = torch.broadcast_tensors(a, b)
    big = b < 0  # divisor >= 2**63: the quotient is 0 or 1
    divisor = torch.where(big, torch.ones_like(b), b)
    q = torch.div((a >> 1) & _I64_MAX, divisor, rounding_mode="trunc") << 1
    q = q + (~_u64_less(a - q * divisor, divisor)).to(torch.int64)
    return torch.where(big, (~_u64_less(a, b)).to(torch.int64), q)


def _int_binary(fn, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``fn`` on integer tensors of any width, wrapping as C does."""
    return restore(fn(computable(a), computable(b)), a.dtype)


# -- legacy (opset < 7) broadcasting --------------------------------------------------------------
def _legacy(op: OpContext, a, b):
    """Opset 1-6 binary ops: with ``broadcast=1``, B's shape matches a run of A's dims from ``axis``
    (default: A's trailing dims); otherwise shapes must be equal."""
    if not op.attr("broadcast", 0):
        if tuple(a.shape) != tuple(b.shape):
            raise op.fail(f"shapes {list(a.shape)} and {list(b.shape)} differ and broadcast=0 (opset < 7)")
        return a, b
    if b.dim() > a.dim():
        raise op.fail(f"legacy broadcast needs B (rank {b.dim()}) no larger than A (rank {a.dim()})")
    axis = op.attr("axis", None)
    axis = a.dim() - b.dim() if axis is None else (axis + a.dim() if axis < 0 else axis)
    if axis < 0 or axis + b.dim() > a.dim():
        raise op.fail(
            f"legacy broadcast axis {op.attr('axis')} does not fit B of rank {b.dim()} in A of rank {a.dim()}"
        )
    return a, b.reshape([1] * axis + list(b.shape) + [1] * (a.dim() - axis - b.dim()))


def _register_binary(name: str, fn, versions: tuple[int, ...], legacy_until: int = 7):
    """Register ``fn(op, a, b)`` for every version; those before ``legacy_until`` broadcast the legacy way."""
    for since in versions:
        if since < legacy_until:

            def legacy_fn(op, a, b, _fn=fn):
                return _fn(op, *_legacy(op, a, b))

            legacy_fn.__doc__ = fn.__doc__
            register(name, since=since)(legacy_fn)
        else:
            register(name, since=since)(fn)


# -- arithmetic -----------------------------------------------------------------------------------
def _add(op, a, b):
    return _int_binary(torch.add, a, b) if _is_int(a) else a + b


def _sub(op, a, b):
    return _int_binary(torch.sub, a, b) if _is_int(a) else a - b


def _mul(op, a, b):
    return _int_binary(torch.mul, a, b) if _is_int(a) else a * b


def _div(op, a, b):
    """Integer Div truncates toward zero (C), unlike Python's floor: ``rounding_mode='trunc'``."""
    if not _is_int(a):
        return a / b
    if a.dtype == torch.uint64:
        return _udiv64(a.view(torch.int64), b.view(torch.int64)).view(torch.uint64)
    return _int_binary(functools.partial(torch.div, rounding_mode="trunc"), a, b)


_register_binary("Add", _add, (1, 7))
_register_binary("Sub", _sub, (1, 7))
_register_binary("Mul", _mul, (1, 7))
_register_binary("Div", _div, (1, 7))


def _float_mod(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Floored float modulo with the spec's (numpy's) special cases: start from C fmod, then move a
    remainder whose sign differs from B's by B; a zero remainder takes B's sign."""
    r = torch.fmod(a, b)
    fix = (r != 0) & ((r < 0) != (b < 0))
    r = torch.where(fix, r + b, r)
    return torch.where(r == 0, torch.copysign(torch.zeros_like(r), b), r)


@register("Mod", since=10)
def mod(op: OpContext, a, b):
    """fmod=0: sign of the divisor (``torch.remainder`` for ints); fmod=1: sign of the dividend (``fmod``)."""
    fmod = op.attr("fmod", 0)
    if fmod not in (0, 1):
        raise op.fail(f"fmod must be 0 or 1, got {fmod}")
    if not _is_int(a):
        return torch.fmod(a, b) if fmod else _float_mod(a, b)
    if a.dtype == torch.uint64:  # unsigned: both definitions agree
        a64, b64 = a.view(torch.int64), b.view(torch.int64)
        return (a64 - _udiv64(a64, b64) * b64).view(torch.uint64)
    return _int_binary(torch.fmod if fmod else torch.remainder, a, b)


def _pow(op, x, y):
    """Pow with mixed types: the result has the base's type; int base with float exponent is
    computed in float64 and truncated back (as numpy's ``power(...).astype``)."""
    if x.is_floating_point():
        if y.is_floating_point() and y.dtype.itemsize > x.dtype.itemsize:
            return torch.pow(x.to(y.dtype), y).to(x.dtype)
        return torch.pow(x, y.to(x.dtype))
    if y.is_floating_point():
        return torch.pow(x.to(torch.float64), y.to(torch.float64)).to(x.dtype)
    # int64 powers wrap mod 2**64, so narrowing back gives the wrapped result of the narrow type
    return restore(torch.pow(computable(x).to(torch.int64), computable(y).to(torch.int64)), x.dtype)


_register_binary("Pow", _pow, (1, 7))


@register("BitShift", since=11)
def bit_shift(op: OpContext, x, y):
    """Shifts by ``<<``/``>>``; shifts < 0 or >= the bit width give the sign fill (0 or -1), as v28
    defines; right shifts of uint64 (an int64 bit view here) are made logical by a mask."""
    direction = op.attr("direction", "")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    if direction not in ("LEFT", "RIGHT"):
        raise op.fail(f"direction must be 'LEFT' or 'RIGHT', got {direction!r}")
    dtype = x.dtype
    bits = torch.iinfo(dtype).bits
    signed = not _is_unsigned(dtype)
    xc, yc = computable(x), computable(y).to(torch.int64)
    outside = (yc < 0) | (yc >= bits)
    shift = yc.clamp(0, bits - 1).to(xc.dtype)
    if direction == "LEFT":
        result = xc << shift
        fill = torch.zeros_like(result)
    else:
        result = xc >> shift
        if dtype == torch.uint64:
            mask = torch.where(shift == 0, -1, _I64_MAX >> (shift - 1).clamp(min=0))
            result = result & mask
        fill = torch.where(xc < 0, -1, 0).to(xc.dtype) if signed else torch.zeros_like(result)
    return restore(torch.where(outside, fill, result), dtype)


# -- bitwise and logical --------------------------------------------------------------------------
@register("BitwiseAnd", since=18)
def bitwise_and(op: OpContext, a, b):
    return _int_binary(torch.bitwise_and, a, b)


@register("BitwiseOr", since=18)
def bitwise_or(op: OpContext, a, b):
    return _int_binary(torch.bitwise_or, a, b)


@register("BitwiseXor", since=18)
def bitwise_xor(op: OpContext, a, b):
    return _int_binary(torch.bitwise_xor, a, b)


@register("BitwiseNot", since=18)
def bitwise_not(op: OpContext, x):
    return restore(torch.bitwise_not(computable(x)), x.dtype)


_register_binary("And", lambda op, a, b: torch.logical_and(a, b), (1, 7))
_register_binary("Or", lambda op, a, b: torch.logical_or(a, b), (1, 7))
_register_binary("Xor", lambda op, a, b: torch.logical_xor(a, b), (1, 7))


@register("Not", since=1)
def logical_not(op: OpContext, x):
    return torch.logical_not(x)


# -- comparisons ----------------------------------------------------------------------------------
def _compare(fn):
    def compare(op, a, b):
        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            if fn is not torch.eq:
                raise op.fail("only Equal compares string tensors")
            return op.tensor(
                np.asarray(np.equal(np.asarray(a, dtype=object), np.asarray(b, dtype=object)), dtype=np.bool_)
            )
        if a.dtype in _FLOAT8:
            a, b = a.to(torch.float32), b.to(torch.float32)
        return fn(ordered(a), ordered(b))

    return compare


_register_binary("Equal", _compare(torch.eq), (1, 7))
_register_binary("Greater", _compare(torch.gt), (1, 7))
_register_binary("Less", _compare(torch.lt), (1, 7))
_register_binary("GreaterOrEqual", _compare(torch.ge), (12,))
_register_binary("LessOrEqual", _compare(torch.le), (12,))


# -- variadic -------------------------------------------------------------------------------------
def _variadic(fn, xs, op: OpContext):
    xs = [x for x in xs if x is not None]
    if not xs:
        raise op.fail("needs at least one input")
    dtype = xs[0].dtype
    result = ordered(xs[0])
    for x in xs[1:]:
        result = fn(result, ordered(x))
    if len(xs) == 1:
        result = result.clone()
    return unordered(result, dtype)


@register("Max", since=1)
def max_(op: OpContext, *xs):
    """Elementwise max over all inputs, broadcasting; NaN propagates (``torch.maximum``)."""
    return _variadic(torch.maximum, xs, op)


@register("Min", since=1)
def min_(op: OpContext, *xs):
    return _variadic(torch.minimum, xs, op)


@register("Sum", since=1)
def sum_(op: OpContext, *xs):
    present = [x for x in xs if x is not None]
    if not present:
        raise op.fail("needs at least one input")
    result = present[0].clone()
    for x in present[1:]:
        result = _add(op, result, x)
    return result


@register("Mean", since=1)
def mean(op: OpContext, *xs):
    present = [x for x in xs if x is not None]
    return sum_(op, *present) / len(present)


@register("Where", since=9)
def where(op: OpContext, condition, x, y):
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):  # string tensors: on the host
        return np.where(condition.cpu().numpy(), x, y).astype(object)
    return restore(torch.where(condition, computable(x), computable(y)), x.dtype)


# -- clip -----------------------------------------------------------------------------------------
def _clip(x, low, high):
    """``torch.clamp``: NaN stays NaN, and min > max gives max everywhere (as numpy's clip)."""
    if low is None and high is None:
        return x.clone()
    dtype = x.dtype
    low = None if low is None else ordered(low.to(dtype))
    high = None if high is None else ordered(high.to(dtype))
    return unordered(torch.clamp(ordered(x), low, high), dtype)


@register("Clip", since=1)
def clip_1(op: OpContext, x):
    """Opset 1-10: bounds are float attributes; an absent one does not clip."""
    low, high = op.attr("min"), op.attr("max")
    low = None if low is None else torch.tensor(low, dtype=x.dtype, device=x.device)
    high = None if high is None else torch.tensor(high, dtype=x.dtype, device=x.device)
    return _clip(x, low, high)


@register("Clip", since=11)
def clip_11(op: OpContext, x, low=None, high=None):
    """Opset 11+: bounds are optional scalar inputs."""
    return _clip(x, low, high)


# -- unary arithmetic -----------------------------------------------------------------------------
def _unary(name: str, since: int, fn, doc: str | None = None):
    def op_fn(op: OpContext, x):
        return fn(x)

    op_fn.__name__ = name.lower()
    op_fn.__doc__ = doc
    register(name, since=since)(op_fn)


def _abs(x):
    if _is_unsigned(x.dtype):
        return x.clone()
    return torch.abs(x)


def _neg(x):
    return restore(torch.neg(computable(x)), x.dtype)


def _sign(x):
    """``torch.sign`` gives 0 for NaN; ONNX (numpy) keeps NaN."""
    if x.dtype == torch.uint64:
        return (x.view(torch.int64) != 0).to(torch.uint64)
    result = restore(torch.sign(computable(x)), x.dtype)
    return torch.where(torch.isnan(x), x, result) if x.is_floating_point() else result


def _as_float(fn):
    """Float8 tensors compute in float32 (torch has few float8 kernels)."""

    def wrapped(x):
        return fn(x.to(torch.float32) if x.dtype in _FLOAT8 else x)

    return wrapped


_unary("Abs", 1, _abs, "Abs; unsigned types are their own absolute value.")
_unary("Neg", 1, _neg)
_unary("Sign", 9, _sign, _sign.__doc__)
_unary("Ceil", 1, torch.ceil)
_unary("Floor", 1, torch.floor)
_unary("Round", 11, torch.round, "``torch.round`` rounds half to even, as ONNX Round does.")
_unary("Reciprocal", 1, torch.reciprocal)
_unary("Sqrt", 1, torch.sqrt)
_unary("Exp", 1, torch.exp)
_unary("Log", 1, torch.log)
_unary("Erf", 9, torch.erf)
_unary("Sin", 7, torch.sin)
_unary("Cos", 7, torch.cos)
_unary("Tan", 7, torch.tan)
_unary("Asin", 7, torch.asin)
_unary("Acos", 7, torch.acos)
_unary("Atan", 7, torch.atan)
_unary("Sinh", 9, torch.sinh)
_unary("Cosh", 9, torch.cosh)
_unary("Asinh", 9, torch.asinh)
_unary("Acosh", 9, torch.acosh)
_unary("Atanh", 9, torch.atanh)
_unary("Tanh", 1, torch.tanh)
_unary("Sigmoid", 1, torch.sigmoid)
_unary("IsNaN", 9, _as_float(torch.isnan))
_unary("Softsign", 1, lambda x: x / (1 + torch.abs(x)))
_unary("Softplus", 1, F.softplus, "log(1 + exp(x)); ``F.softplus`` is linear above 20, where the two agree in float.")
_unary("HardSwish", 14, F.hardswish, "x * max(0, min(1, x/6 + 1/2)), which is ``F.hardswish``.")
_unary("Mish", 18, F.mish)


@register("IsInf", since=10)
def is_inf(op: OpContext, x):
    x = x.to(torch.float32) if x.dtype in _FLOAT8 else x
    positive, negative = op.attr("detect_positive", 1), op.attr("detect_negative", 1)
    if positive and negative:
        return torch.isinf(x)
    if positive:
        return torch.isposinf(x)
    if negative:
        return torch.isneginf(x)
    return torch.zeros_like(x, dtype=torch.bool)


# -- activations ----------------------------------------------------------------------------------
@register("Relu", since=1)
def relu(op: OpContext, x):
    return x.clone() if _is_unsigned(x.dtype) else torch.relu(x)


@register("LeakyRelu", since=1)
def leaky_relu(op: OpContext, x):
    return F.leaky_relu(x, op.attr("alpha", 0.01))


@register("Elu", since=1)
def elu(op: OpContext, x):
    return F.elu(x, op.attr("alpha", 1.0))


@register("Selu", since=1)
def selu(op: OpContext, x):
    """gamma * (x > 0 ? x : alpha * (exp(x) - 1)) with the attributes (``F.selu`` fixes them)."""
    alpha = op.attr("alpha", 1.67326319217681884765625)
    gamma = op.attr("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


@register("Celu", since=12)
def celu(op: OpContext, x):
    return F.celu(x, op.attr("alpha", 1.0))


@register("ThresholdedRelu", since=10)
def thresholded_relu(op: OpContext, x):
    return torch.where(x > op.attr("alpha", 1.0), x, torch.zeros_like(x))


@register("HardSigmoid", since=1)
def hard_sigmoid(op: OpContext, x):
    return torch.clamp(op.attr("alpha", 0.2) * x + op.attr("beta", 0.5), 0, 1)


@register("Shrink", since=9)
def shrink(op: OpContext, x):
    """x < -lambd: x + bias; x > lambd: x - bias; else 0. Integer inputs compute in float64."""
    bias, lambd = op.attr("bias", 0.0), op.attr("lambd", 0.5)
    xf = x if x.is_floating_point() else x.to(torch.float64)
    zero = torch.zeros_like(xf)
    result = torch.where(xf < -lambd, xf + bias, torch.where(xf > lambd, xf - bias, zero))
    return result.to(x.dtype)


@register("Gelu", since=20)
def gelu(op: OpContext, x):
    approximate = op.attr("approximate", "none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    if approximate not in ("none", "tanh"):
        raise op.fail(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return F.gelu(x, approximate=approximate)


@register("Swish", since=24)
def swish(op: OpContext, x):
    """x * sigmoid(alpha * x)."""
    return x * torch.sigmoid(op.attr("alpha", 1.0) * x)


def _prelu_slope(op: OpContext, x, slope):
    """Slope broadcast to X (unidirectional); failing that, a 1-D slope whose length matches
    exactly one dim of X is applied along that dim (as onnx's reference does for old models)."""
    try:
        torch.broadcast_shapes(x.shape, slope.shape)
        return slope
    except RuntimeError:
        if slope.dim() == 1:
            matches = [i for i, d in enumerate(x.shape) if d == slope.shape[0]]
            if len(matches) == 1:
                shape = [1] * x.dim()
                shape[matches[0]] = slope.shape[0]
                return slope.reshape(shape)
        raise op.fail(f"slope of shape {list(slope.shape)} does not broadcast to X of shape {list(x.shape)}") from None


@register("PRelu", since=1)
def prelu(op: OpContext, x, slope):
    """x < 0 ? slope * x : x, slope broadcast to X."""
    slope = _prelu_slope(op, x, slope)
    if _is_unsigned(x.dtype):
        return x.clone()
    return torch.where(x < 0, x * slope, x)
