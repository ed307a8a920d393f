"""Timing one target the way trtexec does, and judging where throughput saturates.

``measure(target)`` warms the target up for ``warmup_ms``, then runs iterations for ``duration_s``
(or exactly ``iterations``). On a GPU target each iteration is queued on one benchmark stream with
four CUDA events around its parts, so the GPU's own times come back per iteration: H2D, compute,
D2H and their sum; the host time to issue each iteration is the enqueue time. Events are read back
in chunks (the stream is synchronized every ``CHUNK`` iterations), which keeps at most that many
iterations in flight. Throughput is iterations over the wall time of the timed loop. A host-timed
target is timed by the host clock around each whole iteration.

``time_calls(fn, device)`` times one call (a layer, a kernel, a whole model in a script) with
``kiln.timing``, which the builder times its tactics with: repetitions of back-to-back calls after a
warm-up, with statistics over the repetitions.

``measure_parallel`` runs several targets at once (one thread each, each on its own stream), as
several execution contexts serve one engine, and reports their combined throughput.

``saturation`` reads a batch sweep: a step from batch a to batch b has efficiency
log(throughput_b / throughput_a) / log(b / a): 1 while throughput grows as fast as the batch (the
GPU had idle capacity), near 0 once it no longer grows. The GPU is saturated from the first batch
whose next step falls below ``threshold`` (0.5: doubling the batch gains less than 41%).
"""

from __future__ import annotations

import contextvars
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kiln import deadline as deadlines
from kiln.bench.results import Run, Saturation, Stats
from kiln.bench.targets import Target
from kiln.timing import repeat_ms, warm_up

CHUNK = 64  # GPU iterations queued before the events are read back
SATURATION_THRESHOLD = 0.5
KNEE = 0.9


def measure(target: Target, batch: int, *, warmup_ms: float = 200.0, duration_s: float | None = 3.0,
            iterations: int | None = None, tick: Callable[[], None] | None = None) -> Run:
    """One timed run of ``target`` (already ``setup``); see the module docstring. ``tick`` is called
    after every chunk of iterations (progress)."""
    return _samples(target, warmup_ms, duration_s, iterations, tick).run(batch)


@dataclass
class _Samples:
    """Per-iteration times (ms) of one or more timed loops, and their wall time."""

    total: list[float]
    wall_s: float
    compute: list[float] | None = None
    h2d: list[float] | None = None
    d2h: list[float] | None = None
    enqueue: list[float] | None = None
    peak: int | None = None

    def run(self, batch: int, wall_s: float | None = None) -> Run:
        wall = self.wall_s if wall_s is None else wall_s
        per_s = len(self.total) / wall if wall > 0 else float("inf")

        def stats(values: list[float] | None) -> Stats | None:
            return Stats.of(values) if values else None

        return Run(latency_ms=Stats.of(self.total), compute_ms=stats(self.compute), h2d_ms=stats(self.h2d),
                   d2h_ms=stats(self.d2h), enqueue_ms=stats(self.enqueue), iterations=len(self.total), wall_s=wall,
                   inferences_per_s=per_s, samples_per_s=per_s * batch, peak_memory_bytes=self.peak)


def _samples(target: Target, warmup_ms: float, duration_s: float | None, iterations: int | None,
             tick: Callable[[], None] | None, track_peak: bool = True) -> _Samples:
    if iterations is not None and iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if duration_s is not None and duration_s <= 0:
        raise ValueError(f"duration must be > 0 s, got {duration_s}")
    if target.gpu_timed:
        return _measure_gpu(target, warmup_ms, duration_s, iterations, tick, track_peak)
    return _measure_host(target, warmup_ms, duration_s, iterations, tick)


def _iteration(target: Target) -> None:
    target.h2d()
    target.compute()
    target.d2h()


def _done(target: Target, count: int, start: float, duration_s: float | None, iterations: int | None) -> bool:
    """Whether the timed loop is done; past the time limit in effect (``kiln.deadline``) it stops
    with ``RunStopped`` instead, whatever the target (an onnxruntime peer checks nothing itself)."""
    deadline = deadlines.current()
    if deadline is not None:
        deadline.check(f"the measurement of {target.name or 'a target'} (iteration {count})")
    if iterations is not None:
        return count >= iterations
    return time.perf_counter() - start >= (duration_s if duration_s is not None else 3.0)


def _measure_host(target: Target, warmup_ms: float, duration_s: float | None, iterations: int | None,
                  tick: Callable[[], None] | None) -> _Samples:
    warm_up(lambda: _iteration(target), warmup_ms)
    samples: list[float] = []
    begin = time.perf_counter()
    while not _done(target, len(samples), begin, duration_s, iterations):
        t0 = time.perf_counter()
        _iteration(target)
        samples.append((time.perf_counter() - t0) * 1e3)
        if tick is not None and len(samples) % CHUNK == 0:
            tick()
    return _Samples(samples, time.perf_counter() - begin)


def _measure_gpu(target: Target, warmup_ms: float, duration_s: float | None, iterations: int | None,
                 tick: Callable[[], None] | None, track_peak: bool) -> _Samples:
    device = target.device
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    stream.synchronize()
    if track_peak:
        torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    with torch.cuda.stream(stream):
        warm_up(lambda: _iteration(target), warmup_ms, stream.synchronize)
        compute: list[float] = []
        h2d: list[float] = []
        d2h: list[float] = []
        enqueue: list[float] = []
        out = _Samples([], 0.0, compute, h2d, d2h, enqueue)
        begin = time.perf_counter()
        while not _done(target, len(out.total), begin, duration_s, iterations):
            chunk = []
            for _ in range(CHUNK if iterations is None else min(CHUNK, iterations - len(out.total))):
                events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
                events[0].record(stream)
                target.h2d()
                events[1].record(stream)
                t0 = time.perf_counter()
                target.compute()
                enqueue.append((time.perf_counter() - t0) * 1e3)
                events[2].record(stream)
                target.d2h()
                events[3].record(stream)
                chunk.append(events)
            stream.synchronize()
            for e in chunk:
                h2d.append(e[0].elapsed_time(e[1]))
                compute.append(e[1].elapsed_time(e[2]))
                d2h.append(e[2].elapsed_time(e[3]))
                out.total.append(e[0].elapsed_time(e[3]))
            if tick is not None:
                tick()
        out.wall_s = time.perf_counter() - begin
    if track_peak:  # the process's peak allocation over the run, beyond what was allocated before it
        out.peak = max(torch.cuda.max_memory_allocated(device) - baseline, 0)
    return out


def measure_parallel(targets: Sequence[Target], batch: int, *, warmup_ms: float = 200.0,
                     duration_s: float | None = 3.0, iterations: int | None = None,
                     tick: Callable[[], None] | None = None) -> Run:
    """All ``targets`` measured at once, one thread each (each GPU target on its own benchmark
    stream), as execution contexts of one engine serve requests side by side. The latencies of
    every iteration of every target are pooled; throughput is all iterations over the common wall
    time (``iterations``, if given, is per target)."""
    if len(targets) == 1:
        return measure(targets[0], batch, warmup_ms=warmup_ms, duration_s=duration_s, iterations=iterations, tick=tick)
    gpu = targets[0].gpu_timed
    if gpu:
        torch.cuda.synchronize(targets[0].device)
        torch.cuda.reset_peak_memory_stats(targets[0].device)
        baseline = torch.cuda.memory_allocated(targets[0].device)
    results: list[_Samples | None] = [None] * len(targets)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(targets))

    def work(index: int) -> None:
        try:
            barrier.wait()
            results[index] = _samples(targets[index], warmup_ms=warmup_ms, duration_s=duration_s,
                                      iterations=iterations, tick=tick, track_peak=False)
        except BaseException as error:  # noqa: BLE001 - re-raised on the calling thread
            errors.append(error)
            barrier.abort()

    # each thread under the caller's time limit (kiln.deadline): a thread starts without the caller's context
    threads = [threading.Thread(target=contextvars.copy_context().run, args=(work, i)) for i in range(len(targets))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    done = [r for r in results if r is not None]

    def pooled(field: str) -> list[float] | None:
        parts = [getattr(r, field) for r in done]
        return None if any(p is None for p in parts) else [x for p in parts for x in p]

    peak = max(torch.cuda.max_memory_allocated(targets[0].device) - baseline, 0) if gpu else None
    total = [x for r in done for x in r.total]
    merged = _Samples(total, wall, pooled("compute"), pooled("h2d"), pooled("d2h"), pooled("enqueue"), peak)
    # the timed loops overlap but their warm-ups add to the wall time: count the slowest loop's span
    return merged.run(batch, wall_s=max(r.wall_s for r in done))


def time_calls(fn: Callable[[], Any], device: torch.device | str, *, reps: int = 7, warmup_calls: int = 10,
               estimate_calls: int = 5, target_ms: float = 100.0, max_calls: int = 200,
               stream: torch.cuda.Stream | None = None) -> tuple[list[float], int]:
    """Milliseconds per call of ``fn`` in each of ``reps`` repetitions of N back-to-back calls
    (``kiln.timing.repeat_ms``: on CUDA CUDA events on ``stream`` or a new side stream, host launches
    included, as a caller sees them; on a CPU perf_counter), and N. A repetition lasts at least
    ``target_ms``; ``warmup_calls`` calls (the last ``estimate_calls`` of them timed to choose N) come first."""
    return repeat_ms(fn, torch.device(device), reps, warmup_calls=max(0, warmup_calls - estimate_calls),
                     estimate_calls=estimate_calls, target_ms=target_ms, max_calls=max_calls, hide_launch=False,
                     round_up=True, stream=stream)


def spread(a: Run, b: Run) -> float:
    """|median a - median b| / their mean, of the compute latency where both have one."""
    x = (a.compute_ms or a.latency_ms).median
    y = (b.compute_ms or b.latency_ms).median
    mean = (x + y) / 2
    return abs(x - y) / mean if mean > 0 else 0.0


def saturation(points: Sequence[tuple[int, float]], threshold: float = SATURATION_THRESHOLD) -> Saturation:
    """The verdict on a batch sweep of (batch, samples/s) points; see the module docstring."""
    points = sorted(points)
    if len(points) < 2:
        return Saturation("one batch size only: give --batch with several sizes to find where the GPU saturates",
                          None, points[0][0] if points else None, threshold)
    best = max(t for _, t in points)
    knee = next(b for b, t in points if t >= KNEE * best)
    steps = []
    saturated_at = None
    for (b0, t0), (b1, t1) in zip(points, points[1:]):
        batch_ratio, throughput_ratio = b1 / b0, (t1 / t0 if t0 > 0 else float("inf"))
        efficiency = math.log(throughput_ratio) / math.log(batch_ratio) if throughput_ratio > 0 else float("-inf")
        steps.append({"from": b0, "to": b1, "batch_ratio": batch_ratio, "throughput_ratio": throughput_ratio,
                      "efficiency": efficiency})
        if saturated_at is None and efficiency < threshold:
            saturated_at = b0
    if saturated_at is None:
        last = steps[-1]
        verdict = (f"not saturated: throughput still grows with the batch up to {points[-1][0]} (batch "
                   f"x{last['batch_ratio']:g} -> throughput x{last['throughput_ratio']:.2f}); larger batches may raise "
                   "it further")
    else:
        step = next(s for s in steps if s["from"] == saturated_at)
        verdict = (f"saturated from batch {saturated_at}: going to batch {step['to']:g} (x{step['batch_ratio']:g}) "
                   f"raises throughput only x{step['throughput_ratio']:.2f} (efficiency {step['efficiency']:.2f} < "
                   f"{threshold}); 90% of the best throughput ({best:,.0f} samples/s) is reached at batch {knee}")
    return Saturation(verdict, saturated_at, knee, threshold, steps)
