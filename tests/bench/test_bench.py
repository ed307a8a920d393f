"""kiln bench end to end on the CPU: the batch sweep with its saturation verdict, peers side by side
with their differences from kiln, the per-layer profile, JSON and PNG, engines (.kiln) as input,
and every option the CPU cannot honour refused with a clear message."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

import kiln
from kiln.bench.options import BenchOptions, parse_batches
from kiln.bench.run import run_bench
from kiln.cli import EXIT_MISMATCH, main
from kiln.errors import KilnError
from tests.runtime.conftest import ACTIVATIONS, WIDTH, branches_model

QUICK = {"warmup_ms": 5.0, "duration_s": None, "iterations": 20}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "branches.onnx"
    onnx.save(branches_model(), path)
    return path


class Branches(torch.nn.Module):
    """The branches model in torch, from the ONNX file's own weights (for the module peers)."""

    def __init__(self, proto: onnx.ModelProto, wrong: bool = False) -> None:
        super().__init__()
        w = {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy()) for t in proto.graph.initializer}
        self.w = [w[f"w{i}"] for i in range(3)]
        self.v = [w[f"v{i}"] * (2.0 if wrong else 1.0) for i in range(3)]

    def forward(self, x):
        acts = {"Relu": torch.relu, "Tanh": torch.tanh, "Sigmoid": torch.sigmoid}
        total = sum(acts[a](x @ self.w[i]) @ self.v[i] for i, a in enumerate(ACTIVATIONS))
        return total.reshape(x.shape[0], 4, 4)


def test_batch_sweep_with_peers_saturation_and_layer_profile(model_path):
    options = BenchOptions(batches=[1, 4, 16], shapes={"x": (1, WIDTH)},
                           build=kiln.BuildConfig(device="cpu", opt_level=1),
                           peers=["eager", "onnxruntime", "compile-reduce-overhead"], profile_layers=True, **QUICK)
    messages: list[str] = []
    result = run_bench(model_path, options, progress=messages.append, command="kiln bench test")
    assert result.batches == [1, 4, 16] and result.targets == ["kiln", "eager", "onnxruntime"]
    for row in result.rows:
        assert row.error is None and len(row.runs) == 2 and row.spread is not None
        run = row.best
        assert run.iterations == 20 and run.latency_ms.median > 0 and run.compute_ms is None
        assert run.samples_per_s == pytest.approx(row.batch * run.inferences_per_s)
        if row.target != "kiln":
            assert row.max_rel_diff is not None and row.max_rel_diff < 1e-4
        assert row.ref_rel_diff is not None and row.ref_rel_diff < 1e-4  # everyone, kiln too, vs the ONNX reference
    assert any(note.startswith("vs ref: max |out - ref| / max |ref|") for note in result.notes)
    assert any("compile-reduce-overhead: not run: CUDA graphs need a GPU" in note for note in result.notes)
    assert result.saturation is not None and len(result.saturation.steps) == 2
    assert result.layer_batch == 16 and result.layers
    assert {layer.name for layer in result.layers} >= {"up0", "down0", "up1", "sum01"}
    assert sum(layer.share for layer in result.layers) == pytest.approx(1.0)
    assert all(a.ms >= b.ms for a, b in zip(result.layers, result.layers[1:]))
    assert any("kiln at batch 16" in m for m in messages)
    assert result.config["engine_summary"]["profiles"] == 3


def test_a_wrong_module_peer_shows_its_difference(model_path):
    proto = onnx.load(model_path)
    options = BenchOptions(batches=[2], build=kiln.BuildConfig(device="cpu", opt_level=0), peers=["eager"],
                           shapes={"x": (2, WIDTH)}, **QUICK)
    right = run_bench(model_path, options, module=Branches(proto))
    wrong = run_bench(model_path, options, module=Branches(proto, wrong=True))
    assert right.row("eager", 2).max_rel_diff < 1e-4 and right.row("eager", 2).diff_ok is True
    assert wrong.row("eager", 2).max_rel_diff > 0.1 and wrong.row("eager", 2).diff_ok is False
    # the reference says which side is wrong: the module, not kiln
    assert wrong.row("eager", 2).ref_rel_diff > 0.1 and wrong.row("kiln", 2).ref_rel_diff < 1e-4
    assert wrong.row("eager", 2).ref_ok is False and wrong.row("kiln", 2).ref_ok is True


def test_the_reference_shows_when_kiln_itself_is_wrong(model_path, monkeypatch):
    """kiln's own outputs are checked too: a kiln row off the reference shows (and the CLI fails)."""
    from kiln.bench import targets

    original = targets.KilnTarget.outputs
    monkeypatch.setattr(targets.KilnTarget, "outputs", lambda self: {k: v * 1.5 for k, v in original(self).items()})
    options = BenchOptions(batches=[2], build=kiln.BuildConfig(device="cpu", opt_level=0), peers=["onnxruntime"],
                           shapes={"x": (2, WIDTH)}, **QUICK)
    result = run_bench(model_path, options)
    assert result.row("kiln", 2).ref_rel_diff == pytest.approx(0.5, rel=1e-3) and result.row("kiln", 2).ref_ok is False
    assert result.row("onnxruntime", 2).ref_rel_diff < 1e-4 and result.row("onnxruntime", 2).max_rel_diff > 0.3
    assert result.row("onnxruntime", 2).ref_ok is True and result.row("onnxruntime", 2).diff_ok is False
    off = run_bench(model_path, replace(options, reference=False, peers=[]))
    assert off.row("kiln", 2).ref_rel_diff is None and off.row("kiln", 2).ref_ok is None
    assert not any(n.startswith("vs ref") for n in off.notes)
    assert main(["bench", str(model_path), "--device", "cpu", "--shapes", f"x:2x{WIDTH}", "--iterations", "3",
                 "--warmup-ms", "0", "--repeats", "1"]) == EXIT_MISMATCH
    # --rtol 1 lets every element be off by its own size: within it, the same run passes
    assert main(["bench", str(model_path), "--device", "cpu", "--shapes", f"x:2x{WIDTH}", "--iterations", "3",
                 "--warmup-ms", "0", "--repeats", "1", "--rtol", "1"]) == 0
    assert main(["bench", str(model_path), "--device", "cpu", "--shapes", f"x:2x{WIDTH}", "--iterations", "3",
                 "--warmup-ms", "0", "--repeats", "1", "--no-reference"]) == 0


def test_cli_writes_json_and_plot_and_prints_the_tables(model_path, tmp_path, capsys):
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    assert main(["bench", str(model_path), "--device", "cpu", "--batch", "1,8", "--shapes", f"x:1x{WIDTH}",
                 "--iterations", "15",
                 "--warmup-ms", "5", "--peers", "onnxruntime", "--profile-layers", "--opt-level", "0",
                 "--json", str(out_json), "--plot", str(out_png)]) == 0
    out = capsys.readouterr().out
    for piece in ("kiln", "onnxruntime", "saturation", "top", "layers at batch 8"):
        assert piece in out
    data = json.loads(out_json.read_text())
    assert data["command"].startswith("kiln bench ") and len(data["rows"]) == 4 and data["saturation"]["steps"]
    assert all(row["ref_ok"] is True for row in data["rows"])
    assert data["config"]["tolerance"] == {"atol": None, "rtol": None}
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_an_engine_file_with_its_onnx_for_the_peers(model_path, tmp_path, capsys):
    engine = tmp_path / "b.kiln"
    assert main(["build", str(model_path), "-o", str(engine), "--device", "cpu", "--opt-level", "0", "--quiet",
                 "--min-shapes", f"x:1x{WIDTH}", "--opt-shapes", f"x:4x{WIDTH}", "--max-shapes", f"x:8x{WIDTH}"]) == 0
    capsys.readouterr()
    assert main(["bench", str(engine), "--batch", "2,8", "--shapes", f"x:1x{WIDTH}", "--iterations", "10",
                 "--warmup-ms", "1",
                 "--peers", "eager", "--onnx", str(model_path), "--contexts", "2"]) == 0
    assert "eager" in capsys.readouterr().out
    result = run_bench(engine, BenchOptions(batches=[4], shapes={"x": (1, WIDTH)}, contexts=3, **QUICK))
    row = result.row("kiln", 4)
    assert row.best.iterations == 60  # three contexts, 20 iterations each
    assert main(["bench", str(engine), "--batch", "16", "--shapes", f"x:1x{WIDTH}", "--iterations", "3"]) == 2
    assert "fit no optimization profile" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--cuda-graph"], "--cuda-graph needs a CUDA GPU"),
    (["--aux-streams", "2"], "--aux-streams needs a CUDA GPU"),
    (["--batch", "0,4"], "batch sizes must be 1 or more"),
    (["--batch", "1,x"], "--batch takes sizes like 1,8,32"),
    (["--contexts", "0"], "--contexts must be 1 or more"),
    (["--peers", "eager,tensorrt"], "tensorrt"),
    (["--onnx", "m.onnx"], "--onnx names the ONNX file a .kiln engine was built from"),
])
def test_bad_options_are_one_line_exit_2(model_path, capsys, flags, message):
    assert main(["bench", str(model_path), "--device", "cpu", "--shapes", f"x:2x{WIDTH}", "--iterations", "2",
                 *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_shapes_the_batch_cannot_fill_are_refused(tmp_path):
    fixed = branches_model()
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    path = tmp_path / "fixed.onnx"
    onnx.save(fixed, path)
    with pytest.raises(KilnError, match="fixed batch of 2"):
        run_bench(path, BenchOptions(batches=[4], build=kiln.BuildConfig(device="cpu"), **QUICK))
    dynamic = branches_model()
    dynamic.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "W"
    path = tmp_path / "dynamic.onnx"
    onnx.save(dynamic, path)
    with pytest.raises(KilnError, match="dynamic dimensions"):
        run_bench(path, BenchOptions(batches=[4], build=kiln.BuildConfig(device="cpu"), **QUICK))


def test_parse_batches():
    assert parse_batches("32,1,8,8") == [1, 8, 32]
    assert parse_batches(None) is None


def test_without_batches_the_given_shapes_are_measured(model_path):
    result = run_bench(model_path,
                       BenchOptions(shapes={"x": (3, WIDTH)}, build=kiln.BuildConfig(device="cpu", opt_level=0),
                                                repeats=1, **QUICK))
    assert result.batches == [3] and result.saturation is None and result.row("kiln", 3).spread is None
    assert np.isfinite(result.row("kiln", 3).best.latency_ms.p99)


def test_an_engine_object_and_real_inputs(model_path, tmp_path, monkeypatch, capsys):
    """run_bench takes an Engine already built; ``inputs`` (kiln bench --inputs) are the data every
    target runs, their rows repeated or cut to each batch size; the other inputs stay random."""
    from kiln.bench import targets
    from kiln.builder import Profile
    from kiln.inputs import write_npz

    engine = kiln.build(model_path, kiln.BuildConfig(device="cpu", opt_level=0, profiles=[
        Profile.from_lists(*({"x": (s, WIDTH)} for s in (1, 3, 8)))]))
    data = np.random.default_rng(7).standard_normal((3, WIDTH)).astype(np.float32)
    seen: list[np.ndarray] = []
    original = targets.KilnTarget.setup
    monkeypatch.setattr(targets.KilnTarget, "setup",
                        lambda self, feeds: (seen.append(feeds["x"]), original(self, feeds))[1])
    options = BenchOptions(batches=[2, 5], inputs={"x": data}, peers=["onnxruntime"], onnx=model_path, **QUICK)
    result = run_bench(engine, options)
    assert result.model == engine.name and result.batches == [2, 5]
    np.testing.assert_array_equal(seen[0], data[:2])
    np.testing.assert_array_equal(seen[1], data[[0, 1, 2, 0, 1]])
    for row in result.rows:
        assert row.error is None and row.ref_rel_diff < 1e-4
    assert result.row("onnxruntime", 5).max_rel_diff < 1e-4
    with pytest.raises(KilnError, match="precision and build flags apply to .onnx models"):
        run_bench(engine, replace(options, build=kiln.BuildConfig(device="cpu")))
    with pytest.raises(KilnError, match=r"array\(s\) \['y'\] that are not inputs"):
        run_bench(engine, replace(options, inputs={"y": data}))
    with pytest.raises(KilnError, match="give one of the two"):
        run_bench(engine, replace(options, shapes={"x": (1, WIDTH + 1)}))

    npz = tmp_path / "real.npz"
    write_npz(npz, {"x": data})
    capsys.readouterr()
    seen.clear()
    assert main(["bench", str(model_path), "--device", "cpu", "--inputs", str(npz), "--iterations", "5", "--warmup-ms",
                 "0",
                 "--repeats", "1", "--opt-level", "0"]) == 0
    np.testing.assert_array_equal(seen[0], data)  # no --batch, no --shapes: the data's own shape
