"""Runs the Triton kernels on the GPU when there is one, else in Triton's CPU interpreter.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, so it is set here, at import
time, before any test module imports ``kiln.kernels``.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded generator: inputs are fresh normal samples, the same on every run."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def rel_err():
    """max|got - ref| / max|ref|, over finite reference entries, with NaNs required in the same places."""

    def measure(got: torch.Tensor, ref: torch.Tensor) -> float:
        got, ref = got.double().cpu(), ref.double().cpu()
        assert got.shape == ref.shape, (got.shape, ref.shape)
        assert torch.equal(got.isnan(), ref.isnan()), "NaNs differ"
        infinite = ref.isinf()
        assert torch.equal(got[infinite], ref[infinite]), "infinities differ"
        finite = ref.isfinite()
        if not finite.any():
            return 0.0
        scale = ref[finite].abs().max().clamp_min(1e-30)
        return ((got[finite] - ref[finite]).abs().max() / scale).item()

    return measure
