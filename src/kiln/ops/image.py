"""Spatial resampling and detection ops: Resize, Upsample, GridSample, AffineGrid, RoiAlign, NMS, DeformConv, Col2Im."""

from __future__ import annotations

import torch

from kiln.ops.registry import OpContext, register
