"""Recurrent layers: RNN, GRU and LSTM, as the ONNX spec defines them."""

from __future__ import annotations

import torch

from kiln.ops.registry import OpContext, register
