"""Shape and data-movement ops: shape arithmetic, reshapes, slicing, gathers, scatters, padding.

Most of these only move elements. torch lacks gather/scatter/index_put/triu kernels for uint16/32/64
and the float8 types, so those run on a same-width integer *view* of the bits (``_raw``/``_cooked``):
exact, since no value is computed. Ops that compute (scatter reductions, Unique, NonZero) widen to a
type torch orders correctly (``_widen``/``_narrow``). String tensors (numpy object arrays) go through
the pure data-movement ops as int64 positions into their elements (``_strings``).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from kiln import dtypes
from kiln.ops.registry import OpContext, register

_BITS = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}
_FLOAT8 = {d for d in dtypes.TORCH_DTYPES.values() if d.is_floating_point and d.itemsize == 1}


def _raw(x: torch.Tensor) -> torch.Tensor:
    """``x`` as bits in a dtype every torch indexing kernel handles (same width, exact)."""
    if x.dtype in _BITS:
        return x.view(_BITS[x.dtype])
    if x.dtype in _FLOAT8:
        return x.view(torch.uint8)
    return x


def _cooked(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Undo ``_raw``."""
    return y.view(dtype) if y.dtype != dtype else y


def _widen(x: torch.Tensor, ordered: bool = False) -> torch.Tensor:
    """``x`` in a dtype torch computes with; ``ordered`` keeps uint64 order (sign bit flipped)."""
    if x.dtype in _FLOAT8:
        return x.float()
    return dtypes.ordered(x) if ordered else dtypes.computable(x)


def _narrow(y: torch.Tensor, dtype: torch.dtype, ordered: bool = False) -> torch.Tensor:
    """Undo ``_widen``."""
    if dtype in _FLOAT8:
        return y.to(dtype)
    return dtypes.unordered(y, dtype) if ordered else dtypes.restore(y, dtype)


def _strings(fn):
    """Let a pure data-movement op take string tensors: each string input becomes int64 positions
    into one pool of elements, the op moves positions, and tensor results map back to strings.
    Position 0 is the empty string, so zero padding pads with "" as the spec says."""

    @functools.wraps(fn)
    def wrapper(op: OpContext, *args):
        if not any(isinstance(a, np.ndarray) for a in args):
            return fn(op, *args)
        pool, converted, offset = [np.array([""], dtype=object)], [], 1  # position 0 is "", the pad value
        for a in args:
            if isinstance(a, np.ndarray):
                pool.append(a.reshape(-1))
                converted.append(torch.arange(offset, offset + a.size, device=op.device).reshape(a.shape))
                offset += a.size
            else:
                converted.append(a)
        elements = np.concatenate(pool).astype(object)

        def back(value):
            if isinstance(value, torch.Tensor) and value.dtype == torch.int64:
                return elements[value.cpu().numpy()]
            return value

        result = fn(op, *converted)
        if isinstance(result, tuple):
            return tuple(back(v) for v in result)
        if isinstance(result, list):
            return [back(v) for v in result]
        return back(result)

    return wrapper


def _ints(t) -> list[int]:
    """A small int tensor (or list) as Python ints."""
    if t is None:
        return []
    if isinstance(t, torch.Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in t]


def _axis(op: OpContext, axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        raise op.fail(f"axis {axis} is out of range for rank {rank}")
    return axis % rank if rank else 0


def _index(indices: torch.Tensor, size: int) -> torch.Tensor:
    """int64 indices with negative ones counted from the end of an axis of ``size``."""
    indices = indices.long()
    return torch.where(indices < 0, indices + size, indices)


# -- shape arithmetic ----------------------------------------------------------------------------


@register("Identity", since=1)
def identity(op: OpContext, x):
    """Tensors, sequences (lists) and optionals (None) pass through unchanged."""
    return x


@register("Shape", since=1, metadata=True)
def shape(op: OpContext, x):
    """The shape as int64; opset 15 adds start/end, clamped to [0, rank] like a Python slice."""
    dims = list(x.shape)
    end = op.attr("end")
    dims = dims[op.attr("start", 0) : (len(dims) if end is None else end)]
    return torch.tensor(dims, dtype=torch.int64, device=op.device)


@register("Size", since=1, metadata=True)
def size(op: OpContext, x):
    return torch.tensor(math.prod(x.shape), dtype=torch.int64, device=op.device)


def _reshape(op: OpContext, x, shape: list[int], allowzero: int):
    if not allowzero:
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    elif 0 in shape and -1 in shape:
        raise op.fail("shape has both 0 and -1 with allowzero=1, which the spec forbids")
    if shape.count(-1) > 1:
        raise op.fail(f"shape {shape} has more than one -1")
    return x.reshape(shape)


@register("Reshape", since=1)
@_strings
def reshape_1(op: OpContext, x):
    return _reshape(op, x, _ints(op.attr("shape", [])), 0)


@register("Reshape", since=5, shape_inputs=(1,), host_inputs=(1,))
@_strings
def reshape_5(op: OpContext, x, shape):
    """0 copies the input dimension (unless allowzero=1, opset 14), -1 is inferred."""
    return _reshape(op, x, _ints(shape), op.attr("allowzero", 0))


def _squeeze(op: OpContext, x, axes: list[int] | None):
    """No axes (or empty axes, as onnxruntime reads it) removes every axis of size 1."""
    if not axes:
        return x.reshape([d for d in x.shape if d != 1])
    removed = {_axis(op, a, x.dim()) for a in axes}
    for a in removed:
        if x.shape[a] != 1:
            raise op.fail(f"cannot squeeze axis {a} of shape {list(x.shape)}: its size is not 1")
    return x.reshape([d for i, d in enumerate(x.shape) if i not in removed])


@register("Squeeze", since=1)
@_strings
def squeeze_1(op: OpContext, x):
    return _squeeze(op, x, op.attr("axes"))


@register("Squeeze", since=13, shape_inputs=(1,), host_inputs=(1,))
@_strings
def squeeze_13(op: OpContext, x, axes=None):
    return _squeeze(op, x, None if axes is None else _ints(axes))


def _unsqueeze(op: OpContext, x, axes: list[int]):
    rank = x.dim() + len(axes)
    axes = sorted(_axis(op, a, rank) for a in axes)
    if len(set(axes)) != len(axes):
        raise op.fail(f"axes {axes} has duplicates")
    shape = list(x.shape)
    for a in axes:
        shape.insert(a, 1)
    return x.reshape(shape)


@register("Unsqueeze", since=1)
@_strings
def unsqueeze_1(op: OpContext, x):
    return _unsqueeze(op, x, op.attr("axes", []))


@register("Unsqueeze", since=13, shape_inputs=(1,), host_inputs=(1,))
@_strings
def unsqueeze_13(op: OpContext, x, axes):
    return _unsqueeze(op, x, _ints(axes))


@register("Flatten", since=1)
@_strings
def flatten(op: OpContext, x):
    """2-D output (prod(shape[:axis]), prod(shape[axis:])); axis may be negative (opset 11) or rank."""
    rank = x.dim()
    axis = op.attr("axis", 1)
    if not -rank <= axis <= rank:
        raise op.fail(f"axis {axis} is out of range for rank {rank}")
    axis = axis + rank if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@register("Transpose", since=1)
@_strings
def transpose(op: OpContext, x):
    perm = op.attr("perm")
    if perm is None:
        perm = list(range(x.dim()))[::-1]
    return x.permute([_axis(op, p, x.dim()) for p in perm])


@register("Expand", since=8, shape_inputs=(1,), host_inputs=(1,))
@_strings
def expand(op: OpContext, x, shape):
    """Bidirectional (numpy) broadcast of x with ``shape``: a stride-0 view, like numpy's."""
    out = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape)))
    return x.expand(out)


@register("ConstantOfShape", since=9, shape_inputs=(0,), host_inputs=(0,))
def constant_of_shape(op: OpContext, shape):
    dims = _ints(shape)
    value = op.attr("value")
    if value is None:
        return torch.zeros(dims, dtype=torch.float32, device=op.device)
    if isinstance(value, np.ndarray):
        return np.full(dims, value.reshape(-1)[0], dtype=object)
    return value.reshape(()).expand(dims).contiguous()


@register("Constant", since=1)
def constant(op: OpContext):
    """value (tensor), value_float(s), value_int(s), value_string(s); strings as numpy objects."""
    attrs = op.attrs
    if "value" in attrs:
        return attrs["value"]
    if "value_float" in attrs:
        return torch.tensor(attrs["value_float"], dtype=torch.float32, device=op.device)
    if "value_floats" in attrs:
        return torch.tensor(list(attrs["value_floats"]), dtype=torch.float32, device=op.device)
    if "value_int" in attrs:
        return torch.tensor(attrs["value_int"], dtype=torch.int64, device=op.device)
    if "value_ints" in attrs:
        return torch.tensor(list(attrs["value_ints"]), dtype=torch.int64, device=op.device)
    if "value_string" in attrs:
        text = np.empty((), dtype=object)
        text[()] = _text(attrs["value_string"])
        return text
    if "value_strings" in attrs:
        items = [_text(s) for s in attrs["value_strings"]]
        texts = np.empty(len(items), dtype=object)
        texts[:] = items
        return texts
    raise op.fail(f"no supported value attribute among {sorted(attrs)} (sparse_value is not supported)")


def _text(s):
    return s.decode("utf-8") if isinstance(s, bytes) else s


@register("Range", since=11, shape_inputs=(0, 1, 2), host_reads=(0, 1, 2), parameter_inputs=(0, 1, 2))
def range_(op: OpContext, start, limit, delta):
    """start + i*delta for i < max(ceil((limit-start)/delta), 0); floats are computed in float64
    and rounded once (at least the precision stash_type=1 asks for float16/bfloat16)."""
    dtype = start.dtype
    s, lim, d = start.item(), limit.item(), delta.item()
    if d == 0:
        raise op.fail("delta is 0")
    if not dtype.is_floating_point:
        s, lim, d = int(s), int(lim), int(d)
        n = max(-((s - lim) // d), 0)
        values = torch.arange(n, dtype=torch.int64, device=op.device) * d + s
        return _narrow(values, dtype) if dtype in _BITS else values.to(dtype)
    n = max(math.ceil((lim - s) / d), 0)
    values = torch.arange(n, dtype=torch.float64, device=op.device) * d + s
    return values.to(dtype)


# -- joining and splitting -----------------------------------------------------------------------


@register("Concat", since=1)
@_strings
def concat(op: OpContext, *xs):
    """torch.cat; axis may be negative (opset 11), inputs may be empty along it."""
    present = [x for x in xs if x is not None]
    axis = _axis(op, op.attr("axis", 1), present[0].dim())
    return torch.cat(present, dim=axis)


def _split(op: OpContext, x, axis: int, split: list[int] | None, parts: int | None = None):
    axis = _axis(op, axis, x.dim())
    length = x.shape[axis]
    if not split:
        count = parts or op.num_outputs
        if length % count == 0:
            split = [length // count] * count
        elif parts is not None:  # opset 18 num_outputs: ceil-sized chunks, the last one smaller
            chunk = -(-length // count)
            split = [chunk] * (count - 1) + [length - chunk * (count - 1)]
            if split[-1] < 0:
                raise op.fail(f"cannot split {length} into {count} outputs")
        else:
            raise op.fail(f"axis of size {length} does not split evenly into {count} outputs; give 'split'")
    if sum(split) != length or min(split) < 0:
        raise op.fail(f"split {split} does not add up to {length}")
    return tuple(torch.split(x, split, dim=axis))


@register("Split", since=1)
@_strings
def split_1(op: OpContext, x, split=None):
    return _split(op, x, op.attr("axis", 0), _ints(split) if split is not None else op.attr("split"))


@register("Split", since=2)
@_strings
def split_2(op: OpContext, x):
    return _split(op, x, op.attr("axis", 0), op.attr("split"))


@register("Split", since=13)
@_strings
def split_13(op: OpContext, x, split=None):
    return _split(op, x, op.attr("axis", 0), _ints(split) if split is not None else None)


@register("Split", since=18, shape_inputs=(1,), host_inputs=(1,))
@_strings
def split_18(op: OpContext, x, split=None):
    return _split(op, x, op.attr("axis", 0), _ints(split) if split is not None else None, op.attr("num_outputs"))


@register("Tile", since=1)
@_strings
def tile_1(op: OpContext, x, tiles, axis):
    repeats = [1] * x.dim()
    repeats[_axis(op, int(axis), x.dim())] = int(tiles)
    return x.repeat(repeats)


@register("Tile", since=6, shape_inputs=(1,), host_inputs=(1,))
@_strings
def tile_6(op: OpContext, x, repeats):
    repeats = _ints(repeats)
    if len(repeats) != x.dim():
        raise op.fail(f"repeats {repeats} must have one entry per axis of the rank-{x.dim()} input")
    return x.repeat(repeats) if repeats else x.clone()


# -- slicing and padding -------------------------------------------------------------------------


def _slice(op: OpContext, x, starts: list[int], ends: list[int], axes: list[int] | None, steps: list[int] | None):
    """Clamping as the spec says: start to [0, dim] (step > 0) or [0, dim-1] (step < 0), end to
    [0, dim] or [-1, dim-1], after adding dim to negatives. Negative steps slice then flip."""
    if axes is None:
        axes = list(range(len(starts)))
    if steps is None:
        steps = [1] * len(starts)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise op.fail("starts, ends, axes and steps must have the same length")
    index: list = [slice(None)] * x.dim()
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = _axis(op, axis, x.dim())
        dim = x.shape[axis]
        if step == 0:
            raise op.fail("a step is 0")
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
            index[axis] = slice(start, max(end, start), min(step, max(dim, 1)))  # a huge step overflows torch
            continue
        start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
        count = max(0, (start - end + (-step) - 1) // (-step))
        if count == 0:
            index[axis] = slice(0, 0)
            continue
        last = start + (count - 1) * step
        index[axis] = slice(last, start + 1, min(-step, dim))
        flips.append(axis)
    y = x[tuple(index)]
    return y.flip(flips) if flips else y


@register("Slice", since=1)
@_strings
def slice_1(op: OpContext, x):
    return _slice(op, x, op.attr("starts"), op.attr("ends"), op.attr("axes"), None)


@register("Slice", since=10, shape_inputs=(1, 2, 3, 4), host_inputs=(1, 2, 3, 4))
@_strings
def slice_10(op: OpContext, x, starts, ends, axes=None, steps=None):
    return _slice(
        op,
        x,
        _ints(starts),
        _ints(ends),
        None if axes is None else _ints(axes),
        None if steps is None else _ints(steps),
    )


def _pad(op: OpContext, x, pads: list[int], mode: str, value, axes: list[int] | None):
    """Negative pads crop. constant fills a new tensor; edge/reflect/wrap gather along each axis
    with the index mapped back into range (clamped, mirrored with period 2(n-1), or modulo n)."""
    rank = x.dim()
    axes = list(range(rank)) if axes is None else [_axis(op, a, rank) for a in axes]
    if len(pads) != 2 * len(axes):
        raise op.fail(f"pads {pads} must have 2 entries per axis ({len(axes)} axes)")
    widths = [(0, 0)] * rank
    for i, axis in enumerate(axes):
        widths[axis] = (pads[i], pads[len(axes) + i])
    out_shape = [n + b + e for n, (b, e) in zip(x.shape, widths, strict=True)]
    if min(out_shape, default=0) < 0:
        raise op.fail(f"pads {pads} crop more than the input shape {list(x.shape)}")
    op.check_output(out_shape, x.dtype)
    if mode == "constant":
        if value is None:
            value = torch.zeros((), dtype=x.dtype, device=x.device)
        elif not isinstance(value, torch.Tensor):
            value = torch.tensor(value, device=x.device).to(x.dtype)
        value = _raw(
            value.reshape(-1)[0].to(x.dtype) if value.numel() else torch.zeros((), dtype=x.dtype, device=x.device)
        )
        out = value.expand(out_shape).contiguous()
        src, dst = [], []
        for n, (b, e) in zip(x.shape, widths, strict=True):
            lo, hi = max(0, -b), n - max(0, -e)
            length = max(hi - lo, 0)
            src.append(slice(lo, lo + length))
            dst.append(slice(max(0, b), max(0, b) + length))
        out[tuple(dst)] = _raw(x)[tuple(src)]
        return _cooked(out, x.dtype)
    if mode not in ("edge", "reflect", "wrap"):
        raise op.fail(f"mode {mode!r} is not one of constant, reflect, edge, wrap")
    y = _raw(x)
    for axis, (b, e) in enumerate(widths):
        if b == 0 and e == 0:
            continue
        n = x.shape[axis]
        if n == 0:
            raise op.fail(f"cannot {mode}-pad axis {axis}, which is empty")
        idx = torch.arange(-b, n + e, device=x.device)
        if mode == "edge":
            idx = idx.clamp(0, n - 1)
        elif mode == "wrap":
            idx = idx.remainder(n)
        elif n == 1:
            idx = torch.zeros_like(idx)
        else:
            idx = idx.remainder(2 * (n - 1))
            idx = torch.where(idx >= n, 2 * (n - 1) - idx, idx)
        y = y.index_select(axis, idx)
    return _cooked(y, x.dtype)


def _mode(op: OpContext) -> str:
    mode = op.attr("mode", "constant")
    return mode.decode() if isinstance(mode, bytes) else mode


@register("Pad", since=1)
@_strings
def pad_1(op: OpContext, x):
    return _pad(op, x, op.attr("paddings"), _mode(op), op.attr("value", 0.0), None)


@register("Pad", since=2)
@_strings
def pad_2(op: OpContext, x):
    return _pad(op, x, op.attr("pads"), _mode(op), op.attr("value", 0.0), None)


@register("Pad", since=11)
@_strings
def pad_11(op: OpContext, x, pads, value=None):
    return _pad(op, x, _ints(pads), _mode(op), value, None)


@register("Pad", since=18, shape_inputs=(1, 3), host_inputs=(1, 3))
@_strings
def pad_18(op: OpContext, x, pads, value=None, axes=None):
    return _pad(op, x, _ints(pads), _mode(op), value, None if axes is None else _ints(axes))


@register("CenterCropPad", since=18, host_inputs=(1,))
@_strings
def center_crop_pad(op: OpContext, x, shape):
    """Crop starts at floor((dim-target)/2); padding puts the odd pixel at the end, zeros."""
    rank = x.dim()
    target = _ints(shape)
    axes = op.attr("axes")
    axes = list(range(rank)) if axes is None else [_axis(op, a, rank) for a in axes]
    if len(target) != len(axes):
        raise op.fail(f"shape {target} needs one entry per axis {axes}")
    pads = [0] * (2 * rank)
    for axis, size in zip(axes, target, strict=True):
        diff = size - x.shape[axis]
        if diff < 0:  # crop: the odd element comes off the end
            pads[axis], pads[rank + axis] = -((-diff) // 2), -((-diff) - (-diff) // 2)
        else:
            pads[axis], pads[rank + axis] = diff // 2, diff - diff // 2
    return _pad(op, x, pads, "constant", None, None)


# -- gathers and scatters ------------------------------------------------------------------------


@register("Gather", since=1, shape_inputs=(1,))
@_strings
def gather(op: OpContext, x, indices):
    """index_select along axis with the index flattened, then the indices' shape put in its place."""
    axis = _axis(op, op.attr("axis", 0), x.dim())
    idx = _index(indices, x.shape[axis])
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1 :])


@register("GatherElements", since=11, shape_inputs=(1,))
@_strings
def gather_elements(op: OpContext, x, indices):
    axis = _axis(op, op.attr("axis", 0), x.dim())
    return _cooked(torch.gather(_raw(x), axis, _index(indices, x.shape[axis])), x.dtype)


def _nd_linear(data_shape, indices: torch.Tensor, batch: int):
    """Row-major linear positions of the last-axis index tuples within data's axes batch..batch+k."""
    k = indices.shape[-1]
    dims = data_shape[batch : batch + k]
    idx = indices.long()
    sizes = torch.tensor(dims, dtype=torch.int64, device=idx.device)
    idx = torch.where(idx < 0, idx + sizes, idx)
    strides = [math.prod(dims[j + 1 :]) for j in range(k)]
    return (idx * torch.tensor(strides, dtype=torch.int64, device=idx.device)).sum(-1), math.prod(dims)


@register("GatherND", since=11, shape_inputs=(1,))
@_strings
def gather_nd(op: OpContext, x, indices):
    """Batch axes flattened to one; index tuples become linear positions into the next k axes."""
    batch = op.attr("batch_dims", 0)
    k = indices.shape[-1]
    if batch + k > x.dim():
        raise op.fail(f"indices tuples of length {k} with batch_dims={batch} exceed the rank-{x.dim()} data")
    nb = math.prod(x.shape[:batch])
    rest = x.shape[batch + k :]
    linear, count = _nd_linear(x.shape, indices, batch)
    data = _raw(x).reshape(nb, count, *rest)
    linear = linear.reshape(nb, math.prod(indices.shape[batch:-1]))
    rows = torch.arange(nb, device=x.device).unsqueeze(1)
    return _cooked(data[rows, linear].reshape(*indices.shape[:-1], *rest), x.dtype)


_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _scatter(op: OpContext, x, axis: int, index: torch.Tensor, updates: torch.Tensor):
    """x.scatter (reduction none) or scatter_reduce with include_self (add/mul/max/min)."""
    reduction = op.attr("reduction", "none")
    if reduction == "none":
        return _cooked(_raw(x).scatter(axis, index, _raw(updates)), x.dtype)
    if reduction not in _REDUCE:
        raise op.fail(f"reduction {reduction!r} is not one of none, add, mul, max, min")
    ordered = reduction in ("max", "min")
    if x.dtype == torch.bool:
        if reduction == "add":
            return x.scatter_reduce(axis, index, updates, "amax")
        if reduction == "mul":
            return x.scatter_reduce(axis, index, updates, "amin")
    out = _widen(x, ordered).scatter_reduce(axis, index, _widen(updates, ordered), _REDUCE[reduction])
    return _narrow(out, x.dtype, ordered)


@register("Scatter", since=9)
@register("ScatterElements", since=11)
def scatter_elements(op: OpContext, x, indices, updates):
    """Reduction (opset 16: add/mul, 18: max/min) folds duplicates into the data, in any order."""
    axis = _axis(op, op.attr("axis", 0), x.dim())
    return _scatter(op, x, axis, _index(indices, x.shape[axis]), updates)


@register("ScatterND", since=11)
def scatter_nd(op: OpContext, x, indices, updates):
    """Data viewed as (prod of the first k axes, rest...); index tuples become rows to scatter."""
    k = indices.shape[-1]
    rest = x.shape[k:]
    linear, count = _nd_linear(x.shape, indices, 0)
    linear = linear.reshape(-1)
    data = x.reshape(count, *rest)
    upd = updates.reshape(-1, *rest)
    index = linear.reshape(-1, *([1] * len(rest))).expand(upd.shape)
    return _scatter(op, data, 0, index, upd).reshape(x.shape)


@register("TensorScatter", since=24)
def tensor_scatter(op: OpContext, past, update, write_indices=None):
    """KV-cache write: update goes to positions write_indices[b] + s along ``axis`` (modulo its
    size when mode is circular), as one scatter along that axis."""
    rank = past.dim()
    axis = _axis(op, op.attr("axis", -2), rank)
    if axis == 0:
        raise op.fail("axis 0 is the batch axis; the sequence axis must come after it")
    mode = op.attr("mode", "linear")
    if mode not in ("linear", "circular"):
        raise op.fail(f"mode {mode!r} is not linear or circular")
    batch, length, size = past.shape[0], update.shape[axis], past.shape[axis]
    if write_indices is None:
        write_indices = torch.zeros(batch, dtype=torch.int64, device=past.device)
    pos = write_indices.long().reshape(-1, 1) + torch.arange(length, device=past.device)
    if mode == "circular":
        pos = pos.remainder(size)
    elif length and int(pos.max()) >= size:
        raise op.fail(f"writes reach position {int(pos.max())} past the sequence axis of size {size}")
    shape = [1] * rank
    shape[0], shape[axis] = batch, length
    index = pos.reshape(shape).expand(update.shape)
    return _cooked(_raw(past).scatter(axis, index, _raw(update)), past.dtype)


# -- selection -----------------------------------------------------------------------------------


@register("Compress", since=9, data_dependent=True)
@_strings
def compress(op: OpContext, x, condition):
    """Keep slices where condition is true (condition may be shorter: the rest count as false);
    no axis means the flattened input."""
    axis = op.attr("axis")
    if axis is None:
        x = x.reshape(-1)
        axis = 0
    axis = _axis(op, axis, x.dim())
    keep = torch.nonzero(condition.reshape(-1).bool()).reshape(-1)
    if keep.numel() and int(keep[-1]) >= x.shape[axis]:
        raise op.fail(f"condition selects index {int(keep[-1])} beyond axis size {x.shape[axis]}")
    return x.index_select(axis, keep)


@register("NonZero", since=9, data_dependent=True)
def nonzero(op: OpContext, x):
    """(rank, count) int64 indices in row-major order: torch.nonzero transposed."""
    if isinstance(x, np.ndarray):
        return torch.as_tensor(np.array(np.nonzero(x != "")), dtype=torch.int64, device=op.device)
    return torch.nonzero(_widen(x)).T.contiguous()


@register("Unique", since=11, data_dependent=True)
def unique(op: OpContext, x):
    """torch.unique (sorted, with inverse and counts); first-occurrence indices by scatter_reduce
    amin; sorted=0 reorders everything by first occurrence."""
    if isinstance(x, np.ndarray) or x.is_complex():
        raise op.fail("Unique of string or complex tensors is not supported")
    axis = op.attr("axis")
    dtype = x.dtype
    data = _widen(x, ordered=True)
    if axis is None:
        data = data.reshape(-1)
        axis = 0
    axis = _axis(op, axis, data.dim())
    y, inverse, counts = torch.unique(data, sorted=True, return_inverse=True, return_counts=True, dim=axis)
    length = data.shape[axis]
    positions = torch.arange(length, device=x.device)
    first = torch.full((y.shape[axis],), length, dtype=torch.int64, device=x.device)
    first = first.scatter_reduce(0, inverse, positions, "amin")
    if not op.attr("sorted", 1):
        order = torch.argsort(first)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=x.device)
        y, first, counts, inverse = y.index_select(axis, order), first[order], counts[order], rank[inverse]
    return _narrow(y, dtype, ordered=True), first, inverse, counts


@register("Trilu", since=14, host_inputs=(1,))
def trilu(op: OpContext, x, k=None):
    k = 0 if k is None else int(k)
    fn = torch.triu if op.attr("upper", 1) else torch.tril
    return _cooked(fn(_raw(x), k), x.dtype)


@register("OneHot", since=9, shape_inputs=(1,), host_inputs=(1,))
def one_hot(op: OpContext, indices, depth, values):
    """Indices (cast to int64) in [-depth, depth) light up their position; others are all off."""
    depth = int(depth.reshape(-1)[0].item())
    rank = indices.dim() + 1
    axis = _axis(op, op.attr("axis", -1), rank)
    idx = indices.long() if indices.is_floating_point() else _widen(indices).long()
    idx = torch.where(idx < 0, idx + depth, idx)
    hot = idx.unsqueeze(-1) == torch.arange(depth, device=indices.device)
    hot = hot.movedim(-1, axis)
    raw = _raw(values.reshape(-1))
    return _cooked(torch.where(hot, raw[1], raw[0]), values.dtype)


@register("EyeLike", since=9)
def eye_like(op: OpContext, x):
    """Ones where column - row == k, in ``dtype`` or the input's type."""
    if x.dim() != 2:
        raise op.fail(f"input must be 2-D, got shape {list(x.shape)}")
    dtype = op.attr("dtype")
    dtype = x.dtype if dtype is None else dtypes.to_torch_dtype(dtype)
    rows, cols = x.shape
    k = op.attr("k", 0)
    mask = (torch.arange(cols, device=x.device) - torch.arange(rows, device=x.device).unsqueeze(1)) == k
    if dtype in _BITS:
        return _narrow(mask.long(), dtype)
    return mask.to(dtype)


@register("ReverseSequence", since=10)
@_strings
def reverse_sequence(op: OpContext, x, sequence_lens):
    """Each batch entry's first sequence_lens[b] time steps reversed: one gather along time."""
    batch_axis, time_axis = op.attr("batch_axis", 1), op.attr("time_axis", 0)
    if {batch_axis, time_axis} != {0, 1}:
        raise op.fail(f"batch_axis {batch_axis} and time_axis {time_axis} must be 0 and 1")
    steps = x.shape[time_axis]
    lens = sequence_lens.long().reshape(-1, 1)
    t = torch.arange(steps, device=x.device)
    idx = torch.where(t < lens, lens - 1 - t, t)  # (batch, time)
    if time_axis == 0:
        idx = idx.T
    idx = idx.reshape(*idx.shape, *([1] * (x.dim() - 2))).expand(x.shape)
    return _cooked(torch.gather(_raw(x), time_axis, idx), x.dtype)


# -- space/depth rearrangement and einsum ------------------------------------------------------


@register("DepthToSpace", since=1)
@_strings
def depth_to_space(op: OpContext, x):
    """The spec's reshape/transpose/reshape, in DCR (default) or CRD order."""
    b, c, h, w = x.shape
    s = op.attr("blocksize")
    if c % (s * s):
        raise op.fail(f"channels {c} are not a multiple of blocksize^2 = {s * s}")
    if _mode_of(op, "DCR") == "DCR":
        y = x.reshape(b, s, s, c // (s * s), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(b, c // (s * s), s, s, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(b, c // (s * s), h * s, w * s)


@register("SpaceToDepth", since=1)
@_strings
def space_to_depth(op: OpContext, x):
    """Inverse of DepthToSpace; opset 28 adds CRD mode."""
    b, c, h, w = x.shape
    s = op.attr("blocksize")
    if h % s or w % s:
        raise op.fail(f"spatial shape {h}x{w} is not a multiple of blocksize {s}")
    y = x.reshape(b, c, h // s, s, w // s, s)
    y = y.permute(0, 3, 5, 1, 2, 4) if _mode_of(op, "DCR") == "DCR" else y.permute(0, 1, 3, 5, 2, 4)
    return y.reshape(b, c * s * s, h // s, w // s)


def _mode_of(op: OpContext, default: str) -> str:
    mode = op.attr("mode", default)
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in ("DCR", "CRD"):
        raise op.fail(f"mode {mode!r} is not DCR or CRD")
    return mode


@register("Einsum", since=12, reads_torch_flags=True, accumulate_fp32=True)
def einsum(op: OpContext, *xs):
    """torch.einsum has numpy's rules (ellipsis, implicit output in alphabetical order). CUDA has
    no integer matmul, so integer einsums run on the CPU there."""
    equation = op.attr("equation").replace(" ", "")
    dtype = xs[0].dtype
    if not (dtype.is_floating_point or dtype.is_complex) and xs[0].device.type == "cuda":
        return torch.einsum(equation, *[_widen(x).cpu() for x in xs]).to(op.device).to(dtype)
    if dtype in _BITS:
        return _narrow(torch.einsum(equation, *[_widen(x) for x in xs]), dtype)
    return torch.einsum(equation, *xs)
