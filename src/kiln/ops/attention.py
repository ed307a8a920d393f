"""Transformer ops of opset 23+: Attention, RotaryEmbedding, RMSNormalization and their relatives."""

from __future__ import annotations

import torch

from kiln.ops.registry import OpContext, register
