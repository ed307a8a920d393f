"""Quantization ops: QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear and the integer MatMul/Conv ops.

Integer products are computed exactly: int8/uint8 operands (after zero-point subtraction) are
carried in float64, whose 53-bit mantissa holds every int8*int8 dot product of any realistic length,
so matmul and convolution run on both CPU and CUDA (torch has no integer GEMM on CUDA) and the
result is rounded back to int32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kiln import dtypes
from kiln.ops.registry import OpContext, register

_INT_RANGES = {
    torch.uint8: (0, 255),
    torch.int8: (-128, 127),
    torch.uint16: (0, 65535),
    torch.int16: (-32768, 32767),
}

_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz)

# Smallest |x| that rounds (RNE) past the largest finite value: max + half an ulp, and whether that
# tie itself overflows (it does when max's last mantissa bit is odd).
_FLOAT8_OVERFLOW = {
    torch.float8_e4m3fn: (464.0, False),
    torch.float8_e4m3fnuz: (248.0, True),
    torch.float8_e5m2: (61440.0, True),
    torch.float8_e5m2fnuz: (61440.0, True),
}


def _to_float8(x: torch.Tensor, dtype: torch.dtype, saturate: bool) -> torch.Tensor:
    """Cast a float tensor to a float8 type with ONNX's saturate rules (Cast's two tables)."""
    x = x.float()
    top = torch.finfo(dtype).max
    y = x.clamp(-top, top)  # NaN stays NaN
    if not saturate:
        limit, tie_overflows = _FLOAT8_OVERFLOW[dtype]
        mag = x.abs()
        over = (mag > limit) | (mag == limit) if tie_overflows else mag > limit
        special = torch.copysign(torch.full_like(x, math.inf if dtype == torch.float8_e5m2 else math.nan), x)
        y = torch.where(over, special, y)
    return y.to(dtype)


def _quant_dtype(op: OpContext, zero_point) -> torch.dtype:
    output_dtype = op.attr("output_dtype", 0)
    if zero_point is not None:
        if output_dtype and dtypes.to_torch_dtype(output_dtype) != zero_point.dtype:
            raise op.fail("output_dtype differs from y_zero_point's type; they must agree")
        dtype = zero_point.dtype
    elif output_dtype:
        try:
            dtype = dtypes.to_torch_dtype(output_dtype)
        except KeyError:
            raise op.fail(f"output_dtype {dtypes.onnx_name(output_dtype)} cannot be held by torch") from None
    else:
        dtype = torch.uint8
    if dtype not in _INT_RANGES and dtype not in _FLOAT8:
        raise op.fail(f"quantization to {dtype} is not supported (int8/uint8/int16/uint16/float8 are)")
    return dtype


def _expand_param(op: OpContext, value: torch.Tensor, x: torch.Tensor, axis: int, block_size: int) -> torch.Tensor:
    """Scale or zero point made broadcastable to ``x``: per-tensor, per-axis or blocked."""
    if value.ndim == 0 or value.numel() == 1 and not block_size:
        return value.reshape(())
    axis = axis + x.ndim if axis < 0 else axis
    if not 0 <= axis < x.ndim:
        raise op.fail(f"axis {axis} is out of range for an input of rank {x.ndim}")
    if not block_size:
        if value.ndim != 1 or value.shape[0] != x.shape[axis]:
            raise op.fail(
                f"per-axis scale/zero point of shape {list(value.shape)} does not match axis {axis} of {list(x.shape)}"
            )
        shape = [1] * x.ndim
        shape[axis] = value.shape[0]
        return value.reshape(shape)
    if block_size < 0:
        raise op.fail("block_size must be positive")
    if value.ndim != x.ndim:
        raise op.fail(f"blocked scale/zero point must have the input's rank {x.ndim}, got shape {list(value.shape)}")
    value = value.repeat_interleave(block_size, dim=axis).narrow(axis, 0, x.shape[axis])
    if list(value.shape) != list(x.shape):
        raise op.fail("blocked scale/zero point shape does not match the input outside the blocked axis")
    return value


def _as_float(t: torch.Tensor) -> torch.Tensor:
    """A quantized or scale tensor in float32 (uint16 and float8 included)."""
    return dtypes.computable(t).to(torch.float32) if t.dtype in dtypes.UNSIGNED_WIDE else t.to(torch.float32)


def _saturate(op: OpContext, v: torch.Tensor, dtype: torch.dtype, saturate: bool = True) -> torch.Tensor:
    """Round half to even and clamp to ``dtype``'s range (integers), or cast to float8."""
    if dtype in _FLOAT8:
        return _to_float8(v, dtype, saturate)
    low, high = _INT_RANGES[dtype]
    v = torch.round(v.to(torch.float64)).clamp(low, high)
    return v.to(torch.int64).to(dtype) if dtype in dtypes.UNSIGNED_WIDE else v.to(dtype)


@register("QuantizeLinear", since=10)
def quantize_linear(op: OpContext, x, y_scale, y_zero_point=None):
    """y = saturate(round_half_even(x / scale) + zero_point); attributes added in 13/19/21/23 default off."""
    dtype = _quant_dtype(op, y_zero_point)
    axis = op.attr("axis", 1)
    block_size = op.attr("block_size", 0)
    precision = op.attr("precision", 0)
    if precision:
        compute = dtypes.to_torch_dtype(precision)
    elif x.dtype.is_floating_point:
        compute = torch.promote_types(x.dtype, y_scale.dtype if y_scale.dtype.is_floating_point else torch.float32)
    else:  # int32 input: numpy promotes int32 / float32 to float64
        compute = torch.float64 if y_scale.dtype == torch.float32 else torch.float32
    if compute not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        compute = torch.float32
    scale = _expand_param(op, y_scale, x, axis, block_size).to(compute)
    q = x.to(compute) / scale
    if dtype in _FLOAT8:
        if y_zero_point is not None:
            q = q.float() + _expand_param(op, y_zero_point, x, axis, block_size).float()
        return _to_float8(q, dtype, bool(op.attr("saturate", 1)))
    q = torch.round(q).to(torch.float64)
    if y_zero_point is not None:
        q = q + _expand_param(op, dtypes.computable(y_zero_point), x, axis, block_size).to(torch.float64)
    return _saturate(op, q, dtype)


@register("DequantizeLinear", since=10)
def dequantize_linear(op: OpContext, x, x_scale, x_zero_point=None):
    """y = (x - zero_point) * scale, computed in float32 and cast to output_dtype or the scale's type."""
    axis = op.attr("axis", 1)
    block_size = op.attr("block_size", 0)
    output_dtype = op.attr("output_dtype", 0)
    out = dtypes.to_torch_dtype(output_dtype) if output_dtype else x_scale.dtype
    if not out.is_floating_point or out.itemsize == 1:
        raise op.fail(f"dequantizing to {out} is not supported; set output_dtype to a float type")
    v = _as_float(x)
    if x_zero_point is not None and x.dtype != torch.int32:
        v = v - _expand_param(op, _as_float(x_zero_point), x, axis, block_size)
    elif x_zero_point is not None and bool((x_zero_point != 0).any()):
        raise op.fail("an int32 input takes no (or a zero) zero point")
    y = v * _expand_param(op, x_scale.to(torch.float32), x, axis, block_size)
    return y.to(out)


@register("DynamicQuantizeLinear", since=11)
def dynamic_quantize_linear(op: OpContext, x):
    """uint8 quantization with scale and zero point from the data range widened to include 0."""
    xf = x.to(torch.float32)
    if xf.numel():
        high = torch.clamp(xf.max(), min=0)
        low = torch.clamp(xf.min(), max=0)
    else:
        high = low = torch.zeros((), device=x.device)
    scale = torch.where(high == low, torch.ones_like(high), high - low) / 255.0
    zero_point = torch.round((0 - low / scale).clamp(0, 255))
    y = torch.round(xf / scale) + zero_point
    return y.clamp(0, 255).to(torch.uint8), scale.to(x.dtype), zero_point.to(torch.uint8)


def _centered(value: torch.Tensor, zero_point, rows: bool) -> torch.Tensor:
    """``value - zero_point`` in float64; a 1-D zero point is per row (A) or per column (B)."""
    v = _as_float(value).to(torch.float64)
    if zero_point is None:
        return v
    zp = _as_float(zero_point).to(torch.float64)
    if rows and zp.ndim == 1 and zp.numel() > 1:
        zp = zp.unsqueeze(-1)
    return v - zp


def _exact_int32(v: torch.Tensor) -> torch.Tensor:
    """A float64 integer-valued result as int32, wrapping as 32-bit accumulation would."""
    return torch.round(v).to(torch.int64).to(torch.int32)


@register("MatMulInteger", since=10, reads_torch_flags=True)
def matmul_integer(op: OpContext, a, b, a_zero_point=None, b_zero_point=None):
    """Exact int32 matmul of zero-point-centred int8/uint8 operands (float64 holds the sums exactly)."""
    return _exact_int32(torch.matmul(_centered(a, a_zero_point, True), _centered(b, b_zero_point, False)))


def _requantize(op: OpContext, acc: torch.Tensor, multiplier: torch.Tensor, y_zero_point, dtype: torch.dtype):
    v = acc * multiplier.to(torch.float64)
    if y_zero_point is not None:
        v = v + _as_float(y_zero_point).to(torch.float64)
    return _saturate(op, v, dtype)


@register("QLinearMatMul", since=10, reads_torch_flags=True)
def qlinear_matmul(op: OpContext, a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point):
    """Integer matmul of centred operands, then requantized by a_scale*b_scale/y_scale (computed in float64)."""
    acc = torch.matmul(_centered(a, a_zero_point, True), _centered(b, b_zero_point, False))
    if a_scale.ndim == 1 and a_scale.numel() > 1:
        a_scale = a_scale.unsqueeze(-1)
    multiplier = a_scale * b_scale / y_scale
    dtype = y_zero_point.dtype if y_zero_point is not None else a.dtype
    return _requantize(op, acc, multiplier, y_zero_point, dtype)


def _conv_exact(op: OpContext, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """ONNX Conv (auto_pad, pads, strides, dilations, group) on float64 operands."""
    spatial = x.ndim - 2
    if spatial not in (1, 2, 3):
        raise op.fail(f"convolution over {spatial} spatial dimensions is not supported (1-3 are)")
    kernel = op.attr("kernel_shape") or list(w.shape[2:])
    if list(kernel) != list(w.shape[2:]):
        raise op.fail(f"kernel_shape {kernel} does not match the weight's shape {list(w.shape[2:])}")
    strides = op.attr("strides") or [1] * spatial
    dilations = op.attr("dilations") or [1] * spatial
    group = op.attr("group", 1)
    auto_pad = op.attr("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("NOTSET", ""):
        pads = op.attr("pads") or [0] * (2 * spatial)
        begins, ends = list(pads[:spatial]), list(pads[spatial:])
    elif auto_pad == "VALID":
        begins = ends = [0] * spatial
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations, strict=True):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else big)
            ends.append(big if auto_pad == "SAME_UPPER" else small)
    else:
        raise op.fail(f"auto_pad {auto_pad!r} is not one of NOTSET, SAME_UPPER, SAME_LOWER, VALID")
    flat = []
    for b, e in zip(reversed(begins), reversed(ends), strict=True):
        flat += [b, e]
    if any(flat):
        x = F.pad(x, flat)
    conv = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    return torch.round(conv(x, w, None, stride=list(strides), dilation=list(dilations), groups=group))


def _weight_zero_point(w_zero_point, w: torch.Tensor):
    if w_zero_point is None or w_zero_point.numel() <= 1:
        return w_zero_point
    return w_zero_point.reshape([-1] + [1] * (w.ndim - 1))


@register("ConvInteger", since=10, reads_torch_flags=True)
def conv_integer(op: OpContext, x, w, x_zero_point=None, w_zero_point=None):
    """Exact int32 convolution of zero-point-centred inputs (padding contributes zero point values)."""
    xc = _centered(x, x_zero_point, False)
    wc = _centered(w, _weight_zero_point(w_zero_point, w), False)
    return _exact_int32(_conv_exact(op, xc, wc))


@register("QLinearConv", since=10, reads_torch_flags=True)
def qlinear_conv(op: OpContext, x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, bias=None):
    """Exact integer convolution plus int32 bias, requantized by x_scale*w_scale/y_scale per output channel."""
    xc = _centered(x, x_zero_point, False)
    wc = _centered(w, _weight_zero_point(w_zero_point, w), False)
    acc = _conv_exact(op, xc, wc)
    shape = [1, -1] + [1] * (x.ndim - 2)
    if bias is not None:
        acc = acc + bias.to(torch.float64).reshape(shape)
    if w_scale.numel() > 1:
        w_scale = w_scale.reshape(shape)
    multiplier = x_scale * w_scale / y_scale
    dtype = y_zero_point.dtype if y_zero_point is not None else x.dtype
    return _requantize(op, acc, multiplier, y_zero_point, dtype)
