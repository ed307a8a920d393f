"""What a tactic is, and the decorators its family modules register with.

A tactic declares the layer kind it implements, where it runs (CPU, CUDA), the precisions it
supports, the lowest optimization level at which it is tried, and a ``supports(layer, ...)`` check.
``prepare`` turns the layer's weights into the form the kernel wants, once, at build time
(transposed, channels_last, cast, bias folded); ``runner`` returns the callable the engine calls
with the layer's runtime inputs. ``configs`` lists the variants worth timing at a level (Triton
block sizes, layouts).

Each kind has one *reference* tactic: plain torch in fp32 with TF32 off. Every other candidate is
checked against it on the same random inputs before it may win.

Family modules (``gemm``, ``conv``, ...) import this module and register with ``@tactic`` and
``@canonical_weights``; :mod:`kiln.builder.tactics.registry` imports the families and answers
lookups. This module imports neither, so the registration has no edge back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from kiln.builder.layers import Layer
from kiln.precision import PRECISION_DTYPES

Runner = Callable[[list[Any]], list[Any]]
CanonicalWeights = Callable[[Layer, Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]


class Tactic:
    """One implementation of one layer kind. See the module docstring."""

    name = ""
    kind = ""
    source = "torch"
    devices: tuple[str, ...] = ("cpu", "cuda")
    precisions: frozenset[str] = frozenset(PRECISION_DTYPES)
    level = 0
    reference = False

    def configs(self, layer: Layer, level: int, precision: str, device: str) -> list[dict[str, Any]]:
        """The variants to time at this optimization level (an empty list: none at this level)."""
        return [{}]

    def supports(self, layer: Layer, precision: str, device: str) -> bool:
        return True

    def heuristic(self, layer: Layer, precision: str, device: str) -> int:
        """Rank used at optimization level 0 and to order short lists: higher is tried first."""
        return 0

    def prepare(
        self, layer: Layer, weights: Mapping[str, torch.Tensor], precision: str, config: Mapping
    ) -> dict[str, torch.Tensor]:
        return {}

    def prep_id(self, config: Mapping) -> str:
        """Tactics (and configs) whose prepared weights are identical share one id, and one copy."""
        return self.name

    def runner(self, layer: Layer, prepared: Mapping[str, torch.Tensor], precision: str, config: Mapping,
               context: Any) -> Runner:
        raise NotImplementedError

    def matches(self, pattern: str) -> bool:
        """A tactic pattern names it fully (``gemm.triton``), by kind (``gemm``) or by source (``triton``)."""
        return pattern in (self.name, self.name.split(".")[0], self.source)


# Filled by the decorators as the family modules are imported; read through kiln.builder.tactics.registry.
TACTICS: dict[str, Tactic] = {}
CANONICAL_WEIGHTS: dict[str, CanonicalWeights] = {}


def tactic(cls: type[Tactic]) -> type[Tactic]:
    """Register one instance of ``cls`` under its ``name``."""
    instance = cls()
    if instance.name in TACTICS:
        raise ValueError(f"tactic {instance.name} registered twice")
    TACTICS[instance.name] = instance
    return cls


def canonical_weights(kind: str):
    """Register how a kind turns raw ONNX constants into the canonical fp32 weights its tactics prepare from."""

    def decorate(fn: CanonicalWeights) -> CanonicalWeights:
        CANONICAL_WEIGHTS[kind] = fn
        return fn

    return decorate
