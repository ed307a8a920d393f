"""Quantization ops: QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear and the integer MatMul/Conv ops."""

from __future__ import annotations

import torch

from kiln.ops.registry import OpContext, register
