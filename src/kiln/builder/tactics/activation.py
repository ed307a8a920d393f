"""Activations fused into conv and GEMM layers, applied with torch (in place where that is safe).

The spec is the dict lowering writes (``{"op": "relu"}``, ``{"op": "clip", "min": 0, "max": 6}``);
``TRITON_ACTIVATIONS`` says which of them the Triton GEMM epilogue computes itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

TRITON_ACTIVATIONS = {None: "none", "relu": "relu", "gelu_erf": "gelu_erf", "gelu_tanh": "gelu_tanh",
                      "sigmoid": "sigmoid", "silu": "silu"}


def apply(y: torch.Tensor, spec: Mapping | None) -> torch.Tensor:
    """``y`` after the activation; ``y`` is a fresh tensor the caller owns, so it may be overwritten."""
    if spec is None:
        return y
    op = spec["op"]
    if op == "relu":
        return y.relu_()
    if op == "sigmoid":
        return y.sigmoid_()
    if op == "tanh":
        return y.tanh_()
    if op == "silu":
        return F.silu(y, inplace=True)
    if op == "hardswish":
        return F.hardswish(y, inplace=True)
    if op == "hardsigmoid":
        alpha, beta = spec["alpha"], spec["beta"]
        if math.isclose(alpha, 1 / 6) and beta == 0.5:
            return F.hardsigmoid(y, inplace=True)
        return y.mul_(alpha).add_(beta).clamp_(0.0, 1.0)
    if op == "leaky_relu":
        return F.leaky_relu(y, spec["alpha"], inplace=True)
    if op == "gelu_erf":
        return F.gelu(y)
    if op == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if op == "clip":
        lo, hi = spec["min"], spec["max"]
        if lo is None and hi is None:
            return y
        return y.clamp_(lo, hi)
    raise ValueError(f"unknown activation {op!r}")


def describe(spec: Mapping | None) -> str:
    return "" if spec is None else spec["op"]
