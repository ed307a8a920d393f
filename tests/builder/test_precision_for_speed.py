"""--fp16 and --bf16 allow reduced precision; they do not impose it (TensorRT's reading). A layer
whose timed fp32 tactics beat its fp16 ones by more than the margin runs in fp32, saying so in its
notes and the log; pinned layers, level 0 and strongly typed builds keep what they were given.
Times are set here (the builder's timing is replaced), so nothing depends on this machine's speed."""

from __future__ import annotations

import numpy as np
import pytest

import kiln
from kiln.builder import BuildConfig, choose_tactic
from tests.builder.graphs import model, node


def _model():
    rng = np.random.default_rng(3)
    return model([node("MatMul", ["x", "w"], ["y"])], [("x", [4, 32])], [("y", [4, 16])],
                 [("w", (rng.standard_normal((32, 16)) / 6).astype(np.float32))])


@pytest.fixture
def times(monkeypatch):
    """Per precision, the milliseconds every tactic takes (after its correctness check passed)."""
    table = {"fp32": 1.0, "tf32": 1.0, "fp16": 1.0, "bf16": 1.0}
    real = choose_tactic.time_tactic

    def timed(state, t, cfg, item, index, inputs, reference, precision):
        entry = real(state, t, cfg, item, index, inputs, reference, precision)
        return {**entry, "ms": table[precision]} if entry["ok"] else entry

    monkeypatch.setattr(choose_tactic, "time_tactic", timed)
    return table


def _precision(engine) -> str:
    return engine.plan["layers"][0]["precision"]


def test_a_layer_faster_in_fp32_runs_in_fp32_and_says_so(times):
    times["fp16"] = 5.0
    engine = kiln.build(_model(), BuildConfig(device="cpu", fp16=True, opt_level=1))
    assert _precision(engine) == "fp32"
    notes = engine.plan["layers"][0]["notes"]
    assert any("runs in fp32, 1 ms against 5 ms in fp16" in note for note in notes), notes
    assert any("1 layer(s) run in fp32: their tactics there were faster than in fp16" in line
               for line in engine.report.lines)


def test_a_layer_faster_in_fp16_keeps_fp16(times):
    times["fp32"] = 5.0
    engine = kiln.build(_model(), BuildConfig(device="cpu", fp16=True, opt_level=1))
    assert _precision(engine) == "fp16"


def test_within_the_margin_the_reduced_precision_stays(times):
    times["fp16"], times["fp32"] = 1.0, 0.95  # 5% faster: not worth the casts at the layer's edges
    assert _precision(kiln.build(_model(), BuildConfig(device="cpu", fp16=True, opt_level=1))) == "fp16"


def test_tf32_is_the_wide_precision_where_it_is_allowed(times):
    times["fp16"] = 5.0
    engine = kiln.build(_model(), BuildConfig(device="cpu", fp16=True, tf32=True, opt_level=1))
    assert _precision(engine) == "tf32"


@pytest.mark.parametrize("config", [dict(opt_level=0), dict(opt_level=1, layer_precisions={"MatMul": "fp16"})],
                         ids=["level 0", "pinned"])
def test_level_0_and_pinned_layers_keep_their_precision(times, config):
    times["fp16"] = 5.0
    assert _precision(kiln.build(_model(), BuildConfig(device="cpu", fp16=True, **config))) == "fp16"


def test_a_build_from_an_onnx_model_proto():
    import onnx

    from tests.builder.graphs import tiny_model

    proto = tiny_model()
    assert isinstance(proto, onnx.ModelProto)
    engine = kiln.build(proto, BuildConfig(device="cpu", opt_level=0))
    assert engine.plan["layers"]


@pytest.mark.cuda
def test_on_a_gpu_a_gain_smaller_than_two_small_kernels_keeps_the_reduced_precision(times):
    times["fp16"], times["fp32"] = 0.015, 0.005  # 3x faster, but 10 us: two kernel launches for the casts eat it
    assert _precision(kiln.build(_model(), BuildConfig(device="cuda", fp16=True, opt_level=1))) == "fp16"


def test_on_a_cpu_small_gains_count(times):
    times["fp16"], times["fp32"] = 0.015, 0.005  # no kernel launches on a CPU: a cast of a small tensor is cheap
    assert _precision(kiln.build(_model(), BuildConfig(device="cpu", fp16=True, opt_level=1))) == "fp32"


def test_a_node_layer_faster_in_fp32_runs_in_fp32(monkeypatch):
    real = choose_tactic.time_node

    def timed(state, index, item, ref_inputs, precision=None):
        ms = real(state, index, item, ref_inputs, precision)
        return None if ms is None else {"fp16": 5.0, "fp32": 1.0}[precision or item.precision]

    monkeypatch.setattr(choose_tactic, "time_node", timed)
    m = model([node("Erf", ["x"], ["y"])], [("x", [4, 32])], [("y", [4, 32])])
    engine = kiln.build(m, BuildConfig(device="cpu", fp16=True, opt_level=1))
    layer = engine.plan["layers"][0]
    assert layer["kind"] == "Node" and layer["precision"] == "fp32"
    assert any("runs in fp32, 1 ms against 5 ms in fp16" in note for note in layer["notes"]), layer["notes"]
