"""Fuzz target: reading an ``--inputs`` .npz file and running a model on it, as ``kiln run`` does.

Seeds are three npz files for a small model with inputs ``x`` (float32 2x3), ``ids`` (int64 2x3) and
``mask`` (bool 2x3): stored, deflated, and one with big-endian arrays (``x`` in Fortran order).
Each case is a seed's members, edited, zipped again, then damaged at the zip level:

- **header**: a member's .npy header rewritten: its version (1.0, 2.0, 3.0, unknown), the header
  length field, the dict's ``descr`` (big-endian, structured, void, object, datetime, long double,
  zero-size, nonsense), ``shape`` (negative, 2^31, 2^62, 10^30, 65 dims, not a tuple of ints),
  ``fortran_order``, keys missing or extra, or text that is not a dict at all;
- **data**: a member's data cut, extended or replaced;
- **member**: a member renamed (not .npy, twice, a folder, an empty name), dropped, or its
  compression changed (stored, deflate, bzip2, lzma);
- **zip**: a member's sizes forged in the zip directory and its local header (the 6 MB -> 6 GiB
  bomb: a small member that says it inflates to gigabytes), the encryption flag set, bytes flipped,
  cut or appended.

``check`` reads the file under a 16 MiB tensor limit, fills the inputs it lacks with random
values, and runs the model on them.
"""

from __future__ import annotations

import ast
import io
import os
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

NAME = "npz_inputs"
TENSOR_LIMIT = 16 << 20

_INTS = st.one_of(st.integers(-3, 8),
                  st.sampled_from([-1, 2**31, 2**31 - 1, 2**32, 2**40, 2**62, 2**63, 2**64, 10**30]))
_DESCRS = st.one_of(
    st.sampled_from(["<f4", ">f4", ">i8", "<i8", "|b1", "<U3", ">U3", "|S2", "|S0", "<U0", "|V4", "|V0", "|O", "O",
                     "<M8[s]", "<m8[s]", "<f16", "<c32", "<f2", "<c8", ">c16", "<i2", ">u2", "|u1", "float32", "int",
                     "xyz", "", "<U999999999999", "<f4 ", "V2", "b1", "?"]),
    st.sampled_from([[("a", "<f4")], [("a", "<f4", (2,))], [("", "<i4")], ("<f4", (2,)), [("a", "|O")], 5, None, [],
                     {}]),
)
_SHAPES = st.one_of(
    st.sampled_from([(2, 3), (3, 2), (6,), (), (0,), (2, 3, 1), (0, 2**62), (2**31, 4), (2**62,), (10**30,),
                     (1,) * 65]),
    st.lists(_INTS, max_size=4).map(tuple),
    st.sampled_from([[2, 3], 6, "2,3", (2.0, 3), ("2", 3), ((2,), 3), None, (True, 3)]),
)
_NAMES = st.sampled_from(["x.npy", "ids.npy", "mask.npy", "x", "x.txt", "dir/", "a/b.npy", ".npy", "", "x.npy",
                          "s.npy", "é.npy", "x.npy/", "../x.npy", "y.npy"])
_COMPRESSION = st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])


# -- seeds -----------------------------------------------------------------------------------------

def _npz(arrays: dict[str, np.ndarray], compressed: bool) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def prepare(folder: Path) -> list[bytes]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3)).astype(np.float32)
    ids = rng.integers(0, 5, (2, 3))
    mask = rng.random((2, 3)) < 0.5
    return [
        _npz({"x": x, "ids": ids, "mask": mask}, compressed=False),
        _npz({"x": x, "ids": ids, "mask": mask}, compressed=True),
        _npz({"x": np.asfortranarray(x.astype(">f4")), "ids": ids.astype(">i8"), "mask": mask}, compressed=False),
    ]


# -- mutations -------------------------------------------------------------------------------------

def _members(data: bytes) -> list[list]:
    """[name, .npy bytes, compression] of each member of a seed."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [[info.filename, archive.read(info), info.compress_type] for info in archive.infolist()]


def _split_npy(npy: bytes) -> tuple[tuple[int, int], str, bytes]:
    """(version, header text, data) of a seed's .npy member."""
    version = (npy[6], npy[7])
    if version[0] == 1:
        length, start = struct.unpack("<H", npy[8:10])[0], 10
    else:
        length, start = struct.unpack("<I", npy[8:12])[0], 12
    return version, npy[start:start + length].decode("latin1"), npy[start + length:]


def _join_npy(version: tuple[int, int], header: str, data: bytes, length: int | None = None) -> bytes:
    text = header.encode("utf8" if version[0] >= 3 else "latin1", errors="replace")
    size = len(text) if length is None else length
    field = struct.pack("<H", size % 65536) if version[0] == 1 else struct.pack("<I", size % 2**32)
    return b"\x93NUMPY" + bytes([version[0] % 256, version[1] % 256]) + field + text + data


@st.composite
def _header_edit(draw, member: list) -> None:
    version, header, data = _split_npy(member[1])
    try:
        fields = ast.literal_eval(header)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):  # edited before
        fields = None
    if not isinstance(fields, dict):
        fields = {"descr": "<f4", "fortran_order": False, "shape": (2, 3)}
    action = draw(st.sampled_from(["descr", "descr", "shape", "shape", "fortran", "keys", "text", "version", "length"]))
    length = None
    if action == "descr":
        fields["descr"] = draw(_DESCRS)
    elif action == "shape":
        fields["shape"] = draw(_SHAPES)
    elif action == "fortran":
        fields["fortran_order"] = draw(st.sampled_from([True, False, 1, 0, "yes", None, []]))
    elif action == "keys":
        if draw(st.booleans()):
            fields.pop(draw(st.sampled_from(["descr", "shape", "fortran_order"])), None)
        else:
            fields[draw(st.sampled_from(["extra", "Shape", 5]))] = draw(st.sampled_from([1, "a", None]))
    elif action == "version":
        version = draw(st.sampled_from([(1, 0), (2, 0), (3, 0), (1, 1), (0, 0), (4, 0), (255, 255)]))
    elif action == "length":
        length = draw(st.one_of(st.integers(0, 200), st.sampled_from([65535, 2**31, 2**32 - 1])))
    text = draw(st.one_of(st.text(max_size=60),
                          st.sampled_from(["{", "((((" * 500, "{'descr': " + "[" * 300, "[1, 2]", "{}", "None",
                                           "{" + "'a': 1, " * 800 + "}"])))
    header = text if action == "text" else repr(fields)
    header += " " * (-(len(header) + 11) % 64) + "\n"
    member[1] = _join_npy(version, header, data, length)


@st.composite
def _data_edit(draw, member: list) -> None:
    version, header, data = _split_npy(member[1])
    how = draw(st.sampled_from(["cut", "extend", "replace"]))
    if how == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif how == "extend":
        data += draw(st.binary(min_size=1, max_size=64))
    else:
        data = draw(st.binary(max_size=96))
    member[1] = _join_npy(version, header, data)


@st.composite
def _member_edit(draw, members: list[list]) -> None:
    action = draw(st.sampled_from(["rename", "drop", "duplicate", "compression"]))
    index = draw(st.integers(0, len(members) - 1))
    if action == "rename":
        members[index][0] = draw(_NAMES)
    elif action == "drop":
        del members[index]
    elif action == "duplicate":
        members.append(list(members[index]))
    else:
        members[index][2] = draw(_COMPRESSION)


def _zip(members: list[list]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a name written twice, on purpose
        for name, data, compression in members:
            info = zipfile.ZipInfo(name or "_")
            info.filename = name  # an empty name too (ZipInfo refuses none)
            info.compress_type = compression
            archive.writestr(info, data)
    return buffer.getvalue()


@st.composite
def _zip_edit(draw, data: bytes) -> bytes:
    data = bytearray(data)
    action = draw(st.sampled_from(["size", "size", "encrypted", "bytes"]))
    central = [i for i in range(len(data) - 4) if data[i:i + 4] == b"PK\x01\x02"]
    local = [i for i in range(len(data) - 4) if data[i:i + 4] == b"PK\x03\x04"]
    if action == "size" and central:
        entry = draw(st.integers(0, len(central) - 1))
        size = draw(st.sampled_from([0, 1, 100, 4_000_000_000, 2**32 - 2, 1 << 24, 17 << 20]))
        at = central[entry]
        data[at + 24:at + 28] = struct.pack("<I", size)  # uncompressed size in the directory
        if entry < len(local) and draw(st.booleans()):
            data[local[entry] + 22:local[entry] + 26] = struct.pack("<I", size)
    elif action == "encrypted" and central:
        at = central[draw(st.integers(0, len(central) - 1))]
        data[at + 8] |= 1
    else:
        for _ in range(draw(st.integers(1, 3))):
            how = draw(st.sampled_from(["flip", "cut", "append"]))
            if how == "flip" and data:
                data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
            elif how == "cut":
                del data[draw(st.integers(0, len(data))):]
            else:
                data += draw(st.binary(max_size=32))
    return bytes(data)


@st.composite
def _case(draw, seeds: list[bytes]) -> bytes:
    members = _members(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 3))):
        if not members:
            break
        kind = draw(st.sampled_from(["header", "header", "header", "data", "member"]))
        if kind == "member":
            draw(_member_edit(members))
        else:
            member = members[draw(st.integers(0, len(members) - 1))]
            if member[1][:6] == b"\x93NUMPY" and len(member[1]) >= 12:
                draw((_header_edit if kind == "header" else _data_edit)(member))
    data = _zip(members)
    if draw(st.integers(0, 2)) == 0:
        data = draw(_zip_edit(data))
    return data


def cases(seeds: list[bytes]):
    return _case(seeds)


# -- the check -------------------------------------------------------------------------------------

_EXECUTORS: list = []


def _executor():
    """where(mask, x, float(ids)) + 1, made once per process."""
    if not _EXECUTORS:
        from onnx import TensorProto, helper

        import kiln

        graph = helper.make_graph(
            [helper.make_node("Cast", ["ids"], ["f"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Where", ["mask", "x", "f"], ["w"], name="where"),
             helper.make_node("Add", ["w", "one"], ["y"], name="add")], "npz",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
             helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3]),
             helper.make_tensor_value_info("mask", TensorProto.BOOL, [2, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
            [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
        _EXECUTORS.append(kiln.Executor(kiln.load_model_proto(proto, name="npz.onnx"), name="npz.onnx"))
    return _EXECUTORS[0]


def check(seeds: list[bytes], case: bytes, work: Path) -> None:
    """Read the case as ``kiln run --inputs`` does, fill the inputs it lacks, run the model."""
    from kiln import limits
    from kiln.inputs import random_inputs, read_npz

    path = work / f"case-{os.getpid()}.npz"
    path.write_bytes(case)
    executor = _executor()
    with limits.max_tensor_bytes_set(TENSOR_LIMIT):
        feeds = read_npz(path)
        feeds.update(random_inputs([v for v in executor.inputs if v.name not in feeds], model="npz.onnx"))
        executor.run(feeds, timeout_s=5.0)  # as --timeout-s
