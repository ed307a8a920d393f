"""The runtime flags of the CLI: kiln build --aux-streams, kiln run --contexts/--profile/--aux-streams/
--cuda-graph on engines (and refused on ONNX models and, for CUDA graphs, on CPU engines)."""

from __future__ import annotations

import json

import pytest

import kiln
from kiln.cli import main
from tests.runtime.conftest import WIDTH, build_branches_file


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return build_branches_file(tmp_path_factory.mktemp("cli"), "cpu")


def test_build_with_aux_streams_and_inspect_shows_them(files, capsys):
    _, engine = files
    assert kiln.load_engine(engine).aux_streams == 2
    capsys.readouterr()
    assert main(["inspect", str(engine)]) == 0
    out = capsys.readouterr().out
    assert "stream" in out and "shared by every execution" in out and "2 auxiliary stream(s)" in out
    assert main(["inspect", str(engine), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["aux_streams"] == 2 and data["summary"]["weights_bytes"] > 0
    assert {row["stream"] for row in data["layers"]} == {0, 1, 2}


def test_run_in_several_contexts_with_a_profile(files, capsys):
    model, engine = files
    assert main(["run", str(engine), "--contexts", "3", "--profile", "1", "--aux-streams", "1", "--shapes",
                 f"x:8x{WIDTH}", "--compare", "onnxruntime", "--onnx", str(model)]) == 0
    out = capsys.readouterr().out
    assert "3 context(s)" in out and "contexts 1-2: two runs each" in out


def test_run_outside_the_chosen_profile_is_one_line_exit_2(files, capsys):
    _, engine = files
    assert main(["run", str(engine), "--profile", "0", "--shapes", f"x:8x{WIDTH}"]) == 2
    err = capsys.readouterr().err
    assert "outside optimization profile 0" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flags,message", [(["--cuda-graph"], "CUDA graphs need an engine built for CUDA"),
                                           (["--contexts", "0"], "--contexts must be 1 or more"),
                                           (["--profile", "2"], "no optimization profile 2")])
def test_bad_runtime_flags_on_an_engine(files, capsys, flags, message):
    _, engine = files
    assert main(["run", str(engine), "--shapes", f"x:2x{WIDTH}", *flags]) == 2
    assert message in capsys.readouterr().err


def test_runtime_flags_on_an_onnx_model_are_refused(files, capsys):
    model, _ = files
    assert main(["run", str(model), "--shapes", f"x:2x{WIDTH}", "--contexts", "2", "--cuda-graph"]) == 2
    err = capsys.readouterr().err
    assert "--cuda-graph, --contexts run a built engine" in err
