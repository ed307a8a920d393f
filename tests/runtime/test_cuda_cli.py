"""The runtime flags of the CLI on the GPU: kiln build --device cuda --aux-streams, kiln run --cuda-graph
--contexts --aux-streams --profile, and kiln bench --cuda-graph --contexts --aux-streams with peers, the
layer profile, JSON and a plot. Skipped without a GPU; run on the lent GPU."""

from __future__ import annotations

import json

import pytest

import kiln
from kiln.cli import main
from tests.runtime.conftest import WIDTH, build_branches_file

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return build_branches_file(tmp_path_factory.mktemp("cuda_cli"), "cuda")


def test_run_with_graphs_contexts_aux_streams_and_a_profile(files, capsys):
    model, engine = files
    assert kiln.load_engine(engine).aux_streams == 2
    assert main(["run", str(engine), "--cuda-graph", "--contexts", "2", "--aux-streams", "2", "--profile", "1",
                 "--shapes", f"x:8x{WIDTH}", "--compare", "onnxruntime", "--onnx", str(model)]) == 0
    assert "2 context(s)" in capsys.readouterr().out


def test_bench_with_graphs_contexts_and_aux_streams(files, tmp_path, capsys):
    model, engine = files
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    assert main(["bench", str(engine), "--onnx", str(model), "--batch", "2,8", "--shapes", f"x:1x{WIDTH}",
                 "--iterations", "20", "--warmup-ms", "5", "--cuda-graph", "--contexts", "2", "--aux-streams", "2",
                 "--peers", "eager,onnxruntime", "--profile-layers", "--json", str(out_json), "--plot",
                 str(out_png)]) == 0
    capsys.readouterr()
    data = json.loads(out_json.read_text())
    assert data["device"] == "cuda" and data["config"]["cuda_graph"] and data["config"]["contexts"] == 2
    for row in data["rows"]:
        assert row["error"] is None and row["ref_rel_diff"] < 1e-4, row["target"]
        if row["target"] == "kiln":
            run = row["runs"][row["best_run"]]
            assert run["iterations"] == 40 and run["compute_ms"]["median"] > 0 and run["h2d_ms"] is not None
    assert data["layers"] and out_png.read_bytes()[:4] == b"\x89PNG"
