"""The GEMM kernel against torch: shapes off the tile grid, strided inputs, every activation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.kernels import gemm as gemm_module
from kiln.kernels.gemm import ACTIVATIONS, SHORT_CONFIGS, WIDE_CONFIGS, GemmConfig, gemm

SMALL = GemmConfig(block_m=16, block_n=32, block_k=16, group_m=2, num_warps=4, num_stages=2)


def reference(a: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    x = a.double() @ w_t.double().T
    if bias is not None:
        x = x + bias.double()
    return {
        "none": lambda v: v,
        "relu": torch.relu,
        "gelu_erf": lambda v: F.gelu(v, approximate="none"),
        "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
        "sigmoid": torch.sigmoid,
        "silu": F.silu,
    }[activation](x)


def randn(gen: torch.Generator, *shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


@pytest.mark.parametrize("m,n,k", [(1, 8, 16), (37, 45, 29), (64, 64, 64), (70, 33, 100)])
def test_shapes_fp32(m, n, k, gen, device, rel_err):
    a, w_t, bias = randn(gen, m, k, device=device), randn(gen, n, k, device=device), randn(gen, n, device=device)
    out = gemm(a, w_t, bias, "none", SMALL, "fp32")
    assert out.shape == (m, n) and out.dtype == torch.float32 and out.is_contiguous()
    assert rel_err(out, reference(a, w_t, bias, "none")) < 1e-4


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations(activation, gen, device, rel_err):
    a, w_t, bias = randn(gen, 20, 24, device=device), randn(gen, 40, 24, device=device), randn(gen, 40, device=device)
    out = gemm(a, w_t, bias, activation, SMALL, "fp32")
    assert rel_err(out, reference(a, w_t, bias, activation)) < 1e-4


def test_no_bias_and_strided_a(gen, device, rel_err):
    a = randn(gen, 40, 30, device=device).T  # [30, 40] with strides (1, 30)
    w_t = randn(gen, 17, 40, device=device)
    out = gemm(a, w_t, None, "relu", SMALL, "fp32")
    assert rel_err(out, reference(a, w_t, None, "relu")) < 1e-4
    sliced = randn(gen, 33, 80, device=device)[:, ::2]  # [33, 40] with strides (80, 2)
    assert rel_err(gemm(sliced, w_t, None, "none", SMALL, "fp32"), reference(sliced, w_t, None, "none")) < 1e-4


def test_bias_in_other_dtype(gen, device, rel_err):
    a, w_t = randn(gen, 9, 16, device=device), randn(gen, 12, 16, device=device)
    bias = randn(gen, 12, dtype=torch.float16, device=device)
    assert rel_err(gemm(a, w_t, bias, "silu", SMALL, "fp32"), reference(a, w_t, bias, "silu")) < 1e-4


def test_64_bit_offsets(gen, device, rel_err, monkeypatch):
    monkeypatch.setattr(gemm_module, "_INT32_LIMIT", 16)  # big tensors cannot be made here; lower the bar
    a = randn(gen, 40, 30, device=device).T
    w_t, bias = randn(gen, 20, 40, device=device), randn(gen, 20, device=device)
    assert rel_err(gemm(a, w_t, bias, "gelu_erf", SMALL, "fp32"), reference(a, w_t, bias, "gelu_erf")) < 1e-4


def test_tf32(gen, device, rel_err):
    a, w_t = randn(gen, 32, 64, device=device), randn(gen, 32, 64, device=device)
    assert rel_err(gemm(a, w_t, None, "none", SMALL, "tf32"), reference(a, w_t, None, "none")) < 1e-2


def test_fp16(gen, device, rel_err):
    a, w_t = (
        randn(gen, 33, 48, dtype=torch.float16, device=device),
        randn(gen, 50, 48, dtype=torch.float16, device=device),
    )
    bias = randn(gen, 50, dtype=torch.float16, device=device)
    out = gemm(a, w_t, bias, "gelu_tanh", SMALL, "fp16")
    assert out.dtype == torch.float16
    assert rel_err(out, reference(a, w_t, bias, "gelu_tanh")) < 1e-2


@pytest.mark.cuda  # the interpreter multiplies bf16 tiles as raw uint16 bits
def test_bf16(gen, device, rel_err):
    a, w_t = (
        randn(gen, 33, 48, dtype=torch.bfloat16, device=device),
        randn(gen, 50, 48, dtype=torch.bfloat16, device=device),
    )
    out = gemm(a, w_t, None, "relu", SMALL, "bf16")
    assert out.dtype == torch.bfloat16
    assert rel_err(out, reference(a, w_t, None, "relu")) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("config", WIDE_CONFIGS, ids=lambda c: f"{c.block_m}x{c.block_n}x{c.block_k}")
def test_every_listed_config(config, gen, device, rel_err):
    a, w_t = (
        randn(gen, 300, 200, dtype=torch.float16, device=device),
        randn(gen, 260, 200, dtype=torch.float16, device=device),
    )
    bias = randn(gen, 260, device=device)
    assert rel_err(gemm(a, w_t, bias, "silu", config, "fp16"), reference(a, w_t, bias, "silu")) < 1e-2


def test_short_configs_are_listed_first_in_wide():
    assert WIDE_CONFIGS[: len(SHORT_CONFIGS)] == SHORT_CONFIGS
    assert len(set(WIDE_CONFIGS)) == len(WIDE_CONFIGS)


def test_config_round_trips_through_a_dict():
    for config in WIDE_CONFIGS:
        assert GemmConfig.from_dict(config.as_dict()) == config


def test_empty_k_gives_the_epilogue_of_zero(device):
    a, w_t = torch.empty(3, 0, device=device), torch.empty(4, 0, device=device)
    bias = torch.tensor([-1.0, 0.0, 1.0, 2.0], device=device)
    assert torch.equal(gemm(a, w_t, bias, "relu", SMALL, "fp32").cpu(), torch.relu(bias).expand(3, 4).cpu())


@pytest.mark.parametrize(
    "a_shape,w_shape,a_dtype,w_dtype,precision,activation",
    [
        ((4, 8, 2), (4, 8), torch.float32, torch.float32, "fp32", "none"),  # a not 2-D
        ((4, 8), (4, 7), torch.float32, torch.float32, "fp32", "none"),  # K mismatch
        ((4, 8), (4, 8), torch.float16, torch.float32, "fp16", "none"),  # dtype mismatch
        ((4, 8), (4, 8), torch.float16, torch.float16, "fp32", "none"),  # precision vs dtype
        ((4, 8), (4, 8), torch.float32, torch.float32, "int8", "none"),  # unknown precision
        ((4, 8), (4, 8), torch.float32, torch.float32, "fp32", "tanh"),  # unknown activation
    ],
)
def test_unsupported_input_raises(a_shape, w_shape, a_dtype, w_dtype, precision, activation, device):
    a = torch.ones(a_shape, dtype=a_dtype, device=device)
    w_t = torch.ones(w_shape, dtype=w_dtype, device=device)
    with pytest.raises(ValueError):
        gemm(a, w_t, None, activation, SMALL, precision)


def test_bad_bias_and_config_raise(device):
    a, w_t = torch.ones(4, 8, device=device), torch.ones(5, 8, device=device)
    with pytest.raises(ValueError):
        gemm(a, w_t, torch.ones(4, device=device), "none", SMALL, "fp32")
    with pytest.raises(ValueError):
        gemm(a, w_t, None, "none", GemmConfig(8, 32, 16, 1, 4, 2), "fp32")
    with pytest.raises(ValueError):
        gemm(a, torch.ones(8, 5, device=device).T, None, "none", SMALL, "fp32")  # w_t not contiguous
