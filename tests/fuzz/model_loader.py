"""Fuzz target: loading an ONNX model and running it, as ``kiln run model.onnx`` does.

Seeds are two small models built with ``onnx.helper`` that hold a tensor of every kind the loader
checks: a small and a large (skeleton-leaving) float initializer, an int64 shape initializer, a
Constant node's tensor, a Loop whose body has its own initializer, and a model-local function with a
Constant inside. The second seed keeps its large weight and its shape initializer in an external
file. Each case is a seed with hostile edits:

- **tensor**: a tensor's raw bytes cut, extended or replaced, its dims, element type or value field
  changed, or external data added to it (a location among the special files of the case's folder:
  FIFO, socket, directory, symlinks in and out, a hard-linked file, a path with ``..``, an absolute
  one; offsets and lengths that are negative, non-numeric, huge);
- **external file**: the external file cut, extended or emptied;
- **node**: an op type, domain, input or attribute changed (an attribute of the wrong type, a
  tensor set on a non-tensor attribute);
- **type**: a graph input's or output's dims (2^31, 2^62, -1, 0, symbolic) or element type changed;
- **model**: an opset or the IR version changed, a function's body or name edited.

``check`` loads the model as a ``ModelProto`` in memory with its folder (``kiln.load_model_proto``,
every check of ``kiln.load_model`` but the parse and the native checks in a child process, which
cost two seconds each here: a crash of onnx's C++ code shows as a crash), then runs it on random
inputs under a 1 MiB tensor limit. Byte-level damage to model files is ``tests/test_hostile_files.py``'s.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

NAME = "model_loader"
TENSOR_LIMIT = 1 << 20
"""The tensor size limit the cases run under (a random input past it is refused, which is the point)."""

_HOSTILE_INTS = st.one_of(st.integers(-3, 70),
                          st.sampled_from([-1, -2**31, 2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, -2**63]))
_HOSTILE_NUMBERS = st.one_of(
    st.sampled_from(["0", "1", "8", "64", "-1", "-0", "abc", "", " 8", "8 ", "1e3", "0x10", "+8", "1_0", "٥",
                     "99999999999999999999", "9" * 50, "9" * 5000, "16384", "4096", "NaN"]),
    st.integers(-2**70, 2**70).map(str), st.text(max_size=8))
_LOCATIONS = st.one_of(
    st.sampled_from(["weights.bin", "fifo", "sock", "dir", "link_in", "link_out", "hard", "sub/inner.bin",
                     "sub", "sub/", "weights.bin/", "./weights.bin", "weights.bin/.", "../outside.bin",
                     "sub/../weights.bin", "/etc/passwd", "\\\\server\\share", "C:\\x", "", "nope.bin", "a\0b",
                     "x" * 300, "sub/" * 50 + "w", "dir/nothing", "fifo/x", "link_loop"]),
    st.text(max_size=12))


# -- seeds -----------------------------------------------------------------------------------------

def _seed(external: bool) -> tuple[onnx.ModelProto, bytes]:
    """y = Loop(2)[v + d](MatMul(x + w_small, W) * c + AddOne(x)), reshaped through ``shape``; and
    the bytes of its external file (W and shape, shape at an offset, as exporters write them)."""
    rng = np.random.default_rng(0)
    body = helper.make_graph(
        [helper.make_node("Add", ["v_in", "d"], ["v_out"], name="body_add"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [2, 16])],
        [numpy_helper.from_array(np.full(16, 0.25, np.float32), "d")])
    add_one = helper.make_function(
        "local", "AddOne", ["a"], ["b"],
        [helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.ones(16, np.float32))),
         helper.make_node("Add", ["a", "one"], ["b"])],
        opset_imports=[helper.make_opsetid("", 17)])
    nodes = [
        helper.make_node("Add", ["x", "w_small"], ["xs"], name="add_small"),
        helper.make_node("MatMul", ["xs", "W"], ["m"], name="matmul"),
        helper.make_node("Constant", [], ["c"], name="const",
                         value=numpy_helper.from_array(np.full(16, 0.5, np.float32))),
        helper.make_node("Mul", ["m", "c"], ["mc"], name="scale"),
        helper.make_node("AddOne", ["x"], ["x1"], name="add_one", domain="local"),
        helper.make_node("Add", ["mc", "x1"], ["s"], name="sum"),
        helper.make_node("Loop", ["M", "cond", "s"], ["l"], name="loop", body=body),
        helper.make_node("Reshape", ["l", "shape"], ["y"], name="reshape"),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w_small", np.arange(16, dtype=np.float32) / 16),
        ("W", (rng.standard_normal((16, 16)) * 0.3).astype(np.float32)),
        ("M", np.array(2, np.int64)), ("cond", np.array(True)), ("shape", np.array([4, 8], np.int64))]]
    graph = helper.make_graph(nodes, "fuzzed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[add_one], ir_version=10)
    data = bytearray()
    if external:
        for tensor in model.graph.initializer:
            if tensor.name in ("W", "shape"):
                data += b"\0" * (-len(data) % 64)
                offset, raw = len(data), tensor.raw_data
                data += raw
                tensor.ClearField("raw_data")
                tensor.data_location = TensorProto.EXTERNAL
                for key, value in (("location", "weights.bin"), ("offset", str(offset)), ("length", str(len(raw)))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
    return model, bytes(data)


def prepare(folder: Path) -> list[tuple[bytes, bytes]]:
    """The seeds: (model bytes, external file bytes)."""
    seeds = []
    for external in (False, True):
        model, weights = _seed(external)
        seeds.append((model.SerializeToString(), weights))
    return seeds


# -- mutations -------------------------------------------------------------------------------------

def _tensors(message) -> list[onnx.TensorProto]:
    """Every TensorProto in a message, depth first (graphs, attributes, functions, subgraphs)."""
    found, stack = [], [message]
    while stack:
        item = stack.pop()
        if isinstance(item, onnx.TensorProto):
            found.append(item)
            continue
        for field, value in item.ListFields():
            if field.type == field.TYPE_MESSAGE:
                stack.extend(value if field.is_repeated else [value])
    return found


def _nodes(message) -> list[onnx.NodeProto]:
    found, stack = [], [message]
    while stack:
        item = stack.pop()
        if isinstance(item, onnx.NodeProto):
            found.append(item)
        if isinstance(item, onnx.TensorProto):
            continue
        for field, value in item.ListFields():
            if field.type == field.TYPE_MESSAGE:
                stack.extend(value if field.is_repeated else [value])
    return found


def _set_external(tensor: onnx.TensorProto, entries: dict[str, str], location_field: bool) -> None:
    del tensor.external_data[:]
    for key, value in entries.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    if location_field:
        tensor.data_location = TensorProto.EXTERNAL


@st.composite
def _tensor_edit(draw, model: onnx.ModelProto) -> None:
    tensor = draw(st.sampled_from(_tensors(model)))
    action = draw(st.sampled_from(["raw", "raw", "dims", "dtype", "field", "external", "external", "external",
                                   "clear"]))
    if action == "raw":
        raw = bytearray(tensor.raw_data)
        how = draw(st.sampled_from(["cut", "extend", "replace"]))
        if how == "cut":
            del raw[draw(st.integers(0, len(raw))):]
        elif how == "extend":
            raw += draw(st.binary(min_size=1, max_size=16))
        else:
            raw = bytearray(draw(st.binary(max_size=80)))
        tensor.raw_data = bytes(raw)
    elif action == "dims":
        del tensor.dims[:]
        tensor.dims.extend(draw(st.lists(_HOSTILE_INTS, max_size=5)))
    elif action == "dtype":
        tensor.data_type = draw(st.one_of(st.integers(0, 30), st.sampled_from([-1, 2**31 - 1])))
    elif action == "field":
        values = (np.frombuffer(tensor.raw_data[: len(tensor.raw_data) // 4 * 4], np.float32).tolist()
                  if tensor.raw_data else [1.0, 2.0])
        field = draw(st.sampled_from(["float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                                      "string_data"]))
        if draw(st.booleans()):
            tensor.ClearField("raw_data")
        container = getattr(tensor, field)
        if field == "string_data":
            container.extend([b"a"] * len(values))
        elif field in ("float_data", "double_data"):
            container.extend(values)
        else:
            container.extend([int(abs(v)) % 128 if np.isfinite(v) else 0 for v in values])
    elif action == "external":
        entries = {}
        if draw(st.integers(0, 5)):
            entries["location"] = draw(_LOCATIONS)
        for key in ("offset", "length"):
            if draw(st.integers(0, 2)) == 0:
                entries[key] = draw(_HOSTILE_NUMBERS)
        if draw(st.integers(0, 5)) == 0:
            entries[draw(st.sampled_from(["checksum", "basepath", "unknown"]))] = draw(st.text(max_size=6))
        if draw(st.integers(0, 3)):
            tensor.ClearField("raw_data")
        _set_external(tensor, entries, draw(st.integers(0, 5)) > 0)
    else:
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                      "string_data"):
            tensor.ClearField(field)


@st.composite
def _node_edit(draw, model: onnx.ModelProto) -> None:
    node = draw(st.sampled_from(_nodes(model)))
    action = draw(st.sampled_from(["op", "domain", "input", "attribute", "attribute", "tensor_attribute"]))
    if action == "op":
        node.op_type = draw(st.sampled_from(["Add", "Relu", "Reshape", "Expand", "ConstantOfShape", "Tile", "Loop",
                                             "If", "Constant", "Unknown", "MatMul", "Gemm", "AddOne", ""]))
    elif action == "domain":
        node.domain = draw(st.sampled_from(["", "local", "ai.onnx", "com.microsoft", "ai.kiln", "nowhere"]))
    elif action == "input":
        if node.input and draw(st.booleans()):
            del node.input[draw(st.integers(0, len(node.input) - 1))]
        else:
            node.input.append(draw(st.sampled_from(["x", "W", "shape", "M", "", "nothing", "c"])))
    elif action == "attribute":
        if node.attribute and draw(st.booleans()):
            attr = node.attribute[draw(st.integers(0, len(node.attribute) - 1))]
            attr.type = draw(st.integers(0, 14))
        else:
            attr = node.attribute.add()
            attr.name = draw(st.sampled_from(["value", "body", "axis", "perm", "to", "value_ints", "alpha"]))
            attr.type = draw(st.sampled_from([onnx.AttributeProto.INT, onnx.AttributeProto.INTS,
                                              onnx.AttributeProto.FLOAT, onnx.AttributeProto.STRING]))
            attr.i = draw(_HOSTILE_INTS)
            attr.ints.extend(draw(st.lists(_HOSTILE_INTS, max_size=4)))
    else:  # a tensor where onnx's external-data loader still looks: on an attribute of another type
        attr = node.attribute.add()
        attr.name, attr.type = "alpha", onnx.AttributeProto.FLOAT
        attr.t.CopyFrom(numpy_helper.from_array(np.ones(2, np.float32), "hidden"))
        if draw(st.booleans()):
            attr.t.ClearField("raw_data")
            _set_external(attr.t, {"location": draw(_LOCATIONS), "length": draw(_HOSTILE_NUMBERS)}, True)


@st.composite
def _type_edit(draw, model: onnx.ModelProto) -> None:
    value = draw(st.sampled_from([*model.graph.input, *model.graph.output]))
    tensor_type = value.type.tensor_type
    if draw(st.integers(0, 3)) == 0:
        tensor_type.elem_type = draw(st.integers(0, 30))
        return
    tensor_type.shape.ClearField("dim")
    for size in draw(st.lists(st.one_of(_HOSTILE_INTS, st.sampled_from(["batch", "?", ""])), max_size=4)):
        dim = tensor_type.shape.dim.add()
        if isinstance(size, str):
            dim.dim_param = size
        else:
            dim.dim_value = size


@st.composite
def _model_edit(draw, model: onnx.ModelProto) -> None:
    action = draw(st.sampled_from(["opset", "ir", "function"]))
    if action == "opset":
        opset = model.opset_import[draw(st.integers(0, len(model.opset_import) - 1))]
        opset.version = draw(st.one_of(st.integers(-1, 30), st.sampled_from([2**62])))
    elif action == "ir":
        model.ir_version = draw(st.integers(-1, 14))
    else:
        function = model.functions[0]
        if draw(st.booleans()) or not function.node:
            function.name = draw(st.sampled_from(["", "AddTwo", "Add"]))
        else:
            del function.node[draw(st.integers(0, len(function.node) - 1))]


@st.composite
def _weights_edit(draw, weights: bytes) -> bytes:
    how = draw(st.sampled_from(["cut", "extend", "empty"]))
    if how == "cut":
        return weights[: draw(st.integers(0, len(weights)))]
    if how == "extend":
        return weights + draw(st.binary(min_size=1, max_size=64))
    return b""


@st.composite
def _case(draw, seeds: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes]:
    model_bytes, weights = draw(st.sampled_from(seeds))
    model = onnx.ModelProto.FromString(model_bytes)
    edits = {"tensor": _tensor_edit, "node": _node_edit, "type": _type_edit, "model": _model_edit}
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["tensor", "tensor", "tensor", "node", "type", "model", "weights"]))
        if kind == "weights":
            weights = draw(_weights_edit(weights))
        else:
            draw(edits[kind](model))
    return model.SerializeToString(), weights


def cases(seeds: list[tuple[bytes, bytes]]):
    return _case(seeds)


# -- the check -------------------------------------------------------------------------------------

_SOCKETS: list[socket.socket] = []


def _folder(work: Path) -> Path:
    """The case's folder, with a file of every special kind beside the model (made once per process)."""
    folder = work / f"model-{os.getpid()}"
    if folder.exists():
        return folder
    folder.mkdir()
    (work / "outside.bin").write_bytes(os.urandom(4096))
    os.mkfifo(folder / "fifo")
    (folder / "dir").mkdir()
    (folder / "sub").mkdir()
    (folder / "sub" / "inner.bin").write_bytes(os.urandom(4096))
    (folder / "link_in").symlink_to("sub/inner.bin")
    (folder / "link_out").symlink_to(work / "outside.bin")
    (folder / "link_loop").symlink_to("link_loop")
    (folder / "hard_target").write_bytes(os.urandom(4096))
    os.link(folder / "hard_target", folder / "hard")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "sock"))
    _SOCKETS.append(server)  # bound for the life of the process
    return folder


RUN_LIMIT_S = 5.0
"""The time limit the runs have (``--timeout-s``): a mutated Loop trip count of 4e18 is a model that
runs for ages, refused with RunStopped; a case over the harness's own limit is kiln not stopping."""


def check(seeds: list[tuple[bytes, bytes]], case: tuple[bytes, bytes], work: Path) -> None:
    """Load the model with its folder, then run it on random inputs under the tensor and time limits."""
    import kiln
    from kiln import limits
    from kiln.inputs import random_inputs

    model_bytes, weights = case
    folder = _folder(work)
    (folder / "weights.bin").write_bytes(weights)
    proto = onnx.ModelProto.FromString(model_bytes)
    with limits.max_tensor_bytes_set(TENSOR_LIMIT):
        model = kiln.load_model_proto(proto, name="case.onnx", base_dir=folder)
        executor = kiln.Executor(model, name="case.onnx")
        executor.run(random_inputs(executor.inputs, model="case.onnx"), timeout_s=RUN_LIMIT_S)
