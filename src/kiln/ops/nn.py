"""Neural-network layers: MatMul, Gemm, Conv, ConvTranspose, pooling, normalizations, dropout."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kiln.dtypes import computable, restore, to_torch_dtype
from kiln.ops.registry import OpContext, register

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_EXACT_IN_FLOAT64 = 2.0**53


def _is_float(x: torch.Tensor) -> bool:
    return x.dtype.is_floating_point or x.dtype.is_complex


# -- MatMul / Gemm ----------------------------------------------------------------------------


def _matmul(a, b):
    """torch.matmul (numpy semantics: N-D broadcasting, 1-D operands); integer products are exact and wrap."""
    if _is_float(a):
        return torch.matmul(a, b)
    dtype = a.dtype
    a, b = computable(a), computable(b)
    if a.device.type == "cpu":
        return restore(torch.matmul(a, b), dtype)
    # No integer GEMM on GPUs: float64 is exact while every partial sum stays below 2**53.
    k = a.shape[-1]
    bound = (a.abs().max().double() * b.abs().max().double() * k) if a.numel() and b.numel() else 0
    if float(bound) < _EXACT_IN_FLOAT64:
        return restore(torch.matmul(a.double(), b.double()).round().to(a.dtype), dtype)
    a2 = a.unsqueeze(0) if a.ndim == 1 else a
    b2 = b.unsqueeze(-1) if b.ndim == 1 else b
    y = (a2.unsqueeze(-1) * b2.unsqueeze(-3)).sum(-2, dtype=a.dtype)
    if b.ndim == 1:
        y = y.squeeze(-1)
    if a.ndim == 1:
        y = y.squeeze(-2)
    return restore(y, dtype)


@register("MatMul", since=1, reads_torch_flags=True)
def matmul(op: OpContext, a, b):
    return _matmul(a, b)


@register("Gemm", since=1, reads_torch_flags=True)
def gemm(op: OpContext, a, b, c=None):
    """alpha * A' @ B' + beta * C through torch.addmm (C broadcast to [M, N]); the opset < 7 'broadcast' flag
    only allowed what broadcasting does anyway."""
    if op.attr("transA", 0):
        a = a.transpose(0, 1)
    if op.attr("transB", 0):
        b = b.transpose(0, 1)
    alpha = float(op.attr("alpha", 1.0))
    beta = float(op.attr("beta", 1.0))
    if _is_float(a):
        if c is not None and beta != 0:
            return torch.addmm(c, a, b, beta=beta, alpha=alpha)
        y = torch.mm(a, b)
        return y * alpha if alpha != 1.0 else y
    dtype = a.dtype
    y = computable(_matmul(a, b))
    if alpha != 1.0:
        y = (y * alpha).to(y.dtype)
    if c is not None and beta != 0:
        c = computable(c)
        y = y + (c if beta == 1.0 else (c * beta).to(c.dtype))
    return restore(y, dtype)


# -- spatial geometry -------------------------------------------------------------------------


def _auto_pad(op: OpContext) -> str:
    mode = op.attr("auto_pad", "NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
        raise op.fail(f"auto_pad={mode!r} is not one of NOTSET, SAME_UPPER, SAME_LOWER, VALID")
    return mode


def _spatial(op: OpContext, x, nd: int):
    if x.ndim != nd + 2:
        raise op.fail(f"input of rank {x.ndim} does not match a kernel of {nd} spatial dims")
    strides = list(op.attr("strides") or [1] * nd)
    dilations = list(op.attr("dilations") or [1] * nd)
    return strides, dilations


def _pads(op: OpContext, sizes, kernel, strides, dilations):
    """(begin, end) pads per spatial dim; SAME_* makes ceil(in / stride) outputs, the odd pad at the end (UPPER)
    or at the start (LOWER)."""
    nd = len(kernel)
    mode = _auto_pad(op)
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for n, k, s, d in zip(sizes, kernel, strides, dilations, strict=True):
            out = -(-n // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
            small = total // 2
            begin.append(small if mode == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
        return begin, end
    if mode == "VALID":
        return [0] * nd, [0] * nd
    pads = list(op.attr("pads") or [0] * (2 * nd))
    if len(pads) != 2 * nd:
        raise op.fail(f"pads has {len(pads)} values, {2 * nd} expected")
    return pads[:nd], pads[nd:]


def _torch_pad(begin, end):
    """ONNX [b1, b2, ..., e1, e2, ...] as F.pad's (b_last, e_last, ..., b_first, e_first)."""
    pad = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        pad += [b, e]
    return pad


def _expand_channels(t, ndim: int):
    """A per-channel vector as [1, C, 1, ...] against a rank-``ndim`` tensor."""
    return t.reshape(1, -1, *([1] * (ndim - 2)))


# -- Conv / ConvTranspose ---------------------------------------------------------------------


@register("Conv", since=1, reads_torch_flags=True)
def conv(op: OpContext, x, w, b=None):
    """F.convNd; asymmetric or auto pads are applied with F.pad first (torch only pads symmetrically)."""
    nd = w.ndim - 2
    if nd not in _CONV:
        raise op.fail(f"Conv with {nd} spatial dims is not supported (1-D, 2-D, 3-D are)")
    strides, dilations = _spatial(op, x, nd)
    kernel = list(w.shape[2:])
    begin, end = _pads(op, list(x.shape[2:]), kernel, strides, dilations)
    padded = [n + b + e for n, b, e in zip(x.shape[2:], begin, end, strict=True)]
    op.check_output((*x.shape[:2], *padded), x.dtype, what="its padded input")
    op.check_output((x.shape[0], w.shape[0], *[(p - d * (k - 1) - 1) // s + 1 if s > 0 else 0 for p, k, s, d in
                                               zip(padded, kernel, strides, dilations, strict=True)]), x.dtype)
    padding = begin
    if begin != end or min(begin, default=0) < 0:
        x = F.pad(x, _torch_pad(begin, end))
        padding = [0] * nd
    return _CONV[nd](x, w, b, stride=strides, padding=padding, dilation=dilations, groups=op.attr("group", 1))


@register("ConvTranspose", since=1, reads_torch_flags=True)
def conv_transpose(op: OpContext, x, w, b=None):
    """The full transposed convolution (no padding) cropped or zero-extended to ONNX's output window, so asymmetric
    pads, output_padding and output_shape all follow the spec's formulas."""
    nd = w.ndim - 2
    if nd not in _CONV_TRANSPOSE:
        raise op.fail(f"ConvTranspose with {nd} spatial dims is not supported (1-D, 2-D, 3-D are)")
    strides, dilations = _spatial(op, x, nd)
    group = op.attr("group", 1)
    kernel = list(w.shape[2:])
    sizes = list(x.shape[2:])
    output_padding = list(op.attr("output_padding") or [0] * nd)
    full = [s * (n - 1) + (k - 1) * d + 1 for n, k, s, d in zip(sizes, kernel, strides, dilations, strict=True)]
    mode = _auto_pad(op)
    output_shape = op.attr("output_shape")
    if output_shape or mode in ("SAME_UPPER", "SAME_LOWER"):
        out = list(output_shape)[-nd:] if output_shape else [n * s for n, s in zip(sizes, strides, strict=True)]
        total = [f + p - o for f, p, o in zip(full, output_padding, out, strict=True)]
        if mode == "SAME_UPPER":
            begin = [t // 2 for t in total]
        else:
            begin = [t - t // 2 for t in total]
    else:
        begin, end = _pads(op, sizes, kernel, strides, dilations)
        out = [f + p - bb - e for f, p, bb, e in zip(full, output_padding, begin, end, strict=True)]
    channels = w.shape[1] * group
    op.check_output((x.shape[0], channels, *full), x.dtype, what="its full transposed convolution")
    op.check_output((x.shape[0], channels, *out), x.dtype)
    y = _CONV_TRANSPOSE[nd](x, w, None, stride=strides, padding=0, output_padding=0, groups=group, dilation=dilations)
    y = F.pad(y, _torch_pad([-bb for bb in begin], [bb + o - f for bb, o, f in zip(begin, out, full, strict=True)]))
    if b is not None:
        y = y + _expand_channels(b, y.ndim)
    return y


# -- pooling ----------------------------------------------------------------------------------


class _Window:
    """Pooling geometry per spatial dim: kernel, strides, dilations, pads and the output size ONNX defines."""

    def __init__(self, op: OpContext, x, kernel, ceil_mode: bool):
        nd = len(kernel)
        self.kernel = list(kernel)
        self.strides, self.dilations = _spatial(op, x, nd)
        self.sizes = list(x.shape[2:])
        self.begin, self.end = _pads(op, self.sizes, self.kernel, self.strides, self.dilations)
        self.out = []
        for i in range(nd):
            n, k, s, d = self.sizes[i], self.kernel[i], self.strides[i], self.dilations[i]
            if _auto_pad(op) in ("SAME_UPPER", "SAME_LOWER"):
                self.out.append(-(-n // s))
                continue
            span = n + self.begin[i] + self.end[i] - ((k - 1) * d + 1)
            if span < 0:
                raise op.fail(f"the pooling window ({k}, dilation {d}) is larger than the padded input ({n})")
            out = (-(-span // s) if ceil_mode else span // s) + 1
            if ceil_mode and (out - 1) * s >= n + self.begin[i]:
                out -= 1  # the last window must start inside the input or the left padding
            self.out.append(out)
        padded = [n + b + e for n, b, e in zip(self.sizes, self.begin, self.end, strict=True)]
        op.check_output((*x.shape[:2], *padded), x.dtype, what="its padded input")
        op.check_output((*x.shape[:2], *self.out), x.dtype)

    @property
    def symmetric(self) -> bool:
        """torch's pooling can take these pads itself (equal both sides, at most half the kernel)."""
        return self.begin == self.end and all(0 <= p <= k // 2 for p, k in zip(self.begin, self.kernel, strict=True))

    def windows(self, x, fill, begin=None):
        """[N, C, *out, *kernel]: every window of ``x`` padded with ``fill`` (a strided view of one padded copy)."""
        begin = self.begin if begin is None else begin
        nd = len(self.kernel)
        end = [
            (o - 1) * s + (k - 1) * d + 1 - n - b
            for o, s, k, d, n, b in zip(
                self.out, self.strides, self.kernel, self.dilations, x.shape[2:], begin, strict=True
            )
        ]
        w = F.pad(x, _torch_pad(begin, end), value=fill)
        for i in range(nd):
            w = w.unfold(2 + i, (self.kernel[i] - 1) * self.dilations[i] + 1, self.strides[i])
        if any(d > 1 for d in self.dilations):
            w = w[(..., *[slice(None, None, d) for d in self.dilations])]
        return w


def _lowest(dtype):
    return -math.inf if dtype.is_floating_point else torch.iinfo(dtype).min


def _max_pool_indices(op: OpContext, x, win: _Window, arg):
    """ONNX's Indices: the flat index of each maximum in X (N and C included), spatial part row-major, or
    column-major with storage_order=1. ``arg`` indexes into the flattened kernel window."""
    nd = len(win.kernel)
    spatial = torch.zeros_like(arg)
    col_major = bool(op.attr("storage_order", 0))
    rest = arg
    offsets = []
    for i in reversed(range(nd)):
        offsets.append(rest % win.kernel[i])
        rest = torch.div(rest, win.kernel[i], rounding_mode="floor")
    offsets.reverse()
    scale = 1
    order = range(nd) if col_major else reversed(range(nd))
    for i in order:
        shape = [1] * arg.ndim
        shape[2 + i] = win.out[i]
        start = torch.arange(win.out[i], device=arg.device).reshape(shape) * win.strides[i] - win.begin[i]
        coord = start + offsets[i] * win.dilations[i]
        spatial = spatial + coord * scale
        scale *= win.sizes[i]
    n, c = x.shape[:2]
    plane = torch.arange(n * c, device=arg.device).reshape(n, c, *([1] * nd)) * scale
    return spatial + plane


@register("MaxPool", since=1)
def max_pool(op: OpContext, x):
    """torch's max_poolNd where it takes the pads itself; otherwise the max over explicit windows (any dtype, any
    rank, asymmetric pads). Indices follow ONNX (flat over the whole tensor, storage_order)."""
    kernel = list(op.attr("kernel_shape"))
    nd = len(kernel)
    win = _Window(op, x, kernel, bool(op.attr("ceil_mode", 0)))
    want_indices = len(op.outputs) > 1 and op.outputs[1]
    if x.dtype.is_floating_point and nd in _MAX_POOL and win.symmetric and not op.attr("storage_order", 0):
        y = _MAX_POOL[nd](
            x,
            win.kernel,
            win.strides,
            win.begin,
            win.dilations,
            ceil_mode=bool(op.attr("ceil_mode", 0)),
            return_indices=want_indices,  # type: ignore[call-overload]  # torch overloads only Literal True/False
        )
        values = y[0] if want_indices else y
        if list(values.shape[2:]) == win.out:
            if not want_indices:
                return y
            n, c = x.shape[:2]
            plane = math.prod(win.sizes)
            offset = torch.arange(n * c, device=x.device).reshape(n, c, *([1] * nd)) * plane
            return values, y[1] + offset
    w = win.windows(x, _lowest(x.dtype)).flatten(-nd)
    arg = torch.argmax(w, dim=-1, keepdim=True)
    values = torch.gather(w, -1, arg).squeeze(-1)
    if not want_indices:
        return values
    return values, _max_pool_indices(op, x, win, arg.squeeze(-1))


@register("AveragePool", since=1)
def average_pool(op: OpContext, x):
    """torch's avg_poolNd where it applies (no dilation, symmetric pads); else window sums over explicit windows
    divided by the count of input elements (plus pads when count_include_pad) each window covers."""
    kernel = list(op.attr("kernel_shape"))
    nd = len(kernel)
    ceil_mode = bool(op.attr("ceil_mode", 0))
    include_pad = bool(op.attr("count_include_pad", 0))
    win = _Window(op, x, kernel, ceil_mode)
    if nd in _AVG_POOL and win.symmetric and all(d == 1 for d in win.dilations):
        y = _AVG_POOL[nd](x, win.kernel, win.strides, win.begin, ceil_mode=ceil_mode, count_include_pad=include_pad)
        if list(y.shape[2:]) == win.out:
            return y
    dims = tuple(range(-nd, 0))
    total = win.windows(x, 0).sum(dim=dims)
    ones = torch.ones((1, 1, *win.sizes), dtype=x.dtype, device=x.device)
    if include_pad:
        ones = F.pad(ones, _torch_pad(win.begin, win.end), value=1)
        count = win.windows(ones, 0, begin=[0] * nd).sum(dim=dims)
    else:
        count = win.windows(ones, 0).sum(dim=dims)
    return total / count


def _lp_p(op: OpContext):
    p = op.attr("p", 2)
    return float(p)


def _lp_norm(x, p: float, dims):
    if p == 2:
        return torch.sqrt(torch.sum(x * x, dim=dims, keepdim=True))
    if p == 1:
        return torch.sum(x.abs(), dim=dims, keepdim=True)
    return torch.pow(torch.sum(torch.pow(x.abs(), p), dim=dims, keepdim=True), 1.0 / p)


@register("LpPool", since=1, accumulate_fp32=True)
def lp_pool(op: OpContext, x):
    """(sum over each window of |x|^p)^(1/p), pads counting as zeros."""
    kernel = list(op.attr("kernel_shape"))
    nd = len(kernel)
    win = _Window(op, x, kernel, bool(op.attr("ceil_mode", 0)))
    w = win.windows(x, 0)
    return _lp_norm(w, _lp_p(op), tuple(range(-nd, 0))).reshape(w.shape[: 2 + nd])


@register("GlobalAveragePool", since=1)
def global_average_pool(op: OpContext, x):
    return torch.mean(x, dim=tuple(range(2, x.ndim)), keepdim=True)


@register("GlobalMaxPool", since=1)
def global_max_pool(op: OpContext, x):
    return torch.amax(x, dim=tuple(range(2, x.ndim)), keepdim=True)


@register("GlobalLpPool", since=1, accumulate_fp32=True)
def global_lp_pool(op: OpContext, x):
    return _lp_norm(x, _lp_p(op), tuple(range(2, x.ndim)))


@register("MaxUnpool", since=9)
def max_unpool(op: OpContext, x, indices, output_shape=None):
    """Scatter X to the flat positions in Indices of a zero tensor of the shape MaxPool's input had (inferred from
    kernel, strides, pads); a larger output_shape extends it with zeros at the end of each dim, as onnx does."""
    kernel = list(op.attr("kernel_shape"))
    nd = len(kernel)
    strides = list(op.attr("strides") or [1] * nd)
    pads = list(op.attr("pads") or [0] * (2 * nd))
    inferred = list(x.shape[:2]) + [
        (n - 1) * s - (pads[i] + pads[nd + i]) + k
        for i, (n, s, k) in enumerate(zip(x.shape[2:], strides, kernel, strict=True))
    ]
    op.check_output(inferred, x.dtype)
    y = torch.zeros(math.prod(inferred), dtype=x.dtype, device=x.device)
    y.scatter_(0, indices.reshape(-1).to(torch.int64), x.reshape(-1))
    y = y.reshape(inferred)
    if output_shape is None:
        return y
    shape = [int(v) for v in output_shape.reshape(-1).tolist()]
    if len(shape) != len(inferred) or any(s < i for s, i in zip(shape, inferred, strict=True)):
        raise op.fail(f"output_shape {shape} is smaller than the unpooled shape {inferred}")
    grow = [s - i for s, i in zip(shape, inferred, strict=True)]
    op.check_output(shape, x.dtype)
    return F.pad(y, _torch_pad([0] * len(shape), grow))


# -- normalizations ---------------------------------------------------------------------------


def _param(t, ndim: int):
    """A BatchNormalization parameter against a rank-``ndim`` input: per channel, or (spatial=0, opset < 9) per
    channel and position."""
    if t.ndim <= 1:
        return _expand_channels(t, ndim)
    return t.unsqueeze(0)


@register("BatchNormalization", since=1, accumulate_fp32=True)
def batch_normalization(op: OpContext, x, scale, bias, mean, var):
    """Inference form: (x - mean) / sqrt(var + eps) * scale + bias. training_mode=1 (opset >= 14), or asking for
    the running statistics (opset < 14), normalizes with the batch statistics and updates the running ones."""
    eps = float(op.attr("epsilon", 1e-5))
    training = bool(op.attr("training_mode", 0)) if op.opset >= 14 else any(op.outputs[1:])
    if not training:
        return (x - _param(mean, x.ndim)) / torch.sqrt(_param(var, x.ndim) + eps) * _param(scale, x.ndim) + _param(
            bias, x.ndim
        )
    momentum = float(op.attr("momentum", 0.9))
    dims = (0, *range(2, x.ndim))
    batch_mean = torch.mean(x, dim=dims)
    batch_var = torch.var(x, dim=dims, correction=0)
    y = (x - _expand_channels(batch_mean, x.ndim)) / torch.sqrt(_expand_channels(batch_var, x.ndim) + eps)
    y = y * _param(scale, x.ndim) + _param(bias, x.ndim)
    running_mean = (mean * momentum + batch_mean.to(mean.dtype) * (1 - momentum)).to(mean.dtype)
    running_var = (var * momentum + batch_var.to(var.dtype) * (1 - momentum)).to(var.dtype)
    if op.opset >= 14:
        return y, running_mean, running_var
    return y, running_mean, running_var, batch_mean, batch_var


@register("InstanceNormalization", since=1, accumulate_fp32=True)
def instance_normalization(op: OpContext, x, scale, bias):
    eps = float(op.attr("epsilon", 1e-5))
    dims = tuple(range(2, x.ndim))
    mean = torch.mean(x, dim=dims, keepdim=True)
    var = torch.var(x, dim=dims, keepdim=True, correction=0)
    y = (x - mean) / torch.sqrt(var + eps)
    return y * _expand_channels(scale, x.ndim) + _expand_channels(bias, x.ndim)


def _stash(op: OpContext, x, default: int | None):
    """The dtype of stage one (statistics) per stash_type; ``default`` None: the input's own."""
    stash = op.attr("stash_type", default)
    if stash is None:
        return x.dtype
    try:
        return to_torch_dtype(stash)
    except (KeyError, ValueError) as error:
        raise op.fail(f"stash_type={stash} is not a type kiln can compute in") from error


@register("LayerNormalization", since=17)
def layer_normalization(op: OpContext, x, scale, bias=None):
    """Statistics over dims axis.. in the stash type; Mean and InvStdDev keep the reduced dims as size 1."""
    axis = op.attr("axis", -1)
    axis = axis % x.ndim if x.ndim else 0
    eps = float(op.attr("epsilon", 1e-5))
    xs = x.to(_stash(op, x, 1))
    dims = tuple(range(axis, x.ndim))
    mean = torch.mean(xs, dim=dims, keepdim=True)
    diff = xs - mean
    inv_std = torch.rsqrt(torch.mean(diff * diff, dim=dims, keepdim=True) + eps)
    y = (diff * inv_std).to(x.dtype) * scale
    if bias is not None:
        y = y + bias
    return y, mean, inv_std


def _group_norm(op: OpContext, x, scale, bias, per_channel: bool, stash_default):
    groups = op.attr("num_groups")
    eps = float(op.attr("epsilon", 1e-5))
    n, c = x.shape[:2]
    if groups is None or groups <= 0 or c % groups:
        raise op.fail(f"num_groups={groups} does not divide the {c} channels")
    xs = x.to(_stash(op, x, stash_default)).reshape(n, groups, -1)
    mean = torch.mean(xs, dim=-1, keepdim=True)
    diff = xs - mean
    y = (diff / torch.sqrt(torch.mean(diff * diff, dim=-1, keepdim=True) + eps)).reshape(x.shape).to(x.dtype)
    if not per_channel:
        scale = scale.repeat_interleave(c // groups)
        bias = bias.repeat_interleave(c // groups)
    return y * _expand_channels(scale, x.ndim) + _expand_channels(bias, x.ndim)


@register("GroupNormalization", since=18)
def group_normalization_v18(op: OpContext, x, scale, bias):
    """Opset 18: scale and bias hold one value per group."""
    return _group_norm(op, x, scale, bias, per_channel=False, stash_default=None)


@register("GroupNormalization", since=21, accumulate_fp32=True)
def group_normalization(op: OpContext, x, scale, bias):
    """Opset 21: scale and bias hold one value per channel; statistics in stash_type."""
    return _group_norm(op, x, scale, bias, per_channel=True, stash_default=1)


@register("LpNormalization", since=1, accumulate_fp32=True)
def lp_normalization(op: OpContext, x):
    """x / ||x||_p along axis; a zero norm gives 0, as onnx's reference does."""
    p = op.attr("p", 2)
    if p not in (1, 2):
        raise op.fail(f"p={p}: LpNormalization defines only p=1 and p=2")
    norm = _lp_norm(x, float(p), (op.attr("axis", -1) % max(x.ndim, 1),))
    return torch.where(norm == 0, torch.zeros_like(x), x / norm)


@register("MeanVarianceNormalization", since=9, accumulate_fp32=True)
def mean_variance_normalization(op: OpContext, x):
    """(x - mean) / (std + 1e-9) over axes (default [0, 2, 3]), as the function body defines it."""
    axes = op.attr("axes", [0, 2, 3])
    dims = tuple(sorted({a % x.ndim for a in axes}))
    mean = torch.mean(x, dim=dims, keepdim=True)
    var = torch.mean(x * x, dim=dims, keepdim=True) - mean * mean
    return (x - mean) / (torch.sqrt(var) + 1e-9)


@register("LRN", since=1, accumulate_fp32=True)
def lrn(op: OpContext, x):
    """Square sums over channels c - floor((size-1)/2) .. c + ceil((size-1)/2) (torch's local_response_norm
    centres even sizes the other way)."""
    size = int(op.attr("size"))
    alpha = float(op.attr("alpha", 1e-4))
    beta = float(op.attr("beta", 0.75))
    bias = float(op.attr("bias", 1.0))
    before = (size - 1) // 2
    after = size - 1 - before
    sq = (x * x).transpose(1, -1)
    sq = F.pad(sq, (before, after)).unfold(-1, size, 1).sum(-1).transpose(1, -1)
    return x / torch.pow(bias + (alpha / size) * sq, beta)


# -- Dropout ----------------------------------------------------------------------------------


def _dropout(op: OpContext, x, mask_dtype):
    if len(op.outputs) > 1 and op.outputs[1]:
        return x, torch.ones_like(x, dtype=mask_dtype)
    return x


@register("Dropout", since=1)
def dropout_v1(op: OpContext, x):
    """Inference: identity (is_test is ignored: kiln runs models, it does not train them); the mask is all ones."""
    return _dropout(op, x, x.dtype)


@register("Dropout", since=10)
def dropout_v10(op: OpContext, x):
    return _dropout(op, x, torch.bool)


@register("Dropout", since=12, random=True)
def dropout(op: OpContext, x, ratio=None, training_mode=None):
    """Identity unless training_mode is true and ratio > 0; random masks are not reproduced (op.fail)."""
    if training_mode is not None and bool(training_mode.reshape(-1)[0]):
        if ratio is None or float(ratio.reshape(-1)[0]) != 0.0:
            raise op.fail("Dropout with training_mode=true and ratio > 0 draws random masks; kiln runs inference only")
    return _dropout(op, x, torch.bool)
