"""ONNX element types as torch and numpy see them.

kiln keeps every tensor as a ``torch.Tensor`` in the ONNX element type whenever torch has that
dtype. numpy lacks bfloat16 and the float8 types, so onnx hands them over as ``ml_dtypes`` arrays;
they cross into torch as raw bits (``view``), never through a lossy float conversion. String tensors
stay numpy object arrays: torch has no string dtype. ONNX types torch cannot hold at all
(int4, uint4, float4, float6, int2/uint2) are rejected by name when a model is loaded.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx_ir as ir
import torch

DT = ir.DataType

TORCH_DTYPES: dict[ir.DataType, torch.dtype] = {
    DT.FLOAT: torch.float32,
    DT.DOUBLE: torch.float64,
    DT.FLOAT16: torch.float16,
    DT.BFLOAT16: torch.bfloat16,
    DT.INT8: torch.int8,
    DT.INT16: torch.int16,
    DT.INT32: torch.int32,
    DT.INT64: torch.int64,
    DT.UINT8: torch.uint8,
    DT.UINT16: torch.uint16,
    DT.UINT32: torch.uint32,
    DT.UINT64: torch.uint64,
    DT.BOOL: torch.bool,
    DT.COMPLEX64: torch.complex64,
    DT.COMPLEX128: torch.complex128,
    DT.FLOAT8E4M3FN: torch.float8_e4m3fn,
    DT.FLOAT8E4M3FNUZ: torch.float8_e4m3fnuz,
    DT.FLOAT8E5M2: torch.float8_e5m2,
    DT.FLOAT8E5M2FNUZ: torch.float8_e5m2fnuz,
}
if hasattr(torch, "float8_e8m0fnu"):
    TORCH_DTYPES[DT.FLOAT8E8M0] = torch.float8_e8m0fnu

ONNX_DTYPES: dict[torch.dtype, ir.DataType] = {v: k for k, v in TORCH_DTYPES.items()}

# Types whose numpy form is an ml_dtypes scalar type: they cross into torch through their bits.
_BITS_VIEW = {1: (np.uint8, torch.uint8), 2: (np.uint16, torch.uint16)}

# Unsigned types torch stores but cannot compute in (add, compare, shift are not implemented).
UNSIGNED_WIDE = (torch.uint16, torch.uint32, torch.uint64)


def supported(dtype: ir.DataType) -> bool:
    """True when kiln can hold tensors of this ONNX element type."""
    return dtype in TORCH_DTYPES or dtype == DT.STRING


def to_torch_dtype(dtype: ir.DataType | int) -> torch.dtype:
    """The torch dtype of an ONNX element type; raises ``KeyError`` for types torch lacks."""
    return TORCH_DTYPES[ir.DataType(dtype)]


def to_onnx_dtype(dtype: torch.dtype) -> ir.DataType:
    return ONNX_DTYPES[dtype]


def onnx_name(dtype: ir.DataType | int) -> str:
    return ir.DataType(dtype).name.lower()


def tensor_from_numpy(array: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor | np.ndarray:
    """A torch tensor holding exactly the values (and bits) of ``array``; strings stay numpy."""
    array = np.asarray(array)
    if array.dtype == object or array.dtype.kind in "SU":
        return array.astype(object)
    onnx_type = ir.DataType.from_numpy(array.dtype)
    torch_dtype = TORCH_DTYPES.get(onnx_type)
    if torch_dtype is None:
        raise KeyError(onnx_type)
    # C order (np.ascontiguousarray would also make a 0-d array 1-d), and writable for a CPU result:
    # a tensor must not share read-only memory such as onnx-ir's initializers. Bound for a GPU, the
    # read-only view lives only until the copy to the device, which saves copying the weights twice.
    staying = torch.device(device).type == "cpu"
    array = np.require(array, requirements=["C", "W"] if staying else ["C"])
    if array.dtype.type.__module__.startswith("ml_dtypes") or array.dtype.names is not None:
        bits_np, bits_torch = _BITS_VIEW[array.dtype.itemsize]
        array, view_as = array.view(bits_np), torch_dtype
    else:
        view_as = None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(array)
    tensor = tensor.view(view_as) if view_as is not None else tensor
    return tensor.to(device)


def tensor_to_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    """A numpy array with the ONNX element type of ``value`` (ml_dtypes for bfloat16/float8)."""
    if isinstance(value, np.ndarray):
        return value
    tensor = value.detach().cpu()
    onnx_type = ONNX_DTYPES[tensor.dtype]
    np_dtype = onnx_type.numpy()
    if np_dtype.type.__module__.startswith("ml_dtypes"):
        bits_np, bits_torch = _BITS_VIEW[np_dtype.itemsize]
        return tensor.contiguous().view(bits_torch).numpy().view(np_dtype)
    return tensor.numpy()


def computable(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in a dtype torch can compute with: uint16/uint32 widen to int64 exactly; uint64
    becomes int64 with the same bits (exact for +, -, *, bitwise ops; not for order or division).
    Pair with ``restore`` to give the result the ONNX type back."""
    if tensor.dtype in (torch.uint16, torch.uint32):
        return tensor.to(torch.int64)
    if tensor.dtype == torch.uint64:
        return tensor.view(torch.int64)
    return tensor


def restore(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Undo ``computable``: bring an int64 result back to the unsigned ``dtype`` (wrapping as C does)."""
    if tensor.dtype == dtype:
        return tensor
    if dtype == torch.uint64:
        return tensor.to(torch.int64).view(torch.uint64)
    if dtype in (torch.uint16, torch.uint32):
        bits = 16 if dtype == torch.uint16 else 32
        return (tensor.to(torch.int64) & ((1 << bits) - 1)).to(dtype)
    return tensor.to(dtype)


_SIGN_BIT = -(1 << 63)


def ordered(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in a dtype torch can compare, with the same order: like ``computable``, except that
    uint64 flips its top bit into int64 so that order (compare, max, sort) stays unsigned.
    Undo with ``unordered``."""
    if tensor.dtype == torch.uint64:
        return tensor.view(torch.int64) ^ _SIGN_BIT
    return computable(tensor)


def unordered(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Undo ``ordered`` on values taken from its result."""
    if dtype == torch.uint64:
        return (tensor ^ _SIGN_BIT).view(torch.uint64)
    return restore(tensor, dtype)
