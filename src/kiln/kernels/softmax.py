"""Softmax and LogSoftmax over the last dimension, one row per program, fp32 inside.

Rows up to ``_SINGLE_BLOCK`` elements are read once and written once. Longer rows take two passes:
an online pass keeps a running maximum and a sum rescaled to it per lane, then a second pass writes
the output. -inf entries give exact zeros (or -inf for log); a row of only -inf gives NaN, as in
torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_SINGLE_BLOCK = 16384
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _softmax_kernel(x_ptr, out_ptr, N, LOG: tl.constexpr, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * N
    x_row, out_row = x_ptr + start, out_ptr + start
    cols = tl.arange(0, BLOCK)
    if SINGLE_BLOCK:
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        row_max = tl.max(x, axis=0)
        shifted = x - row_max
        e = tl.exp(shifted)
        total = tl.sum(e, axis=0)
        if LOG:
            y = shifted - tl.log(total)
        else:
            y = e / total
        tl.store(out_row + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        lane_max = tl.full([BLOCK], -float("inf"), dtype=tl.float32)
        lane_sum = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(0, N, BLOCK):
            x = tl.load(x_row + off + cols, mask=off + cols < N, other=-float("inf")).to(tl.float32)
            new_max = tl.maximum(lane_max, x)
            # While a lane has seen only -inf its sum stays 0 (not exp(-inf - -inf) = NaN).
            ref = tl.where(new_max == -float("inf"), 0.0, new_max)
            lane_sum = lane_sum * tl.exp(lane_max - ref) + tl.exp(x - ref)
            lane_max = new_max
        row_max = tl.max(lane_max, axis=0)
        # A row of only -inf keeps row_max = -inf; the output pass then computes -inf - -inf = NaN.
        scale = tl.where(lane_max == -float("inf"), 0.0, tl.exp(lane_max - row_max))
        total = tl.sum(lane_sum * scale, axis=0)
        for off in range(0, N, BLOCK):
            mask = off + cols < N
            shifted = tl.load(x_row + off + cols, mask=mask, other=-float("inf")).to(tl.float32) - row_max
            if LOG:
                y = shifted - tl.log(total)
            else:
                y = tl.exp(shifted) / total
            tl.store(out_row + off + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block < 8192 else 16


def softmax(x: torch.Tensor, log: bool = False) -> torch.Tensor:
    """Softmax (``log=True``: log-softmax) of contiguous fp32/fp16/bf16 ``x`` over its last
    dimension, as a new contiguous tensor of x's shape and dtype. Raises ``ValueError`` for
    anything unsupported."""
    if x.dtype not in _FLOAT:
        raise ValueError(f"softmax: x must be float32, float16 or bfloat16, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError("softmax: x must be contiguous")
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    n = x.shape[-1] if x.dim() else 1
    rows = x.numel() // n if n else 0
    if rows == 0:
        return out
    single = n <= _SINGLE_BLOCK
    block = triton.next_power_of_2(n) if single else 4096
    _softmax_kernel[(rows,)](x, out, n, LOG=bool(log), BLOCK=block, SINGLE_BLOCK=single, num_warps=_num_warps(block))
    return out
