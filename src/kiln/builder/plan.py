"""What the builder hands on: the plan, its prepared weights and the stripped graph.

The builder stops here and never imports the engine; ``kiln.build`` (``kiln/__init__.py``) turns a
``BuiltPlan`` into an ``Engine`` with ``Engine.from_plan``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class BuildReport:
    """What the build did, for the log and the summary (times are not part of the engine file)."""

    lines: list[str] = field(default_factory=list)
    seconds: float = 0.0
    timed: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    rejected: int = 0
    fallbacks: list[str] = field(default_factory=list)
    output_diffs: dict[str, float] = field(default_factory=dict)

    def log(self, line: str) -> None:
        self.lines.append(line)


@dataclass
class BuiltPlan:
    """A finished build: the plan (JSON: layers, tactics, precisions, profiles, streams), the
    prepared weights by name, the model's graph without its weights, the device it was built for,
    and the build's report."""

    plan: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    graph: bytes
    device: str
    report: BuildReport
