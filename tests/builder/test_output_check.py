"""The build's end-to-end contract: on its inputs the engine's outputs are within the tolerance of
its loosest precision (kiln.precision) of fp32, or the build moves layers towards fp32 until they
are (saying which), or it fails saying so.

The drifting layer here is a MatMul whose weight columns sum to zero on inputs with a large common
offset (12 + N(0, 1)): the offset cancels, so fp16's rounding of the inputs is large against the
result. Its drift against the output's own scale (about 3e-3) passes the per-layer check (1e-2),
but the outputs near zero are off by more than fp16's per-element tolerance (atol 1e-2)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import kiln
from kiln.builder import BuildConfig, PrecisionError
from kiln.builder.tactics import base, registry
from kiln.builder.tactics.gemm import GemmTorch
from kiln.precision import TOLERANCES, judge, tolerance
from tests.builder.graphs import model, node

K = 16


def _model_and_inputs():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((K, 8)).astype(np.float32)
    cancelling = v - v.mean(axis=0, keepdims=True)
    plain = (rng.standard_normal((K, 8)) / 4).astype(np.float32)
    m = model([node("MatMul", ["x", "wc"], ["a"]), node("MatMul", ["x", "w"], ["c"])], [("x", [4, K])],
              [("a", [4, 8]), ("c", [4, 8])], [("wc", cancelling), ("w", plain)])
    x = (12 + rng.standard_normal((4, K))).astype(np.float32)
    return m, {"x": x}


def _precisions(engine) -> dict[str, str]:
    return {layer["name"]: layer["precision"] for layer in engine.plan["layers"]}


def _within(engine, m, feeds, precision) -> bool:
    got, ref = engine.run(feeds), kiln.Executor(m).run(feeds)
    return all(judge(got[k].float().numpy(), ref[k].float().numpy(), tolerance(precision)).ok for k in ref)


@pytest.mark.usefixtures("reduced_precision_kept")
def test_without_the_end_to_end_check_the_drift_passes_every_layer_but_not_the_output():
    m, feeds = _model_and_inputs()
    engine = kiln.build(m, BuildConfig(device="cpu", fp16=True, opt_level=1, precision_check=False), calibration=feeds)
    assert _precisions(engine) == {"a": "fp16", "c": "fp16"}
    assert not _within(engine, m, feeds, "fp16")


@pytest.mark.usefixtures("reduced_precision_kept")
def test_the_layer_that_drifts_most_moves_to_fp32_until_the_outputs_are_within_tolerance():
    m, feeds = _model_and_inputs()
    engine = kiln.build(m, BuildConfig(device="cpu", fp16=True, opt_level=1), calibration=feeds)
    assert _precisions(engine) == {"a": "fp32", "c": "fp16"}  # c drifts less: it keeps fp16
    layer = next(layer for layer in engine.plan["layers"] if layer["name"] == "a")
    assert any("moved from fp16 to fp32" in note and "end to end" in note for note in layer["notes"])
    log = "\n".join(engine.report.lines)
    assert "end-to-end check on the calibration inputs: output(s) 'a'" in log
    assert "every float output within the fp16 tolerance of fp32" in log
    assert set(engine.report.output_diffs) == {"a", "c"} and engine.report.output_diffs["a"] < 1e-4
    assert _within(engine, m, feeds, "fp16")


@pytest.mark.usefixtures("reduced_precision_kept")
def test_a_looser_tolerance_keeps_the_layers_where_they_are():
    m, feeds = _model_and_inputs()
    engine = kiln.build(m, BuildConfig(device="cpu", fp16=True, opt_level=1, atol=0.05), calibration=feeds)
    assert _precisions(engine) == {"a": "fp16", "c": "fp16"}
    assert not engine.report.fallbacks


def test_pinned_layers_that_keep_the_outputs_over_tolerance_fail_the_build():
    m, feeds = _model_and_inputs()
    with pytest.raises(PrecisionError,
                       match=r"'a' .* over the fp16 tolerance of fp32 .*pinned by --layer-precision: a"):
        kiln.build(m, BuildConfig(device="cpu", fp16=True, opt_level=1, layer_precisions={"a": "fp16"}),
                   calibration=feeds)


class _Drifting(GemmTorch):
    """The torch GEMM plus an offset of 0.9 of the precision's per-layer tolerance of its output's
    scale: it passes the check against the reference tactic at every precision, fp32 included."""

    name = "gemm.drifting"
    reference = False

    def heuristic(self, layer, precision, device):
        return 100

    def runner(self, layer, prepared, precision, config, context):
        run = super().runner(layer, prepared, precision, config, context)
        share = 0.9 * TOLERANCES[precision].rtol

        def drift(inputs):
            return [out + share * out.abs().max() for out in run(inputs)]

        return drift


def test_an_engine_over_tolerance_even_in_fp32_fails_the_build(monkeypatch):
    registry.load_families()
    monkeypatch.setitem(base.TACTICS, _Drifting.name, _Drifting())
    rng = np.random.default_rng(2)
    m = model([node("MatMul", ["x", "w"], ["y"])], [("x", [4, K])], [("y", [4, 8])],
              [("w", rng.standard_normal((K, 8)).astype(np.float32))])
    config = dict(device="cpu", opt_level=0, allow_tactics=["gemm.drifting"])
    with pytest.raises(PrecisionError, match=r"on seeded random inputs the engine's output\(s\) 'y' .* over the fp32 "
                                             r"tolerance"):
        kiln.build(m, BuildConfig(**config))
    engine = kiln.build(m, BuildConfig(**config, precision_check=False))  # the check is what refuses it
    assert engine.plan["layers"][0]["choices"][0]["tactic"] == "gemm.drifting"
    assert torch.isfinite(engine.run({"x": rng.standard_normal((4, K)).astype(np.float32)})["y"]).all()


@pytest.mark.parametrize("elem,precision", [(np.float32, "fp32"), (np.float16, "fp16")])
def test_a_strongly_typed_model_is_judged_at_its_own_types(elem, precision):
    from onnx import TensorProto

    rng = np.random.default_rng(4)
    m = model([node("Transpose", ["x"], ["t"], perm=[1, 0]), node("Neg", ["t"], ["y"])], [("x", [4, 8])],
              [("y", [8, 4])],
              elem=TensorProto.FLOAT if elem == np.float32 else TensorProto.FLOAT16)
    engine = kiln.build(m, BuildConfig(device="cpu", strongly_typed=True, opt_level=1))
    assert {layer["precision"] for layer in engine.plan["layers"]} == {"native"}  # Node layers, in the model's types
    assert any(f"every float output within the {precision} tolerance" in line for line in engine.report.lines)
    x = rng.standard_normal((4, 8)).astype(elem)
    assert np.array_equal(engine.run({"x": x})["y"].numpy(), -x.T)


def test_a_layer_that_cannot_take_the_reduced_precision_values_fails_the_build_naming_them():
    """tiny = x * 1e-8, pinned to fp16, underflows to zero there; NonZero then finds nothing and the
    Reshape of its indices to [4, 8] fails in the end-to-end run, though each layer ran in the walk."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [node("Mul", ["x", "k"], ["tiny"]), node("NonZero", ["tiny"], ["nz"]), node("Reshape", ["nz", "to"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [4, 8])],
        [numpy_helper.from_array(np.array(1e-8, np.float32), "k"),
         numpy_helper.from_array(np.array([4, 8], np.int64), "to")])
    m = kiln.load_model_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10),
                              name="g")
    with pytest.raises(kiln.KilnError, match=r"layer 'y' \(Reshape, fp16\) failed in the end-to-end run .* pin it or "
                                             r"the reduced-precision layers before it \(tiny\) to fp32"):
        kiln.build(m, BuildConfig(device="cpu", fp16=True, opt_level=1, layer_precisions={"tiny": "fp16"}))
    engine = kiln.build(m, BuildConfig(device="cpu", fp16=True, opt_level=1))  # unpinned, tiny falls back
    x = np.random.default_rng(5).standard_normal((4, 4)).astype(np.float32)
    assert engine.run({"x": x})["y"].shape == (4, 8)


def test_the_cli_exits_1_when_the_outputs_stay_over_tolerance_and_takes_atol(tmp_path, capsys):
    """Over tolerance is a verdict (exit 1), not bad input (exit 2); --atol loosens the contract."""
    import onnx_ir as ir

    from kiln.cli import main
    from kiln.inputs import write_npz

    m, feeds = _model_and_inputs()
    path, data = tmp_path / "drift.onnx", tmp_path / "x.npz"
    ir.save(m, path)
    write_npz(data, feeds)
    common = ["build", str(path), "--device", "cpu", "--fp16", "--opt-level", "1", "--inputs", str(data),
              "--layer-precision", "a:fp16", "--quiet"]
    assert main([*common, "-o", str(tmp_path / "strict.kiln")]) == 1
    assert "over the fp16 tolerance" in capsys.readouterr().err
    assert not (tmp_path / "strict.kiln").exists()
    assert main([*common, "-o", str(tmp_path / "loose.kiln"), "--atol", "0.05"]) == 0


class _SummingInFloat64(GemmTorch):
    """The GEMM summed in float64, then rounded once to fp32: more exact than the fp32 reference,
    and so farther from it than fp32's per-element tolerance where the reference's sums cancel."""

    name = "gemm.float64"
    reference = False

    def heuristic(self, layer, precision, device):
        return 100

    def runner(self, layer, prepared, precision, config, context):
        w = prepared["w"].t().to(torch.float64)

        def run(inputs):
            return [(inputs[0].reshape(-1, w.shape[0]).to(torch.float64) @ w).to(inputs[0].dtype).reshape(
                *inputs[0].shape[:-1], w.shape[1])]

        return run


def _cancelling_model():
    """x (values near 1000) @ w, where w's last column is orthogonal to x's rows: that output is
    near zero, and fp32's rounding of 64 products of ~1000 is large against it."""
    rng = np.random.default_rng(5)
    k = 64
    x = (1000 + 10 * rng.standard_normal((4, k))).astype(np.float32)
    w = rng.standard_normal((k, 8))
    rows = x.astype(np.float64)
    w[:, 7] -= rows.T @ np.linalg.lstsq(rows.T, w[:, 7], rcond=None)[0]  # the component x's rows span, removed
    m = model([node("MatMul", ["x", "w"], ["y"])], [("x", [4, k])], [("y", [4, 8])], [("w", w.astype(np.float32))])
    return m, {"x": x}


def test_an_fp32_engine_more_exact_than_the_reference_is_accepted_by_the_float64_referee(monkeypatch):
    registry.load_families()
    monkeypatch.setitem(base.TACTICS, _SummingInFloat64.name, _SummingInFloat64())
    m, feeds = _cancelling_model()
    config = BuildConfig(device="cpu", opt_level=0, allow_tactics=["gemm.float64"])
    reference = kiln.Executor(m).run(feeds)["y"].numpy()
    engine = kiln.build(m, config, calibration=feeds)
    got = engine.run(feeds)["y"].numpy()
    assert not judge(got, reference, tolerance("fp32")).ok  # over fp32's tolerance of the fp32 reference ...
    exact = feeds["x"].astype(np.float64) @ m.graph.initializers["w"].const_value.numpy().astype(np.float64)
    assert np.abs(got - exact).max() < np.abs(reference - exact).max()  # ... because it is nearer the truth
    log = "\n".join(engine.report.lines)
    assert re.search(r"'y' [0-9.e-]+ from the model run in float64, the fp32 reference [0-9.e-]+: fp32 rounding the "
                     r"network amplifies, accepted", log), log


def test_the_drifting_kernel_is_farther_from_float64_than_the_reference_and_refused(monkeypatch):
    registry.load_families()
    monkeypatch.setitem(base.TACTICS, _Drifting.name, _Drifting())
    m, feeds = _cancelling_model()
    with pytest.raises(PrecisionError, match=r"'y' [0-9.e-]+ from the model run in float64, the fp32 reference "):
        kiln.build(m, BuildConfig(device="cpu", opt_level=0, allow_tactics=["gemm.drifting"]), calibration=feeds)
