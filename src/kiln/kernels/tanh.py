"""tanh for Triton kernels: ``tl`` has no tanh in every Triton version, and the GEMM epilogue
(tanh-GELU) and the pointwise generator (Tanh, Mish, tanh-GELU) both need one."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh(u):
    # t = e^(-2|u|) lies in (0, 1]: nothing overflows, and (1 - t) / (1 + t) tends to exactly 1
    # for large |u|.
    t = tl.exp(-2.0 * tl.abs(u))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(u < 0.0, -y, y)
