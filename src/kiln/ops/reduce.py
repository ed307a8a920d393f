"""Reductions and normalizing maps over an axis: Reduce*, ArgMax/ArgMin, Softmax family, cumulative ops, TopK."""

from __future__ import annotations

import torch

from kiln.ops.registry import OpContext, register
