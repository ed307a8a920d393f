"""Neural-network layers: MatMul, Gemm, Conv, ConvTranspose, pooling, normalizations, dropout."""

from __future__ import annotations

import torch

from kiln.ops.registry import OpContext, register
