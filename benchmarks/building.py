"""Building kiln engines the way the builder, passes and runtime benchmarks do: two optimization
profiles (batch 1; batch 2..LARGE tuned at a chosen batch) and a timed build that logs its progress."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks.models import ModelSpec
from benchmarks.run_info import log


def profiles_for(spec: ModelSpec, large: int):
    from kiln import Profile

    def shapes(batch: int) -> dict[str, list[int]]:
        return {name: [batch, *shape] for name, (shape, _) in spec.inputs.items()}

    return [Profile.from_lists(opt_shapes=shapes(1)),
            Profile.from_lists(min_shapes=shapes(2), opt_shapes=shapes(large), max_shapes=shapes(large))]


class BuildProgress:
    """Prints a line when a build phase starts, every 20 s while it runs, and when it ends."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.phase = None
        self.started = self.printed = 0.0

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if phase != self.phase:
            self.phase, self.started, self.printed = phase, now, now
            log(f"  {self.label}: {phase} ({total} layers)")
        elif done == total:
            log(f"  {self.label}: {phase} done in {now - self.started:.1f} s")
        elif now - self.printed >= 20:
            self.printed = now
            log(f"  {self.label}: {phase} {done}/{total} layers after {now - self.started:.0f} s")


def timed_build(path: Path, config, label: str):
    import kiln

    start = time.perf_counter()
    engine = kiln.build(path, config, progress=BuildProgress(label))
    if config.device == "cuda":
        torch.cuda.synchronize()
    return engine, time.perf_counter() - start
