"""Element-type conversions: Cast, CastLike and BitCast, including float8 saturation rules."""

from __future__ import annotations

import torch

from kiln.ops.registry import OpContext, register
