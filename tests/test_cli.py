"""`kiln run`: outputs printed, npz in and out, --shapes, --compare, and one-line errors with exit 2."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from model_builders import add_relu_model
from onnx import TensorProto, helper, numpy_helper

from kiln.cli import main


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(add_relu_model((2, 3)), path)
    return path


def _dynamic_model(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "dyn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    path = tmp_path / "dyn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    return path


def test_run_prints_outputs(model_path, capsys):
    assert main(["run", str(model_path)]) == 0
    out = capsys.readouterr().out
    assert "y" in out and "2x3" in out and "float32" in out


def test_run_compare_onnxruntime(model_path, capsys):
    assert main(["run", str(model_path), "--compare", "onnxruntime"]) == 0
    out = capsys.readouterr().out
    assert "max rel diff" in out and "ok" in out


def test_run_inputs_and_save_outputs(model_path, tmp_path):
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    assert main(["run", str(model_path), "--inputs", str(tmp_path / "in.npz"), "--save-outputs", str(tmp_path / "out.npz")]) == 0
    w = numpy_helper.to_array(onnx.load(model_path).graph.initializer[0])
    with np.load(tmp_path / "out.npz") as saved:
        np.testing.assert_allclose(saved["y"], np.maximum(x + w, 0), rtol=1e-6)


def test_dynamic_dims_need_shapes(tmp_path, capsys):
    path = _dynamic_model(tmp_path)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "dynamic" in err and "--shapes" in err
    assert main(["run", str(path), "--shapes", "x:5x4"]) == 0
    assert "5x4" in capsys.readouterr().out


@pytest.mark.parametrize(
    "shapes,match",
    [("x:5x5", "fixes it at 4"), ("x:5", "rank"), ("nope:1x4", "unknown input"), ("x=5x4", "NAME:DxDxD")],
)
def test_bad_shapes(tmp_path, capsys, shapes, match):
    assert main(["run", str(_dynamic_model(tmp_path)), "--shapes", shapes]) == 2
    assert match in capsys.readouterr().err


def test_wrong_input_dtype_and_shape(model_path, tmp_path, capsys):
    np.savez(tmp_path / "in.npz", x=np.ones((2, 3), dtype=np.int32))
    assert main(["run", str(model_path), "--inputs", str(tmp_path / "in.npz")]) == 2
    assert "dtype int32" in capsys.readouterr().err
    np.savez(tmp_path / "in.npz", x=np.ones((3, 3), dtype=np.float32))
    assert main(["run", str(model_path), "--inputs", str(tmp_path / "in.npz")]) == 2
    assert "axis 0 must be 2" in capsys.readouterr().err


def test_pickled_npz_is_refused(model_path, tmp_path, capsys):
    np.savez(tmp_path / "in.npz", x=np.array([{"a": 1}], dtype=object))
    assert main(["run", str(model_path), "--inputs", str(tmp_path / "in.npz")]) == 2
    assert "not a readable .npz" in capsys.readouterr().err


def test_compare_mismatch_exits_1(tmp_path, capsys, monkeypatch):
    path = tmp_path / "m.onnx"
    onnx.save(add_relu_model((2, 3)), path)
    import kiln.compare

    real = kiln.compare.run_onnxruntime
    monkeypatch.setattr(kiln.compare, "run_onnxruntime", lambda p, f: {k: v + 1.0 for k, v in real(p, f).items()})
    assert main(["run", str(path), "--compare", "onnxruntime"]) == 1
    assert "OVER" in capsys.readouterr().out


def test_hostile_external_data_exits_2_with_one_line_and_writes_nothing(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\x00" * 4096)
    model = add_relu_model((32, 32))
    path = folder / "m.onnx"
    onnx.save(model, path, save_as_external_data=True, location="w.bin", size_threshold=0)
    proto = onnx.load(path, load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../secret.bin"
    path.write_bytes(proto.SerializeToString())
    out = tmp_path / "out.npz"
    result = subprocess.run(
        [sys.executable, "-m", "kiln", "run", str(path), "--save-outputs", str(out)], capture_output=True, text=True
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln: error:") and "secret.bin" in lines[0]
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_corrupt_model_exits_2(tmp_path):
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"not a model at all")
    result = subprocess.run([sys.executable, "-m", "kiln", "run", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "bad.onnx" in result.stderr


def test_full_disk_leaves_no_partial_outputs_file(model_path, tmp_path, capsys, monkeypatch):
    """A failing write (here: ENOSPC from fsync) exits 2 and leaves neither a partial nor a temporary file."""
    import errno
    import os

    out = tmp_path / "out.npz"
    out.write_bytes(b"previous contents")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    assert main(["run", str(model_path), "--save-outputs", str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert out.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out.npz"]
