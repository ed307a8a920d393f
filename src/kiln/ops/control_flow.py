"""Ops with subgraphs (If, Loop, Scan, SequenceMap), sequences and optionals."""

from __future__ import annotations

import torch

from kiln.ops.registry import OpContext, register
