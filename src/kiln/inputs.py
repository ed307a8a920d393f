"""Model inputs from the outside world: ``--shapes`` text, npz files, random tensors of declared shapes.

Random inputs are never zeros: floats are standard normal, integers are uniform in [0, 2) (valid as
token ids, segment ids and attention masks alike), bools are fair coin flips. A dynamic dimension
must be given a size with ``--shapes``; kiln does not guess one. Every array, read or made, is held
to the tensor size limit (``kiln.limits``) before it is allocated.
"""

from __future__ import annotations

import lzma
import math
import os
import re
import stat
import zipfile
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from kiln import limits
from kiln.atomic_file import write_atomically
from kiln.errors import InputError, KilnError, ResourceLimitError, file_kind, first_line

_SHAPE_ITEM = re.compile(r"^(?P<name>.+):(?P<dims>\d+(?:x\d+)*|)$")


def parse_shapes(text: str | None) -> dict[str, tuple[int, ...]]:
    """``"input_ids:1x128,mask:1x128"`` -> ``{"input_ids": (1, 128), "mask": (1, 128)}`` (trtexec's syntax)."""
    shapes: dict[str, tuple[int, ...]] = {}
    if not text:
        return shapes
    for item in text.split(","):
        match = _SHAPE_ITEM.match(item.strip())
        if not match:
            raise InputError(f"--shapes: {item!r} is not NAME:DxDxD (for example input:1x3x224x224)")
        dims = match.group("dims")
        shapes[match.group("name")] = tuple(int(d) for d in dims.split("x")) if dims else ()
    return shapes


# Element kinds an inputs file may hold: bool, signed and unsigned integers, floats, complex, strings.
_NPZ_KINDS = "biufcSU"
# What reading a damaged zip or .npy member raises (zipfile, zlib/bz2/lzma, numpy's reader); zipfile
# says NotImplementedError of a compression method or flag it lacks.
_READ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, NotImplementedError,
                OverflowError)


def read_npz(path: str | os.PathLike[str], *, max_tensor_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Arrays by name from an npz file, refusing pickled objects.

    Each member's .npy header is read before its data: refused are members that are not .npy
    arrays, object (pickle), structured, void, datetime and extended-precision dtypes, and a
    declared shape whose bytes exceed the tensor limit (``max_tensor_bytes``, else ``kiln.limits``)
    or what the member holds by the zip directory; so are archives that inflate past the limit in
    all. Big-endian arrays come back in native byte order. A FIFO or device is refused by its kind,
    without waiting on it."""
    label = os.fspath(path)
    limit = limits.max_tensor_bytes() if max_tensor_bytes is None else max_tensor_bytes
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(f"{label}: no such inputs file") from None
    except (OSError, ValueError) as error:
        raise InputError(f"{label}: cannot read the inputs file "
                         f"({getattr(error, 'strerror', None) or error})") from None
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{label}: it is {file_kind(info.st_mode)}, not a regular file; inputs are an .npz file")
    try:
        # replaced by a FIFO since: no wait
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise InputError(f"{label}: not a regular file; inputs are an .npz file")
            with zipfile.ZipFile(handle) as archive:
                members = _npz_members(archive, label, limit)
                return {key: _read_member(archive, member, f"{label}: array {key!r}", limit)
                        for key, member in members.items()}
    except KilnError:
        raise
    except _READ_ERRORS as error:
        raise InputError(f"{label}: not a readable .npz of arrays ({first_line(error)})") from error


def _npz_members(archive: zipfile.ZipFile, label: str, limit: int) -> dict[str, zipfile.ZipInfo]:
    """The .npy members by array name, after the zip directory's checks (names, encryption, size)."""
    members: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for member in archive.infolist():
        if not member.filename.endswith(".npy"):
            raise InputError(f"{label}: member {member.filename[:100]!r} is not a .npy array; an inputs file holds "
                             "only arrays")
        key = member.filename[:-4]
        if key in members:
            raise InputError(f"{label}: array {key[:100]!r} is stored twice")
        if member.flag_bits & 0x1:
            raise InputError(f"{label}: array {key[:100]!r} is encrypted")
        total += member.file_size
        if total > limit:
            raise ResourceLimitError(f"{label}: its arrays inflate to more than {limits.format_bytes(limit)}, the "
                                     f"limit on one tensor ({limits.HOW_TO_RAISE})")
        members[key] = member
    return members


def _read_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, what: str, limit: int) -> np.ndarray:
    """One member's array: its header checked (dtype, shape against the limit and the member's size)
    before its data is read."""
    fmt = np.lib.format
    with archive.open(member) as stream:
        version = fmt.read_magic(stream)
        if version not in ((1, 0), (2, 0)):
            raise InputError(f"{what}: .npy format version {version[0]}.{version[1]} is not one numpy writes for plain "
                             "arrays")
        try:
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read_header(stream)
        except _READ_ERRORS:
            raise
        except Exception as error:  # noqa: BLE001 - numpy's header parser (tokenize, ast) raises several types
            raise InputError(f"{what}: the .npy header is not readable ({first_line(error)})") from error
        header = stream.tell()
    if dtype.hasobject:
        raise InputError(f"{what}: holds Python objects (pickle); kiln reads only plain arrays")
    if dtype.fields is not None or dtype.subdtype is not None:
        raise InputError(f"{what}: a structured dtype {str(dtype)[:100]}; give each field as its own array")
    wide = dtype.itemsize > {"f": 8, "c": 16}.get(dtype.kind, dtype.itemsize)  # long double
    if dtype.kind not in _NPZ_KINDS or wide:
        raise InputError(f"{what}: dtype {str(dtype)[:100]} is not one kiln can hold (bool, integers, floats up to 64 "
                         "bits, complex, strings)"
                         + ("; bfloat16 and float8 arrays lose their type in .npy: store their bits "
                            "as uint16/uint8 or the values as float32" if dtype.kind == "V" else ""))
    if dtype.itemsize == 0:
        raise InputError(f"{what}: dtype {dtype} has elements of zero bytes")
    if len(shape) > 64 or any(type(d) is not int or d < 0 for d in shape):  # numpy's parser lets True through
        raise InputError(f"{what}: the header declares an impossible shape {list(shape)[:8]}")
    limits.check_tensor_bytes(shape, dtype, what, limit=limit)
    size = math.prod(shape) * dtype.itemsize
    if size > member.file_size - header:
        raise InputError(f"{what}: the header declares {'x'.join(map(str, shape)) or 'a scalar'} {dtype} "
                         f"({size:,} bytes) but the member holds {max(member.file_size - header, 0):,}; the file is "
                         "corrupt")
    with archive.open(member) as stream:
        array = fmt.read_array(stream, allow_pickle=False)
    if array.dtype.byteorder == ">":
        array = array.byteswap(inplace=True).view(array.dtype.newbyteorder("="))
    return array


def write_npz(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> None:
    """Write the arrays to an .npz atomically (never half a file, even on a full disk)."""
    # numpy's stub types savez's **kwds against its allow_pickle: bool keyword
    write_atomically(path, lambda handle: np.savez(handle, **{k: np.asarray(v) for k, v in arrays.items()}))  # type: ignore[arg-type]


def concrete_shape(value: ir.Value, shapes: Mapping[str, Sequence[int]], model: str) -> tuple[int, ...]:
    """The shape to use for an input: ``--shapes`` if given, else its declared static shape."""
    if value.name is not None and value.name in shapes:
        given = tuple(shapes[value.name])
        declared = value.shape
        if declared is not None:
            if len(declared) != len(given):
                raise InputError(f"{model}: --shapes gives input {value.name!r} rank {len(given)}, the model declares "
                                 f"rank {len(declared)}")
            for axis, (dim, size) in enumerate(zip(declared, given)):
                if isinstance(dim, int) and dim != size:
                    raise InputError(f"{model}: --shapes gives input {value.name!r} size {size} on axis {axis}, the "
                                     f"model fixes it at {dim}")
        return given
    if value.shape is None:
        raise InputError(f"{model}: input {value.name!r} has no declared shape; give one with --shapes "
                         f"{value.name}:AxB...")
    dynamic = {axis: dim for axis, dim in enumerate(value.shape) if not isinstance(dim, int)}
    if dynamic:
        names = [str(dim.value or "?") for dim in dynamic.values()]
        raise InputError(
            f"{model}: input {value.name!r} has dynamic dimension(s) {names} at axis {list(dynamic)}; "
            "give sizes with --shapes "
            f"{value.name}:{'x'.join(str(d) if isinstance(d, int) else 'N' for d in value.shape)}"
        )
    return value.shape.numpy()  # every dim an int (checked above)


def engine_input_values(engine) -> list[ir.Value]:
    """An engine's inputs as onnx-ir values, their dynamic dimensions by the names the model gave
    them (read from the engine's graph; unnamed ones stay unknown), so that random inputs and batch
    axes are worked out for an engine the same way as for a model."""
    import onnx

    graph = onnx.ModelProto.FromString(engine.graph).graph
    names = {v.name: [d.dim_param or None for d in v.type.tensor_type.shape.dim] for v in graph.input}
    values = []
    for spec in engine.inputs:
        shape = None
        if spec["shape"] is not None:
            symbols = names.get(spec["name"], [])
            shape = ir.Shape([d if d is not None else ir.SymbolicDim(symbols[axis] if axis < len(symbols) else None)
                              for axis, d in enumerate(spec["shape"])])
        values.append(ir.Value(name=spec["name"], type=ir.TensorType(getattr(ir.DataType, spec["dtype"].upper())),
                               shape=shape))
    return values


def random_inputs(
    values: Sequence[ir.Value], shapes: Mapping[str, Sequence[int]] | None = None, seed: int = 0, model: str = "model"
) -> dict[str, np.ndarray]:
    """Fresh random arrays for each input, of its declared dtype and (given or static) shape."""
    rng = np.random.default_rng(seed)
    shapes = shapes or {}
    unknown = sorted(set(shapes) - {v.name for v in values})
    if unknown:
        raise InputError(f"{model}: --shapes names unknown input(s) {unknown}; inputs are {[v.name for v in values]}")
    feeds = {}
    for value in values:
        shape = concrete_shape(value, shapes, model)
        dtype = value.dtype
        if dtype is None or dtype == ir.DataType.STRING:
            raise InputError(f"{model}: cannot make a random value for input {value.name!r} of type {value.type}; pass "
                             "--inputs")
        feeds[value.name or ""] = random_array(rng, shape, dtype, f"{model}: random input {value.name!r}")
    return feeds


def random_array(rng: np.random.Generator, shape: Sequence[int], dtype: ir.DataType, what: str) -> np.ndarray:
    """A random array (see the module docstring) of a numeric ONNX type, held to the tensor size
    limit before anything is allocated, and drawn without a wider temporary than float32 (floats
    are drawn in float32 and converted; integers and bools are drawn in their own type)."""
    limits.check_tensor_bytes(shape, dtype, what)
    np_dtype = dtype.numpy()
    if dtype.is_floating_point():
        if np_dtype.itemsize < 4:
            limits.check_tensor_bytes(shape, ir.DataType.FLOAT, f"{what} (drawn in float32)")
        return rng.standard_normal(shape, dtype=np.float32).astype(np_dtype)
    if np_dtype.kind in "biu":
        return rng.integers(0, 2, size=shape, dtype=np_dtype)
    return rng.integers(0, 2, size=shape, dtype=np.int8).astype(np_dtype)  # complex
