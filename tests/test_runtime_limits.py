"""The tensor-size ceiling at run time: ops whose output size comes from their inputs' values or
shapes are refused before they allocate (ResourceLimitError naming the model, node, op, shape and
bytes), in the reference executor and in engines, and growing Loop scan outputs stop at it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.cli import main
from kiln.errors import ResourceLimitError
from kiln.limits import max_tensor_bytes_set

GIB = 1 << 30
F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _model(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs],
                              [numpy_helper.from_array(np.asarray(a), n) for n, a in initializers])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _run(proto: onnx.ModelProto, feeds=None, name: str = "bomb.onnx"):
    return kiln.Executor(kiln.load_model_proto(proto, name=name), name=name).run(feeds or {})


def _constant_of_shape_16gb() -> onnx.ModelProto:
    return _model([helper.make_node("ConstantOfShape", ["shape"], ["y"], name="fill")], [],
                  [("y", F, [4, 1 << 30])], [("shape", np.array([4, 1 << 30], np.int64))])


def test_a_few_hundred_bytes_asking_for_16_gb_are_refused_before_allocation():
    proto = _constant_of_shape_16gb()
    assert len(proto.SerializeToString()) < 300
    with max_tensor_bytes_set(GIB), pytest.raises(ResourceLimitError) as caught:
        _run(proto)
    message = str(caught.value)
    assert message.startswith("bomb.onnx: node 'fill' (op ConstantOfShape): output 'y': "
                              "4x1073741824 float32 is 16.0 GiB")
    assert "17,179,869,184 bytes" in message and "--max-tensor-bytes" in message


# case -> (node, inputs, initializers, feeds, output rank, the shape in the message); the inputs are small
_X = np.ones((1 << 20, 1), np.float32)
_XT = np.ones((1, 1 << 20), np.float32)
BOMBS = {
    "expand": (helper.make_node("Expand", ["x", "shape"], ["y"], name="n"), [("x", F, [1])],
               [("shape", np.array([1 << 40], np.int64))], {"x": np.ones(1, np.float32)}, 1, "1099511627776 float32"),
    "tile": (helper.make_node("Tile", ["x", "reps"], ["y"], name="n"), [("x", F, [1024])],
             [("reps", np.array([1 << 30], np.int64))], {"x": np.ones(1024, np.float32)}, 1, "1099511627776 float32"),
    "broadcast add": (helper.make_node("Add", ["a", "b"], ["y"], name="n"),
                      [("a", F, [1 << 20, 1]), ("b", F, [1, 1 << 20])],
                      [], {"a": _X, "b": _XT}, 2, "1048576x1048576 float32"),
    "broadcast equal": (helper.make_node("Equal", ["a", "b"], ["y"], name="n"),
                        [("a", F, [1 << 20, 1]), ("b", F, [1, 1 << 20])],
                        [], {"a": _X, "b": _XT}, 2, "1048576x1048576 bool"),
    "where": (helper.make_node("Where", ["c", "a", "b"], ["y"], name="n"),
              [("c", TensorProto.BOOL, [1 << 20, 1]), ("a", F, [1, 1 << 20]), ("b", F, [1])], [],
              {"c": np.ones((1 << 20, 1), bool), "a": _XT, "b": np.ones(1, np.float32)}, 2, "1048576x1048576 float32"),
    "variadic sum": (helper.make_node("Sum", ["a", "b", "a"], ["y"], name="n"),
                     [("a", F, [1 << 20, 1]), ("b", F, [1, 1 << 20])],
                     [], {"a": _X, "b": _XT}, 2, "1048576x1048576 float32"),
    "matmul": (helper.make_node("MatMul", ["a", "b"], ["y"], name="n"),
               [("a", F, [1 << 20, 1]), ("b", F, [1, 1 << 20])],
               [], {"a": _X, "b": _XT}, 2, "1048576x1048576 float32"),
    "gemm": (helper.make_node("Gemm", ["a", "b"], ["y"], name="n", transB=1),
             [("a", F, [1 << 20, 1]), ("b", F, [1 << 20, 1])],
             [], {"a": _X, "b": _X}, 2, "1048576x1048576 float32"),
    "einsum outer product": (helper.make_node("Einsum", ["a", "b"], ["y"], name="n", equation="i,j->ij"),
                             [("a", F, [1 << 20]), ("b", F, [1 << 20])], [],
                             {"a": _X.reshape(-1), "b": _X.reshape(-1)}, 2, "1048576x1048576 float32"),
    "concat of one input many times": (helper.make_node("Concat", ["x"] * 4096, ["y"], name="n", axis=0),
                                       [("x", F, [1 << 20, 1])], [], {"x": _X}, 2, "4294967296x1 float32"),
    "range": (helper.make_node("Range", ["s", "l", "d"], ["y"], name="n"), [],
              [("s", np.array(0, np.int64)), ("l", np.array(1 << 40, np.int64)), ("d", np.array(1, np.int64))], {},
              1, "1099511627776 int64"),
    "pad": (helper.make_node("Pad", ["x", "pads"], ["y"], name="n"), [("x", F, [2, 2])],
            [("pads", np.array([0, 0, 1 << 20, 1 << 20], np.int64))], {"x": np.ones((2, 2), np.float32)},
            2, "1048578x1048578 float32"),
    "resize": (helper.make_node("Resize", ["x", "", "scales"], ["y"], name="n"), [("x", F, [1, 1, 4, 4])],
               [("scales", np.array([1, 1, 1 << 18, 1 << 18], np.float32))], {"x": np.ones((1, 1, 4, 4), np.float32)},
               4, "1x1x1048576x1048576 float32"),
    "one hot": (helper.make_node("OneHot", ["i", "depth", "values"], ["y"], name="n"), [("i", I64, [1 << 20])],
                [("depth", np.array(1 << 20, np.int64)), ("values", np.array([0, 1], np.float32))],
                {"i": np.zeros(1 << 20, np.int64)}, 2, "1048576x1048576 float32"),
    "random normal": (helper.make_node("RandomNormal", [], ["y"], name="n", shape=[1 << 20, 1 << 20]), [], [], {},
                      2, "1048576x1048576 float32"),
    "conv transpose strides": (helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="n",
                                                strides=[1 << 20, 1 << 20]),
                               [("x", F, [1, 1, 4, 4])], [("w", np.ones((1, 1, 1, 1), np.float32))],
                               {"x": np.ones((1, 1, 4, 4), np.float32)}, 4, "1x1x3145729x3145729 float32"),
}


@pytest.mark.parametrize("case", sorted(BOMBS))
def test_value_and_broadcast_shaped_outputs_are_refused_before_allocation(case):
    node, inputs, initializers, feeds, rank, shape = BOMBS[case]
    out_type = TensorProto.BOOL if node.op_type == "Equal" else I64 if node.op_type == "Range" else F
    proto = _model([node], inputs, [("y", out_type, [f"d{i}" for i in range(rank)])], initializers)
    with max_tensor_bytes_set(GIB), pytest.raises(ResourceLimitError) as caught:
        _run(proto, feeds)
    message = str(caught.value)
    assert message.startswith(f"bomb.onnx: node 'n' (op {node.op_type}): "), message
    assert f": {shape} is " in message and "over the 1.0 GiB (1,073,741,824 bytes) limit" in message, message


def _growing_scan_loop() -> onnx.ModelProto:
    """A Loop of 2^62 trips whose scan output gains a [256] row per iteration."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("Identity", ["row"], ["scan"])],
        "body",
        [helper.make_tensor_value_info("i", I64, []), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("scan", F, [256])])
    return _model([helper.make_node("Loop", ["trips", "keep"], ["rows"], name="grow", body=body)], [],
                  [("rows", F, ["n", 256])],
                  [("trips", np.array(1 << 62, np.int64)), ("keep", np.array(True)), ("row", np.ones(256, np.float32))])


def test_a_loop_whose_scan_output_grows_stops_at_the_ceiling():
    with max_tensor_bytes_set(1 << 20), pytest.raises(ResourceLimitError) as caught:
        _run(_growing_scan_loop())
    assert str(caught.value).startswith("bomb.onnx: node 'grow' (op Loop): output 'rows': 1025x256 float32 is 1.0 MiB")


def test_a_loop_whose_scan_output_fits_is_unchanged():
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("Cast", ["i"], ["scan"], to=F)],
        "body",
        [helper.make_tensor_value_info("i", I64, []), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("scan", F, [])])
    proto = _model([helper.make_node("Loop", ["trips", "keep"], ["rows"], name="count", body=body)], [],
                   [("rows", F, ["n"])], [("trips", np.array(1000, np.int64)), ("keep", np.array(True))])
    rows = _run(proto)["rows"]
    assert rows.tolist() == list(range(1000))  # stacked in chunks, in order


def test_kiln_run_refuses_a_bomb_in_one_line(tmp_path, capsys):
    path = tmp_path / "fill.onnx"
    onnx.save(_constant_of_shape_16gb(), path)
    with max_tensor_bytes_set(GIB):
        assert main(["run", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"kiln: error: {path}: node 'fill' (op ConstantOfShape): output 'y': 4x1073741824 float32")


def test_an_engine_refuses_a_value_shaped_bomb_naming_the_engine(tmp_path):
    """An Expand whose shape is an input: built at a small shape, run with a huge one."""
    proto = _model([helper.make_node("Expand", ["x", "shape"], ["y"], name="expand")],
                   [("x", F, [1]), ("shape", I64, [1])], [("y", F, ["n"])])
    onnx.save(proto, tmp_path / "expand.onnx")
    engine = kiln.build(tmp_path / "expand.onnx", kiln.BuildConfig(device="cpu", opt_level=0),
                        calibration={"x": np.ones(1, np.float32), "shape": np.array([3], np.int64)})
    engine.save(tmp_path / "expand.kiln")
    engine = kiln.load_engine(tmp_path / "expand.kiln")
    assert engine.run({"x": np.ones(1, np.float32), "shape": np.array([3], np.int64)})["y"].tolist() == [1.0] * 3
    with max_tensor_bytes_set(GIB), pytest.raises(ResourceLimitError) as caught:
        engine.run({"x": np.ones(1, np.float32), "shape": np.array([1 << 40], np.int64)})
    assert str(caught.value).startswith(f"{tmp_path / 'expand.kiln'}: node 'expand' (op Expand): output 'y': "
                                        "1099511627776 float32")


def test_an_engine_checks_a_pointwise_broadcast_on_the_first_run_at_a_shape(tmp_path):
    proto = _model([helper.make_node("Add", ["a", "b"], ["s"], name="add"),
                    helper.make_node("Relu", ["s"], ["y"], name="relu")],
                   [("a", F, ["n", 1]), ("b", F, [1, "m"])], [("y", F, ["n", "m"])])
    onnx.save(proto, tmp_path / "outer.onnx")
    big = 1 << 20
    profile = kiln.Profile.from_lists(min_shapes={"a": (1, 1), "b": (1, 1)}, opt_shapes={"a": (4, 1), "b": (1, 4)},
                                      max_shapes={"a": (big, 1), "b": (1, big)})
    engine = kiln.build(tmp_path / "outer.onnx", kiln.BuildConfig(device="cpu", opt_level=0, profiles=[profile]))
    kinds = {layer["kind"] for layer in engine.plan["layers"]}
    assert kinds == {"Pointwise"}
    a = np.ones((big, 1), np.float32)
    with max_tensor_bytes_set(GIB), pytest.raises(ResourceLimitError) as caught:
        engine.run({"a": a, "b": a.T.copy()})
    assert "(op Add+Relu): its output: 1048576x1048576 float32 is 4.0 TiB" in str(caught.value)
    assert engine.run({"a": a[:4], "b": a[:4].T.copy()})["y"].shape == (4, 4)
