"""The builder end to end on CPU: exported model families match onnxruntime, reduced precisions fall
back where they overflow, constraints and tactic lists are obeyed, a wrong fast tactic is never chosen."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from families import TEXT, VISION, example_inputs, export_family

import kiln
from kiln.builder import BuildConfig, Profile
from kiln.builder.tactics import base, registry
from kiln.builder.tactics.base import Tactic
from kiln.compare import run_onnxruntime
from kiln.errors import InputError, KilnError
from kiln.precision import scaled_error
from tests.builder.graphs import model, node, weights


def _feeds(family, batch=3, seq=6):
    inputs = example_inputs(family, batch=batch, seq=seq, generator=torch.Generator().manual_seed(11))
    return {k: v.numpy() for k, v in inputs.items()}


def _profile(feeds, min_feeds=None, max_feeds=None):
    shape = lambda f: {k: tuple(v.shape) for k, v in f.items()} if f else None  # noqa: E731
    return Profile.from_lists(shape(min_feeds), shape(feeds), shape(max_feeds))


CASES = [(f, e) for f in sorted(VISION) + sorted(TEXT) for e in ("torchscript", "dynamo")]


@pytest.mark.slow
@pytest.mark.parametrize("family,exporter", CASES, ids=[f"{f}-{e}" for f, e in CASES])
def test_fp32_engine_matches_onnxruntime(tmp_path, family, exporter):
    path = export_family(tmp_path, family, exporter)
    feeds = _feeds(family)
    engine = kiln.build(path, BuildConfig(device="cpu", opt_level=1, profiles=[_profile(feeds)]))
    got = engine.run(feeds)
    for name, ref in run_onnxruntime(path, feeds).items():
        assert scaled_error(got[name].float(), torch.from_numpy(ref).float()) <= 1e-4, name


LOW = [("resnet", "torchscript", "fp16"), ("mobilenet_v3", "dynamo", "fp16"), ("bert", "torchscript", "fp16"),
       ("gpt2", "dynamo", "fp16"), ("convnext", "torchscript", "fp16"), ("resnet", "dynamo", "bf16"),
       ("efficientnet", "torchscript", "bf16")]


@pytest.mark.slow
@pytest.mark.parametrize("family,exporter,precision", LOW, ids=["-".join(c) for c in LOW])
def test_reduced_precision_engine_within_1e_2(tmp_path, family, exporter, precision):
    path = export_family(tmp_path, family, exporter)
    feeds = _feeds(family)
    engine = kiln.build(path, BuildConfig(device="cpu", opt_level=1, profiles=[_profile(feeds)], **{precision: True}))
    assert any(layer["precision"] == precision for layer in engine.plan["layers"])
    got = engine.run(feeds)
    for name, ref in run_onnxruntime(path, feeds).items():
        assert scaled_error(got[name].float(), torch.from_numpy(ref).float()) <= 1e-2, name


def test_dynamic_profiles_pick_tactics_per_profile_and_run_any_shape_inside(tmp_path):
    path = export_family(tmp_path, "bert", "torchscript")
    small, large = _feeds("bert", 1, 4), _feeds("bert", 4, 8)
    profiles = [_profile(small), _profile(large, _feeds("bert", 2, 5), _feeds("bert", 6, 8))]
    engine = kiln.build(path, BuildConfig(device="cpu", opt_level=1, profiles=profiles))
    assert all(len(layer["choices"]) == 2 for layer in engine.plan["layers"])
    assert any(step.static for step in engine.program.steps[0]), "the exported shape arithmetic is cached per shape"
    for feeds in (small, _feeds("bert", 3, 7), small, _feeds("bert", 6, 8), _feeds("bert", 3, 7)):
        got = engine.run(feeds)  # the repeats run on cached shape values
        for name, ref in run_onnxruntime(path, feeds).items():
            assert scaled_error(got[name].float(), torch.from_numpy(ref).float()) <= 1e-4
    with pytest.raises(InputError, match="profile"):
        engine.run(_feeds("bert", 7, 8))


def test_dynamic_input_without_a_profile_is_refused(tmp_path):
    path = export_family(tmp_path, "resnet", "torchscript")
    with pytest.raises(InputError, match="--opt-shapes"):
        kiln.build(path, BuildConfig(device="cpu"))


def _overflow_model(rng):
    """m * 3e4 * 3e4 overflows fp16 (max 65504) but not bf16 or fp32. The two Muls fuse into one
    pointwise layer (computed in fp32 inside), so the overflow shows where its result is stored: b
    is also a graph output."""
    return model(
        [
            node("MatMul", ["x", "w"], ["m"]),
            node("Mul", ["m", "k"], ["a"]),
            node("Mul", ["a", "k"], ["b"]),
            node("Sigmoid", ["b"], ["y"]),
        ],
        [("x", [4, 8])],
        [("y", [4, 16]), ("b", [4, 16])],
        [("w", weights(rng, 8, 16)), ("k", np.array(3e4, np.float32))],
    )


def _check(engine, m, rng, tol):
    feeds = {"x": rng.standard_normal((4, 8)).astype(np.float32)}
    got, ref = engine.run(feeds), kiln.Executor(m).run(feeds)
    for name in ref:
        assert scaled_error(got[name].float(), ref[name].float()) <= tol


@pytest.mark.usefixtures("reduced_precision_kept")
def test_fp16_overflow_falls_back_to_fp32_and_says_so(rng):
    m = _overflow_model(rng)
    engine = kiln.build(m, BuildConfig(device="cpu", fp16=True, opt_level=1))
    precisions = {layer["op_types"][0]: layer["precision"] for layer in engine.plan["layers"]}
    assert precisions["MatMul"] == "fp16" and precisions["Mul"] == "fp32"
    assert any("overflows in fp16; falls back to fp32" in line for line in engine.report.lines)
    _check(engine, m, rng, 1e-2)


@pytest.mark.usefixtures("reduced_precision_kept")
def test_with_bf16_allowed_fp16_overflow_falls_back_to_bf16(rng):
    m = _overflow_model(rng)
    engine = kiln.build(m, BuildConfig(device="cpu", fp16=True, bf16=True, opt_level=1))
    precisions = {layer["op_types"][0]: layer["precision"] for layer in engine.plan["layers"]}
    assert precisions["Mul"] == "bf16" and precisions["MatMul"] == "fp16"
    _check(engine, m, rng, 1e-2)


@pytest.mark.usefixtures("reduced_precision_kept")
def test_without_the_check_fp16_overflows(rng):
    m = _overflow_model(rng)
    engine = kiln.build(m, BuildConfig(device="cpu", fp16=True, opt_level=1, precision_check=False))
    feeds = {"x": rng.standard_normal((4, 8)).astype(np.float32)}
    assert not torch.isfinite(engine.run(feeds)["b"]).all()
    assert not engine.report.fallbacks


def test_layer_precision_constraint_by_op_type_and_node_name(rng):
    m = _overflow_model(rng)
    engine = kiln.build(
        m, BuildConfig(device="cpu", fp16=True, opt_level=1, layer_precisions={"MatMul": "fp32", "y": "fp16"})
    )
    precisions = {layer["nodes"][0]: layer["precision"] for layer in engine.plan["layers"]}
    assert precisions["m"] == "fp32" and precisions["y"] == "fp16"
    with pytest.raises(KilnError, match="neither node names nor op types"):
        kiln.build(m, BuildConfig(device="cpu", fp16=True, layer_precisions={"nosuch": "fp32"}))
    with pytest.raises(KilnError, match="--bf16"):
        kiln.build(m, BuildConfig(device="cpu", fp16=True, layer_precisions={"m": "bf16"}))


def test_strongly_typed_fp16_model_runs_in_fp16(rng):
    from onnx import TensorProto

    m = model(
        [node("MatMul", ["x", "w"], ["m"]), node("Add", ["m", "b"], ["a"]), node("Relu", ["a"], ["y"])],
        [("x", [4, 8])],
        [("y", [4, 16])],
        [("w", weights(rng, 8, 16, dtype=np.float16)), ("b", weights(rng, 16, dtype=np.float16))],
        elem=TensorProto.FLOAT16,
    )
    engine = kiln.build(m, BuildConfig(device="cpu", strongly_typed=True, opt_level=1))
    assert [layer["precision"] for layer in engine.plan["layers"]] == ["fp16"]
    feeds = {"x": rng.standard_normal((4, 8)).astype(np.float16)}
    got, ref = engine.run(feeds), kiln.Executor(m).run(feeds)
    assert got["y"].dtype == torch.float16
    assert scaled_error(got["y"].float(), ref["y"].float()) <= 1e-2
    with pytest.raises(KilnError, match="strongly typed"):
        kiln.build(m, BuildConfig(device="cpu", strongly_typed=True, fp16=True))


@pytest.mark.parametrize("level", range(6))
def test_every_optimization_level_builds_a_correct_engine(rng, level):
    m = _overflow_model(rng)
    engine = kiln.build(m, BuildConfig(device="cpu", opt_level=level))
    assert (engine.report.timed == 0) == (level == 0)
    assert any(f"optimization level {level}: built in" in line for line in engine.report.lines)
    _check(engine, m, rng, 1e-4)


def _conv_model(rng):
    return model(
        [node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), node("Relu", ["c"], ["y"])],
        [("x", [2, 4, 6, 6])],
        [("y", [2, 8, 6, 6])],
        [("w", weights(rng, 8, 4, 3, 3)), ("b", weights(rng, 8))],
    )


def test_tactic_allow_and_deny_lists(rng):
    m = _conv_model(rng)
    engine = kiln.build(
        m, BuildConfig(device="cpu", opt_level=4, allow_tactics=["conv.nhwc"], deny_tactics=["conv.nchw"])
    )
    assert engine.plan["layers"][0]["choices"][0]["tactic"] == "conv.nhwc"
    with pytest.raises(KilnError, match="no tactic is left"):
        kiln.build(m, BuildConfig(device="cpu", opt_level=1, deny_tactics=["conv.nchw", "conv.nhwc"]))
    # on the CPU convolutions are an NHWC region: NCHW is a layout alternative from level 4
    engine = kiln.build(m, BuildConfig(device="cpu", opt_level=1))
    assert engine.plan["layers"][0]["choices"][0]["tactic"] == "conv.nhwc"


class _FastButWrong(Tactic):
    """Claims to be the best conv and computes garbage quickly: the builder must never pick it."""

    name = "conv.fast_but_wrong"
    kind = "Conv"

    def heuristic(self, layer, precision, device):
        return 100

    def runner(self, layer, prepared, precision, config, context):
        return lambda inputs: [torch.zeros(inputs[0].shape[0], 8, *inputs[0].shape[2:], dtype=inputs[0].dtype)]


@pytest.mark.parametrize("level", [0, 3])
def test_a_wrong_fast_tactic_is_never_chosen(rng, monkeypatch, level):
    registry.load_families()
    monkeypatch.setitem(base.TACTICS, "conv.fast_but_wrong", _FastButWrong())
    m = _conv_model(rng)
    engine = kiln.build(m, BuildConfig(device="cpu", opt_level=level))
    layer = engine.plan["layers"][0]
    assert layer["choices"][0]["tactic"] != "conv.fast_but_wrong"
    assert any("conv.fast_but_wrong" in note and "rejected" in note for note in layer["notes"])
    feeds = {"x": rng.standard_normal((2, 4, 6, 6)).astype(np.float32)}
    assert scaled_error(engine.run(feeds)["y"], kiln.Executor(m).run(feeds)["y"]) <= 1e-4


def test_corrupt_timing_cache_is_ignored_with_a_warning(rng, tmp_path):
    cache = tmp_path / "cache.json"
    cache.write_bytes(b'{"format": "kiln-timing-cache", "version": 1, "entries": {"zz": 1')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = kiln.build(_conv_model(rng), BuildConfig(device="cpu", opt_level=1, timing_cache=cache))
    assert any("warning" in line and "timing cache" in line for line in engine.report.lines)
    again = kiln.build(_conv_model(rng), BuildConfig(device="cpu", opt_level=1, timing_cache=cache))
    assert again.report.timed == 0 and again.report.cache_hits > 0


def test_calibration_inputs_must_have_the_opt_shape(rng):
    with pytest.raises(InputError, match="calibration"):
        kiln.build(
            _conv_model(rng), BuildConfig(device="cpu", fp16=True), calibration={"x": np.ones((1, 4, 6, 6), np.float32)}
        )


def test_a_minus_one_batch_builds_with_a_profile_and_runs_in_its_range(tmp_path):
    """paddle2onnx writes a dynamic batch as -1 (input, value_info, output): a dynamic dim, not a size."""
    import onnx

    from tests.builder.graphs import tiny_model

    proto = tiny_model(batch=-1)
    proto.graph.value_info.append(onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [-1, 4, 6, 8]))
    path = tmp_path / "minus_one.onnx"
    onnx.save(proto, path)
    engine = kiln.build(
        path,
        BuildConfig(
            device="cpu",
            opt_level=1,
            profiles=[
                Profile.from_lists(
                    {"x": (1, 3, 6, 8), "r": (1, 4, 6, 8)},
                    {"x": (2, 3, 6, 8), "r": (2, 4, 6, 8)},
                    {"x": (4, 3, 6, 8), "r": (4, 4, 6, 8)},
                )
            ],
        ),
    )
    assert [spec["shape"] for spec in engine.inputs] == [[None, 3, 6, 8], [None, 4, 6, 8]]
    rng = np.random.default_rng(3)
    feeds = {
        "x": rng.standard_normal((3, 3, 6, 8)).astype(np.float32),
        "r": rng.standard_normal((3, 4, 6, 8)).astype(np.float32),
    }
    assert scaled_error(engine.run(feeds)["y"], run_onnxruntime(path, feeds)["y"]) <= 1e-4
    with pytest.raises(InputError, match="optimization profile"):
        engine.run({k: np.concatenate([v, v]) for k, v in feeds.items()})


def _scalar_input_model():
    """y = MatMul(x[N, 4], w) * float(sr): sr is a rank-0 int64 input (silero's sample rate)."""
    rng = np.random.default_rng(5)
    return model([node("MatMul", ["x", "w"], ["m"]), node("Cast", ["sr"], ["s"], to=1), node("Mul", ["m", "s"], ["y"])],
                 [("x", ["N", 4]), ("sr", [], 7)], [("y", ["N", 3])], [("w", weights(rng, 4, 3))])


@pytest.mark.parametrize("named", [True, False], ids=["profile-names-the-scalar", "scalar-left-out"])
def test_a_rank_0_input_builds_and_runs_with_or_without_a_profile_entry(named):
    scalar = {"sr": ()} if named else {}
    profile = Profile.from_lists({"x": (1, 4)}, {"x": (2, 4), **scalar}, {"x": (4, 4)})  # min/max: the opt's
    assert ("sr" in profile.shapes) == named and (not named or profile.shapes["sr"] == ((), (), ()))
    m = _scalar_input_model()
    engine = kiln.build(m, BuildConfig(device="cpu", opt_level=1, profiles=[profile]))
    assert engine.profiles[0].shapes["sr"] == ((), (), ())
    x = np.random.default_rng(6).standard_normal((3, 4)).astype(np.float32)
    feeds = {"x": x, "sr": np.array(16000, np.int64)}
    assert scaled_error(engine.run(feeds)["y"], kiln.Executor(m).run(feeds)["y"]) <= 1e-4
    context = engine.create_context(profile=0)
    assert scaled_error(context.run(feeds)["y"], kiln.Executor(m).run(feeds)["y"]) <= 1e-4
    with pytest.raises(InputError, match="sr"):
        engine.run({"x": x, "sr": np.array([16000], np.int64)})


def test_a_rank_0_input_in_the_build_command_line(tmp_path):
    import onnx_ir as ir

    from kiln.cli import main
    from kiln.inputs import write_npz

    path, engine_path = tmp_path / "scalar.onnx", tmp_path / "scalar.kiln"
    ir.save(_scalar_input_model(), path)
    assert main(["build", str(path), "-o", str(engine_path), "--device", "cpu", "--opt-level", "1",
                 "--min-shapes", "x:1x4", "--opt-shapes", "x:2x4,sr:", "--max-shapes", "x:4x4"]) == 0
    write_npz(tmp_path / "in.npz", {"x": np.ones((3, 4), np.float32), "sr": np.array(8000, np.int64)})
    assert main(["run", str(engine_path), "--inputs", str(tmp_path / "in.npz"), "--compare", "onnxruntime",
                 "--onnx", str(path)]) == 0


def test_calibration_inputs_the_model_does_not_have_are_refused(rng):
    with pytest.raises(
        InputError, match=r"calibration input\(s\) \['sr'\] are not inputs of the model; its inputs are \['x'\]"
    ):
        kiln.build(_conv_model(rng), BuildConfig(device="cpu"), calibration={"sr": np.array(16000)})
