"""Control flow in engines: an If whose branches read values from outside it (top-level values,
shape arithmetic, graph inputs, initializers, the enclosing branch's values in a nested If) builds
and runs through every path: the shape recording, the precision walk, the Node layer's captured
inputs, the context's per-shape caches, stream scheduling and CUDA graphs. And a model that needs a
real value for a scalar integer input (a sample rate) fails the build in one line that says which
input got random values and to pass ``--inputs``."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import kiln
from kiln.builder import BuildConfig, Profile
from kiln.cli import main
from kiln.compare import run_onnxruntime
from kiln.errors import KilnError
from kiln.precision import judge, tolerance
from tests.builder.graphs import outer_scope_if_model

PROFILE = Profile.from_lists({"x": (1, 4)}, {"x": (2, 4)}, {"x": (6, 4)})
SR16K = {"sr": np.array(16000, np.int64)}


def _feeds(n: int, sr: int, c: bool, seed: int = 0) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)
    return {"x": x, "sr": np.array(sr, np.int64), "c": np.array(c)}


# every path through the model: both nested branches at 16 kHz, the 8 kHz branch where 4N % 3 == 0
CASES = [(2, 16000, True), (2, 16000, False), (5, 16000, True), (3, 8000, True), (6, 8000, False), (2, 16000, True)]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("if") / "outer_scope_if.onnx"
    onnx.save(outer_scope_if_model(), path)
    return path


def _model():
    return kiln.load_model_proto(outer_scope_if_model(), name="outer_scope_if")


def _check_engine(engine, model_file, precision: str = "fp32", device: str = "cpu", **context):
    ctx = engine.create_context(**context)
    for n, sr, c in CASES:  # shapes and branches alternate: the per-shape caches serve each one
        feeds = _feeds(n, sr, c, seed=n)
        got = ctx.run(feeds)["y"].cpu().numpy()
        ref = run_onnxruntime(model_file, feeds)["y"]
        assert judge(got, ref, tolerance(precision)).ok, (n, sr, c)
    return ctx


@pytest.mark.parametrize("level", [0, 3])
def test_if_reading_outer_values_builds_and_runs(model_file, tmp_path, level):
    engine = kiln.build(_model(), BuildConfig(device="cpu", opt_level=level, profiles=[PROFILE]), calibration=SR16K)
    branch = next(layer for layer in engine.plan["layers"] if layer["op_types"] == ["If"])
    assert branch["attrs"]["captured"] == ["c", "h", "x", "xs"]  # runtime values the branches read
    assert branch["attrs"]["captured_weights"] == ["frames", "k", "w"]
    assert set(branch["inputs"]) == {"eq", "c", "h", "x", "xs"}
    _check_engine(engine, model_file)
    engine.save(tmp_path / "if.kiln")
    _check_engine(kiln.load_engine(tmp_path / "if.kiln"), model_file)


def test_fp16_build_keeps_control_flow_in_fp32(model_file):
    """The branches' weights are captured as they are: the If runs in fp32 in a reduced-precision build."""
    engine = kiln.build(
        _model(), BuildConfig(device="cpu", fp16=True, opt_level=1, profiles=[PROFILE]), calibration=SR16K
    )
    precisions = {layer["op_types"][0]: layer["precision"] for layer in engine.plan["layers"]}
    assert precisions["If"] == "fp32"
    _check_engine(engine, model_file, "fp16")


def test_a_captured_value_from_another_stream_is_waited_for():
    """h (Relu) and eq (Equal) are independent, so they land on two streams; the If follows eq on its
    stream and reads h only through its branches: it must wait for h's stream all the same."""
    engine = kiln.build(_model(), BuildConfig(device="cpu", opt_level=0, profiles=[PROFILE], max_aux_streams=2),
                        calibration=SR16K)
    layers = engine.plan["layers"]
    index = {layer["op_types"][0]: i for i, layer in enumerate(layers)}
    relu, branch = index["Relu"], index["If"]  # Relu and Mul: one pointwise layer
    assert layers[relu]["stream"] != layers[branch]["stream"]
    recorded = engine.program.steps[0][relu].record
    assert recorded is not None and recorded in engine.program.steps[0][branch].waits


def test_random_inputs_the_model_cannot_take_fail_in_one_line():
    with pytest.raises(KilnError) as caught:
        kiln.build(_model(), BuildConfig(device="cpu", opt_level=1, profiles=[PROFILE]))
    message = str(caught.value)
    assert "\n" not in message
    assert "the model failed on the build's random inputs" in message
    assert "node 'branch' (op If)" in message and "(op Reshape)" in message and "invalid for input of size 8" in message
    assert "sr (int64 scalar, integers in [0, 2))" in message and "c (bool scalar, coin flips)" in message
    assert "x (" not in message  # float inputs are not the suspects while integer ones are
    assert "--inputs FILE.npz" in message


def test_cli_build_without_inputs_exits_2_and_with_them_builds(model_file, tmp_path, capsys):
    engine = tmp_path / "if.kiln"
    shapes = ["--min-shapes", "x:1x4", "--opt-shapes", "x:2x4", "--max-shapes", "x:6x4"]
    base = ["build", str(model_file), "-o", str(engine), "--device", "cpu", "--opt-level", "1", "--quiet", *shapes]
    assert main(base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "random inputs" in err[0] and "sr (int64 scalar" in err[0] and "--inputs" in err[0]
    assert not engine.exists()
    inputs = tmp_path / "sr16k.npz"
    np.savez(inputs, **SR16K)
    assert main([*base, "--inputs", str(inputs)]) == 0
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, **_feeds(2, 16000, False))
    capsys.readouterr()
    assert (
        main(["run", str(engine), "--inputs", str(feeds), "--compare", "onnxruntime", "--onnx", str(model_file)]) == 0
    )


@pytest.mark.cuda
def test_if_reading_outer_values_on_cuda_with_graphs_and_streams(model_file):
    """On the GPU the If reads its condition on the host, so its graph is not captured: the context
    says so and runs the plan eagerly, on two streams, with the right results."""
    engine = kiln.build(_model(), BuildConfig(device="cuda", opt_level=1, profiles=[PROFILE], max_aux_streams=2),
                        calibration=SR16K)
    ctx = _check_engine(engine, model_file, cuda_graph=True)
    assert ctx.stats.failed_captures >= 1 and ctx.graph_errors
    _check_engine(engine, model_file, aux_streams=2)


def test_calibration_inputs_serve_every_profile_they_fit(model_file):
    """x is given at the first profile's opt shape: the second profile records its shapes on random
    x but on the given sr (a scalar fits every profile), so its run takes the 16 kHz branch too."""
    second = Profile.from_lists({"x": (4, 4)}, {"x": (5, 4)}, {"x": (6, 4)})
    calibration = {**SR16K, "x": _feeds(2, 16000, True)["x"], "c": np.array(True)}
    engine = kiln.build(
        _model(), BuildConfig(device="cpu", opt_level=1, profiles=[PROFILE, second]), calibration=calibration
    )
    assert len(engine.plan["layers"][0]["choices"]) == 2
    _check_engine(engine, model_file)
