"""Execution contexts on the CPU: results, input checks before anything runs, profiles, bindings,
shape caches, and threads (one context each, and one shared)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kiln
from kiln.errors import InputError, KilnError
from kiln.runtime import ExecutionContext
from kiln.runtime.context import SHAPE_CACHE_SIZE
from tests.runtime.conftest import WIDTH, feeds, reference, runs_that_differ


def _close(got: torch.Tensor, x: np.ndarray) -> None:
    np.testing.assert_allclose(got.numpy(), reference(x), rtol=1e-4, atol=1e-5)


def test_context_runs_the_engine_on_numpy_and_torch_inputs(engine):
    context = engine.create_context()
    assert isinstance(context, ExecutionContext) and context.stream is None
    x = feeds(3, seed=1)
    _close(context.run(x)["y"], x["x"])
    _close(context.run({"x": torch.from_numpy(x["x"])})["y"], x["x"])
    _close(context.run_async(x)["y"], x["x"])
    assert torch.equal(context.run(x)["y"], engine.run(x)["y"])


def test_contexts_share_the_engine_weights(engine):
    a, b = engine.create_context(), engine.create_context()
    assert a.program is b.program is engine.program
    assert engine.weights_bytes == sum(
        t.untyped_storage().nbytes() for t in {id(t): t for t in engine.tensors.values()}.values()
    )
    assert engine.weights_bytes > 0


@pytest.mark.parametrize("bad,message", [
    ({"x": np.zeros((2, WIDTH), np.float32), "extra": np.zeros(1, np.float32)}, "unknown input"),
    ({}, "missing input"),
    ({"x": np.zeros((2, WIDTH), np.float64)}, "dtype double, the engine expects float"),
    ({"x": np.zeros((2, WIDTH, 1), np.float32)}, "rank 3"),
    ({"x": np.zeros((2, WIDTH + 1), np.float32)}, "axis 1 must be 16"),
    ({"x": np.zeros((17, WIDTH), np.float32)}, "fit no optimization profile"),
    ({"x": torch.zeros((2, WIDTH), device="meta")}, "is on meta"),
])
def test_bad_inputs_are_refused_before_anything_runs(engine, bad, message):
    context = engine.create_context()
    with pytest.raises(InputError, match=message):
        context.run(bad)
    with pytest.raises(InputError, match=message):
        context.run_async(bad)
    assert context.stats.eager_runs == 0 and context.stats.first_runs == 0


def test_a_chosen_profile_refuses_shapes_outside_it_naming_input_shape_and_range(engine):
    context = engine.create_context(profile=1)
    with pytest.raises(InputError, match=r"input 'x' has shape \[3, 16\], outside optimization profile 1, which allows "
                                         r"\[5, 16\] to \[16, 16\]"):
        context.run(feeds(3))
    assert context.stats.eager_runs == 0
    x = feeds(9, seed=2)
    _close(context.run(x)["y"], x["x"])
    context.set_profile(0)
    with pytest.raises(InputError, match="outside optimization profile 0"):
        context.run(x)
    _close(context.run(feeds(3))["y"], feeds(3)["x"])
    context.set_profile(None)
    _close(context.run(x)["y"], x["x"])


@pytest.mark.parametrize("profile", [2, -1, "0", True])
def test_an_unknown_profile_is_refused(engine, profile):
    with pytest.raises(KilnError, match="no optimization profile"):
        engine.create_context(profile=profile)
    context = engine.create_context()
    with pytest.raises(KilnError, match="no optimization profile"):
        context.set_profile(profile)


def test_gpu_only_options_are_refused_on_the_cpu(engine):
    with pytest.raises(KilnError, match="CUDA graphs need an engine built for CUDA"):
        engine.create_context(cuda_graph=True)
    context = engine.create_context()
    with pytest.raises(KilnError, match="no streams"):
        context.run_async(feeds(2), stream=object())
    for bad in ({"graph_cache_size": 0}, {"aux_streams": -1}):
        with pytest.raises(KilnError):
            engine.create_context(**bad)


def test_shape_arithmetic_is_computed_once_per_shape_and_the_cache_is_bounded(engine):
    context = engine.create_context()
    for _ in range(3):
        context.run(feeds(2))
    assert context.stats.first_runs == 1 and context.stats.eager_runs == 3
    context.run(feeds(3))
    assert context.stats.first_runs == 2
    for batch in range(5, 5 + SHAPE_CACHE_SIZE):
        if batch <= 16:
            context.run(feeds(batch))
    assert context.cached_shapes <= SHAPE_CACHE_SIZE


def test_bound_tensors_are_read_and_written_in_place(engine):
    context = engine.create_context()
    x = torch.from_numpy(feeds(4, seed=3)["x"].copy())
    y = torch.empty((4, 4, 4))
    context.bind({"x": x}, {"y": y})
    out = context.execute()
    assert out["y"] is y
    _close(y, x.numpy())
    x.copy_(torch.from_numpy(feeds(4, seed=4)["x"]))  # new data, same tensor
    context.execute_async()
    _close(y, x.numpy())


def test_bindings_are_checked(engine):
    context = engine.create_context()
    with pytest.raises(KilnError, match="call bind"):
        context.execute()
    x = torch.from_numpy(feeds(4)["x"])
    with pytest.raises(InputError, match="unknown output"):
        context.bind({"x": x}, {"z": torch.empty(1)})
    with pytest.raises(InputError, match="dtype"):
        context.bind({"x": x}, {"y": torch.empty((4, 4, 4), dtype=torch.float64)})
    with pytest.raises(InputError, match="contiguous"):
        context.bind({"x": x}, {"y": torch.empty((4, 4, 8))[..., ::2]})
    with pytest.raises(InputError, match="dtype"):
        context.bind({"x": x.double()})
    context.bind({"x": x}, {"y": torch.empty((2, 4, 4))})
    with pytest.raises(InputError, match=r"bound output 'y' has shape \[2, 4, 4\], this run writes \[4, 4, 4\]"):
        context.execute()


def test_eight_threads_with_a_context_each(engine):
    """8 threads x 100 runs, each thread its own context and its own inputs; every output equals the
    single-thread result for those inputs."""
    inputs = [feeds(1 + t % 4, seed=100 + t) for t in range(8)]
    expected = [engine.create_context().run(x)["y"] for x in inputs]
    assert runs_that_differ(lambda t: engine.create_context(), inputs, expected, 100, torch.equal) == []


def test_threads_sharing_one_context_take_turns(engine):
    context = engine.create_context()
    inputs = [feeds(1 + t % 4, seed=200 + t) for t in range(8)]
    expected = [engine.create_context().run(x)["y"] for x in inputs]
    assert runs_that_differ(lambda t: context, inputs, expected, 25, torch.equal) == []


def test_a_call_from_inside_a_running_context_is_refused(engine):
    context = engine.create_context()
    context.run(feeds(2))  # the profiler is called on runs after the first at a shape, inside the call

    def reenter(layer, ms):
        context.run(feeds(2))

    context.profiler = reenter
    with pytest.raises(KilnError, match="already running on this thread"):
        context.run(feeds(2))
    context.profiler = None
    _close(context.run(feeds(2))["y"], feeds(2)["x"])


def test_engine_run_uses_one_default_context(engine):
    x = feeds(2, seed=9)
    assert torch.equal(engine.run(x)["y"], engine.run(x)["y"])
    assert engine.graph_errors == []
    assert engine.default_context() is engine.default_context()


def test_loaded_engine_contexts(engine, tmp_path):
    engine.save(tmp_path / "e.kiln")
    loaded = kiln.load_engine(tmp_path / "e.kiln")
    x = feeds(6, seed=5)
    assert torch.equal(loaded.create_context(profile=1).run(x)["y"], engine.create_context().run(x)["y"])


def _if_model():
    """y = If(c, then: x + 1, else: x * 3): both branches read x from the enclosing scope."""
    from onnx import TensorProto, helper

    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    three = helper.make_tensor("three", TensorProto.FLOAT, [], [3.0])
    out = [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 4])]
    then = helper.make_graph(
        [helper.make_node("Constant", [], ["k"], value=one), helper.make_node("Add", ["x", "k"], ["t"])],
        "then",
        [],
        out,
    )
    out_else = [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 4])]
    other = helper.make_graph(
        [helper.make_node("Constant", [], ["k3"], value=three), helper.make_node("Mul", ["x", "k3"], ["e"])],
        "else",
        [],
        out_else,
    )
    graph = helper.make_graph([helper.make_node("Relu", ["x0"], ["x"]),
                               helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                              "if", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["N", 4]),
                                     helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_threads_running_control_flow_keep_their_own_scopes():
    """An If node's branches read x from the enclosing scope; contexts in 8 threads run it at once,
    each with its own x and condition, and each sees its own."""
    from kiln.builder import BuildConfig, Profile

    model = kiln.load_model_proto(_if_model(), name="if")
    profile = Profile.from_lists({"x0": (1, 4)}, {"x0": (2, 4)}, {"x0": (8, 4)})
    engine = kiln.build(model, BuildConfig(device="cpu", opt_level=0, profiles=[profile]))
    rng = np.random.default_rng(5)
    inputs = [
        {"x0": rng.standard_normal((1 + t % 8, 4)).astype(np.float32), "c": np.array(t % 2 == 0)} for t in range(8)
    ]
    expected = [np.maximum(f["x0"], 0) + 1 if f["c"] else np.maximum(f["x0"], 0) * 3 for f in inputs]

    def same(got, want) -> bool:
        return got.shape == want.shape and np.allclose(got.numpy(), want, rtol=1e-6)

    assert runs_that_differ(lambda t: engine.create_context(), inputs, expected, 200, same) == []


def test_profiler_reports_every_layer_that_runs(engine):
    context = engine.create_context()
    times: list[tuple[str, float]] = []
    context.run(feeds(2))  # the first run at a shape also computes the shape arithmetic: not reported
    context.profiler = lambda layer, ms: times.append((layer, ms))
    x = feeds(2, seed=8)
    _close(context.run(x)["y"], x["x"])
    lean = [step.name for step in engine.program.lean[0]]
    assert [name for name, _ in times] == lean
    assert "shape" not in lean and all(ms >= 0 for _, ms in times)
    context.profiler = None
    context.run(x)
    assert len(times) == len(lean)


def test_warm_up_caches_a_shape_before_the_first_real_call(engine):
    context = engine.create_context(profile=1)
    context.warm_up({"x": (8, WIDTH)})
    assert context.stats.first_runs == 1
    x = feeds(8, seed=10)
    _close(context.run(x)["y"], x["x"])
    assert context.stats.first_runs == 1  # the real call found the shape warm
    with pytest.raises(InputError, match="dynamic dimensions"):
        context.warm_up()
    with pytest.raises(InputError, match="unknown input"):
        context.warm_up({"x": (8, WIDTH), "z": (1,)})
    with pytest.raises(InputError, match="outside optimization profile 1"):
        context.warm_up({"x": (2, WIDTH)})


def test_which_layers_read_torchs_process_wide_switches():
    from kiln.runtime.program import layer_reads_torch_flags

    def layer(kind, precision, op="MatMul"):
        return {"kind": kind, "precision": precision, "op_types": [op]}

    assert layer_reads_torch_flags(layer("Conv", "fp16", "Conv"))  # cuDNN's benchmark switch picks its algorithm
    assert layer_reads_torch_flags(layer("Gemm", "fp32"))
    assert layer_reads_torch_flags(layer("Attention", "tf32", "Softmax"))
    assert layer_reads_torch_flags(layer("Node", "fp32", "Einsum"))
    assert layer_reads_torch_flags(layer("Node", "fp32", "Loop"))
    assert not layer_reads_torch_flags(layer("Gemm", "fp16"))
    assert not layer_reads_torch_flags(layer("Node", "fp32", "Gather"))
    assert layer_reads_torch_flags(layer("Node", "tf32", "Gather"))
    assert not layer_reads_torch_flags(layer("Pointwise", "fp32", "Add"))
    assert not layer_reads_torch_flags(layer("LayerNorm", "fp32"))
