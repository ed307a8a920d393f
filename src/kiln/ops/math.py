"""Elementwise math: unary and binary arithmetic, comparisons, logic, bitwise ops and activations."""

from __future__ import annotations

import torch

from kiln.ops.registry import OpContext, register


@register("Relu", since=6)
def relu(op: OpContext, x):
    return torch.relu(x)


@register("Add", since=7)
def add(op: OpContext, a, b):
    return a + b
