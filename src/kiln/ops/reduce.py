"""Reductions and normalizing maps over an axis: Reduce*, ArgMax/ArgMin, Softmax family, cumulative ops, TopK."""

from __future__ import annotations

import math
from typing import Any

import torch

from kiln.dtypes import computable, ordered, restore, unordered
from kiln.ops.registry import OpContext, register

_UNSIGNED = (torch.uint8, torch.uint16, torch.uint32, torch.uint64)


def _is_float(x: torch.Tensor) -> bool:
    return x.dtype.is_floating_point or x.dtype.is_complex


# -- Reduce* ----------------------------------------------------------------------------------
# Each kind reduces a tensor over a non-empty tuple of non-negative dims.


def _sum(x, dims, keep):
    xc = computable(x)
    return restore(torch.sum(xc, dim=dims, keepdim=keep, dtype=xc.dtype), x.dtype)


def _sum_square(x, dims, keep):
    xc = computable(x)
    return restore(torch.sum(xc * xc, dim=dims, keepdim=keep, dtype=xc.dtype), x.dtype)


def _l1(x, dims, keep):
    xc = computable(x)
    if x.dtype not in _UNSIGNED:
        xc = xc.abs()
    return restore(torch.sum(xc, dim=dims, keepdim=keep, dtype=xc.dtype), x.dtype)


def _count(x, dims):
    return math.prod(x.shape[d] for d in dims)


def _mean(x, dims, keep):
    if _is_float(x):
        return torch.mean(x, dim=dims, keepdim=keep)
    total = torch.sum(computable(x), dim=dims, keepdim=keep, dtype=torch.int64)
    return restore(torch.div(total, max(_count(x, dims), 1), rounding_mode="trunc"), x.dtype)


def _l2(x, dims, keep):
    if _is_float(x):
        return torch.sqrt(torch.sum(x * x, dim=dims, keepdim=keep))
    xc = computable(x).to(torch.int64)
    return torch.sqrt(torch.sum(xc * xc, dim=dims, keepdim=keep).double()).to(x.dtype)


def _log_sum(x, dims, keep):
    if _is_float(x):
        return torch.log(torch.sum(x, dim=dims, keepdim=keep))
    return torch.log(torch.sum(computable(x), dim=dims, keepdim=keep).double()).to(x.dtype)


def _log_sum_exp(x, dims, keep):
    if _is_float(x):
        return torch.logsumexp(x, dim=dims, keepdim=keep)
    return torch.logsumexp(computable(x).double(), dim=dims, keepdim=keep).to(x.dtype)


def _prod(x, dims, keep):
    y = computable(x)
    for d in sorted(dims, reverse=True):
        y = torch.prod(y, dim=d, keepdim=keep, dtype=y.dtype)
    return restore(y, x.dtype)


def _extreme(fn):
    def reduce(x, dims, keep):
        if x.dtype == torch.bool:
            return fn(x.to(torch.uint8), dim=dims, keepdim=keep).to(torch.bool)
        return unordered(fn(ordered(x), dim=dims, keepdim=keep), x.dtype)

    return reduce


def _lowest(dtype):
    if dtype == torch.bool:
        return False
    if dtype.is_floating_point:
        return -math.inf
    return 0 if dtype in _UNSIGNED else torch.iinfo(dtype).min


def _highest(dtype):
    if dtype == torch.bool:
        return True
    if dtype.is_floating_point:
        return math.inf
    if dtype == torch.uint64:
        return None  # all bits set: built as int64 -1 and viewed
    return torch.iinfo(dtype).max if dtype not in (torch.uint16, torch.uint32) else (1 << (dtype.itemsize * 8)) - 1


# kind -> (reduce function, value of an empty reduction or None when the function gets it right itself)
_KINDS = {
    "sum": (_sum, None),
    "mean": (_mean, None),
    "max": (_extreme(torch.amax), _lowest),
    "min": (_extreme(torch.amin), _highest),
    "prod": (_prod, None),
    "l1": (_l1, None),
    "l2": (_l2, None),
    "log_sum": (_log_sum, None),
    "log_sum_exp": (_log_sum_exp, None),
    "sum_square": (_sum_square, None),
}
_NEEDS_ORDER = ("mean", "l2", "log_sum", "log_sum_exp")


def _full(shape, value, dtype, device):
    if value is None:  # uint64 max
        return torch.full(shape, -1, dtype=torch.int64, device=device).view(torch.uint64)
    if dtype in (torch.uint16, torch.uint32):
        return torch.full(shape, value, dtype=torch.int64, device=device).to(dtype)
    return torch.full(shape, value, dtype=dtype, device=device)


def _reduce(op: OpContext, x, axes, kind: str):
    fn, empty_value = _KINDS[kind]
    keep = bool(op.attr("keepdims", 1))
    if x.dtype == torch.uint64 and kind in _NEEDS_ORDER:
        raise op.fail(f"Reduce {kind} of uint64 is not supported; cast the input to int64 or float64 first")
    if not axes:
        if op.attr("noop_with_empty_axes", 0):
            # No axes to reduce: every element is reduced alone (ReduceSumSquare still squares, ...).
            return fn(x.unsqueeze(-1), (x.ndim,), False)
        axes = range(x.ndim)
    dims = tuple(sorted({a % x.ndim if x.ndim else 0 for a in axes})) if x.ndim else ()
    if not dims:  # rank-0 input: one element, reduced alone
        return fn(x.unsqueeze(-1), (0,), False)
    if empty_value is not None and any(x.shape[d] == 0 for d in dims):
        shape = [1 if d in dims else s for d, s in enumerate(x.shape) if keep or d not in dims]
        return _full(shape, empty_value(x.dtype), x.dtype, x.device)
    return fn(x, dims, keep)


def _register_reduce(name: str, kind: str, input_since: int, **facts: Any) -> None:
    def axes_attribute(op: OpContext, x):
        return _reduce(op, x, op.attr("axes"), kind)

    def axes_input(op: OpContext, x, axes=None):
        return _reduce(op, x, None if axes is None else [int(a) for a in axes.reshape(-1).tolist()], kind)

    axes_attribute.__doc__ = axes_input.__doc__ = f"ONNX {name}: torch reduction '{kind}' over the given axes."
    register(name, since=1)(axes_attribute)
    register(name, since=input_since, host_inputs=(1,), **facts)(axes_input)  # axes: read on the host


_REDUCES: list[tuple[str, str, int, dict[str, Any]]] = [
    ("ReduceSum", "sum", 13, {"shape_inputs": (1,)}),
    ("ReduceMean", "mean", 18, {"shape_inputs": (1,)}),
    ("ReduceMax", "max", 18, {"shape_inputs": (1,)}),
    ("ReduceMin", "min", 18, {"shape_inputs": (1,)}),
    ("ReduceProd", "prod", 18, {"shape_inputs": (1,), "accumulate_fp32": True}),
    ("ReduceL1", "l1", 18, {"accumulate_fp32": True}),
    ("ReduceL2", "l2", 18, {"accumulate_fp32": True}),
    ("ReduceLogSum", "log_sum", 18, {"accumulate_fp32": True}),
    ("ReduceLogSumExp", "log_sum_exp", 18, {"accumulate_fp32": True}),
    ("ReduceSumSquare", "sum_square", 18, {"accumulate_fp32": True}),
]
for _name, _kind, _since, _facts in _REDUCES:
    _register_reduce(_name, _kind, _since, **_facts)


# -- ArgMax / ArgMin --------------------------------------------------------------------------


def _arg(op: OpContext, x, fn):
    """torch.argmax/argmin return the first index on ties; select_last_index flips the axis first."""
    axis = op.attr("axis", 0) % max(x.ndim, 1)
    keep = bool(op.attr("keepdims", 1))
    last = bool(op.attr("select_last_index", 0))
    if x.ndim == 0:
        x = x.reshape(1)
    xo = x.to(torch.uint8) if x.dtype == torch.bool else ordered(x)
    if last:
        xo = xo.flip(axis)
    index = fn(xo, dim=axis, keepdim=True)
    if last:
        index = (x.shape[axis] - 1) - index
    return index if keep else index.squeeze(axis)


@register("ArgMax", since=1)
def arg_max(op: OpContext, x):
    return _arg(op, x, torch.argmax)


@register("ArgMin", since=1)
def arg_min(op: OpContext, x):
    return _arg(op, x, torch.argmin)


# -- Softmax family ---------------------------------------------------------------------------


def _hardmax(x, dim):
    out = torch.zeros_like(x)
    if x.numel() == 0:
        return out
    return out.scatter_(dim, torch.argmax(x, dim=dim, keepdim=True), 1)


def _as_2d(op: OpContext, x, fn):
    """Opset < 13: the input is coerced to 2-D [prod(shape[:axis]), prod(shape[axis:])] and normalized per row."""
    if x.ndim == 0:
        return fn(x.reshape(1, 1), 1).reshape(())
    axis = op.attr("axis", 1) % x.ndim
    rows = math.prod(x.shape[:axis])
    cols = math.prod(x.shape[axis:])
    return fn(x.reshape(rows, cols), 1).reshape(x.shape)


def _along_axis(op: OpContext, x, fn):
    """Opset >= 13: normalized along one axis (default -1)."""
    if x.ndim == 0:
        return fn(x.reshape(1), 0).reshape(())
    return fn(x, op.attr("axis", -1) % x.ndim)


@register("Softmax", since=1)
def softmax_v1(op: OpContext, x):
    return _as_2d(op, x, torch.softmax)


@register("Softmax", since=13, accumulate_fp32=True)
def softmax(op: OpContext, x):
    return _along_axis(op, x, torch.softmax)


@register("LogSoftmax", since=1)
def log_softmax_v1(op: OpContext, x):
    return _as_2d(op, x, torch.log_softmax)


@register("LogSoftmax", since=13, accumulate_fp32=True)
def log_softmax(op: OpContext, x):
    return _along_axis(op, x, torch.log_softmax)


@register("Hardmax", since=1)
def hardmax_v1(op: OpContext, x):
    """One-hot of the first maximum per row of the 2-D coerced input."""
    return _as_2d(op, x, _hardmax)


@register("Hardmax", since=13, accumulate_fp32=True)
def hardmax(op: OpContext, x):
    """One-hot of the first maximum along the axis."""
    return _along_axis(op, x, _hardmax)


# -- CumSum / CumProd -------------------------------------------------------------------------


def _cumulative(op: OpContext, x, axis, fn, identity: int):
    """exclusive shifts the input by one along the axis (identity first); reverse flips before and after."""
    if x.ndim == 0:
        return x.clone()
    dim = int(axis.reshape(-1)[0]) % x.ndim
    reverse = bool(op.attr("reverse", 0))
    xc = computable(x)
    if reverse:
        xc = xc.flip(dim)
    if op.attr("exclusive", 0) and xc.shape[dim] > 0:
        first = torch.full_like(xc.narrow(dim, 0, 1), identity)
        xc = torch.cat([first, xc.narrow(dim, 0, xc.shape[dim] - 1)], dim)
    y = fn(xc, dim, dtype=xc.dtype)
    if reverse:
        y = y.flip(dim)
    return restore(y, x.dtype)


@register("CumSum", since=11, shape_inputs=(1,), host_inputs=(1,), accumulate_fp32=True)
def cum_sum(op: OpContext, x, axis):
    return _cumulative(op, x, axis, torch.cumsum, 0)


@register("CumProd", since=26)
def cum_prod(op: OpContext, x, axis):
    return _cumulative(op, x, axis, torch.cumprod, 1)


# -- TopK -------------------------------------------------------------------------------------


def _top_k(op: OpContext, x, k: int, largest: bool):
    """A stable sort, not torch.topk, so equal values come out lower index first as ONNX requires."""
    axis = op.attr("axis", -1)
    if x.ndim == 0:
        raise op.fail("TopK of a rank-0 tensor is undefined")
    axis %= x.ndim
    if k < 0 or k > x.shape[axis]:
        raise op.fail(f"k={k} is outside [0, {x.shape[axis]}] for axis {axis} of shape {list(x.shape)}")
    xo = x.to(torch.uint8) if x.dtype == torch.bool else ordered(x)
    values, indices = torch.sort(xo, dim=axis, descending=largest, stable=True)
    values = values.narrow(axis, 0, k)
    values = values.to(torch.bool) if x.dtype == torch.bool else unordered(values, x.dtype)
    return values, indices.narrow(axis, 0, k).contiguous()


@register("TopK", since=1)
def top_k_v1(op: OpContext, x):
    return _top_k(op, x, int(op.attr("k")), True)


@register("TopK", since=10, shape_inputs=(1,), host_inputs=(1,))
def top_k(op: OpContext, x, k):
    return _top_k(op, x, int(k.reshape(-1)[0]), bool(op.attr("largest", 1)))
