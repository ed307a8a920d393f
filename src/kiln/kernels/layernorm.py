"""LayerNormalization over the last dimension, optionally fused with the residual add before it.

Transformer blocks compute ``LayerNorm(x + residual)``; doing the add inside the kernel saves a
full write and read of the sum. One program normalizes one row. Rows up to ``_SINGLE_BLOCK``
elements are held in registers and read once; longer rows are read in blocks, three times (mean,
centred variance, output), which keeps the variance as accurate as the single-block path.
Statistics are always fp32, whatever the storage dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_SINGLE_BLOCK = 8192
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _load_row(x_ptr, r_ptr, offs, mask, HAS_RESIDUAL: tl.constexpr):
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _layer_norm_kernel(
    x_ptr, r_ptr, w_ptr, b_ptr, out_ptr,
    N, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):  # fmt: skip
    start = tl.program_id(0).to(tl.int64) * N
    x_row, r_row, out_row = x_ptr + start, r_ptr + start, out_ptr + start
    cols = tl.arange(0, BLOCK)
    if SINGLE_BLOCK:
        mask = cols < N
        x = _load_row(x_row, r_row, cols, mask, HAS_RESIDUAL)
        mean = tl.sum(x, axis=0) / N
        centred = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / N + eps)
        y = centred * rstd
        if HAS_WEIGHT:
            y *= tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(0, N, BLOCK):
            total += _load_row(x_row, r_row, off + cols, off + cols < N, HAS_RESIDUAL)
        mean = tl.sum(total, axis=0) / N
        squares = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(0, N, BLOCK):
            mask = off + cols < N
            centred = tl.where(mask, _load_row(x_row, r_row, off + cols, mask, HAS_RESIDUAL) - mean, 0.0)
            squares += centred * centred
        rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / N + eps)
        for off in range(0, N, BLOCK):
            mask = off + cols < N
            y = (_load_row(x_row, r_row, off + cols, mask, HAS_RESIDUAL) - mean) * rstd
            if HAS_WEIGHT:
                y *= tl.load(w_ptr + off + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y += tl.load(b_ptr + off + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_row + off + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block < 8192 else 16


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalize ``x`` (or ``x + residual``) over its last dimension, then scale and shift.

    ``x`` must be contiguous, fp32/fp16/bf16; ``residual`` has x's shape; ``weight`` and ``bias``
    are [N] in fp32 or any float dtype. Returns a new contiguous tensor of x's shape and dtype.
    Raises ``ValueError`` for anything unsupported.
    """
    _check(x, weight, bias, residual)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    n = x.shape[-1] if x.dim() else 1
    rows = x.numel() // n if n else 0
    if rows == 0:
        return out
    single = n <= _SINGLE_BLOCK
    block = triton.next_power_of_2(n) if single else _SINGLE_BLOCK
    _layer_norm_kernel[(rows,)](
        x, residual if residual is not None else x,
        weight.contiguous() if weight is not None else x, bias.contiguous() if bias is not None else x,
        out, n, float(eps),
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK=block, SINGLE_BLOCK=single,
        num_warps=_num_warps(block),
    )  # fmt: skip
    return out


def _check(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, residual: torch.Tensor | None
) -> None:
    if x.dtype not in _FLOAT:
        raise ValueError(f"layer_norm: x must be float32, float16 or bfloat16, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError("layer_norm: x must be contiguous")
    n = x.shape[-1] if x.dim() else 1
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        if param.numel() != n or param.dim() > 1:
            raise ValueError(f"layer_norm: {name} must have shape ({n},), got {tuple(param.shape)}")
        if param.dtype not in _FLOAT or param.device != x.device:
            raise ValueError(
                f"layer_norm: {name} must be a float tensor on {x.device}, got {param.dtype} on {param.device}"
            )
    if residual is not None:
        if residual.shape != x.shape or not residual.is_contiguous():
            raise ValueError(
                f"layer_norm: residual must be contiguous with x's shape {tuple(x.shape)}, got {tuple(residual.shape)}"
            )
        if residual.dtype not in _FLOAT or residual.device != x.device:
            raise ValueError(
                f"layer_norm: residual must be a float tensor on {x.device}, got {residual.dtype} on {residual.device}"
            )
