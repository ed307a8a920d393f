"""The LayerNorm kernel against torch.nn.functional.layer_norm, with and without the fused add."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.kernels import layernorm
from kiln.kernels.layernorm import layer_norm


def randn(gen: torch.Generator, *shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def reference(x, weight, bias, eps, residual=None):
    x = x.double() + (residual.double() if residual is not None else 0)
    w = weight.double() if weight is not None else None
    b = bias.double() if bias is not None else None
    return F.layer_norm(x, x.shape[-1:], w, b, eps)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (4, 64), (2, 3, 100), (5, 1000)])
def test_shapes_fp32(shape, gen, device, rel_err):
    n = shape[-1]
    x, w, b = randn(gen, *shape, device=device), randn(gen, n, device=device), randn(gen, n, device=device)
    out = layer_norm(x, w, b, 1e-5)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    assert rel_err(out, reference(x, w, b, 1e-5)) < 1e-4


def test_offset_rows_keep_their_variance(gen, device, rel_err):
    x = randn(gen, 4, 96, device=device) * 0.1 + 100.0  # mean far larger than spread: E[x^2] - E[x]^2 would fail
    assert rel_err(layer_norm(x, None, None, 1e-6), reference(x, None, None, 1e-6)) < 1e-2


def test_without_weight_or_bias(gen, device, rel_err):
    x, w = randn(gen, 6, 33, device=device), randn(gen, 33, device=device)
    assert rel_err(layer_norm(x, None, None, 1e-5), reference(x, None, None, 1e-5)) < 1e-4
    assert rel_err(layer_norm(x, w, None, 1e-3), reference(x, w, None, 1e-3)) < 1e-4


def test_residual_is_added_before_normalizing(gen, device, rel_err):
    x, r = randn(gen, 2, 5, 48, device=device), randn(gen, 2, 5, 48, device=device)
    w, b = randn(gen, 48, device=device), randn(gen, 48, device=device)
    assert rel_err(layer_norm(x, w, b, 1e-5, residual=r), reference(x, w, b, 1e-5, r)) < 1e-4


def test_long_rows_take_the_blocked_path(gen, device, rel_err):
    n = layernorm._SINGLE_BLOCK + 1000
    x, r = randn(gen, 3, n, device=device) + 3.0, randn(gen, 3, n, device=device)
    w, b = randn(gen, n, device=device), randn(gen, n, device=device)
    assert rel_err(layer_norm(x, w, b, 1e-5), reference(x, w, b, 1e-5)) < 1e-4
    assert rel_err(layer_norm(x, w, b, 1e-5, residual=r), reference(x, w, b, 1e-5, r)) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_with_fp32_params(dtype, gen, device, rel_err):
    x, r = randn(gen, 4, 80, dtype=dtype, device=device), randn(gen, 4, 80, dtype=dtype, device=device)
    w, b = randn(gen, 80, device=device), randn(gen, 80, dtype=dtype, device=device)
    out = layer_norm(x, w, b, 1e-5, residual=r)
    assert out.dtype == dtype
    assert rel_err(out, reference(x, w, b, 1e-5, r)) < 1e-2


def test_empty_input(device):
    assert layer_norm(torch.empty(0, 8, device=device), None, None, 1e-5).shape == (0, 8)


@pytest.mark.parametrize(
    "case",
    ["int_x", "strided_x", "weight_shape", "residual_shape", "int_bias"],
)
def test_unsupported_input_raises(case, device):
    x = torch.ones(4, 8, device=device)
    kwargs = {"x": x, "weight": None, "bias": None, "eps": 1e-5}
    if case == "int_x":
        kwargs["x"] = torch.ones(4, 8, dtype=torch.int32, device=device)
    elif case == "strided_x":
        kwargs["x"] = torch.ones(8, 4, device=device).T
    elif case == "weight_shape":
        kwargs["weight"] = torch.ones(7, device=device)
    elif case == "residual_shape":
        kwargs["residual"] = torch.ones(1, 8, device=device)
    elif case == "int_bias":
        kwargs["bias"] = torch.ones(8, dtype=torch.int64, device=device)
    with pytest.raises(ValueError):
        layer_norm(**kwargs)
