"""Hostile files: each one either loads and runs, or is refused with a KilnError (on the command
line: one line, exit code 2). Never another exception, never a crash, never a blind allocation.

Mutated model files (bit flips, truncations, insertions, overwritten runs of bytes); tensors whose
data disagrees with their dims wherever they are; FIFOs in a file's place; random inputs and npz
arrays over the tensor size limit; npz members that are not plain arrays."""

from __future__ import annotations

import io
import os
import re
import zipfile

import numpy as np
import onnx
import pytest
from model_builders import add_relu_model
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.cli import main
from kiln.demo import make_demo_model
from kiln.inputs import random_inputs

_BASE = make_demo_model().SerializeToString()


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    data = bytearray(data)
    kind = rng.integers(0, 4)
    if kind == 0:
        for _ in range(rng.integers(1, 6)):
            data[rng.integers(0, len(data))] ^= 1 << int(rng.integers(0, 8))
    elif kind == 1:
        data = data[: rng.integers(1, len(data))]
    elif kind == 2:
        at = rng.integers(0, len(data))
        data[at:at] = rng.integers(0, 256, rng.integers(1, 20), dtype=np.uint8).tobytes()
    else:
        at = rng.integers(0, len(data) - 8)
        data[at:at + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
    return bytes(data)


@pytest.mark.parametrize("seed", range(40))
def test_mutated_model_runs_or_is_refused(tmp_path, seed):
    path = tmp_path / "mutated.onnx"
    path.write_bytes(_mutate(_BASE, np.random.default_rng(seed)))
    try:
        executor = kiln.Executor(kiln.load_model(path), name=str(path))
        executor.run(random_inputs(executor.inputs, seed=seed, model=str(path)))
    except kiln.KilnError as error:
        assert "mutated.onnx" in str(error), f"the error does not name the file: {error}"


# -- hostile files end in one line and exit code 2, never a traceback ------------------------------


def _refused(capsys, argv: list[str], match: str) -> str:
    """``kiln ARGV`` exits 2 with one ``kiln: error:`` line matching ``match``, and no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("kiln: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert re.search(match, errors[0]), errors[0]
    return errors[0]


def _model(nodes, initializers=(), functions=(), y_shape=(2, 3), opsets=(("", 17),)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))],
                              list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets],
                             functions=list(functions), ir_version=10)


def _tensor_in_each_place() -> dict[str, tuple[onnx.ModelProto, onnx.TensorProto]]:
    """Models holding one small tensor each in a place the loader must check: (model, that tensor)."""
    c = numpy_helper.from_array(np.ones((2, 3), np.float32), "c")
    shape = numpy_helper.from_array(np.array([3, 2], np.int64), "shape")
    small = add_relu_model((2, 3))
    reshape = _model([helper.make_node("Reshape", ["x", "shape"], ["y"])], [shape], y_shape=(3, 2))
    constant = _model([helper.make_node("Constant", [], ["c"], value=c), helper.make_node("Add", ["x", "c"], ["y"])])
    branch = helper.make_graph([helper.make_node("Add", ["x", "c"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 3])], [c])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 3])])
    subgraph = _model([helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)],
                      [numpy_helper.from_array(np.array(True), "cond")])
    add_c = helper.make_function("local", "AddC", ["a"], ["b"], [helper.make_node("Constant", [], ["k"], value=c),
                                                                helper.make_node("Add", ["a", "k"], ["b"])],
                                 opset_imports=[helper.make_opsetid("", 17)])
    function = _model([helper.make_node("AddC", ["x"], ["y"], domain="local")], functions=[add_c],
                      opsets=(("", 17), ("local", 1)))
    return {
        "small float initializer": (small, small.graph.initializer[0]),
        "int64 initializer": (reshape, reshape.graph.initializer[0]),
        "Constant node": (constant, constant.graph.node[0].attribute[0].t),
        "subgraph initializer": (subgraph, next(a.g for a in subgraph.graph.node[0].attribute
                                                if a.name == "then_branch").initializer[0]),
        "function's Constant": (function, function.functions[0].node[0].attribute[0].t),
    }


@pytest.mark.parametrize("place", list(_tensor_in_each_place()))
@pytest.mark.parametrize("damage", ["longer", "shorter"])
def test_raw_data_of_the_wrong_length_is_refused_anywhere(tmp_path, capsys, place, damage):
    """onnx's checker accepts a raw_data longer than the dims; kiln checks every tensor in the model."""
    model, tensor = _tensor_in_each_place()[place]
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    kiln.load_model(path)  # whole, it loads
    tensor.raw_data = tensor.raw_data + b"\0" * 8 if damage == "longer" else tensor.raw_data[:-1]
    onnx.save(model, path)
    _refused(capsys, ["run", str(path)], r"m\.onnx: .* but holds \d+ bytes; the file is truncated or corrupt")


def test_values_in_the_wrong_field_are_refused(tmp_path):
    model = add_relu_model((2, 3))
    w = model.graph.initializer[0]
    w.ClearField("raw_data")
    w.int64_data.extend(range(6))  # a float tensor's values belong in float_data
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(kiln.ModelLoadError, match="float tensor with its values in int64_data"):
        kiln.load_model(path)


def test_empty_tensor_with_dims_past_any_index_is_refused(tmp_path):
    """[0, 2^62] holds no bytes, but numpy and torch cannot make it (its strides overflow)."""
    model = add_relu_model((2, 3))
    empty = numpy_helper.from_array(np.zeros(0, np.float32), "empty")
    empty.dims[:] = [0, 2**62]
    model.graph.initializer.append(empty)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(kiln.ModelLoadError,
                       match="initializer 'empty' has dims .* multiply past what numpy and torch can index"):
        kiln.load_model(path)


def test_a_fifo_as_the_model_is_refused_by_its_kind(tmp_path, capsys):
    os.mkfifo(tmp_path / "m.onnx")
    _refused(capsys, ["run", str(tmp_path / "m.onnx")], "it is a FIFO, not a regular file")


def _big_input_model(tmp_path, shape, elem=TensorProto.FLOAT):
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", elem, shape)],
                              [helper.make_tensor_value_info("y", elem, shape)])
    path = tmp_path / "big.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    return path


def test_random_input_over_the_tensor_limit_is_refused_before_it_is_allocated(tmp_path, capsys):
    """A graph input declared [2^31, 4] and no --inputs: 32 GiB of random floats are not made."""
    path = _big_input_model(tmp_path, [2**31, 4])
    line = _refused(capsys, ["run", str(path), "--max-tensor-bytes", str(10**9)],
                    r"random input 'x': 2147483648x4 float is 32\.0 GiB .*over the .* limit on one tensor")
    assert "--max-tensor-bytes" in line
    path = _big_input_model(tmp_path, [2**40, 4], TensorProto.BOOL)  # 4 TiB of bools: over any default
    _refused(capsys, ["run", str(path)], r"random input 'x': 1099511627776x4 bool is 4\.0 TiB")
    _refused(capsys, ["build", str(path), "-o", str(tmp_path / "e.kiln"), "--device", "cpu"], "random input 'x'")
    _refused(capsys, ["bench", str(path), "--device", "cpu", "--max-tensor-bytes", str(1 << 30)], "random input 'x'")


# -- npz inputs --------------------------------------------------------------------------------------


def _npz(path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def _zip(path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return str(path)


def _npy_header(**fields) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"fortran_order": False, **fields})
    return buffer.getvalue()


@pytest.fixture
def relu_model(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(add_relu_model((2, 3)), path)
    return str(path)


def test_big_endian_npz_inputs_are_read_in_native_order(tmp_path, relu_model, capsys):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    inputs = _npz(tmp_path / "in.npz", x=np.asfortranarray(x.astype(">f4")))
    assert main(["run", relu_model, "--inputs", inputs, "--save-outputs", str(tmp_path / "out.npz")]) == 0
    w = numpy_helper.to_array(onnx.load(relu_model).graph.initializer[0])
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_allclose(out["y"], np.maximum(x + w, 0), rtol=1e-6)


@pytest.mark.parametrize("array, match", [
    (np.zeros((2, 3), dtype=[("a", "<f4")]), "a structured dtype"),
    (np.zeros((2, 3), dtype="V4"), r"dtype \|V4 is not one kiln can hold"),
    (np.zeros((2, 3), dtype="M8[s]"), "datetime64.* is not one kiln can hold"),
    (np.zeros((2, 3), dtype=np.longdouble), "is not one kiln can hold"),
], ids=["structured", "void", "datetime", "long double"])
def test_npz_dtypes_kiln_cannot_hold_are_refused(tmp_path, relu_model, capsys, array, match):
    _refused(capsys, ["run", relu_model, "--inputs", _npz(tmp_path / "in.npz", x=array)], match)


def test_npz_header_asking_for_terabytes_is_refused_before_reading(tmp_path, relu_model, capsys):
    """236 bytes on disk, a header declaring 4 TiB: refused by the header, nothing allocated."""
    path = _zip(tmp_path / "in.npz", {"x.npy": _npy_header(descr="<f4", shape=(2**40,))})
    assert os.path.getsize(path) < 400
    _refused(capsys, ["run", relu_model, "--inputs", path], r"array 'x': 1099511627776 float32 is 4\.0 TiB")


def test_npz_header_declaring_more_than_the_member_holds_is_refused(tmp_path, relu_model, capsys):
    path = _zip(tmp_path / "in.npz", {"x.npy": _npy_header(descr="<f4", shape=(2, 3)) + b"\0" * 20})
    _refused(capsys, ["run", relu_model, "--inputs", path],
             r"declares 2x3 float32 \(24 bytes\) but the member holds 20")


def test_npz_inflating_past_the_limit_is_refused_by_its_zip_directory(tmp_path, relu_model, capsys):
    path = tmp_path / "in.npz"
    np.savez_compressed(path, x=np.zeros(1 << 22, np.uint8))  # 4 MiB of zeros in a few KiB
    assert path.stat().st_size < 100_000
    _refused(capsys, ["run", relu_model, "--inputs", str(path), "--max-tensor-bytes", str(1 << 20)],
             r"its arrays inflate to more than 1\.0 MiB \(1,048,576 bytes\), the limit on one tensor")


@pytest.mark.parametrize("members, match", [
    ({"x.txt": b"hello"}, "member 'x.txt' is not a .npy array"),
    ({"x.npy": b"\x93NUMPY\x03\x00" + b"\0" * 20}, r"\.npy format version 3\.0"),
    ({"x.npy": _npy_header(descr="|O", shape=(2, 3))}, r"Python objects \(pickle\)"),
], ids=["not-npy", "version-3", "object"])
def test_npz_members_that_are_not_plain_arrays_are_refused(tmp_path, relu_model, capsys, members, match):
    _refused(capsys, ["run", relu_model, "--inputs", _zip(tmp_path / "in.npz", members)], match)


def test_a_fifo_as_the_inputs_file_is_refused_without_waiting_on_it(tmp_path, relu_model, capsys):
    os.mkfifo(tmp_path / "in.npz")
    _refused(capsys, ["run", relu_model, "--inputs", str(tmp_path / "in.npz")], "it is a FIFO, not a regular file")
