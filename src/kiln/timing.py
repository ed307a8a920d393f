"""Timing a call: warm-up, repetitions of back-to-back calls, the median. The one place that times.

On CUDA calls are timed with CUDA events on a side stream (never the default stream), each
repetition queued behind a GPU sleep longer than the host takes to launch it, so the events measure
GPU time alone: an engine replays its layers from a CUDA graph, where host launch cost is gone, and
timing launches too would favour kernels with cheap launches (cuBLAS over Triton) for small layers.
On a CPU calls are timed with ``time.perf_counter``.

The builder times tactics and passes' alternatives with ``median_ms``; ``kiln.bench.measure`` builds
its timed loops and ``time_calls`` on ``warm_up`` and ``repeat_ms``. This module sits low in the
flow (it imports only torch) so the builder can use it without importing the bench.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

GPU_SLEEP_MAX_S = 0.05  # the longest sleep queued before a repetition


def median_ms(fn: Callable[[], Any], device: torch.device, reps: int = 5) -> float:
    """Median milliseconds per call of ``fn`` over ``reps`` repetitions (``repeat_ms``): a repetition
    lasts about 0.5 ms of calls (at most 100 calls on CUDA, 50 on a CPU)."""
    if device.type == "cuda":
        times, _ = repeat_ms(fn, device, reps, warmup_calls=2, target_ms=0.5, max_calls=100)
    else:
        times, _ = repeat_ms(fn, device, reps, warmup_calls=1, target_ms=0.5, max_calls=50)
    return statistics.median(times)


def repeat_ms(fn: Callable[[], Any], device: torch.device, reps: int, *, warmup_calls: int = 2,
              estimate_calls: int = 1, target_ms: float = 0.5, max_calls: int = 100,
              hide_launch: bool = True, round_up: bool = False,
              stream: torch.cuda.Stream | None = None) -> tuple[list[float], int]:
    """Milliseconds per call in each of ``reps`` repetitions of N back-to-back calls, and N.
    ``warmup_calls`` untimed calls, then ``estimate_calls`` timed ones estimate a call's time; N makes
    a repetition last about ``target_ms`` (1 to ``max_calls``; at least ``target_ms`` with
    ``round_up``). ``hide_launch`` (CUDA): queue each repetition behind a GPU sleep of twice the
    host's launch time for it, so only GPU time counts. ``stream`` (CUDA): the side stream to time on
    (default: a new one), for callers that warm up and time on the same stream."""
    rounded = math.ceil if round_up else int
    if device.type != "cuda":
        for _ in range(warmup_calls):
            fn()
        t0 = time.perf_counter()
        for _ in range(estimate_calls):
            fn()
        estimate = max((time.perf_counter() - t0) * 1e3 / estimate_calls, 1e-3)
        calls = max(1, min(max_calls, rounded(target_ms / estimate)))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / calls)
        return times, calls
    stream = stream or torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup_calls):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        stream.synchronize()
        t0 = time.perf_counter()
        start.record()
        for _ in range(estimate_calls):
            fn()
        end.record()
        launch_s = (time.perf_counter() - t0) / estimate_calls
        end.synchronize()
        estimate = max(start.elapsed_time(end) / estimate_calls, 1e-3)
        calls = max(1, min(max_calls, rounded(target_ms / estimate)))
        times = []
        for _ in range(reps):
            if hide_launch:  # twice the host's launch time for the repetition, in GPU clock cycles
                gpu_sleep(min(2.0 * launch_s * calls + 1e-4, GPU_SLEEP_MAX_S), device)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
    torch.cuda.current_stream(device).wait_stream(stream)
    return times, calls


def warm_up(fn: Callable[[], Any], ms: float, sync: Callable[[], Any] | None = None) -> int:
    """Call ``fn`` (then ``sync``, where given) until ``ms`` milliseconds have passed; returns the calls."""
    calls = 0
    start = time.perf_counter()
    while (time.perf_counter() - start) * 1e3 < ms:
        fn()
        if sync is not None:
            sync()
        calls += 1
    return calls


_CYCLES_PER_S: dict[int, float] = {}


def gpu_sleep(seconds: float, device: torch.device) -> None:
    """Keep the current stream busy for about ``seconds`` (``torch.cuda._sleep`` spins for a number of
    clock cycles; the rate is measured once per device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CYCLES_PER_S:
        cycles = 1_000_000
        torch.cuda._sleep(cycles)  # warm-up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _CYCLES_PER_S[index] = cycles / max(start.elapsed_time(end) / 1e3, 1e-6)
    torch.cuda._sleep(int(seconds * _CYCLES_PER_S[index]))
