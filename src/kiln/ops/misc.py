"""The remaining ops: losses, signal processing (DFT, STFT, windows), random generators, Einsum, Det, ML-domain helpers."""

from __future__ import annotations

import torch

from kiln.ops.registry import OpContext, register
