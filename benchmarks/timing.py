"""How the builder, passes and runtime benchmarks time a call: the median of repetitions of N
back-to-back calls, on one side stream, with the peak memory the calls allocated.

``time_calls(fn, device)``: ``WARMUP_CALLS`` warm-up calls (the last ``ESTIMATE_CALLS`` of them timed
to choose N, so a repetition lasts >= ``TARGET_REPETITION_MS``, at most ``MAX_CALLS`` calls), then
``REPETITIONS`` repetitions; on CUDA timed with events on the one side stream (never the default
stream), host launches included, as a user calling the model sees them; on a CPU with perf_counter.
The loop itself is ``kiln.bench.measure.time_calls`` (``kiln.timing``, the one place that times);
this module fixes the scripts' constants (``benchmarks.runtime --smoke`` shortens it by setting them)
and adds the memory figures.
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable
from typing import Any

import torch

from kiln.bench import measure

WARMUP_CALLS = 10
ESTIMATE_CALLS = 5  # the last warm-up calls, timed to choose N
REPETITIONS = 7
TARGET_REPETITION_MS = 100.0
MAX_CALLS = 200

_SIDE_STREAM: list[torch.cuda.Stream] = []


def side_stream() -> torch.cuda.Stream:
    """The one non-default CUDA stream everything is timed on."""
    if not _SIDE_STREAM:
        _SIDE_STREAM.append(torch.cuda.Stream())
    return _SIDE_STREAM[0]


def time_calls(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """ms per call (``kiln.bench.measure.time_calls`` with this module's constants, on the side stream)
    and, on CUDA, the peak memory allocated while it ran."""
    with torch.inference_mode():
        memory: dict[str, float] = {}
        stream = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            stream = side_stream()
        times, calls = measure.time_calls(fn, device, reps=REPETITIONS, warmup_calls=WARMUP_CALLS,
                                          estimate_calls=ESTIMATE_CALLS, target_ms=TARGET_REPETITION_MS,
                                          max_calls=MAX_CALLS, stream=stream)
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            memory = {"base_allocated_mb": base / 2**20, "peak_allocated_mb": peak / 2**20,
                      "peak_extra_mb": (peak - base) / 2**20}
    return {"ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "calls_per_repetition": calls,
            "repetitions_ms": times, **memory}


def free_memory() -> None:
    """Collect garbage and return cached GPU memory between models, so one model's leftovers do not
    count against the next."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
