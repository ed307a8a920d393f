"""The tactic registry: every tactic of every family, looked up by kind or name.

Importing the family modules is what fills it (their ``@tactic`` and ``@canonical_weights``
decorators, :mod:`kiln.builder.tactics.base`); every lookup here loads them first. The families
import only ``base``, never this module, so the imports run one way.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kiln.builder.layers import Layer
from kiln.builder.tactics.base import CANONICAL_WEIGHTS, TACTICS, Tactic


def tactics_for(kind: str) -> list[Tactic]:
    load_families()
    return [t for t in TACTICS.values() if t.kind == kind]


def get(name: str) -> Tactic | None:
    load_families()
    return TACTICS.get(name)


def all_tactics() -> list[Tactic]:
    load_families()
    return list(TACTICS.values())


def reference_for(kind: str) -> Tactic:
    return next(t for t in tactics_for(kind) if t.reference)


def canonical(layer: Layer, constants: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layer's canonical fp32 weights: its kind's ``@canonical_weights`` function, else the
    constants as they are, by role."""
    load_families()
    fn = CANONICAL_WEIGHTS.get(layer.kind)
    return fn(layer, constants) if fn else {role: constants[name] for role, name in layer.weights.items()}


def load_families() -> None:
    """Import every family module, which registers its tactics (idempotent, as imports are)."""
    from kiln.builder.tactics import attention, conv, gemm, node, norm, pointwise  # noqa: F401  (registers)
