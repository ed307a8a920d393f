"""kiln bench on a model whose inputs do not all batch on axis 0 (silero VAD's shape): x[batch, 8],
a state batched on axis 1, state[2, batch, 4], and a scalar sample rate. The inputs that batch grow
along their own batch axis, the scalar passes through as given, and the reference still agrees."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.bench.batching import batch_axes
from kiln.bench.options import BenchOptions, parse_batch_axes
from kiln.bench.run import run_bench
from kiln.cli import main
from kiln.errors import KilnError
from kiln.inputs import write_npz

QUICK = {"warmup_ms": 0.0, "duration_s": None, "iterations": 3, "repeats": 1}


def _stateful(batch: str | None = "batch") -> onnx.ModelProto:
    """out = x @ W + sum(state, axis 0) * sr; new_state = state * sr. ``batch=None``: the batch dims
    are unnamed (spox writes them so)."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("ReduceSum", ["state", "axis0"], ["s"], keepdims=0),
        helper.make_node("Cast", ["sr"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["s", "f"], ["sf"]),
        helper.make_node("Add", ["m", "sf"], ["out"]),
        helper.make_node("Mul", ["state", "f"], ["new_state"]),
    ]
    graph = helper.make_graph(
        nodes, "stateful",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, batch, 4]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 4]),
         helper.make_tensor_value_info("new_state", TensorProto.FLOAT, [2, batch, 4])],
        [w, numpy_helper.from_array(np.array([0], np.int64), "axis0")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("batch_axes") / "stateful.onnx"
    onnx.save(_stateful(), path)
    return path


@pytest.fixture
def seen(monkeypatch):
    """The feeds kiln's target is set up with, one dict per batch size."""
    from kiln.bench import targets

    feeds: list[dict[str, np.ndarray]] = []
    original = targets.KilnTarget.setup
    monkeypatch.setattr(targets.KilnTarget, "setup", lambda self, f: (feeds.append(dict(f)), original(self, f))[1])
    return feeds


def _shapes(feeds):
    return {name: tuple(array.shape) for name, array in feeds.items()}


def test_the_shared_symbolic_dim_batches_the_state_on_axis_1_and_the_scalar_passes_through(model_path, seen):
    options = BenchOptions(batches=[1, 2], build=kiln.BuildConfig(device="cpu", opt_level=0), peers=["onnxruntime"],
                           **QUICK)
    result = run_bench(model_path, options)
    assert [_shapes(f) for f in seen] == [{"x": (1, 8), "state": (2, 1, 4), "sr": ()},
                                          {"x": (2, 8), "state": (2, 2, 4), "sr": ()}]
    assert result.batches == [1, 2] and result.config["batch_axes"] == {"x": 0, "state": 1}
    note = next(n for n in result.notes if n.startswith("batch axes"))
    assert "'batch' that 2 inputs share" in note and "x:0, state:1" in note and "as given: sr" in note
    for row in result.rows:
        assert row.error is None and row.ref_rel_diff < 1e-4
    assert result.row("onnxruntime", 2).max_rel_diff < 1e-4


def test_real_inputs_repeat_along_each_batch_axis_and_a_scalar_is_used_as_given(model_path, seen):
    state = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    options = BenchOptions(batches=[2, 5], batch_axes={"x": 0, "state": 1},
                           inputs={"sr": np.array(16000), "state": state},
                           build=kiln.BuildConfig(device="cpu", opt_level=0), **QUICK)
    result = run_bench(model_path, options)
    np.testing.assert_array_equal(seen[0]["state"], state[:, :2])
    np.testing.assert_array_equal(seen[1]["state"], state[:, [0, 1, 2, 0, 1]])
    assert all(f["sr"].shape == () and f["sr"] == 16000 for f in seen)
    assert "batch axes (--batch-axes): x:0, state:1; as given: sr" in " ".join(result.notes)
    assert all(row.ref_rel_diff < 1e-4 for row in result.rows)
    with pytest.raises(KilnError, match="give one of the two"):
        run_bench(model_path, replace(options, shapes={"state": (3, 1, 4)}))


def test_unnamed_batch_dims_batch_axis_0_by_default_and_take_batch_axes(tmp_path, seen):
    path = tmp_path / "unnamed.onnx"
    onnx.save(_stateful(batch=None), path)
    model = kiln.load_model(path)
    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    axes, note = batch_axes(inputs, BenchOptions(batches=[2]))
    assert axes == {"x": 0} and "axis 0 of each input whose axis 0 is dynamic" in note and "as given: state, sr" in note
    options = BenchOptions(batches=[2], build=kiln.BuildConfig(device="cpu", opt_level=0), **QUICK)
    with pytest.raises(KilnError, match=r"input .state. has dynamic dimensions \(2x\?x4\).*--shapes state:2xNx4, or "
                                        r"batch it with --batch-axes state:AXIS"):
        run_bench(path, options)
    run_bench(path, replace(options, batch_axes={"x": 0, "state": -2}))
    assert _shapes(seen[0]) == {"x": (2, 8), "state": (2, 2, 4), "sr": ()}


def test_an_engine_batches_as_its_model_does(model_path, seen):
    profiles = [kiln.Profile.from_lists(*({"x": (b, 8), "state": (2, b, 4)} for b in (1, 2, 4)))]
    engine = kiln.build(model_path, kiln.BuildConfig(device="cpu", opt_level=0, profiles=profiles))
    result = run_bench(engine, BenchOptions(batches=[3], onnx=model_path, **QUICK))
    assert _shapes(seen[0]) == {"x": (3, 8), "state": (2, 3, 4), "sr": ()}
    assert result.config["batch_axes"] == {"x": 0, "state": 1} and result.row("kiln", 3).ref_rel_diff < 1e-4


def test_static_models_batch_axis_0_at_their_own_size():
    fixed = kiln.load_model_proto(_stateful(batch=2))
    inputs = [v for v in fixed.graph.inputs if not v.is_initializer()]
    axes, note = batch_axes(inputs, BenchOptions(batches=[2]))
    assert axes == {"x": 0, "state": 0} and "none has a dynamic batch dim" in note


@pytest.mark.parametrize("axes,message", [
    ({"y": 0}, r"unknown input\(s\) \['y'\]"),
    ({"state": 3}, "batch axis 3, but it has rank 3"),
    ({"sr": 0}, "a scalar does not batch"),
])
def test_batch_axes_that_cannot_be_are_refused(model_path, axes, message):
    model = kiln.load_model(model_path)
    with pytest.raises(KilnError, match=message):
        batch_axes([v for v in model.graph.inputs if not v.is_initializer()],
                   BenchOptions(batches=[2], batch_axes=axes))


def test_parse_batch_axes():
    assert parse_batch_axes("input:0, state:1,a:b:-1") == {"input": 0, "state": 1, "a:b": -1}
    assert parse_batch_axes(None) == {}
    for bad in ("state", "state:x", ":1"):
        with pytest.raises(KilnError, match="is not NAME:AXIS"):
            parse_batch_axes(bad)


def test_cli_batch_axes_and_a_scalar_from_inputs(model_path, tmp_path, capsys):
    npz = tmp_path / "sr.npz"
    write_npz(npz, {"sr": np.array(16000, np.int64)})
    assert main(["bench", str(model_path), "--device", "cpu", "--batch", "1,2", "--inputs", str(npz),
                 "--batch-axes", "x:0,state:1", "--iterations", "3", "--warmup-ms", "0", "--repeats", "1",
                 "--opt-level", "0"]) == 0
    assert "batch axes (--batch-axes): x:0, state:1; as given: sr" in " ".join(capsys.readouterr().out.split())
    assert main(["bench", str(model_path), "--device", "cpu", "--batch", "2", "--batch-axes", "state"]) == 2
    assert "is not NAME:AXIS" in capsys.readouterr().err


def test_the_build_runs_the_model_on_the_given_inputs(tmp_path):
    """A model that branches on its sample rate: only 16000 takes the branch that works for these
    shapes, so a build on random inputs (sr in [0, 2)) fails and one on --inputs does not."""
    then = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["rows", "cols"])])
    other = helper.make_graph([helper.make_node("Reshape", ["x", "three"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["rows", "cols"])])
    graph = helper.make_graph(
        [helper.make_node("Equal", ["sr", "rate"], ["is16k"]),
         helper.make_node("If", ["is16k"], ["y"], then_branch=then, else_branch=other)],
        "branches_on_sr",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", "cols"])],
        [numpy_helper.from_array(np.array(16000, np.int64), "rate"),
         numpy_helper.from_array(np.array([-1, 3], np.int64), "three")],
    )
    path = tmp_path / "branches_on_sr.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    options = BenchOptions(batches=[1], build=kiln.BuildConfig(device="cpu", opt_level=0), **QUICK)
    with pytest.raises(KilnError, match="Reshape"):
        run_bench(path, options)
    result = run_bench(path, replace(options, inputs={"sr": np.array(16000, np.int64)}))
    assert result.row("kiln", 1).ref_rel_diff == 0.0
