"""Execution contexts on the GPU: own streams (never the default one), CUDA graphs per shape in an
LRU cache, copy-free bound replay, run_async without host synchronization, auxiliary streams equal to
one stream, and threads. Skipped without a GPU; run on the lent GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.errors import InputError
from tests.runtime.conftest import build_branches, feeds, reference, runs_that_differ

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def gpu_engine():
    return build_branches("cuda", aux=2)


def _close(got: torch.Tensor, x: np.ndarray) -> None:
    assert got.device.type == "cuda"
    np.testing.assert_allclose(got.cpu().numpy(), reference(x), rtol=1e-4, atol=1e-5)


def test_graph_captured_on_the_first_run_and_replayed_after(gpu_engine):
    context = gpu_engine.create_context(cuda_graph=True)
    x = feeds(3, seed=1)
    for _ in range(3):
        _close(context.run(x)["y"], x["x"])
    assert context.graph_errors == []
    assert context.stats.first_runs == 1 and context.stats.captures == 1 and context.stats.replays == 2


def test_graph_cache_is_an_lru_and_shapes_outside_it_are_captured_anew(gpu_engine):
    context = gpu_engine.create_context(cuda_graph=True, graph_cache_size=2)
    for batch in (1, 2, 3, 1, 2):
        x = feeds(batch, seed=batch)
        _close(context.run(x)["y"], x["x"])
    assert context.cached_graphs == 2
    assert context.stats.evictions >= 2
    assert context.stats.captures == 5  # 1, 2, 3, then 1 and 2 again after eviction


def test_every_kernel_runs_on_the_context_stream_not_the_default(gpu_engine):
    context = gpu_engine.create_context(aux_streams=0)
    seen: list[torch.cuda.Stream] = []
    step = gpu_engine.program.lean[0][0]
    original = step.run

    def spy(inputs):
        seen.append(torch.cuda.current_stream())
        return original(inputs)

    step.run = spy
    try:
        context.run(feeds(2))
        context.run(feeds(2))
    finally:
        step.run = original
    default = torch.cuda.default_stream()
    assert seen and all(s != default for s in seen)
    assert all(s == context.stream for s in seen)


def test_bound_buffers_replay_without_copies(gpu_engine):
    context = gpu_engine.create_context(cuda_graph=True)
    x = torch.from_numpy(feeds(4, seed=3)["x"]).cuda()
    y = torch.empty((4, 4, 4), device="cuda")
    context.bind({"x": x}, {"y": y})
    for seed in (3, 4, 5):
        x.copy_(torch.from_numpy(feeds(4, seed=seed)["x"]))
        out = context.execute()
        assert out["y"] is y
        _close(y, feeds(4, seed=seed)["x"])
    assert context.stats.captures == 1 and context.stats.replays == 2
    with pytest.raises(InputError, match="must be on the engine's device"):
        context.bind({"x": x.cpu()})


def test_run_async_queues_on_the_callers_stream(gpu_engine):
    context = gpu_engine.create_context(cuda_graph=True)
    caller = torch.cuda.Stream()
    x = torch.from_numpy(feeds(2, seed=6)["x"]).cuda()
    with torch.cuda.stream(caller):
        outs = [context.run_async({"x": x}, stream=caller)["y"] for _ in range(3)]
        host = context.run_async(feeds(2, seed=6), stream=caller)["y"]  # numpy input: pinned, async copy
    caller.synchronize()
    for y in outs + [host]:
        _close(y, feeds(2, seed=6)["x"])


def test_aux_streams_give_the_single_stream_results(gpu_engine):
    single = gpu_engine.create_context(aux_streams=0)
    several = gpu_engine.create_context()
    graphed = gpu_engine.create_context(cuda_graph=True)
    assert several.aux_streams == 2 and single.aux_streams == 0
    for batch in (1, 4, 8, 16):
        x = feeds(batch, seed=batch)
        expected = single.run(x)["y"]
        for _ in range(3):
            assert torch.equal(several.run(x)["y"], expected)
            assert torch.equal(graphed.run(x)["y"], expected)
    assert graphed.graph_errors == []


def test_inputs_on_another_gpu_are_refused(gpu_engine):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    with pytest.raises(InputError, match="is on cuda:1"):
        gpu_engine.create_context().run({"x": torch.zeros((2, 16), device="cuda:1")})


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_eight_threads_with_a_context_each_on_the_gpu(gpu_engine, cuda_graph):
    inputs = [feeds(1 + t % 4, seed=300 + t) for t in range(8)]
    expected = [gpu_engine.create_context(aux_streams=0).run(x)["y"] for x in inputs]
    assert runs_that_differ(lambda t: gpu_engine.create_context(cuda_graph=cuda_graph), inputs, expected, 100,
                            torch.equal) == []


def test_threads_sharing_one_gpu_context_take_turns(gpu_engine):
    context = gpu_engine.create_context(cuda_graph=True)
    inputs = [feeds(1 + t % 4, seed=400 + t) for t in range(8)]
    expected = [gpu_engine.create_context(aux_streams=0).run(x)["y"] for x in inputs]
    assert runs_that_differ(lambda t: context, inputs, expected, 25, torch.equal) == []


def test_profiler_runs_layer_by_layer_and_times_each(gpu_engine):
    context = gpu_engine.create_context(cuda_graph=True)
    x = feeds(4, seed=9)
    context.run(x)
    times: list[tuple[str, float]] = []
    context.profiler = lambda layer, ms: times.append((layer, ms))
    _close(context.run(x)["y"], x["x"])
    assert [name for name, _ in times] == [step.name for step in gpu_engine.program.lean[0]]
    assert all(ms > 0 for _, ms in times)
    assert context.stats.replays == 0
    context.profiler = None
    _close(context.run(x)["y"], x["x"])
    assert context.stats.replays == 1


def test_a_warmed_context_replays_on_its_first_real_call(gpu_engine):
    context = gpu_engine.create_context(cuda_graph=True, profile=1)
    context.warm_up({"x": (8, 16)})
    assert context.stats.captures == 1
    x = feeds(8, seed=11)
    _close(context.run(x)["y"], x["x"])
    assert context.stats.replays == 1 and context.stats.first_runs == 1
