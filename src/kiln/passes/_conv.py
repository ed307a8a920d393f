"""What the convolution and GEMM passes share: element counts, new initializers, and the standard
ONNX ``Pad`` (in the form the model's opset defines) that pads a value with zeros on one axis."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kiln.passes.framework import KILN_DOMAIN, PassContext
from kiln.passes.rewriting import Names, add_initializer, opset


def is_conv(node: ir.Node) -> bool:
    """A standard Conv or kiln's FusedConv (same X, W, B inputs and attributes)."""
    return (node.op_type == "Conv" and node.domain in ("", "ai.onnx")) or (
        node.op_type == "FusedConv" and node.domain == KILN_DOMAIN
    )


def elements(shape: ir.Shape | None, ctx: PassContext) -> tuple[int, bool]:
    """(number of elements, whether every dim was known). Dims neither static nor in ``ctx.dims``
    count as 1, so a finding for a dynamic batch reports the cost per unit of that dim."""
    if shape is None:
        return 0, False
    total, known = 1, True
    for d in shape:
        v = ctx.dim(d)
        if v is None:
            known = False
            v = 1
        total *= v
    return total, known


def pad_array(array: np.ndarray, axis: int, size: int, fill: float = 0.0) -> np.ndarray:
    """``array`` extended with ``fill`` on ``axis`` to ``size``."""
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, size - array.shape[axis])
    return np.pad(array, widths, constant_values=np.asarray(fill, dtype=array.dtype))


def with_dim(shape: ir.Shape | None, axis: int, size: int) -> ir.Shape | None:
    if shape is None:
        return None
    dims = list(shape)
    dims[axis] = size
    return ir.Shape(dims)


def can_pad(model: ir.Model) -> bool:
    """Pad with zeros exists in the form kiln writes from opset 2 (Pad-1 spelled it ``paddings``)."""
    return opset(model) >= 2


def make_pad(model: ir.Model, names: Names, x: ir.Value, axis: int, size: int, base: str) -> ir.Node:
    """A standard ``Pad`` node appending zeros to ``x`` on ``axis`` up to ``size``; ``x`` must have a
    known rank and a static size on ``axis``. The node is not inserted."""
    shape = x.shape
    assert shape is not None, "make_pad needs x's rank"
    rank = len(shape)
    axis = axis % rank
    pads = [0] * (2 * rank)
    dim = shape[axis]
    assert isinstance(dim, int), "make_pad needs x's size on the padded axis"
    pads[rank + axis] = size - dim
    out = ir.Value(name=names.fresh(f"{base}_padded"), type=x.type, shape=with_dim(shape, axis, size))
    if opset(model) >= 11:
        pads_value = add_initializer(model.graph, names, f"{base}_pads", np.asarray(pads, dtype=np.int64))
        node = ir.Node("", "Pad", [x, pads_value], outputs=[out], name=names.fresh(f"{base}/pad"))
    else:
        node = ir.Node("", "Pad", [x], attributes=[ir.AttrInt64s("pads", pads), ir.AttrFloat32("value", 0.0)],
                       outputs=[out], name=names.fresh(f"{base}/pad"))
    return node
