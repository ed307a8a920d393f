"""The three views of a ``BenchResult`` (terminal, JSON, PNG) on a hand-built result: no model, no GPU."""

from __future__ import annotations

import io
import json
import sys

import pytest
from rich.console import Console

from kiln.bench.report import plot, render, write_json
from kiln.bench.results import BenchResult, LayerTime, Row, Run, Saturation, Stats
from kiln.errors import KilnError

VERDICT = "throughput stops growing with the batch after batch 8"


def make_run(median_ms: float, batch: int, gpu: bool = True) -> Run:
    latency = Stats.of([median_ms * f for f in (0.9, 1.0, 1.0, 1.1, 1.3)])
    compute = Stats.of([median_ms * 0.8 * f for f in (0.9, 1.0, 1.0, 1.1, 1.3)]) if gpu else None
    copy = Stats.of([0.01, 0.012, 0.02]) if gpu else None
    return Run(latency_ms=latency, compute_ms=compute, h2d_ms=copy, d2h_ms=copy, enqueue_ms=copy, iterations=100,
               wall_s=median_ms / 10, inferences_per_s=1e3 / median_ms, samples_per_s=batch * 1e3 / median_ms,
               peak_memory_bytes=123_000_000 if gpu else None)


def make_result(batches=(1, 8, 32)) -> BenchResult:
    rows = []
    for batch in batches:
        kiln_ms, eager_ms = 0.5 + 0.05 * batch, 1.2 + 0.1 * batch
        rows.append(Row("kiln", batch, [make_run(kiln_ms, batch), make_run(kiln_ms * 1.01, batch)], spread=0.01))
        if batch == 32:
            rows.append(Row("eager", batch, error="CUDA out of memory while allocating 2.00 GiB"))
        else:
            spread = 0.12 if batch == 8 else 0.02
            rows.append(Row("eager", batch, [make_run(eager_ms, batch), make_run(eager_ms * 1.1, batch)],
                            spread=spread, max_rel_diff=3e-6))
    saturation = Saturation(verdict=VERDICT, saturated_at=8, knee_batch=8, threshold=0.5, steps=[
        {"from": 1, "to": 8, "batch_ratio": 8.0, "throughput_ratio": 5.1, "efficiency": 0.78},
        {"from": 8, "to": 32, "batch_ratio": 4.0, "throughput_ratio": 1.2, "efficiency": 0.13}])
    layers = [LayerTime(index=i, name=f"layer_{i}", kind="conv", nodes=[f"/block{i}/conv_{j}" for j in range(6)],
                        tactic="cudnn.nhwc", precision="fp16", ms=0.01 * (i + 1), share=(i + 1) / 78)
              for i in range(12)]
    return BenchResult(model="/models/resnet_tiny.onnx", device="cuda:0", gpu="NVIDIA H200",
                       date="2025-01-02T03:04:05", command="kiln bench /models/resnet_tiny.onnx",
                       versions={"kiln": "0.1.0"}, config={"iterations": 100},
                       rows=rows, saturation=saturation, layers=layers, layer_batch=8,
                       notes=["eager: torch 2.11 eager on cuda:0", "inputs: seeded random"])


def rendered(result: BenchResult, width: int = 120, terminal: bool = False) -> str:
    buffer = io.StringIO()
    render(result, Console(file=buffer, width=width, force_terminal=terminal, color_system=None))
    return buffer.getvalue()


@pytest.mark.parametrize("width", [120, 80])
def test_render_has_every_section(width):
    text = rendered(make_result(), width)
    for piece in ["kiln", "eager", "samples/s", "NVIDIA H200", "resnet_tiny.onnx", "2025-01-02T03:04:05",
                  "inputs: seeded random", VERDICT, "top 10 layers at batch 8",
                  "eager at batch 32 failed: CUDA out of memory while allocating 2.00 GiB",
                  "repeat spread 12.0% for eager at batch 8: differences below that are noise",
                  "total 0.7800 ms over 12 layers"]:
        assert piece in text, piece
    assert "for eager at batch 1:" not in text  # 2% is under the noise line
    assert "layer_11" in text and "layer_1 " not in text  # the 10 slowest only (layer_0 and layer_1 are out)


def test_render_table_values():
    text = rendered(make_result(), 200)
    eager_1 = next(line for line in text.splitlines() if line.split()[:2] == ["eager", "1"])
    kiln, eager = make_result().row("kiln", 1).best, make_result().row("eager", 1).best
    assert f"{eager.samples_per_s / kiln.samples_per_s:.2f}x" in eager_1
    assert "3.0e-06" in eager_1
    assert "compute p50" in text  # every measured row has a compute time
    assert "inf/s" in text and "narrow terminal" not in text


def test_render_narrow_terminal_keeps_the_comparison():
    text = rendered(make_result(), 100, terminal=True)
    assert "narrow terminal: p90, h2d, d2h, inf/s, peak MB left out" in text
    assert max(len(line) for line in text.splitlines() if line.startswith(("kiln", "eager"))) <= 100
    assert "0.42x" in text


@pytest.mark.parametrize("terminal", [True, False])
def test_render_never_wraps_a_number(terminal):
    """At 80 columns, in a terminal or a pipe, a rel diff of 3.3e-10 stays whole (it printed as
    ``3.3e-1`` over ``0``): the main table falls back to plain lines, one per row."""
    result = make_result()
    result.row("eager", 1).max_rel_diff = 3.3e-10
    text = rendered(result, 80, terminal)
    eager_1 = next(line for line in text.splitlines() if line.split()[:2] == ["eager", "1"])
    assert "3.3e-10" in eager_1.split() and "0.42x" in eager_1.split()


def test_render_marks_a_difference_beyond_tolerance():
    result = make_result()
    result.row("eager", 8).diff_ok = False
    result.row("eager", 8).ref_rel_diff, result.row("eager", 8).ref_ok = 2.5e-2, False
    eager_8 = next(line for line in rendered(result).splitlines() if line.split()[:2] == ["eager", "8"])
    assert eager_8.split()[-2:] == ["3.0e-06!", "2.5e-02!"]


def test_render_mixed_latency_and_no_extras():
    result = make_result(batches=(4,))
    result.rows.append(Row("onnxruntime", 4, [make_run(2.0, 4, gpu=False)], spread=None, max_rel_diff=1e-5))
    result.saturation, result.layers = None, None
    text = rendered(result)
    assert "compute time (GPU events) for kiln, eager; end to end for onnxruntime" in text
    assert "saturation" not in text and "top 10" not in text


def test_write_json_round_trips(tmp_path):
    result = make_result()
    path = tmp_path / "bench.json"
    write_json(result, path)
    data = json.loads(path.read_text())
    assert [(r["target"], r["batch"]) for r in data["rows"]] == [(r.target, r.batch) for r in result.rows]
    assert data["saturation"]["verdict"] == VERDICT
    assert len(data["layers"]) == 12
    assert data["rows"][-1]["error"].startswith("CUDA out of memory")


def test_write_json_is_strict_json(tmp_path):
    result = make_result()
    result.rows[1].max_rel_diff = float("inf")  # a peer whose outputs overflowed
    write_json(result, tmp_path / "bench.json")

    def refuse(constant):
        raise ValueError(constant)

    data = json.loads((tmp_path / "bench.json").read_text(), parse_constant=refuse)
    assert data["rows"][1]["max_rel_diff"] == "inf"


@pytest.mark.parametrize("batches", [(1, 8, 32), (16,)])
def test_plot_writes_a_png(tmp_path, batches):
    from matplotlib.image import imread

    path = tmp_path / "bench.png"
    plot(make_result(batches), path)
    data = path.read_bytes()
    assert data[:4] == b"\x89PNG"
    image = imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_writing_into_a_missing_folder_fails_cleanly(tmp_path):
    missing = tmp_path / "no" / "such"
    for write, name in ((plot, "bench.png"), (write_json, "bench.json")):
        with pytest.raises(KilnError):
            write(make_result(), missing / name)
    assert list(tmp_path.iterdir()) == []


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import now raises ImportError
    with pytest.raises(KilnError, match="matplotlib"):
        plot(make_result(), tmp_path / "bench.png")
    assert list(tmp_path.iterdir()) == []


def test_json_round_trips_into_the_same_result():
    result = make_result()
    result.rows[0].max_rel_diff = float("inf")
    back = BenchResult.from_json(json.loads(json.dumps(result.to_json())))
    assert back == result
