"""kiln.bench.measure and results: percentiles, timed loops (host-timed here; CUDA ones on the GPU),
several targets at once, repeat spread, and the saturation verdict on hand-made sweeps."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from kiln.bench.measure import measure, measure_parallel, saturation, spread, time_calls
from kiln.bench.results import Stats
from kiln.bench.targets import Target


class Sleeper(Target):
    """A host-timed target whose compute takes ``ms`` milliseconds (a test double for the loop)."""

    def __init__(self, ms: float) -> None:
        self.name, self.ms, self.calls = f"sleep{ms}", ms, {"h2d": 0, "compute": 0, "d2h": 0}

    def setup(self, feeds):
        pass

    def h2d(self):
        self.calls["h2d"] += 1

    def compute(self):
        self.calls["compute"] += 1
        time.sleep(self.ms / 1e3)

    def d2h(self):
        self.calls["d2h"] += 1

    def outputs(self):
        return {}


def test_stats_match_numpy_percentiles():
    samples = list(np.random.default_rng(0).exponential(2.0, size=997))
    stats = Stats.of(samples)
    assert stats.count == 997 and stats.min == min(samples)
    for name, q in (("median", 50), ("p90", 90), ("p95", 95), ("p99", 99)):
        assert getattr(stats, name) == pytest.approx(float(np.percentile(samples, q)))
    assert stats.mean == pytest.approx(float(np.mean(samples)))
    with pytest.raises(ValueError):
        Stats.of([])


def test_a_fixed_number_of_iterations_each_with_all_three_parts():
    target = Sleeper(2.0)
    run = measure(target, batch=4, warmup_ms=0, iterations=25)
    assert run.iterations == 25 and run.latency_ms.count == 25
    assert run.latency_ms.min >= 2.0 and run.compute_ms is None and run.h2d_ms is None
    assert target.calls["h2d"] == target.calls["compute"] == target.calls["d2h"] >= 25
    assert run.samples_per_s == pytest.approx(4 * run.inferences_per_s)
    assert run.inferences_per_s == pytest.approx(25 / run.wall_s)
    assert run.inferences_per_s < 1000 / 2.0


def test_warm_up_and_duration():
    target = Sleeper(1.0)
    start = time.perf_counter()
    run = measure(target, batch=1, warmup_ms=50, duration_s=0.2)
    assert time.perf_counter() - start >= 0.25
    assert run.wall_s >= 0.2 and target.calls["compute"] > run.iterations  # the warm-up ran too


def test_bad_loop_settings_are_refused():
    with pytest.raises(ValueError):
        measure(Sleeper(0), batch=1, iterations=0)
    with pytest.raises(ValueError):
        measure(Sleeper(0), batch=1, duration_s=0)


def test_parallel_targets_pool_latencies_and_add_throughput():
    targets = [Sleeper(5.0) for _ in range(3)]
    run = measure_parallel(targets, batch=2, warmup_ms=0, iterations=10)
    assert run.iterations == 30 and run.latency_ms.count == 30
    assert run.samples_per_s == pytest.approx(2 * run.inferences_per_s)
    alone = measure(Sleeper(5.0), batch=2, warmup_ms=0, iterations=10)
    assert run.inferences_per_s > 1.5 * alone.inferences_per_s  # sleeping threads overlap


def test_spread_is_relative():
    a = measure(Sleeper(1.0), batch=1, warmup_ms=0, iterations=5)
    assert spread(a, a) == 0.0
    b = measure(Sleeper(3.0), batch=1, warmup_ms=0, iterations=5)
    assert 0.5 < spread(a, b) < 1.5


def test_saturation_found_where_throughput_stops_growing():
    # throughput doubles up to batch 16, then grows 7% and 3% per doubling
    points = [(1, 100.0), (2, 200.0), (4, 400.0), (8, 790.0), (16, 1540.0), (32, 1650.0), (64, 1700.0)]
    verdict = saturation(points)
    assert verdict.saturated_at == 16
    assert verdict.knee_batch == 16  # 1540 >= 0.9 * 1700
    assert "saturated from batch 16" in verdict.verdict and "x1.07" in verdict.verdict
    assert len(verdict.steps) == 6 and verdict.steps[0]["efficiency"] == pytest.approx(1.0)


def test_saturation_not_reached_and_single_batch():
    verdict = saturation([(1, 10.0), (8, 75.0), (64, 560.0)])
    assert verdict.saturated_at is None and verdict.verdict.startswith("not saturated")
    one = saturation([(8, 10.0)])
    assert one.saturated_at is None and "one batch size" in one.verdict


def test_saturation_when_throughput_falls():
    verdict = saturation([(1, 100.0), (4, 390.0), (16, 300.0)])
    assert verdict.saturated_at == 4 and verdict.steps[1]["efficiency"] < 0


@pytest.mark.cuda
def test_gpu_loop_times_each_part_with_events():
    class Copy(Target):
        name, device, gpu_timed = "copy", torch.device("cuda"), True

        def setup(self, feeds):
            self.host = torch.randn(1 << 20).pin_memory()
            self.dev = torch.empty_like(self.host, device="cuda")
            self.out = torch.empty_like(self.host).pin_memory()

        def h2d(self):
            self.dev.copy_(self.host, non_blocking=True)

        def compute(self):
            self.dev.mul_(2)

        def d2h(self):
            self.out.copy_(self.dev, non_blocking=True)

        def outputs(self):
            return {"y": self.out.numpy()}

    target = Copy()
    target.setup({})
    run = measure(target, batch=1, warmup_ms=10, iterations=100)
    assert run.iterations == 100 and run.compute_ms.count == 100
    assert run.h2d_ms.median > 0 and run.d2h_ms.median > 0 and run.enqueue_ms is not None
    assert run.latency_ms.median >= run.compute_ms.median
    np.testing.assert_allclose(target.outputs()["y"], target.host.numpy() * 2)


def test_time_calls_times_back_to_back_calls_on_the_host():
    calls = []

    def sleep():
        calls.append(1)
        time.sleep(0.002)

    times, per_repetition = time_calls(sleep, "cpu", reps=3, warmup_calls=2, estimate_calls=1, target_ms=5.0)
    assert len(times) == 3 and min(times) >= 2.0
    assert 2 <= per_repetition <= 3  # at least 5 ms of 2 ms calls
    assert len(calls) == 2 + 3 * per_repetition
