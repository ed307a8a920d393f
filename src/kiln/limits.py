"""How large one tensor may be, decided from its shape before it is allocated.

A hostile or mistaken input can ask for any size: a graph input declared ``[2**31, 4]``, a 236-byte
npz whose header declares 4 TiB, later an op whose output shape comes from a value (ConstantOfShape,
Expand, Tile, Range). kiln computes the bytes from the shape first and refuses, with a one-line
``ResourceLimitError`` naming the tensor, anything over the ceiling; nothing is allocated for it.

The ceiling is, in order: the value set for this process (``set_max_tensor_bytes``: the CLI's
``--max-tensor-bytes``), the environment variable ``KILN_MAX_TENSOR_BYTES``, or half of the machine's
memory (for a CUDA device, half of the smaller of the machine's and that GPU's memory). Strings count
``STRING_ELEMENT_BYTES`` more per element than their characters: kiln holds them as Python objects.

``check_tensor_bytes(shape, dtype, what)`` is the one call sites make; it costs a product of the
dims and, for a CUDA device, one cached property lookup.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from kiln.errors import KilnError, ResourceLimitError

ENVIRONMENT = "KILN_MAX_TENSOR_BYTES"
HOW_TO_RAISE = f"raise it with --max-tensor-bytes or {ENVIRONMENT}"
STRING_ELEMENT_BYTES = 64
"""What a string element costs beyond its characters: an object pointer and a Python object header."""

_set: int | None = None


def set_max_tensor_bytes(limit: int | None) -> int | None:
    """Set the ceiling for this process (None: back to the environment or the default); returns the
    previous setting, so that a caller can restore it."""
    global _set
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise KilnError(f"the tensor size limit (--max-tensor-bytes) must be a positive number of bytes, got {limit!r}")
    previous, _set = _set, limit
    return previous


@contextlib.contextmanager
def max_tensor_bytes_set(limit: int | None) -> Iterator[None]:
    """``set_max_tensor_bytes(limit)`` for the duration of a block (None leaves the setting as it is)."""
    if limit is None:
        yield
        return
    previous = set_max_tensor_bytes(limit)
    try:
        yield
    finally:
        set_max_tensor_bytes(previous)


def max_tensor_bytes(device: Any = None) -> int:
    """The ceiling on one tensor's bytes, for tensors on ``device`` (None or "cpu": host memory)."""
    if _set is not None:
        return _set
    named = os.environ.get(ENVIRONMENT)
    if named:
        if not named.strip().isdigit() or int(named) < 1:
            raise KilnError(f"{ENVIRONMENT}={named[:40]!r} is not a positive number of bytes")
        return int(named)
    limit = _host_memory() // 2
    index = _cuda_index(device)
    if index is not None:
        limit = min(limit, _gpu_memory(index) // 2)
    return limit


def tensor_bytes(shape: Sequence[int], dtype: Any) -> int:
    """Bytes a tensor of this shape and element type takes (Python integers: no overflow)."""
    count = math.prod(int(d) for d in shape)
    return math.ceil(count * _element_bytes(dtype))


def check_tensor_bytes(shape: Sequence[int], dtype: Any, what: str, *, device: Any = None,
                       limit: int | None = None) -> None:
    """Raise ``ResourceLimitError`` when a tensor of ``shape`` and ``dtype`` (an onnx-ir DataType, a
    numpy or torch dtype) would exceed the ceiling (``limit`` if given, else ``max_tensor_bytes(device)``).
    ``what`` names it: "model.onnx: input 'x'"."""
    size = tensor_bytes(shape, dtype)
    limit = max_tensor_bytes(device) if limit is None else limit
    if size > limit:
        raise ResourceLimitError(
            f"{what}: {_dims(shape)} {_dtype_name(dtype)} is {format_bytes(size)}, "
            f"over the {format_bytes(limit)} limit on one tensor ({HOW_TO_RAISE})"
        )
    if size == 0 and tensor_bytes([max(int(d), 1) for d in shape], dtype) >= 1 << 63:
        raise ResourceLimitError(f"{what}: {_dims(shape)} {_dtype_name(dtype)} is empty, but its other dims "
                                 "multiply past what numpy and torch can index (2^63 bytes)")


def _dims(shape: Sequence[int]) -> str:
    return ("x".join(str(int(d)) for d in shape) or "scalar")[:100]


def _element_bytes(dtype: Any) -> float:
    if isinstance(dtype, ir.DataType):
        return STRING_ELEMENT_BYTES if dtype == ir.DataType.STRING else dtype.itemsize
    if _is_torch_dtype(dtype):
        return dtype.itemsize
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return dtype.itemsize + STRING_ELEMENT_BYTES
    return dtype.itemsize


def _is_torch_dtype(dtype: Any) -> bool:
    return type(dtype).__module__ == "torch"  # without importing torch


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, ir.DataType):
        return dtype.name.lower()
    if _is_torch_dtype(dtype):
        return str(dtype).removeprefix("torch.")
    return np.dtype(dtype).name


def format_bytes(size: int) -> str:
    """``12.0 GiB (12,884,901,888 bytes)``, or ``1,000 bytes`` below a KiB."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):.1f} {unit} ({size:,} bytes)"
    return f"{size:,} bytes"


@functools.cache
def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): assume a small machine
        return 8 << 30


def _cuda_index(device: Any) -> int | None:
    if device is None:
        return None
    text = str(device)
    if not text.startswith("cuda"):
        return None
    index = getattr(device, "index", None)
    if index is None and ":" in text:
        index = int(text.split(":", 1)[1])
    return index or 0


@functools.cache
def _gpu_memory(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).total_memory
