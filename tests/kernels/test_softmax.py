"""The softmax kernel against torch: short and long rows, log-softmax, -inf entries."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import softmax as softmax_module
from kiln.kernels.softmax import softmax

# -inf - -inf and log(0) make numpy warn inside the interpreter; the results are checked.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def randn(gen: torch.Generator, *shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def reference(x: torch.Tensor, log: bool) -> torch.Tensor:
    return torch.log_softmax(x.double(), -1) if log else torch.softmax(x.double(), -1)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (4, 64), (2, 3, 100), (5, 1000)])
def test_shapes_fp32(shape, log, gen, device, rel_err):
    x = randn(gen, *shape, device=device) * 4
    out = softmax(x, log=log)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    assert rel_err(out, reference(x, log)) < 1e-4


@pytest.mark.parametrize("log", [False, True])
def test_long_rows_take_the_online_path(log, gen, device, rel_err):
    n = softmax_module._SINGLE_BLOCK + 5000
    x = randn(gen, 3, n, device=device) * 3
    x[0, : n // 2] = -float("inf")  # whole blocks of -inf, then finite values
    x[1, 7] = 30.0  # a late-found large maximum rescales the running sums
    x[2, :] = -float("inf")
    x[2, -1] = 0.5
    assert rel_err(softmax(x, log=log), reference(x, log)) < 1e-4


@pytest.mark.parametrize("long", [False, True])
@pytest.mark.parametrize("log", [False, True])
def test_minus_inf_entries_and_rows(long, log, gen, device, rel_err):
    n = softmax_module._SINGLE_BLOCK + 10 if long else 10
    x = randn(gen, 3, n, device=device)
    x[0, ::3] = -float("inf")
    x[1, :] = -float("inf")  # torch gives NaN for the whole row
    out = softmax(x, log=log)
    assert out[1].isnan().all()
    assert rel_err(out, reference(x, log)) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("log", [False, True])
def test_half_precision(dtype, log, gen, device, rel_err):
    x = randn(gen, 6, 50, dtype=dtype, device=device)
    out = softmax(x, log=log)
    assert out.dtype == dtype
    assert rel_err(out, reference(x, log)) < 1e-2


def test_empty_input(device):
    assert softmax(torch.empty(0, 8, device=device)).shape == (0, 8)


def test_unsupported_input_raises(device):
    with pytest.raises(ValueError):
        softmax(torch.ones(4, 8, dtype=torch.int32, device=device))
    with pytest.raises(ValueError):
        softmax(torch.ones(8, 4, device=device).T)
    with pytest.raises(ValueError):
        softmax(torch.ones(4, 8, dtype=torch.float64, device=device))
