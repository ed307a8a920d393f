"""Element-type conversions: Cast, CastLike and BitCast, including float8 saturation rules.

torch's ``Tensor.to`` does the numeric conversions (RNE for floats, two's-complement wrap for ints,
nonzero -> True for bool). What it does not do the ONNX way is handled here: float8 overflow
(``saturate``), float8e8m0 rounding (``round_mode``, built from the float32 bits like the onnx
reference) and strings (numpy object arrays, parsed and formatted on the host).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import torch

from kiln import dtypes
from kiln.ops.registry import OpContext, register

DT = ir.DataType

# float8 type -> (largest finite value, overflow threshold, tie at threshold overflows, overflow bits +, -)
# A value overflows when it rounds (RNE) past the largest finite value: above max + ulp/2, or at it
# when max has an odd mantissa (the tie then rounds up). Overflow bits are used when saturate=0.
_FLOAT8 = {
    torch.float8_e4m3fn: (448.0, 464.0, False, 0x7F, 0xFF),  # NaN, -NaN (no infinities)
    torch.float8_e4m3fnuz: (240.0, 248.0, True, 0x80, 0x80),  # the single NaN
    torch.float8_e5m2: (57344.0, 61440.0, True, 0x7C, 0xFC),  # +inf, -inf
    torch.float8_e5m2fnuz: (57344.0, 61440.0, True, 0x80, 0x80),
}
_E8M0 = getattr(torch, "float8_e8m0fnu", None)


def _target_dtype(op: OpContext, to) -> ir.DataType:
    """The ONNX type named by a Cast ``to`` attribute (an int, or a type name before opset 6)."""
    try:
        if isinstance(to, bytes):
            to = to.decode()
        if isinstance(to, str) and not to.isdigit():
            return DT.__members__[to.upper()]  # DT[...] would read as a generic type to mypy
        return DT(int(to))
    except (KeyError, ValueError, TypeError) as error:
        raise op.fail(f"unknown target element type {to!r}") from error


def _torch_dtype(op: OpContext, to: ir.DataType) -> torch.dtype:
    try:
        return dtypes.to_torch_dtype(to)
    except KeyError as error:
        raise op.fail(
            f"element type {dtypes.onnx_name(to)} cannot be held by torch; kiln does not support it"
        ) from error


def _to_float8(x: torch.Tensor, dtype: torch.dtype, saturate: bool) -> torch.Tensor:
    """float8 e4m3fn/e4m3fnuz/e5m2/e5m2fnuz per the Cast tables: RNE, out-of-range values clamp to
    +-max (saturate) or become NaN/inf (saturate=0); NaN stays NaN; fnuz types have no -0."""
    big, threshold, tie_overflows, pos_bits, neg_bits = _FLOAT8[dtype]
    x = x.to(torch.float32)  # float64 goes through float32 too, as ml_dtypes (the reference) does
    y = x.clamp(-big, big).to(dtype)  # clamp keeps NaN; in range, torch rounds RNE
    if saturate:
        return y
    mag = x.abs()
    over = (mag >= threshold) if tie_overflows else (mag > threshold)
    special = torch.where(x < 0, neg_bits, pos_bits).to(torch.uint8)
    return torch.where(over, special, y.view(torch.uint8)).view(dtype)


def _to_e8m0(x: torch.Tensor, saturate: bool, round_mode: str, op: OpContext) -> torch.Tensor:
    """float8e8m0 (a bare power-of-two exponent) from the float32 bits, as onnx's reference does:
    the sign is dropped, NaN/inf give 0xFF, ``round_mode`` up/down/nearest decides the exponent."""
    if _E8M0 is None:
        raise op.fail("this torch has no float8_e8m0fnu dtype; upgrade torch to cast to float8e8m0")
    bits = x.to(torch.float32).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    exponent = (bits >> 23) & 0xFF
    special = exponent == 0xFF
    if round_mode == "nearest":
        guard = (bits & 0x400000) != 0
        round_up = guard & (((bits & 0x3FFFFF) != 0) | (exponent > 0))
    elif round_mode == "up":
        round_up = (bits & 0x7FFFFF) != 0
    elif round_mode == "down":
        round_up = torch.zeros_like(special)
    else:
        raise op.fail(f"round_mode {round_mode!r} is not one of 'up', 'down', 'nearest'")
    round_up = round_up & ~special
    if saturate:
        round_up = round_up & (exponent != 0xFE)
    exponent = torch.where(special, 0xFF, exponent + round_up.to(torch.int64))
    return exponent.to(torch.uint8).view(_E8M0)


def _numeric_cast(op: OpContext, x: torch.Tensor, dtype: torch.dtype, saturate: bool, round_mode: str) -> torch.Tensor:
    if x.dtype == dtype:
        return x
    if dtype in _FLOAT8:
        return _to_float8(x, dtype, saturate)
    if _E8M0 is not None and dtype == _E8M0:
        return _to_e8m0(x, saturate, round_mode, op)
    if x.dtype in _FLOAT8 or x.dtype == _E8M0:
        x = x.to(torch.float32)  # float8 -> integers and others go through float32 (exact)
    return x.to(dtype)


def _to_strings(x: torch.Tensor) -> np.ndarray:
    """Numbers formatted as numpy does (the onnx reference's ``astype(str)``): shortest repr."""
    array = dtypes.tensor_to_numpy(x)
    if array.dtype.type.__module__.startswith("ml_dtypes"):
        array = array.astype(np.float32)
    return array.astype(np.str_).astype(object)


def _parse_float(text: str) -> float:
    """A number from a string: plain or scientific notation, case-insensitive [+-]INF / NaN."""
    return float(text.strip())


def _parse_int(text: str) -> int:
    text = text.strip()
    try:
        return int(text, 10)
    except ValueError:
        value = float(text)  # "100.5" -> 100, as the spec allows
        return 0 if not math.isfinite(value) else int(value)


def _from_strings(op: OpContext, x: np.ndarray, to: ir.DataType, saturate: bool, round_mode: str) -> torch.Tensor:
    dtype = _torch_dtype(op, to)
    flat = [str(s.decode() if isinstance(s, bytes) else s) for s in x.reshape(-1)]
    try:
        if dtype == torch.bool:
            values = [
                s.strip().lower() == "true" or (s.strip().lower() != "false" and _parse_float(s) != 0) for s in flat
            ]
            return op.tensor(np.array(values, dtype=np.bool_).reshape(x.shape))
        if dtype.is_floating_point:
            floats = op.tensor(np.array([_parse_float(s) for s in flat], dtype=np.float64).reshape(x.shape))
            return _numeric_cast(op, floats, dtype, saturate, round_mode)
        bits = torch.iinfo(dtype).bits
        signed = torch.iinfo(dtype).min < 0
        wrapped = []
        for s in flat:
            v = _parse_int(s) % (1 << bits)  # out of range wraps, as fixed-point casts do
            wrapped.append(v - (1 << bits) if signed and v >= 1 << (bits - 1) else v)
        np_dtype = to.numpy()
        tensor = dtypes.tensor_from_numpy(np.array(wrapped, dtype=np_dtype).reshape(x.shape), op.device)
        assert isinstance(tensor, torch.Tensor)  # integers: only strings stay numpy
        return tensor
    except ValueError as error:
        raise op.fail(f"cannot parse a string as {dtypes.onnx_name(to)}: {error}") from error


def _cast(op: OpContext, x, to: ir.DataType, saturate: bool = True, round_mode: str = "up"):
    if isinstance(x, np.ndarray):
        if to == DT.STRING:
            return x.copy()
        return _from_strings(op, x, to, saturate, round_mode)
    if to == DT.STRING:
        return _to_strings(x)
    return _numeric_cast(op, x, _torch_dtype(op, to), saturate, round_mode)


def _round_mode(op: OpContext) -> str:
    mode = op.attr("round_mode", "up")
    return mode.decode() if isinstance(mode, bytes) else mode


@register("Cast", since=1)
def cast_1(op: OpContext, x):
    return _cast(op, x, _target_dtype(op, op.attr("to")))


@register("Cast", since=19)
def cast_19(op: OpContext, x):
    return _cast(op, x, _target_dtype(op, op.attr("to")), bool(op.attr("saturate", 1)))


@register("Cast", since=24)
def cast_24(op: OpContext, x):
    return _cast(op, x, _target_dtype(op, op.attr("to")), bool(op.attr("saturate", 1)), _round_mode(op))


def _dtype_of(value) -> ir.DataType:
    if isinstance(value, np.ndarray):
        return DT.STRING
    return dtypes.to_onnx_dtype(value.dtype)


@register("CastLike", since=15)
def cast_like_15(op: OpContext, x, like):
    return _cast(op, x, _dtype_of(like))


@register("CastLike", since=19)
def cast_like_19(op: OpContext, x, like):
    return _cast(op, x, _dtype_of(like), bool(op.attr("saturate", 1)))


@register("CastLike", since=24)
def cast_like_24(op: OpContext, x, like):
    return _cast(op, x, _dtype_of(like), bool(op.attr("saturate", 1)), _round_mode(op))


@register("BitCast", since=26)
def bit_cast(op: OpContext, x):
    """Same bits, new type: ``Tensor.view(dtype)`` between types of equal width (little endian)."""
    to = _target_dtype(op, op.attr("to"))
    if isinstance(x, np.ndarray) or to == DT.STRING:
        raise op.fail("BitCast does not take or produce strings")
    dtype = _torch_dtype(op, to)
    if dtype.itemsize != x.dtype.itemsize:
        raise op.fail(f"BitCast from {x.dtype} to {dtype}: the types must have the same bit width")
    if x.dtype == dtype:
        return x
    if x.dim() == 0:
        return x.reshape(1).view(dtype).reshape(())
    return x.contiguous().view(dtype)
