"""`kiln build`, `kiln inspect` and `kiln run` on engines: summaries, timing-cache hits, JSON
inspection, per-layer precision, profiles from repeated shape flags, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest

from kiln.cli import main
from tests.builder.graphs import tiny_model

LAYERS = ["conv", "matmul", "softmax", "transpose"]


def build_args(model, output, *extra) -> list[str]:
    return ["build", str(model), "-o", str(output), "--device", "cpu", "--opt-level", "1", "--quiet", *extra]


def inspect_json(engine, capsys) -> dict:
    capsys.readouterr()
    assert main(["inspect", str(engine), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("kiln: error:") and "Traceback" not in captured.err
    return lines[0]


@pytest.fixture(scope="module")
def dynamic_model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("dynamic") / "dyn.onnx"
    onnx.save(tiny_model("batch"), path)
    return path


@pytest.fixture(scope="module")
def engine_path(model_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("engine") / "tiny.kiln"
    assert main(build_args(model_path, path)) == 0
    return path


# -- build ----------------------------------------------------------------------------------------

def test_build_writes_the_engine_and_prints_a_summary(model_path, tmp_path, capsys):
    out = tmp_path / "e.kiln"
    assert main(build_args(model_path, out)) == 0
    assert out.is_file() and out.stat().st_size > 0
    captured = capsys.readouterr()
    text = captured.out
    assert "7 nodes -> 4 after passes -> 4 layers" in text  # MatMul + bias Add: one FusedGemm
    for label in ("layers", "tactics", "precisions", "profiles", "build time", "timing cache", "weights"):
        assert label in text, label
    assert re.search(r"4 \(2 fused, from 7 nodes\)", text)
    assert "optimization level 1" in text
    assert "Traceback" not in captured.err


def test_second_build_with_a_timing_cache_reports_hits(model_path, tmp_path, capsys):
    cache = tmp_path / "cache.json"
    assert main(build_args(model_path, tmp_path / "a.kiln", "--timing-cache", str(cache))) == 0
    first = capsys.readouterr().out
    assert cache.is_file()
    assert re.search(r"\b0 hits, [1-9]\d* misses", first), first
    assert main(build_args(model_path, tmp_path / "b.kiln", "--timing-cache", str(cache))) == 0
    second = capsys.readouterr().out
    hits = re.search(r"\b(\d+) hits, (\d+) misses", second)
    assert hits and int(hits.group(1)) > 0 and int(hits.group(2)) == 0, second
    assert "0 candidates timed" in second
    # the cold build's plan holds the very timings it wrote to the cache: the engines are identical
    assert (tmp_path / "a.kiln").read_bytes() == (tmp_path / "b.kiln").read_bytes()


def test_build_fp16_with_a_layer_held_at_fp32(model_path, tmp_path, capsys):
    out = tmp_path / "e.kiln"
    assert main(build_args(model_path, out, "--fp16", "--layer-precision", "matmul:fp32,relu:fp32")) == 0
    layers = {row["name"]: row for row in inspect_json(out, capsys)["layers"]}
    assert layers["matmul"]["precision"] == "fp32"
    assert layers["conv"]["precision"] == "fp32"  # relu is fused into the conv layer
    assert layers["softmax"]["precision"] == "fp16"
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "fp32" in capsys.readouterr().out


@pytest.mark.parametrize("extra,match", [
    (["--layer-precision", "nosuchnode:fp32"], "nosuchnode"),
    (["--layer-precision", "X"], "NAME:PRECISION"),
    (["--layer-precision", ":fp32"], "NAME:PRECISION"),
    (["--layer-precision", "matmul:fp8"], "fp8"),
    (["--layer-precision", "matmul:fp16"], "--fp16"),
    (["--tactics", "triton"], r"must start with \+"),
    (["--tactics=-conv.nchw,-conv.nhwc,-gemm.torch,-softmax.torch,-node.reference"], "no tactic is left"),
    (["--strongly-typed", "--fp16"], "strongly typed"),
    (["--min-shapes", "x:1x3x6x8"], "unknown input|fixes it"),
    (["--opt-shapes", "nosuch:1x3"], "unknown input"),
], ids=["unknown-node", "no-colon", "no-name", "bad-precision", "precision-without-flag", "tactics-without-sign",
        "every-tactic-denied", "strongly-typed-fp16", "static-input-resized", "unknown-input"])
def test_bad_build_options_exit_2_with_one_line_and_write_nothing(model_path, tmp_path, capsys, extra, match):
    out = tmp_path / "e.kiln"
    assert main(build_args(model_path, out, *extra)) == 2
    assert re.search(match, one_line_error(capsys))
    assert list(tmp_path.iterdir()) == []


def test_tactics_deny_list_with_equals_sign(model_path, tmp_path, capsys):
    out = tmp_path / "e.kiln"
    assert main(build_args(model_path, out, "--tactics=-triton,+gemm")) == 0
    assert out.is_file()


def test_tactics_deny_list_as_a_separate_argument(model_path, tmp_path):
    assert main(build_args(model_path, tmp_path / "e.kiln", "--tactics", "-triton")) == 0


def test_dynamic_model_without_shapes_exits_2(dynamic_model_path, tmp_path, capsys):
    out = tmp_path / "e.kiln"
    assert main(build_args(dynamic_model_path, out)) == 2
    line = one_line_error(capsys)
    assert "--opt-shapes" in line and "dynamic" in line
    assert not out.exists()


def test_repeated_shape_flags_make_two_profiles(dynamic_model_path, tmp_path, capsys):
    out = tmp_path / "e.kiln"

    def shapes(n):
        return f"x:{n}x3x6x8,r:{n}x4x6x8"

    assert main(build_args(dynamic_model_path, out,
                           "--min-shapes", shapes(1), "--opt-shapes", shapes(2), "--max-shapes", shapes(2),
                           "--min-shapes", shapes(3), "--opt-shapes", shapes(4), "--max-shapes", shapes(8))) == 0
    assert re.search(r"^profiles\s+2$", capsys.readouterr().out, re.MULTILINE)
    info = inspect_json(out, capsys)
    assert len(info["profiles"]) == 2 and info["summary"]["profiles"] == 2
    assert info["profiles"][0]["x"] == [[1, 3, 6, 8], [2, 3, 6, 8], [2, 3, 6, 8]]
    assert info["profiles"][1]["r"] == [[3, 4, 6, 8], [4, 4, 6, 8], [8, 4, 6, 8]]
    assert all(len(row["tactics_per_profile"]) == 2 for row in info["layers"])
    for batch in (1, 5):
        assert main(["run", str(out), "--shapes", shapes(batch), "--compare", "onnxruntime", "--onnx",
                     str(dynamic_model_path)]) == 0
        assert f"{batch}x4x5x6" in capsys.readouterr().out
    assert main(["run", str(out), "--shapes", shapes(9)]) == 2
    assert "profile" in one_line_error(capsys)


def test_build_into_a_missing_directory_exits_2(model_path, tmp_path, capsys):
    assert main(build_args(model_path, tmp_path / "no" / "e.kiln")) == 2
    assert "cannot write" in one_line_error(capsys)


# -- inspect --------------------------------------------------------------------------------------

def test_inspect_prints_every_layer(engine_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # not a terminal: plain lines, every column, nothing folded
    assert main(["inspect", str(engine_path)]) == 0
    text = capsys.readouterr().out
    assert "4 layers" in text
    for index, name in enumerate(LAYERS):
        assert re.search(rf"^ *{index}  {re.escape(name)}  ", text, re.MULTILINE), name
    for tactic in ("conv.nhwc", "gemm.torch", "softmax.torch", "node.reference"):
        assert tactic in text


def test_inspect_json_has_one_row_per_layer(engine_path, capsys):
    info = inspect_json(engine_path, capsys)
    rows = info["layers"]
    assert [row["name"] for row in rows] == LAYERS
    assert info["summary"]["layers"] == len(rows) == 4
    assert [row["index"] for row in rows] == list(range(4))
    for row in rows:
        for key in ("tactic", "precision", "layout", "share", "time_ms", "nodes", "op_types", "inputs", "outputs"):
            assert key in row, key
        assert row["precision"] == "fp32"
    assert rows[0]["layout"] == "NHWC" and rows[0]["nodes"] == ["conv", "residual", "relu"]
    if all(row["time_ms"] is not None for row in rows):
        assert sum(row["share"] for row in rows) == pytest.approx(1.0, abs=1e-6)
        assert all(0 <= row["share"] <= 1 for row in rows)


# -- run ------------------------------------------------------------------------------------------

def test_run_engine_against_onnxruntime(engine_path, model_path, tmp_path, capsys):
    assert main(["run", str(engine_path), "--compare", "onnxruntime", "--onnx", str(model_path)]) == 0
    out = capsys.readouterr().out
    assert "max rel diff" in out and "ok" in out and "2x4x5x6" in out
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "in.npz", x=rng.standard_normal((2, 3, 6, 8)).astype(np.float32),
             r=rng.standard_normal((2, 4, 6, 8)).astype(np.float32))
    assert main(["run", str(engine_path), "--inputs", str(tmp_path / "in.npz"), "--save-outputs",
                 str(tmp_path / "out.npz"), "--compare", "onnxruntime", "--onnx", str(model_path)]) == 0
    with np.load(tmp_path / "out.npz") as saved:
        assert saved["y"].shape == (2, 4, 5, 6) and saved["y"].dtype == np.float32
        np.testing.assert_allclose(saved["y"].sum(axis=2), 1.0, rtol=1e-5)  # softmax over the transposed axis


def test_run_engine_compare_without_onnx_exits_2(engine_path, capsys):
    assert main(["run", str(engine_path), "--compare", "onnxruntime"]) == 2
    assert "--onnx" in one_line_error(capsys)


def test_run_engine_with_wrong_inputs_exits_2(engine_path, tmp_path, capsys):
    np.savez(tmp_path / "in.npz", x=np.random.default_rng(0).standard_normal((2, 3, 6, 9)).astype(np.float32))
    assert main(["run", str(engine_path), "--inputs", str(tmp_path / "in.npz")]) == 2
    assert "axis 3 must be 8" in one_line_error(capsys)


# -- damaged engines ------------------------------------------------------------------------------

def _tampered(engine_path, tmp_path):
    data = bytearray(engine_path.read_bytes())
    data[-20] ^= 0xFF
    path = tmp_path / "tampered.kiln"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("command", ["inspect", "run"])
def test_tampered_engine_exits_2_with_one_line(engine_path, tmp_path, capsys, command):
    path = _tampered(engine_path, tmp_path)
    assert main([command, str(path)]) == 2
    line = one_line_error(capsys)
    assert "checksum" in line and "tampered.kiln" in line


@pytest.mark.parametrize("content", [b"", b"garbage", None], ids=["empty", "garbage", "truncated"])
def test_broken_engine_files_exit_2(engine_path, tmp_path, capsys, content):
    path = tmp_path / "broken.kiln"
    path.write_bytes(engine_path.read_bytes()[:-1] if content is None else content)
    assert main(["inspect", str(path)]) == 2
    assert "broken.kiln" in one_line_error(capsys)
    assert main(["inspect", str(tmp_path / "missing.kiln")]) == 2
    assert "missing.kiln" in one_line_error(capsys)


def test_inspect_a_directory_exits_2(tmp_path, capsys):
    folder = tmp_path / "dir.kiln"
    folder.mkdir()
    assert main(["inspect", str(folder)]) == 2


def test_tampered_engine_in_a_subprocess_has_no_traceback(engine_path, tmp_path):
    path = _tampered(engine_path, tmp_path)
    result = subprocess.run([sys.executable, "-m", "kiln", "inspect", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln: error:") and "checksum" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
