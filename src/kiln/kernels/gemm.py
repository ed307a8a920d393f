"""Matrix multiply with a fused bias + activation epilogue: ``act(a @ w_t.T + bias)``.

This is the GEMM tactic's kernel. Weights arrive pre-transposed as ``w_t`` [N, K] (the layout of
ONNX Gemm with transB=1 and of torch Linear), so both operands are read along K. Products
accumulate in fp32 and the epilogue runs in fp32 before one cast to the output dtype, so fusing
bias and activation costs no precision over separate ops. Programs are ordered in groups of
``group_m`` row blocks so that neighbouring programs share tiles of ``a`` and ``w_t`` in L2.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from kiln.activations import TRITON_EPILOGUES
from kiln.kernels.tanh import tanh as _tanh

ACTIVATIONS = ("none", *TRITON_EPILOGUES)
_INT32_LIMIT = 2**31  # offsets at or past this need 64-bit index math

# precision -> (operand dtype it needs, tl.dot input_precision). fp16/bf16 go to tensor cores as
# they are; input_precision only changes how fp32 operands are multiplied.
_PRECISIONS: dict[str, tuple[torch.dtype, str]] = {
    "fp32": (torch.float32, "ieee"),
    "tf32": (torch.float32, "tf32"),
    "fp16": (torch.float16, "tf32"),
    "bf16": (torch.bfloat16, "tf32"),
}


@dataclass(frozen=True)
class GemmConfig:
    """One tiling of the kernel: the tactic search times several and stores the winner."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GemmConfig:
        return cls(**{name: int(d[name]) for name in cls.__dataclass_fields__})


# Good H100 fp16 tilings for most shapes; a quick build times only these.
SHORT_CONFIGS: tuple[GemmConfig, ...] = (
    GemmConfig(128, 128, 64, 8, 8, 3),
    GemmConfig(128, 64, 32, 8, 4, 4),
    GemmConfig(64, 64, 32, 8, 4, 4),
)

# A thorough build also tries wide tiles for large problems and narrow-M tiles for small batches.
# With fp32 operands on an H100, 128x256x64 and 256x128x64 at 3 stages need 288 KiB of shared
# memory ("tf32"; "fp32" needs less): gemm() raises ValueError for them there.
WIDE_CONFIGS: tuple[GemmConfig, ...] = SHORT_CONFIGS + (
    GemmConfig(128, 256, 64, 8, 8, 3),
    GemmConfig(256, 128, 64, 8, 8, 3),
    GemmConfig(64, 256, 32, 8, 4, 4),
    GemmConfig(64, 128, 64, 8, 4, 4),
    GemmConfig(128, 128, 32, 8, 4, 4),
    GemmConfig(32, 64, 64, 8, 4, 4),
    GemmConfig(32, 128, 64, 8, 4, 4),
    GemmConfig(16, 64, 64, 8, 4, 4),
    GemmConfig(16, 128, 128, 8, 4, 3),
)


@triton.jit
def _gemm_kernel(
    a_ptr, w_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk,
    a_step, w_step,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # Rows and columns past the edge wrap around: their loads stay in bounds and the store drops them.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += a_step
        w_ptrs += w_step

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
    if ACTIVATION == "relu":
        acc = tl.where(acc < 0.0, 0.0, acc)
    elif ACTIVATION == "gelu_erf":
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        acc = 0.5 * acc * (1.0 + _tanh(0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)))
    elif ACTIVATION == "sigmoid":
        acc = tl.sigmoid(acc)
    elif ACTIVATION == "silu":
        acc = acc * tl.sigmoid(acc)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if INDEX_64:
        rows = rows.to(tl.int64)
    out_ptrs = out_ptr + rows[:, None] * N + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


def _check(a: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None, activation: str, precision: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"gemm: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if precision not in _PRECISIONS:
        raise ValueError(f"gemm: unknown precision {precision!r}; expected one of {tuple(_PRECISIONS)}")
    if a.dim() != 2 or w_t.dim() != 2:
        raise ValueError(f"gemm: a and w_t must be 2-D, got {tuple(a.shape)} and {tuple(w_t.shape)}")
    if a.shape[1] != w_t.shape[1]:
        raise ValueError(f"gemm: K differs: a is {tuple(a.shape)}, w_t is {tuple(w_t.shape)} (w_t is [N, K])")
    if a.dtype != w_t.dtype:
        raise ValueError(f"gemm: a is {a.dtype} but w_t is {w_t.dtype}")
    if a.dtype != _PRECISIONS[precision][0]:
        raise ValueError(f"gemm: precision {precision!r} needs {_PRECISIONS[precision][0]} operands, got {a.dtype}")
    if not w_t.is_contiguous():
        raise ValueError("gemm: w_t must be contiguous")
    if a.device != w_t.device:
        raise ValueError(f"gemm: a is on {a.device} but w_t is on {w_t.device}")
    if bias is not None:
        if bias.shape != (w_t.shape[0],):
            raise ValueError(f"gemm: bias must have shape ({w_t.shape[0]},), got {tuple(bias.shape)}")
        if not bias.dtype.is_floating_point or bias.device != a.device:
            raise ValueError(f"gemm: bias must be a float tensor on {a.device}, got {bias.dtype} on {bias.device}")


def _check_config(config: GemmConfig) -> None:
    for name in ("block_m", "block_n", "block_k"):
        size = getattr(config, name)
        if size < 16 or size & (size - 1):
            raise ValueError(f"gemm: {name}={size} must be a power of two >= 16 (tl.dot's smallest tile)")
    if config.group_m < 1 or config.num_warps < 1 or config.num_stages < 1:
        raise ValueError(f"gemm: group_m, num_warps and num_stages must be >= 1 in {config}")


def gemm(
    a: torch.Tensor,
    w_t: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    config: GemmConfig,
    precision: str,
) -> torch.Tensor:
    """``act(a @ w_t.T + bias)`` as a new contiguous [M, N] tensor of ``a.dtype``.

    ``a`` is [M, K] with any strides, ``w_t`` is [N, K] contiguous, ``bias`` is [N] of any float
    dtype or None. ``precision`` ("fp32", "tf32", "fp16", "bf16") must match the operand dtype;
    "fp32" multiplies in full IEEE precision, "tf32" on tf32 tensor cores. Raises ``ValueError``
    for anything unsupported, including a config whose tiles do not fit the GPU's shared memory.
    """
    _check(a, w_t, bias, activation, precision)
    _check_config(config)
    M, K = a.shape
    N = w_t.shape[0]
    out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        out.copy_(_epilogue_only(M, N, bias, activation, a.device))
        return out
    bias = bias.contiguous() if bias is not None else None
    # Only offsets that overflow int32 pay for 64-bit address math.
    largest = max((M - 1) * abs(a.stride(0)) + (K - 1) * abs(a.stride(1)), N * K, M * N)
    grid = (triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n),)
    try:
        _gemm_kernel[grid](
            a, w_t, bias if bias is not None else out, out,
            M, N, K,
            a.stride(0), a.stride(1), w_t.stride(0), w_t.stride(1),
            # Per-iteration pointer steps come from Python so that they are 64-bit when they must be.
            config.block_k * a.stride(1), config.block_k * w_t.stride(1),
            HAS_BIAS=bias is not None,
            ACTIVATION=activation,
            DOT_PRECISION=_PRECISIONS[precision][1],
            INDEX_64=largest >= _INT32_LIMIT,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip
    except OutOfResources as error:  # a wide tile's pipeline of fp32 operands can overflow shared memory
        raise ValueError(f"gemm: {config} does not fit this GPU with {precision} operands ({error})") from error
    return out


def _epilogue_only(M: int, N: int, bias: torch.Tensor | None, activation: str, device: torch.device) -> torch.Tensor:
    """The result when K == 0: the product is all zeros, only bias and activation remain."""
    x = bias.float().expand(M, N) if bias is not None else torch.zeros(M, N, device=device)
    if activation == "relu":
        return torch.relu(x)
    if activation in ("gelu_erf", "gelu_tanh"):
        return torch.nn.functional.gelu(x, approximate="none" if activation == "gelu_erf" else "tanh")
    if activation == "sigmoid":
        return torch.sigmoid(x)
    if activation == "silu":
        return torch.nn.functional.silu(x)
    return x
