"""kiln.timing: the one place that times a call (host-timed here; CUDA events on the GPU)."""

from __future__ import annotations

import time

import pytest
import torch

from kiln.timing import median_ms, repeat_ms, warm_up


def test_median_ms_of_a_sleeping_call():
    ms = median_ms(lambda: time.sleep(0.001), torch.device("cpu"), reps=3)
    assert 1.0 <= ms < 50.0


def test_repeat_ms_runs_warm_up_estimate_and_repetitions():
    calls = []
    times, per_repetition = repeat_ms(lambda: calls.append(1), torch.device("cpu"), 4, warmup_calls=3,
                                      estimate_calls=2, target_ms=1e9, max_calls=5)
    assert len(times) == 4 and per_repetition == 5 and len(calls) == 3 + 2 + 4 * 5


def test_warm_up_calls_until_the_time_has_passed():
    start = time.perf_counter()
    synced = []
    calls = warm_up(lambda: time.sleep(0.001), 5.0, sync=lambda: synced.append(1))
    assert (time.perf_counter() - start) * 1e3 >= 5.0 and calls == len(synced) >= 1


@pytest.mark.cuda
def test_median_ms_on_cuda_times_the_gpu():
    x = torch.randn(512, 512, device="cuda")
    assert median_ms(lambda: x @ x, torch.device("cuda"), reps=3) > 0
