"""How the builder, passes and runtime benchmarks time a call: the median of repetitions of N
back-to-back calls, on one side stream, with the peak memory the calls allocated.

``time_calls(fn, device)``: ``WARMUP_CALLS`` warm-up calls (the last ``ESTIMATE_CALLS`` of them timed
to choose N, so a repetition lasts >= ``TARGET_REPETITION_MS``, at most ``MAX_CALLS`` calls), then
``REPETITIONS`` repetitions; on CUDA timed with events on the one side stream (never the default
stream), host launches included, as a user calling the model sees them; on a CPU with perf_counter.
``kiln.bench.measure`` times an iteration at a time (h2d, compute, d2h events per iteration) and has
no such loop over a plain callable, hence this one (``benchmarks.runtime --smoke`` shortens it by
setting the constants).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

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
    """ms per call: WARMUP_CALLS warm-up calls, then the median of REPETITIONS repetitions of N
    back-to-back calls (N: a repetition lasts >= TARGET_REPETITION_MS, at most MAX_CALLS). On CUDA
    timed with events on the side stream; also the peak memory allocated while it ran."""
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            stream = side_stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                for _ in range(WARMUP_CALLS - ESTIMATE_CALLS):
                    fn()
                start.record()
                for _ in range(ESTIMATE_CALLS):  # the last warm-up calls estimate N
                    fn()
                end.record()
                end.synchronize()
                estimate = max(start.elapsed_time(end) / ESTIMATE_CALLS, 1e-3)
                calls = max(1, min(MAX_CALLS, math.ceil(TARGET_REPETITION_MS / estimate)))
                times = []
                for _ in range(REPETITIONS):
                    start.record()
                    for _ in range(calls):
                        fn()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) / calls)
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            memory = {"base_allocated_mb": base / 2**20, "peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
                      "peak_extra_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}
        else:
            for _ in range(WARMUP_CALLS - ESTIMATE_CALLS):
                fn()
            t0 = time.perf_counter()
            for _ in range(ESTIMATE_CALLS):
                fn()
            estimate = max((time.perf_counter() - t0) * 1e3 / ESTIMATE_CALLS, 1e-3)
            calls = max(1, min(MAX_CALLS, math.ceil(TARGET_REPETITION_MS / estimate)))
            times = []
            for _ in range(REPETITIONS):
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                times.append((time.perf_counter() - t0) * 1e3 / calls)
            memory = {}
    return {"ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "calls_per_repetition": calls,
            "repetitions_ms": times, **memory}


def free_memory() -> None:
    """Collect garbage and return cached GPU memory between models, so one model's leftovers do not
    count against the next."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
