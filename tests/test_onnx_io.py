"""Safe loading: every kind of bad model file is refused with a clear KilnError, and nothing outside
the model's folder is ever opened."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from model_builders import add_relu_model
from onnx import TensorProto, helper

import kiln
from kiln import ModelLoadError, UnsupportedModelError, load_model

# -- files that are not models ---------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "nope.onnx")


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="not a regular file"):
        load_model(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        load_model(path)


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.99])
def test_truncated_file(tmp_path, fraction):
    data = add_relu_model((16, 16)).SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelLoadError, match="cut.onnx"):
        load_model(path)


@pytest.mark.parametrize(
    "content",
    [b"hello, I am a text file\n", b"\x89PNG\r\n\x1a\n" + bytes(range(256)), os.urandom(4096), b"\x08\x07" * 10],
    ids=["text", "png", "random", "looks-like-protobuf"],
)
def test_not_onnx(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="bad.onnx"):
        load_model(path)


def test_size_limit(tmp_path):
    path = tmp_path / "big.onnx"
    onnx.save(add_relu_model((64, 64)), path)
    with pytest.raises(ModelLoadError, match="over the .*-byte limit"):
        load_model(path, max_bytes=1000)
    assert load_model(path, max_bytes=1 << 20) is not None


# -- external data -----------------------------------------------------------------------------------


def _save_external(tmp_path: Path, location: str = "weights.bin") -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    model = add_relu_model((32, 32))
    path = folder / "m.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=0)
    return path


def _set_location(path: Path, location: str, **extra: str) -> None:
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
        for key, value in extra.items():
            entry = next((e for e in tensor.external_data if e.key == key), None)
            if entry is None:
                entry = tensor.external_data.add()
                entry.key = key
            entry.value = value
    path.write_bytes(model.SerializeToString())


def test_external_data_inside_folder_loads_and_runs(tmp_path):
    path = _save_external(tmp_path)
    model = load_model(path)
    x = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)
    y = kiln.Executor(model).run({"x": x})["y"].numpy()
    w = onnx.numpy_helper.to_array(add_relu_model((32, 32)).graph.initializer[0])
    np.testing.assert_allclose(y, np.maximum(x + w, 0), rtol=1e-6)



def test_loaded_external_weights_live_in_the_model(tmp_path, monkeypatch):
    """The IR holds external weights itself: serialized after its folder is gone, it is a complete model."""
    path = _save_external(tmp_path)
    model = load_model(path)
    (path.parent / "weights.bin").unlink()
    monkeypatch.chdir(tmp_path)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer)
    w = onnx.numpy_helper.to_array(add_relu_model((32, 32)).graph.initializer[0])
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(proto.graph.initializer[0]), w)

class _OpenRecorder:
    """Records every file Python opens while active (an audit hook cannot be removed, so it is gated)."""

    active = False
    paths: list[str] = []

    @classmethod
    def hook(cls, event, args):
        if cls.active and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            cls.paths.append(os.fsdecode(args[0]))


sys.addaudithook(_OpenRecorder.hook)


@contextlib.contextmanager
def recording_opens():
    _OpenRecorder.paths = []
    _OpenRecorder.active = True
    try:
        yield _OpenRecorder.paths
    finally:
        _OpenRecorder.active = False


def _outside_secret(tmp_path: Path) -> Path:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(os.urandom(8192))
    return secret


def _assert_nothing_outside(opened: list[str], folder: Path) -> None:
    root = str(folder.resolve())
    outside = [p for p in opened if not os.path.realpath(p).startswith(root + os.sep)]
    assert not outside, f"opened outside the model folder: {outside}"


def test_external_data_absolute_path(tmp_path):
    path = _save_external(tmp_path)
    secret = _outside_secret(tmp_path)
    _set_location(path, str(secret))
    with recording_opens() as opened, pytest.raises(ModelLoadError, match="absolute path"):
        load_model(path)
    _assert_nothing_outside(opened, path.parent)


@pytest.mark.parametrize("location", ["../secret.bin", "sub/../../secret.bin"], ids=["leading", "hidden-in-the-middle"])
def test_external_data_dotdot(tmp_path, location):
    path = _save_external(tmp_path)
    _outside_secret(tmp_path)
    _set_location(path, location)
    with recording_opens() as opened, pytest.raises(ModelLoadError, match=r"leaves the model's folder"):
        load_model(path)
    _assert_nothing_outside(opened, path.parent)


def test_external_data_symlink_out(tmp_path):
    path = _save_external(tmp_path)
    secret = _outside_secret(tmp_path)
    (path.parent / "link.bin").symlink_to(secret)
    _set_location(path, "link.bin")
    with recording_opens() as opened, pytest.raises(ModelLoadError, match="symlink"):
        load_model(path)
    _assert_nothing_outside(opened, path.parent)


def test_external_data_missing_file(tmp_path):
    path = _save_external(tmp_path)
    _set_location(path, "gone.bin")
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(path)


def test_external_data_truncated(tmp_path):
    path = _save_external(tmp_path)
    weights = path.parent / "weights.bin"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="past the end"):
        load_model(path)


def test_external_data_offset_past_end(tmp_path):
    path = _save_external(tmp_path)
    _set_location(path, "weights.bin", offset="1000000")
    with pytest.raises(ModelLoadError, match="past the end"):
        load_model(path)


@pytest.mark.parametrize("key", ["offset", "length"])
@pytest.mark.parametrize("value", ["-1", "abc", "1e3", " 8", "99999999999999999999", ""])
def test_external_data_offset_and_length_must_be_byte_counts(tmp_path, key, value):
    """onnx's reader would raise a bare ValueError on these; kiln names the tensor and the field."""
    path = _save_external(tmp_path)
    _set_location(path, "weights.bin", **{key: value})
    with pytest.raises(ModelLoadError, match=rf"initializer 'w': its external data {key} .* is not a byte count"):
        load_model(path)


def _special_file(folder: Path, kind: str) -> None:
    target = folder / "special.bin"
    if kind == "FIFO":
        os.mkfifo(target)
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(target))
        _SOCKETS.append(server)
    elif kind == "directory":
        target.mkdir()


_SOCKETS: list[socket.socket] = []


@pytest.mark.parametrize("kind", ["FIFO", "socket", "directory"])
def test_external_data_in_a_special_file_is_refused_by_its_kind_unopened(tmp_path, kind):
    """A FIFO in the weights' place would block a reader forever: it is refused by lstat, never opened."""
    path = _save_external(tmp_path)
    _special_file(path.parent, kind)
    _set_location(path, "special.bin")
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the load waited on the special file"))
    signal.alarm(60)
    try:
        with recording_opens() as opened, pytest.raises(ModelLoadError, match=f"it is a {kind}, not a regular file"):
            load_model(path)
    finally:
        signal.alarm(0)
    assert not [p for p in opened if p.endswith("special.bin")]


def test_external_data_through_a_symlink_inside_the_folder_is_refused(tmp_path):
    """onnx's reader refuses any link on the way; kiln says so before it gets there."""
    path = _save_external(tmp_path)
    (path.parent / "link.bin").symlink_to("weights.bin")
    _set_location(path, "link.bin")
    with pytest.raises(ModelLoadError, match="'link.bin' is a symbolic link"):
        load_model(path)


def test_external_data_in_a_hard_linked_file_is_refused(tmp_path):
    path = _save_external(tmp_path)
    os.link(path.parent / "weights.bin", tmp_path / "elsewhere.bin")
    with pytest.raises(ModelLoadError, match="the file has 2 hard links"):
        load_model(path)


def test_external_data_of_a_function_constant_is_checked_like_any_other(tmp_path):
    """A tensor inside a model-local function, or on an attribute that is not a tensor attribute, is
    read by onnx's external-data loader too: its location is checked before anything is opened."""
    folder = tmp_path / "model"
    folder.mkdir()
    secret = _outside_secret(tmp_path)
    c = onnx.numpy_helper.from_array(np.ones((2, 3), np.float32), "c")
    onnx.external_data_helper.set_external_data(c, "../secret.bin", offset=0, length=24)
    c.ClearField("raw_data")
    body = [helper.make_node("Constant", [], ["k"], value=c), helper.make_node("Add", ["a", "k"], ["b"])]
    function = helper.make_function("local", "AddC", ["a"], ["b"], body, opset_imports=[helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("AddC", ["x"], ["y"], domain="local")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, functions=[function], ir_version=10,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    path = folder / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with (recording_opens() as opened,
          pytest.raises(ModelLoadError, match="in function 'AddC' has external data at '../secret.bin'")):
        load_model(path)
    _assert_nothing_outside(opened, folder)
    assert secret.exists()
    # the same tensor hidden on a float attribute
    node = helper.make_node("Relu", ["x"], ["y"])
    hidden = node.attribute.add()
    hidden.name, hidden.type, hidden.f = "alpha", onnx.AttributeProto.FLOAT, 1.0
    hidden.t.CopyFrom(c)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    with (recording_opens() as opened,
          pytest.raises(ModelLoadError, match="the tensor of attribute 'alpha' of node 'Relu'")):
        load_model(path)
    _assert_nothing_outside(opened, folder)


def test_external_data_counts_toward_size_limit(tmp_path):
    path = _save_external(tmp_path)
    with pytest.raises(ModelLoadError, match="size limit"):
        load_model(path, max_bytes=path.stat().st_size + 100)


# -- valid files kiln cannot run ------------------------------------------------------------------------


def test_opset_newer_than_supported(tmp_path):
    path = tmp_path / "new.onnx"
    model = add_relu_model(opset=17)
    model.opset_import[0].version = 99
    path.write_bytes(model.SerializeToString())
    with pytest.raises(UnsupportedModelError, match="opset 99 .* newer than kiln supports"):
        load_model(path)


def test_unknown_ops_are_all_listed(tmp_path):
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["a"], name="ok"),
            helper.make_node("FancyOp", ["a"], ["b"], name="fancy1", domain="com.example"),
            helper.make_node("OtherOp", ["b"], ["c"], name="other", domain="com.example"),
            helper.make_node("FancyOp", ["c"], ["y"], name="fancy2", domain="com.example"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    with pytest.raises(UnsupportedModelError) as info:
        load_model(path)
    message = str(info.value)
    assert "2 op(s)" in message
    for expected in ["com.example::FancyOp", "'fancy1'", "'fancy2'", "com.example::OtherOp", "'other'", "custom.onnx"]:
        assert expected in message


def test_input_without_dtype(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.UNDEFINED, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    path = tmp_path / "nodtype.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    with pytest.raises(kiln.KilnError, match="'x'.*(element type|type)"):
        load_model(path)


def test_invalid_graph_is_refused_by_the_checker(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["missing"], ["y"], name="relu")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    path = tmp_path / "broken.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        load_model(path)


def test_loaded_model_carries_inferred_shapes(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(add_relu_model((2, 5)), path)
    model = load_model(path)
    s = next(n for n in model.graph if n.name == "add").outputs[0]
    assert s.shape is not None and list(s.shape) == [2, 5]


# -- native crashes and odd-but-valid models -------------------------------------------------------


def _slice_with_huge_step() -> onnx.ModelProto:
    inits = [onnx.numpy_helper.from_array(np.array([v]), n)
             for n, v in [("s", 0), ("e", 4), ("a", 0), ("st", 2**63 - 1)]]
    graph = helper.make_graph(
        [helper.make_node("Slice", ["x", "s", "e", "a", "st"], ["y"], name="slice")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_slice_with_int64_max_step_loads_and_runs(tmp_path):
    """onnx 1.23's shape-inference data propagation segfaults on this valid model; kiln must not."""
    path = tmp_path / "slice.onnx"
    onnx.save(_slice_with_huge_step(), path)
    y = kiln.Executor(load_model(path)).run({"x": np.arange(1, 5, dtype=np.float32)})["y"]
    assert y.tolist() == [1.0]


def test_native_crash_while_checking_is_a_load_error(tmp_path, monkeypatch):
    """The native checks run in a child process; its crash becomes a ModelLoadError here."""
    import kiln.onnx_io

    path = tmp_path / "m.onnx"
    onnx.save(add_relu_model(), path)
    crash = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    monkeypatch.setattr(kiln.onnx_io, "_NATIVE_CHECKS", crash)
    with pytest.raises(ModelLoadError, match="crashed on this model"):
        load_model(path)


def test_sparse_attribute_is_refused_with_a_kiln_error():
    sparse = helper.make_sparse_tensor(
        helper.make_tensor("v", TensorProto.FLOAT, [1], [5.0]), helper.make_tensor("i", TensorProto.INT64, [1], [2]),
        [4],
    )
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["y"], name="const", sparse_value=sparse)],
        "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(kiln.KilnError, match="sparse"):
        kiln.Executor(kiln.load_model_proto(model, name="sparse"))


# -- the skeleton: large weights skip the checker and shape inference -------------------------------


def _weighted_model(ir_version: int = 8) -> onnx.ModelProto:
    """x [2, 64] @ W [64, 64] (a large float weight) -> Reshape by a small int64 shape -> Relu."""
    rng = np.random.default_rng(3)
    w = onnx.numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W")
    shape = onnx.numpy_helper.from_array(np.array([4, 32], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
         helper.make_node("Reshape", ["h", "shape"], ["r"], name="reshape"),
         helper.make_node("Relu", ["r"], ["y"], name="relu")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])], [w, shape],
    )
    if ir_version < 4:  # old models list their initializers among the inputs
        graph.input.extend([helper.make_tensor_value_info("W", TensorProto.FLOAT, [64, 64]),
                            helper.make_tensor_value_info("shape", TensorProto.INT64, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=ir_version)


@pytest.mark.parametrize("ir_version", [3, 8])
def test_skeleton_infers_what_the_full_model_infers(tmp_path, ir_version):
    """Shapes inferred without the weight (its value) equal those onnx infers with it; the weight is
    back as an initializer, not an input, and the model computes x @ W reshaped."""
    proto = _weighted_model(ir_version)
    path = tmp_path / "w.onnx"
    onnx.save(proto, path)
    model = load_model(path)
    full = onnx.shape_inference.infer_shapes(proto)
    expected = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in full.graph.value_info}
    got = {v.name: list(v.shape) for n in model.graph for v in n.outputs if v.name in expected}
    assert got == expected == {"h": [2, 64], "r": [4, 32]}
    assert list(model.graph.outputs[0].shape) == [4, 32]
    assert "W" in model.graph.initializers and [v.name for v in model.graph.inputs] == (
        ["x", "W", "shape"] if ir_version < 4 else ["x"]
    )
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    w = onnx.numpy_helper.to_array(proto.graph.initializer[0])
    y = kiln.Executor(model).run({"x": x})["y"].numpy()
    np.testing.assert_allclose(y, np.maximum(x @ w, 0).reshape(4, 32), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("damage", ["short", "long", "two-fields", "float-data-count"])
def test_weight_with_wrong_amount_of_data_is_refused(tmp_path, damage):
    """A weight that leaves the skeleton is still checked: its stored values must match its dims."""
    proto = _weighted_model()
    w = proto.graph.initializer[0]
    if damage == "short":
        w.raw_data = w.raw_data[:-4]
    elif damage == "long":
        w.raw_data = w.raw_data + b"\0" * 8
    elif damage == "two-fields":
        w.float_data.extend([1.0] * 4096)
    else:
        values = np.frombuffer(w.raw_data, dtype=np.float32)
        w.ClearField("raw_data")
        w.float_data.extend(values[:-1].tolist())
    path = tmp_path / "w.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(ModelLoadError, match=r"w\.onnx: initializer 'W'"):
        load_model(path)


def test_weight_in_float_data_loads(tmp_path):
    proto = _weighted_model()
    w = proto.graph.initializer[0]
    values = np.frombuffer(w.raw_data, dtype=np.float32).copy()
    w.ClearField("raw_data")
    w.float_data.extend(values.tolist())
    path = tmp_path / "w.onnx"
    path.write_bytes(proto.SerializeToString())
    x = np.ones((2, 64), dtype=np.float32)
    y = kiln.Executor(load_model(path)).run({"x": x})["y"].numpy()
    np.testing.assert_allclose(y, np.maximum(x @ values.reshape(64, 64), 0).reshape(4, 32), rtol=1e-5)


def test_external_weight_whose_length_disagrees_with_its_dims(tmp_path):
    path = _save_external(tmp_path)
    _set_location(path, "weights.bin", length="8")
    with pytest.raises(ModelLoadError, match="external data of 8 bytes"):
        load_model(path)


# -- dims written as -1 (paddle2onnx) or "?" are dynamic -----------------------------------------------


def _minus_one_model() -> onnx.ModelProto:
    """Relu -> Conv (5 -> 6 channels: misaligned for fp16) -> Reshape to [0, -1], as paddle2onnx
    writes it: the batch is ``-1`` on the input, a value_info and the output, H and W are "?". The
    Reshape's ``-1`` is a value, not a dim, and must keep its meaning."""
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((6, 5, 3, 3)).astype(np.float32), "w"),
             onnx.numpy_helper.from_array(np.array([0, -1], np.int64), "target")]
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Reshape", ["c", "target"], ["y"], name="reshape")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 5, "?", "?"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, -1])],
        inits,
        value_info=[helper.make_tensor_value_info("r", TensorProto.FLOAT, [-1, 5, "?", "?"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_minus_one_and_question_mark_dims_load_as_dynamic(tmp_path):
    proto = _minus_one_model()
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    for model in (load_model(path), kiln.load_model_proto(proto)):
        values = {v.name: v for v in (*model.graph.inputs, *model.graph.outputs)}
        values["r"] = next(n for n in model.graph if n.name == "relu").outputs[0]
        for name, value in values.items():
            assert not any(isinstance(d, int) and d < 0 for d in value.shape), (name, value.shape)
            assert not isinstance(value.shape[0], int), (name, value.shape)
        x = values["x"].shape
        assert x[1] == 5 and all(x[a].value is None for a in (0, 2, 3))  # unknown: the two "?" need not agree
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1  # the caller's proto is untouched


def test_minus_one_dims_in_subgraphs_and_sequences_load_as_dynamic():
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [-1, 3])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [-1, 3])])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other, name="if"),
         helper.make_node("SequenceConstruct", ["y"], ["s"], name="seq")],
        "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3]),
         helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, [-1, 3])],
    )
    model = kiln.load_model_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    branch = next(n for n in model.graph if n.op_type == "If").attributes["then_branch"].value
    assert not isinstance(branch.outputs[0].shape[0], int)
    assert not isinstance(model.graph.outputs[0].shape[0], int)
    out = kiln.Executor(model).run({"cond": np.array(False), "x": np.ones((2, 3), np.float32)})
    np.testing.assert_array_equal(np.asarray(out["y"]), -np.ones((2, 3), np.float32))
    assert [tuple(t.shape) for t in out["s"]] == [(2, 3)]


def test_minus_one_model_runs_doctors_and_optimizes_from_the_command_line(tmp_path, capsys):
    from kiln.cli import main

    path = tmp_path / "m.onnx"
    onnx.save(_minus_one_model(), path)
    assert main(["run", str(path), "--shapes", "x:2x5x6x6", "--compare", "onnxruntime"]) == 0
    assert main(["doctor", str(path), "--precision", "fp16", "--shapes", "x:2x5x6x6"]) == 0
    assert main(["doctor", str(path), "--precision", "fp16", "--opt-shapes", "x:2x5x6x6"]) == 0
    assert main(["optimize", str(path), "-o", str(tmp_path / "out.onnx"), "--precision", "fp16"]) == 0
    text = capsys.readouterr().out
    assert "fixes it at -1" not in text and "misaligned" in text and "pad_for_tensor_cores: 1 rewrite" in text
    optimized = onnx.load(tmp_path / "out.onnx")
    assert "Pad" in {n.op_type for n in optimized.graph.node}
    assert main(["run", str(tmp_path / "out.onnx"), "--shapes", "x:3x5x4x7", "--compare", "onnxruntime"]) == 0


def _invalid_utf8_model_bytes() -> bytes:
    """add_relu_model with a producer name that is not UTF-8 (ONNX is proto2: it parses, and fails when read)."""
    model = add_relu_model()
    model.producer_name = "QQQQ"
    data = model.SerializeToString()
    assert data.count(b"QQQQ") == 1
    return data.replace(b"QQQQ", b"Q\xe9AQ")


def test_a_string_that_is_not_utf8_is_refused_in_a_model_file(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(_invalid_utf8_model_bytes())
    with pytest.raises(ModelLoadError, match="not valid UTF-8"):
        load_model(path)


def test_a_string_that_is_not_utf8_is_refused_in_an_embedded_graph():
    from kiln.onnx_io import load_embedded_model

    with pytest.raises(ModelLoadError, match="engine graph: a string in the model .* is not valid UTF-8"):
        load_embedded_model(_invalid_utf8_model_bytes(), "engine graph")
