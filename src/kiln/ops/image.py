"""Spatial resampling and detection ops: Resize, Upsample, GridSample, AffineGrid, RoiAlign, NMS, DeformConv, Col2Im."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from kiln.ops.registry import OpContext, register

# ----------------------------------------------------------------------------------------------
# Resize / Upsample: separable per-axis resampling. For each resized axis the source coordinate of
# every output index is computed as the spec's coordinate_transformation_mode says, then the
# kernel's taps are gathered and weighted. Coordinates and weights are float64 (they are 1-D).
# ----------------------------------------------------------------------------------------------

_CTMS = (
    "half_pixel",
    "half_pixel_symmetric",
    "pytorch_half_pixel",
    "align_corners",
    "asymmetric",
    "tf_crop_and_resize",
    "tf_half_pixel_for_nn",
)


def _source_coords(op, ctm, out_len, in_len, scale, roi, device):
    """x_original for each output index along one axis (float64), and the tf_crop_and_resize
    out-of-range mask (or None)."""
    y = torch.arange(out_len, dtype=torch.float64, device=device)
    width = scale * in_len  # output_width: fractional when it comes from a scale
    outside = None
    if ctm == "align_corners":
        x = torch.zeros_like(y) if width == 1 else y * (in_len - 1) / (width - 1)
    elif ctm == "asymmetric":
        x = y / scale
    elif ctm == "tf_crop_and_resize":
        # roi is float32 data: its products with the length are float32, as in onnx's reference
        start, end = np.float32(roi[0]), np.float32(roi[1])
        span, first = float((end - start) * np.float32(in_len - 1)), float(start * np.float32(in_len - 1))
        x = torch.full_like(y, span / 2) if width == 1 else y * span / (width - 1)
        x = x + first
        outside = (x < 0) | (x > in_len - 1)
    elif ctm == "pytorch_half_pixel":
        x = (y + 0.5) / scale - 0.5 if out_len > 1 else torch.zeros_like(y)
    elif ctm == "half_pixel":
        x = (y + 0.5) / scale - 0.5
    elif ctm == "half_pixel_symmetric":
        offset = in_len / 2 * (1 - out_len / width)
        x = offset + (y + 0.5) / scale - 0.5
    elif ctm == "tf_half_pixel_for_nn" and op.opset < 13:
        x = (y + 0.5) / scale
    else:
        raise op.fail(f"coordinate_transformation_mode {ctm!r} is not one of {_CTMS} (for this opset)")
    return x, outside


def _cubic(t: torch.Tensor, a: float) -> torch.Tensor:
    """Keys' cubic convolution kernel with coefficient a, at |t|."""
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def _taps(mode, ratio, scale, antialias, cubic_a):
    """Kernel weights (out, n) for taps at offsets start..start+n-1 from the left neighbour, where
    ratio in (0, 1] is the coordinate's distance to that neighbour. Antialias stretches the kernel
    by 1/scale when downsampling and renormalises."""
    s = min(scale, 1.0) if antialias else 1.0
    support = 1.0 if mode == "linear" else 2.0
    start = math.floor(-support / s) + 1
    n = 2 - 2 * start
    t = (torch.arange(start, start + n, dtype=torch.float64, device=ratio.device) - ratio[:, None]) * s
    weights = (1 - t.abs()).clamp(0, 1) if mode == "linear" else _cubic(t, cubic_a)
    if antialias:
        weights = weights / weights.sum(dim=1, keepdim=True)
    return start, weights


def _nearest_index(op, x, nearest_mode, scale):
    left = torch.floor(x)
    frac = x - left
    if nearest_mode == "round_prefer_floor":
        up = frac > 0.5
    elif nearest_mode == "round_prefer_ceil":
        up = frac >= 0.5
    elif nearest_mode == "floor":
        up = torch.zeros_like(frac, dtype=torch.bool)
    elif nearest_mode == "ceil":
        up = frac > 0
    elif nearest_mode == "simple":  # Resize-10 / Upsample: floor when upsampling, ceil when downsampling
        up = frac > 0 if scale < 1 else torch.zeros_like(frac, dtype=torch.bool)
    else:
        raise op.fail(f"nearest_mode {nearest_mode!r} is not round_prefer_floor, round_prefer_ceil, floor or ceil")
    return (left + up.to(left.dtype)).to(torch.int64)


def _along(t: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
    """Shape a per-output-index tensor (out, ...) to broadcast at ``axis`` of a rank-``rank`` tensor."""
    return t.reshape((1,) * axis + tuple(t.shape) + (1,) * (rank - axis - 1))


def _resize_axis(op, x, axis, out_len, scale, roi, cfg):
    in_len = x.shape[axis]
    if out_len == 0 or in_len == 0:
        shape = list(x.shape)
        shape[axis] = out_len
        return x.new_zeros(shape)
    coords, outside = _source_coords(op, cfg["ctm"], out_len, in_len, scale, roi, x.device)
    if cfg["mode"] == "nearest":
        index = _nearest_index(op, coords, cfg["nearest_mode"], scale).clamp(0, in_len - 1)
        y = x.index_select(axis, index)
    else:
        left = torch.ceil(coords) - 1  # the neighbour left of x; x itself when ratio would be 0
        ratio = coords - left
        start, weights = _taps(cfg["mode"], ratio, scale, cfg["antialias"], cfg["cubic_a"])
        n = weights.shape[1]
        index = left.to(torch.int64)[:, None] + start + torch.arange(n, device=x.device)
        if cfg["exclude_outside"]:
            weights = torch.where((index < 0) | (index >= in_len), torch.zeros_like(weights), weights)
            total = weights.sum(dim=1, keepdim=True)
            weights = weights / torch.where(total == 0, torch.ones_like(total), total)
        index = index.clamp(0, in_len - 1)
        gathered = x.index_select(axis, index.reshape(-1))
        shape = list(x.shape)
        shape[axis : axis + 1] = [out_len, n]
        gathered = gathered.reshape(shape)
        y = (gathered * _along(weights.to(x.dtype), axis, x.dim())).sum(dim=axis + 1)
    if outside is not None and bool(outside.any()):
        fill = torch.tensor(cfg["extrapolation"], dtype=torch.float64).to(y.dtype)
        y = torch.where(_along(outside, axis, x.dim()), fill.to(y.device), y)
    return y


def _resize(op: OpContext, x, out_sizes, scales, rois, cfg):
    """Resize every axis whose size, scale or roi differs from the identity."""
    if isinstance(x, np.ndarray):
        raise op.fail("resizing string tensors is not supported")
    dtype = x.dtype
    if cfg["mode"] != "nearest":
        if dtype == torch.bool or dtype.is_complex:
            raise op.fail(f"mode {cfg['mode']!r} needs a numeric real input, got {dtype}")
        work = torch.float64 if dtype == torch.float64 or not dtype.is_floating_point else torch.float32
        y = x.to(work)
    else:
        y = x
    op.check_output(out_sizes, y.dtype)
    for axis in cfg["order"]:
        out_len, scale, roi = out_sizes[axis], scales[axis], rois[axis]
        trivial_roi = cfg["ctm"] != "tf_crop_and_resize" or (math.isclose(roi[0], 0.0) and math.isclose(roi[1], 1.0))
        if out_len == y.shape[axis] and math.isclose(scale, 1.0) and trivial_roi:
            continue
        y = _resize_axis(op, y, axis, out_len, scale, roi, cfg)
    if y.dtype == dtype:
        return y
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        y = torch.round(y).clamp(info.min, info.max)
    return y.to(dtype)


def _values(t) -> list[float] | None:
    if t is None or t.numel() == 0:
        return None
    return [float(v) for v in t.reshape(-1).tolist()]


def _resize_config(op: OpContext, rank: int, mode: str, ctm: str, nearest_mode: str) -> dict:
    if mode not in ("nearest", "linear", "cubic") or (op.op_type == "Upsample" and mode == "cubic"):
        raise op.fail(f"mode {mode!r} is not supported (nearest, linear or cubic)")
    antialias = bool(op.attr("antialias", 0))
    if antialias and mode == "nearest":
        raise op.fail("antialias is not defined for mode 'nearest'")
    return {
        "mode": mode,
        "ctm": ctm,
        "nearest_mode": nearest_mode,
        "cubic_a": op.attr("cubic_coeff_a", -0.75),
        "exclude_outside": bool(op.attr("exclude_outside", 0)),
        "extrapolation": op.attr("extrapolation_value", 0.0),
        "antialias": antialias,
        "order": list(range(rank)),
    }


def _by_scales(op, x, scales, cfg):
    if len(scales) != x.dim():
        raise op.fail(f"scales has {len(scales)} values for a rank-{x.dim()} input")
    if any(s <= 0 for s in scales):
        raise op.fail(f"scales must be positive, got {scales}")
    sizes = [math.floor(s * d) for s, d in zip(scales, x.shape, strict=True)]
    return _resize(op, x, sizes, scales, [(0.0, 1.0)] * x.dim(), cfg)


@register("Upsample", since=7)
def upsample_7(op: OpContext, x):
    """Resize with asymmetric coordinates (nearest: floor, as onnxruntime's Upsample)."""
    mode = op.attr("mode", "nearest")
    cfg = _resize_config(op, x.dim(), mode, "asymmetric", "simple")
    return _by_scales(op, x, [float(s) for s in op.attr("scales")], cfg)


@register("Upsample", since=9, shape_inputs=(1,), host_inputs=(1,), parameter_inputs=(1,))
def upsample_9(op: OpContext, x, scales):
    mode = op.attr("mode", "nearest")
    cfg = _resize_config(op, x.dim(), mode, "asymmetric", "simple")
    return _by_scales(op, x, _values(scales) or [], cfg)


@register("Resize", since=10)
def resize_10(op: OpContext, x, scales):
    """Resize-10 = Upsample-9: asymmetric coordinates; nearest rounds down when upsampling and up
    when downsampling (onnxruntime's 'simple' mode, which this opset implies)."""
    cfg = _resize_config(op, x.dim(), op.attr("mode", "nearest"), "asymmetric", "simple")
    return _by_scales(op, x, _values(scales) or [], cfg)


@register("Resize", since=11, shape_inputs=(1, 2, 3), host_inputs=(2, 3), host_reads=(1,), parameter_inputs=(1, 2))
def resize_11(op: OpContext, x, roi=None, scales=None, sizes=None):
    """The general Resize (opsets 11-19): scales or sizes, optional axes and keep_aspect_ratio_policy."""
    rank = x.dim()
    cfg = _resize_config(
        op,
        rank,
        op.attr("mode", "nearest"),
        op.attr("coordinate_transformation_mode", "half_pixel"),
        op.attr("nearest_mode", "round_prefer_floor"),
    )
    axes = op.attr("axes")
    if axes is None:
        axes = list(range(rank))
    else:
        axes = [a + rank if a < 0 else a for a in axes]
        if any(not 0 <= a < rank for a in axes) or len(set(axes)) != len(axes):
            raise op.fail(f"axes {op.attr('axes')} invalid for rank {rank}")
    cfg["order"] = axes
    scale_values, size_values = _values(scales), None if sizes is None or sizes.numel() == 0 else sizes.tolist()
    if (scale_values is None) == (size_values is None):
        raise op.fail("exactly one of scales and sizes must be given (non-empty)")
    out = list(x.shape)
    factors = [1.0] * rank
    if scale_values is not None:
        if len(scale_values) != len(axes):
            raise op.fail(f"scales has {len(scale_values)} values for {len(axes)} axes")
        if any(s <= 0 for s in scale_values):
            raise op.fail(f"scales must be positive, got {scale_values}")
        for a, s in zip(axes, scale_values, strict=True):
            factors[a] = s
            out[a] = math.floor(s * x.shape[a])
    else:
        assert size_values is not None  # exactly one of the two is given (checked above)
        if len(size_values) != len(axes):
            raise op.fail(f"sizes has {len(size_values)} values for {len(axes)} axes")
        policy = op.attr("keep_aspect_ratio_policy", "stretch")
        ratios = [s / x.shape[a] if x.shape[a] else 1.0 for a, s in zip(axes, size_values, strict=True)]
        if policy == "stretch":
            for a, s, f in zip(axes, size_values, ratios, strict=True):
                out[a], factors[a] = int(s), f
        elif policy in ("not_larger", "not_smaller"):
            common = min(ratios) if policy == "not_larger" else max(ratios)
            for a in axes:
                factors[a] = common
                out[a] = int(common * x.shape[a] + 0.5)
        else:
            raise op.fail(f"keep_aspect_ratio_policy {policy!r} is not stretch, not_larger or not_smaller")
    rois = [(0.0, 1.0)] * rank
    if cfg["ctm"] == "tf_crop_and_resize":
        roi_values = _values(roi)
        if roi_values is None or len(roi_values) != 2 * len(axes):
            raise op.fail(f"tf_crop_and_resize needs roi with {2 * len(axes)} values")
        n = len(axes)
        for i, a in enumerate(axes):
            rois[a] = (roi_values[i], roi_values[n + i])
    return _resize(op, x, out, factors, rois, cfg)


# ----------------------------------------------------------------------------------------------
# GridSample / AffineGrid / DeformConv: N-D sampling at fractional pixel positions.
# ----------------------------------------------------------------------------------------------


def _reflect(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Reflect x at the borders lo and hi until it lies in [lo, hi]."""
    span = hi - lo
    if span <= 0:
        return torch.full_like(x, lo)
    below, above = lo - x, x - hi
    out = x
    for dx, near, far, mask in ((below, lo, hi, x < lo), (above, hi, lo, x > hi)):
        flips = torch.trunc(dx / span)
        rest = dx - flips * span
        sign = 1.0 if near == lo else -1.0
        even = torch.remainder(flips, 2) == 0
        moved = torch.where(even, near + sign * rest, far - sign * rest)
        out = torch.where(mask, moved, out)
    return out


def _gather_nd(x: torch.Tensor, index: list[torch.Tensor]) -> torch.Tensor:
    """x (N, C, *dims) read at integer positions index[d] (N, *S), all in range: (N, C, *S)."""
    n, c = x.shape[:2]
    dims = x.shape[2:]
    flat = torch.zeros_like(index[0])
    for i, size in zip(index, dims, strict=True):
        flat = flat * size + i
    out_shape = flat.shape[1:]
    flat = flat.reshape(n, 1, -1).expand(n, c, -1)
    return x.reshape(n, c, -1).gather(2, flat).reshape(n, c, *out_shape)


def _sample_nd(x, coords, taps, padding, borders):
    """Sum over tap combinations of prod(weights) * x[taps], one (index, weight) list per spatial dim.

    ``taps[d]`` is a list of (float index (N, *S), weight (N, *S) or None); ``padding`` decides
    what an index outside [0, size) reads: zeros, border (clamped) or reflection (reflected at
    ``borders[d]`` then truncated), the way onnx's reference reads a pixel."""
    dims = x.shape[2:]
    per_dim = []
    for d, size in enumerate(dims):
        entries = []
        for idx, weight in taps[d]:
            valid = None
            if padding == "zeros":
                valid = (idx >= 0) & (idx < size)
                i = idx.clamp(0, size - 1)
            elif padding == "border":
                i = idx.clamp(0, size - 1)
            else:
                i = torch.trunc(_reflect(idx, *borders[d])).clamp(0, size - 1)
            entries.append((i.to(torch.int64), weight, valid))
        per_dim.append(entries)
    result = None
    for combo in _product(per_dim):
        value = _gather_nd(x, [e[0] for e in combo])
        valid = None
        weight = None
        for _, w, v in combo:
            if v is not None:
                valid = v if valid is None else valid & v
            if w is not None:
                weight = w if weight is None else weight * w
        if weight is not None:
            value = value * weight.unsqueeze(1).to(value.dtype)
        if valid is not None:
            value = torch.where(valid.unsqueeze(1), value, torch.zeros((), dtype=value.dtype, device=value.device))
        result = value if result is None else result + value
    return result


def _product(lists):
    if not lists:
        yield ()
        return
    for head in lists[0]:
        for tail in _product(lists[1:]):
            yield (head, *tail)


def _keys_cubic_taps(x: torch.Tensor, a: float = -0.75):
    base = torch.floor(x)
    t = x - base
    return [(base + k, _cubic(t - k, a)) for k in (-1, 0, 1, 2)]


def _grid_sample(op: OpContext, x, grid, mode: str):
    padding = op.attr("padding_mode", "zeros")
    if padding not in ("zeros", "border", "reflection"):
        raise op.fail(f"padding_mode {padding!r} is not zeros, border or reflection")
    align = bool(op.attr("align_corners", 0))
    r = x.dim() - 2
    if r < 1 or grid.dim() != r + 2 or grid.shape[-1] != r or grid.shape[0] != x.shape[0]:
        raise op.fail(f"grid {list(grid.shape)} does not match input {list(x.shape)}")
    if isinstance(x, np.ndarray) or (mode != "nearest" and not x.dtype.is_floating_point):
        raise op.fail(f"GridSample mode {mode!r} needs a floating-point input")
    n, c = x.shape[:2]
    if n * c == 0 or grid[..., 0].numel() == 0 or any(s == 0 for s in x.shape[2:]):
        return x.new_zeros((n, c, *grid.shape[1:-1]))
    fast = _grid_sample_fast(x, grid, mode, padding, align)
    if fast is not None:
        return fast
    cdt = torch.float64 if grid.dtype == torch.float64 else torch.float32
    work = x if mode == "nearest" or x.dtype in (torch.float32, torch.float64) else x.float()
    dims = x.shape[2:]
    taps, borders = [], []
    for d, size in enumerate(dims):
        g = grid[..., r - 1 - d].to(cdt)  # grid lists the innermost dimension first
        lo, hi = (0.0, size - 1.0) if align else (-0.5, size - 0.5)
        borders.append((lo, hi))
        pos = (g + 1) / 2 * (size - 1) if align else ((g + 1) * size - 1) / 2
        if mode == "nearest":
            pos = torch.round(pos)  # half to even
        outside = (pos < lo) | (pos > hi)
        if padding == "border":
            pos = torch.where(outside, pos.clamp(0, size - 1), pos)
        elif padding == "reflection":
            pos = torch.where(outside, _reflect(pos, lo, hi), pos)
        if mode == "nearest":
            taps.append([(torch.trunc(pos), None)])
        elif mode == "linear":
            base = torch.floor(pos)
            t = pos - base
            taps.append([(base, 1 - t), (base + 1, t)])
        else:
            taps.append(_keys_cubic_taps(pos))
    return _sample_nd(work, None, taps, padding, borders).to(x.dtype)


def _grid_sample_fast(x, grid, mode, padding, align):
    """F.grid_sample where it provably equals the spec: 4-D/5-D float, (bi/tri)linear or nearest,
    zeros or border padding (torch clamps the coordinate for border, which reads the same pixels)."""
    if x.dim() not in (4, 5) or mode == "cubic" or padding == "reflection":
        return None
    if x.dtype not in (torch.float32, torch.float64) or grid.dtype != x.dtype:
        return None
    torch_mode = "bilinear" if mode == "linear" else "nearest"
    return F.grid_sample(x, grid, mode=torch_mode, padding_mode=padding, align_corners=align)


_GRID_MODES = {"bilinear": "linear", "bicubic": "cubic", "linear": "linear", "cubic": "cubic", "nearest": "nearest"}


@register("GridSample", since=16)
def grid_sample_16(op: OpContext, x, grid):
    """4-D GridSample with modes bilinear/nearest/bicubic (opset 16 names)."""
    mode = op.attr("mode", "bilinear")
    if mode not in ("bilinear", "nearest", "bicubic"):
        raise op.fail(f"mode {mode!r} is not bilinear, nearest or bicubic")
    if x.dim() != 4:
        raise op.fail("GridSample-16 takes a 4-D input; opset 20 allows N-D")
    return _grid_sample(op, x, grid, _GRID_MODES[mode])


@register("GridSample", since=20)
def grid_sample_20(op: OpContext, x, grid):
    """N-D GridSample, modes linear/nearest/cubic, separable per spatial dimension."""
    mode = op.attr("mode", "linear")
    if mode not in ("linear", "nearest", "cubic"):
        raise op.fail(f"mode {mode!r} is not linear, nearest or cubic")
    return _grid_sample(op, x, grid, mode)


@register("AffineGrid", since=20)
def affine_grid(op: OpContext, theta, size):
    """theta @ [x, y, (z,) 1] over an evenly spaced [-1, 1] grid (F.affine_grid's convention)."""
    shape = [int(v) for v in size.tolist()]
    spatial = shape[2:]
    r = len(spatial)
    if r not in (2, 3) or tuple(theta.shape[1:]) != (r, r + 1):
        raise op.fail(f"theta {list(theta.shape)} and size {shape} must be (N, 2, 3) with 4 sizes or (N, 3, 4) with 5")
    align = bool(op.attr("align_corners", 0))
    cdt = torch.float64 if theta.dtype == torch.float64 else torch.float32
    axes = []
    for length in spatial:
        i = torch.arange(length, dtype=cdt, device=theta.device)
        if align:
            axes.append(-1 + 2 * i / (length - 1) if length > 1 else torch.zeros_like(i))
        else:
            axes.append((2 * i + 1) / length - 1)
    mesh = torch.meshgrid(*axes, indexing="ij")  # (D,) H, W
    ones = torch.ones_like(mesh[0])
    base = torch.stack([*reversed(mesh), ones], dim=-1)  # x first, then y (, z), then 1
    grid = torch.einsum("...k,njk->n...j", base, theta.to(cdt))
    return grid.to(theta.dtype)


@register("DeformConv", since=19)
def deform_conv(op: OpContext, x, w, offset, bias=None, mask=None):
    """Each kernel tap reads x bilinearly at its offset position (zero outside), times mask, then a
    grouped contraction with W."""
    if not x.dtype.is_floating_point:
        raise op.fail("DeformConv needs a floating-point input")
    n, c = x.shape[:2]
    dims = list(x.shape[2:])
    r = len(dims)
    oc = w.shape[0]
    kernel = [int(k) for k in (op.attr("kernel_shape") or w.shape[2:])]
    strides = op.attr("strides") or [1] * r
    dilations = op.attr("dilations") or [1] * r
    pads = op.attr("pads") or [0] * (2 * r)
    group, ogroup = op.attr("group", 1), op.attr("offset_group", 1)
    if c != w.shape[1] * group or oc % group or c % ogroup:
        raise op.fail(f"channels {c}, weight {list(w.shape)}, group {group}, offset_group {ogroup} are inconsistent")
    out_dims = list(offset.shape[2:])
    k_total = math.prod(kernel)
    if offset.shape[1] != ogroup * k_total * r:
        raise op.fail(f"offset has {offset.shape[1]} channels, expected offset_group*prod(kernel)*{r}")
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    offset = offset.to(work.dtype).reshape(n, ogroup, k_total, r, *out_dims)
    # base position of tap k at output o along dim d: -pad + stride*o + dilation*k
    ks = torch.meshgrid(*[torch.arange(k, device=x.device) for k in kernel], indexing="ij")
    taps = []
    for d in range(r):
        o = torch.arange(out_dims[d], device=x.device, dtype=work.dtype)
        o = o.reshape((1,) * d + (-1,) + (1,) * (r - d - 1))
        k = ks[d].reshape(k_total, *([1] * r)).to(work.dtype)
        base = -pads[d] + strides[d] * o + dilations[d] * k  # (K, *out)
        pos = base + offset[:, :, :, d]  # (N, G, K, *out)
        pos = pos.reshape(n * ogroup, k_total, *out_dims)
        floor = torch.floor(pos)
        t = pos - floor
        taps.append([(floor, 1 - t), (floor + 1, t)])
    xg = work.reshape(n * ogroup, c // ogroup, *dims)
    sampled = _sample_nd(xg, None, taps, "zeros", None)  # (N*G, C/G, K, *out)
    sampled = sampled.reshape(n, c, k_total, *out_dims)
    if mask is not None:
        m = mask.to(work.dtype).reshape(n, ogroup, 1, k_total, *out_dims)
        sampled = (sampled.reshape(n, ogroup, c // ogroup, k_total, *out_dims) * m).reshape(n, c, k_total, *out_dims)
    cols = sampled.reshape(n, group, (c // group) * k_total, -1)
    weights = w.to(work.dtype).reshape(group, oc // group, (c // group) * k_total)
    y = torch.einsum("gok,ngkl->ngol", weights, cols).reshape(n, oc, *out_dims)
    if bias is not None:
        y = y + bias.to(work.dtype).reshape(1, oc, *([1] * r))
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# RoiAlign, NonMaxSuppression, Col2Im
# ----------------------------------------------------------------------------------------------


def _roi_axis(start, bin_size, grid, pooled: int, points: int, size: int):
    """Bilinear taps of the sampling points of one axis: indices (R, P, G, 2) and weights (R, P, G, 2)
    (zero for padding points beyond an roi's own grid and for points outside [-1, size])."""
    dev = start.device
    p = torch.arange(pooled, device=dev, dtype=start.dtype).reshape(1, -1, 1)
    g = torch.arange(points, device=dev, dtype=start.dtype).reshape(1, 1, -1)
    pos = start[:, None, None] + p * bin_size[:, None, None] + (g + 0.5) * bin_size[:, None, None] / grid[:, None, None]
    used = (g < grid[:, None, None]) & (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = torch.floor(pos)
    edge = low >= size - 1
    low = torch.where(edge, torch.full_like(low, size - 1), low)
    pos = torch.where(edge, low, pos)
    high = torch.where(edge, low, low + 1)
    frac = pos - low
    weights = torch.stack([1 - frac, frac], dim=-1) * used.unsqueeze(-1).to(pos.dtype)
    return torch.stack([low, high], dim=-1).to(torch.int64), weights


def _roi_align(op: OpContext, x, rois, batch_indices, half_pixel: bool):
    mode = op.attr("mode", "avg")
    if mode not in ("avg", "max"):
        raise op.fail(f"mode {mode!r} is not avg or max")
    if x.dim() != 4 or rois.dim() != 2 or rois.shape[1] != 4:
        raise op.fail(f"X must be 4-D and rois (num_rois, 4), got {list(x.shape)} and {list(rois.shape)}")
    ph, pw = op.attr("output_height", 1), op.attr("output_width", 1)
    ratio, scale = op.attr("sampling_ratio", 0), op.attr("spatial_scale", 1.0)
    n_rois, channels, height, width = rois.shape[0], x.shape[1], x.shape[2], x.shape[3]
    if n_rois == 0:
        return x.new_zeros((0, channels, ph, pw))
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    work = x.to(cdt)
    box = rois.to(cdt) * scale - (0.5 if half_pixel else 0.0)
    size_w, size_h = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    if not half_pixel:
        size_w, size_h = size_w.clamp(min=1.0), size_h.clamp(min=1.0)
    bin_h, bin_w = size_h / ph, size_w / pw
    if ratio > 0:
        grid_h = torch.full_like(bin_h, float(ratio))
        grid_w = torch.full_like(bin_w, float(ratio))
    else:
        grid_h, grid_w = torch.ceil(size_h / ph), torch.ceil(size_w / pw)
    count = (grid_h * grid_w).clamp(min=1)
    gh, gw = max(int(grid_h.max()), 1), max(int(grid_w.max()), 1)
    op.check_output((n_rois, channels, ph, pw), cdt)
    op.check_output((1, channels, ph, gh, 2, pw, gw, 2), cdt, what="the sampling points of one region")
    batch = batch_indices.to(torch.int64)
    out = []
    chunk = max(1, (1 << 24) // max(1, channels * ph * pw * gh * gw * 4))
    for lo in range(0, n_rois, chunk):
        sl = slice(lo, lo + chunk)
        yi, yw = _roi_axis(box[sl, 1], bin_h[sl], grid_h[sl], ph, gh, height)  # (R, PH, GH, 2)
        xi, xw = _roi_axis(box[sl, 0], bin_w[sl], grid_w[sl], pw, gw, width)  # (R, PW, GW, 2)
        r = yi.shape[0]
        planes = work[batch[sl]]  # (R, C, H, W)
        rows = planes.gather(2, yi.reshape(r, 1, -1, 1).expand(r, channels, -1, width))
        rows = rows.reshape(r, channels, ph, gh, 2, 1, width)
        vals = rows.expand(r, channels, ph, gh, 2, pw * gw * 2, width).gather(
            6, xi.reshape(r, 1, 1, 1, 1, -1, 1).expand(r, channels, ph, gh, 2, -1, 1)
        )
        vals = vals.reshape(r, channels, ph, gh, 2, pw, gw, 2)
        weights = yw.reshape(r, 1, ph, gh, 2, 1, 1, 1) * xw.reshape(r, 1, 1, 1, 1, pw, gw, 2)
        weighted = vals * weights  # (R, C, PH, GH, 2, PW, GW, 2)
        if mode == "avg":
            res = weighted.sum(dim=(3, 4, 6, 7)) / count[sl].reshape(-1, 1, 1, 1)
        else:
            # max over each point's four weighted corners, then over the roi's own sampling points
            corner = weighted.amax(dim=(4, 7))  # (R, C, PH, GH, PW, GW)
            real = (torch.arange(gh, device=x.device)[None, :] < grid_h[sl, None]).reshape(r, 1, 1, gh, 1, 1) & (
                torch.arange(gw, device=x.device)[None, :] < grid_w[sl, None]
            ).reshape(r, 1, 1, 1, 1, gw)
            corner = torch.where(real, corner, torch.full_like(corner, float("-inf")))
            res = corner.amax(dim=(3, 5))
        out.append(res)
    return torch.cat(out).to(x.dtype)


@register("RoiAlign", since=10)
def roi_align_10(op: OpContext, x, rois, batch_indices):
    """RoiAlign without the half-pixel shift (opset 10 behaviour = output_half_pixel)."""
    return _roi_align(op, x, rois, batch_indices, half_pixel=False)


@register("RoiAlign", since=16)
def roi_align_16(op: OpContext, x, rois, batch_indices):
    """Bilinear samples on a per-roi grid (adaptive when sampling_ratio=0), averaged or max-pooled
    (max is over each sample's weighted corners, as onnxruntime does)."""
    ctm = op.attr("coordinate_transformation_mode", "half_pixel")
    if ctm not in ("half_pixel", "output_half_pixel"):
        raise op.fail(f"coordinate_transformation_mode {ctm!r} is not half_pixel or output_half_pixel")
    return _roi_align(op, x, rois, batch_indices, half_pixel=ctm == "half_pixel")


def _scalar(t, default):
    return default if t is None or t.numel() == 0 else t.reshape(-1)[0].item()


@register("NonMaxSuppression", since=10, data_dependent=True)
def non_max_suppression(op: OpContext, boxes, scores, max_output=None, iou_threshold=None, score_threshold=None):
    """Greedy per (batch, class): highest score first (ties: lower index), drop boxes whose IoU with a
    kept box is > iou_threshold. Runs on the CPU (it is sequential); output [num, 3] int64."""
    center = op.attr("center_point_box", 0)
    if center not in (0, 1):
        raise op.fail(f"center_point_box must be 0 or 1, got {center}")
    limit = max(int(_scalar(max_output, 0)), 0)
    iou_thr = float(_scalar(iou_threshold, 0.0))
    score_thr = None if score_threshold is None or score_threshold.numel() == 0 else float(_scalar(score_threshold, 0))
    n_batch, n_class = scores.shape[0], scores.shape[1]
    selected: list[tuple[int, int, int]] = []
    if limit > 0:
        b = boxes.detach().to("cpu", torch.float64)
        s = scores.detach().to("cpu", torch.float64)
        if center == 0:
            x1, x2 = torch.minimum(b[..., 1], b[..., 3]), torch.maximum(b[..., 1], b[..., 3])
            y1, y2 = torch.minimum(b[..., 0], b[..., 2]), torch.maximum(b[..., 0], b[..., 2])
        else:
            x1, x2 = b[..., 0] - b[..., 2] / 2, b[..., 0] + b[..., 2] / 2
            y1, y2 = b[..., 1] - b[..., 3] / 2, b[..., 1] + b[..., 3] / 2
        area = (x2 - x1) * (y2 - y1)
        for n in range(n_batch):
            for c in range(n_class):
                cls = s[n, c]
                order = torch.sort(-cls, stable=True).indices
                if score_thr is not None:
                    order = order[cls[order] > score_thr]
                alive = torch.ones(order.numel(), dtype=torch.bool)
                bx1, bx2, by1, by2, ba = x1[n][order], x2[n][order], y1[n][order], y2[n][order], area[n][order]
                kept = 0
                for i in range(order.numel()):
                    if kept >= limit:
                        break
                    if not alive[i]:
                        continue
                    selected.append((n, c, int(order[i])))
                    kept += 1
                    iw = torch.minimum(bx2, bx2[i]) - torch.maximum(bx1, bx1[i])
                    ih = torch.minimum(by2, by2[i]) - torch.maximum(by1, by1[i])
                    inter = iw * ih
                    union = ba + ba[i] - inter
                    valid = (iw > 0) & (ih > 0) & (inter > 0) & (ba > 0) & (ba[i] > 0) & (union > 0)
                    over = valid & (inter / torch.where(union > 0, union, torch.ones_like(union)) > iou_thr)
                    alive &= ~over
    result = torch.tensor(selected, dtype=torch.int64).reshape(-1, 3)
    return result.to(boxes.device)


@register("Col2Im", since=18)
def col2im(op: OpContext, x, image_shape, block_shape):
    """Sum each column block back into the (padded) image (N-D fold), then crop the padding."""
    image = [int(v) for v in image_shape.tolist()]
    block = [int(v) for v in block_shape.tolist()]
    r = len(image)
    strides = op.attr("strides") or [1] * r
    dilations = op.attr("dilations") or [1] * r
    pads = op.attr("pads") or [0] * (2 * r)
    n, ck, length = x.shape
    k_total = math.prod(block)
    if len(block) != r or ck % k_total:
        raise op.fail(f"input channel dim {ck} is not C * prod(block_shape {block})")
    c = ck // k_total
    padded = [image[d] + pads[d] + pads[d + r] for d in range(r)]
    counts = [(padded[d] - dilations[d] * (block[d] - 1) - 1) // strides[d] + 1 for d in range(r)]
    if math.prod(counts) != length or any(v < 1 for v in counts):
        raise op.fail(f"input has {length} blocks, the shapes give {counts}")
    op.check_output((n, c, *padded), x.dtype, what="its padded image")
    dev = x.device
    flat = torch.zeros((k_total, length), dtype=torch.int64, device=dev)
    kidx = torch.meshgrid(*[torch.arange(k, device=dev) for k in block], indexing="ij")
    lidx = torch.meshgrid(*[torch.arange(v, device=dev) for v in counts], indexing="ij")
    for d in range(r):
        pos = kidx[d].reshape(-1, 1) * dilations[d] + lidx[d].reshape(1, -1) * strides[d]
        flat = flat * padded[d] + pos
    src = x.reshape(n, c, k_total * length)
    out = torch.zeros((n, c, math.prod(padded)), dtype=x.dtype, device=dev)
    out.index_add_(2, flat.reshape(-1), src)
    out = out.reshape(n, c, *padded)
    crop = tuple(slice(pads[d], pads[d] + image[d]) for d in range(r))
    return out[(slice(None), slice(None), *crop)].contiguous()
