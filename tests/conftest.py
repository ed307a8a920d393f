"""Skips tests marked ``cuda`` where torch sees no GPU; provides a seeded ``rng``.

Without a GPU, Triton kernels run in Triton's CPU interpreter; the variable must be set before any
kernel is decorated, so it is set here, before any test module is imported.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
