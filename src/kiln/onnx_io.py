"""Safe loading of ONNX files into onnx-ir.

A model file is untrusted input. ``load_model`` accepts it only after these checks, each failing
with a ``ModelLoadError`` or ``UnsupportedModelError`` that names the file (and node) and the reason:

1. the path is a regular, non-empty file no larger than ``max_bytes`` (external data counted too);
2. it parses as a ModelProto that onnx's checker accepts (truncated or foreign bytes do not);
3. every tensor anywhere in it (initializers, node attributes, sparse tensors' parts, in subgraphs
   and model-local functions) has an element type kiln can hold, no negative dim, and its values in
   the one field its type uses, exactly as many as its dims say (onnx's checker accepts a
   ``raw_data`` longer than the dims, and does not see the weights that leave the skeleton);
4. every external-data reference stays inside the model's folder and names a regular file there:
   no absolute path, no ``..``, no symbolic link on the way, no FIFO, device, socket or directory
   (refused by their kind, found with ``lstat``: they are never opened), no file with several hard
   links (onnx refuses those too), offset and length byte counts (digits) within the file, and the
   length the dims say. This is checked before any external file is opened, so a hostile model
   makes kiln read nothing outside its folder;
5. the opsets are ones kiln supports, every op has a kiln implementation (all missing ones are
   listed at once), and every graph input has an element type kiln can hold.

Model-local functions are inlined and onnx's shape inference runs, so the IR carries the types and
shapes the builder needs. For a file, onnx's native checks run first in a child process, so a file
that crashes onnx's C++ code yields a ``ModelLoadError`` instead of killing the caller; a
``ModelProto`` given in memory is the caller's own object and skips that step.

onnx's checker and shape inference run on a *skeleton* of the model: the graph with its large
floating-point initializers turned into typed graph inputs. Shape inference reads initializer values
only for shape-like inputs (integers, and small float ``scales``), so it infers the same types; the
weights themselves (hundreds of MB for BERT) are then not copied, serialized and parsed again by
each check. Their storage is checked with every other tensor's (point 3).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import stat
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx.inliner
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from kiln import dtypes
from kiln.errors import ModelLoadError, UnsupportedModelError, file_kind, first_line
from kiln.ops import lookup
from kiln.ops.registry import canonical_domain
from kiln.regular_file import UnreadableFile, read_regular_file

# Highest opset of each domain kiln implements (onnx 1.23's: its node tests are kiln's conformance suite).
MAX_OPSETS = {"": 28, "ai.onnx.ml": 5, "ai.onnx.preview.training": 1, "ai.onnx.preview": 1, "ai.kiln": 1}

DEFAULT_MAX_BYTES = 8 << 30
MAX_BYTES_ENVIRONMENT = "KILN_MAX_MODEL_BYTES"

log = logging.getLogger(__name__)


def default_max_bytes() -> int:
    """The model size limit: ``KILN_MAX_MODEL_BYTES`` if set, else ``DEFAULT_MAX_BYTES``."""
    named = os.environ.get(MAX_BYTES_ENVIRONMENT)
    if not named:
        return DEFAULT_MAX_BYTES
    if not (named.strip().isascii() and named.strip().isdigit()):
        raise ModelLoadError(f"{MAX_BYTES_ENVIRONMENT}={named[:40]!r} is not a number of bytes")
    return int(named)


def load_model(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> ir.Model:
    """Read, check and convert an ONNX file. See the module docstring for what is refused."""
    path = Path(path)
    label = str(path)
    max_bytes = default_max_bytes() if max_bytes is None else max_bytes
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise ModelLoadError(f"{label}: no such file") from None
    except (OSError, ValueError) as error:  # a name too long, a symlink loop, a NUL byte
        raise ModelLoadError(f"{label}: cannot read it ({getattr(error, 'strerror', None) or error})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ModelLoadError(f"{label}: it is {file_kind(info.st_mode)}, not a regular file")
    size = info.st_size
    if size == 0:
        raise ModelLoadError(f"{label}: the file is empty, not an ONNX model")
    if size > max_bytes:
        raise ModelLoadError(
            f"{label}: the file is {size:,} bytes, over the {max_bytes:,}-byte limit "
            "(raise it with --max-model-bytes or KILN_MAX_MODEL_BYTES)"
        )
    native = _NativeChecks()  # the child starts its interpreter while this one parses the file
    try:
        with _onnx_notes(label):
            proto = _parse(_read_regular(path, label, size), label)
        return load_model_proto(proto, name=label, base_dir=path.parent, max_bytes=max_bytes - size, _native=native)
    finally:
        native.close()


def _read_regular(path: Path, label: str, size: int) -> bytes:
    """The bytes of the regular file of ``size`` bytes that ``stat`` found (a FIFO put in its place
    since does not block the read)."""
    try:
        return read_regular_file(path, size, size=size)
    except (FileNotFoundError, UnreadableFile) as error:
        reason = error.reason if isinstance(error, UnreadableFile) else "the file changed while it was read; try again"
        raise ModelLoadError(f"{label}: {reason}") from None


@contextlib.contextmanager
def _onnx_notes(name: str) -> Iterator[None]:
    """onnx's Python warnings (an unknown external-data key, met once per helper that reads it) as
    one kiln note each, on logger ``kiln``, instead of Python's two-line warnings on the terminal."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            # a caught warning's message is always the Warning instance (typeshed also allows a str)
            for text in dict.fromkeys(first_line(w.message) for w in caught if isinstance(w.message, Warning)):
                log.warning("%s: %s", name, text)


def load_model_proto(
    proto: onnx.ModelProto,
    *,
    name: str = "model",
    base_dir: str | os.PathLike[str] | None = None,
    max_bytes: int | None = None,
    _native: _NativeChecks | None = None,
) -> ir.Model:
    """Check and convert a ModelProto already in memory. External data is read from ``base_dir``."""
    with _onnx_notes(name), _utf8_strings(name):
        return _load_proto(proto, name, base_dir, default_max_bytes() if max_bytes is None else max_bytes, _native)


@contextlib.contextmanager
def _utf8_strings(name: str) -> Iterator[None]:
    """ONNX is proto2: a string field holding bytes that are not UTF-8 parses, and fails only when
    Python reads it (a name, an attribute, a doc string). That is a damaged model, not kiln's error."""
    try:
        yield
    except UnicodeDecodeError as error:
        raise ModelLoadError(f"{name}: a string in the model (a name, attribute or doc string) is not valid UTF-8 "
                             f"({first_line(error)})") from None


def _load_proto(proto: onnx.ModelProto, name: str, base_dir: str | os.PathLike[str] | None, max_bytes: int,
                _native: _NativeChecks | None) -> ir.Model:
    _check_structure(proto, name)
    external = []
    for tensor, where in _all_tensors(proto):
        _check_tensor_storage(tensor, f"{name}: {where}")
        if external_data_helper.uses_external_data(tensor):
            external.append((tensor, where))
    if external:
        if base_dir is None:
            raise ModelLoadError(f"{name}: the model references external data but no folder to read it from was given")
        _check_external_data(external, Path(base_dir), name, max_bytes)
    skeleton, weights, added_inputs = _skeleton(proto)
    _unknown_placeholder_dims(skeleton)
    if external:
        # what stays in the skeleton is small: the checker and shape inference see its values
        with _reading_external_data(name):
            external_data_helper.load_external_data_for_model(skeleton, str(base_dir))
    if _native is not None:
        _native.check(skeleton, name)
    inferred = _check_and_infer(skeleton, name)
    try:
        model = ir.serde.deserialize_model(inferred)
        with _reading_external_data(name):
            _with_weights(model, weights, added_inputs, base_dir)
    except ModelLoadError:
        raise
    except Exception as error:  # noqa: BLE001 - onnx-ir wraps what it cannot read in several types
        raise ModelLoadError(f"{name}: cannot convert the model to kiln's IR: {first_line(error)}") from error
    return model


def _check_and_infer(proto: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """onnx's checker, kiln's own checks, function inlining and shape inference (on the skeleton).
    The checker runs again on the inlined model: it does not see that a function's body leaves an
    output unset, which inlining turns into a node reading a value nothing produces."""
    _check_onnx(proto, name)
    _check_opsets(proto, name)
    if proto.functions:
        try:
            proto = onnx.inliner.inline_local_functions(proto)
        except Exception as error:  # noqa: BLE001 - onnx's C++ inliner raises its assertions as several types
            raise ModelLoadError(f"{name}: cannot inline the model's functions: {first_line(error)}") from error
        _check_onnx(proto, name)
    _check_ops(proto, name)
    _check_input_types(proto, name)
    _check_no_sparse(proto, name)
    try:
        # data_prop=False: onnx 1.23's data propagation crashes the process on some valid models
        # (a Slice with steps = INT64_MAX).
        return onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=False)
    except Exception as error:  # noqa: BLE001 - onnx raises several unrelated types here
        raise ModelLoadError(f"{name}: shape inference failed: {first_line(error)}") from error


def _check_onnx(proto: onnx.ModelProto, name: str) -> None:
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError) as error:
        raise ModelLoadError(f"{name}: not a valid ONNX model: {first_line(error)}") from error


# Run in a fresh interpreter on the skeleton (read from stdin): the native checks load_model makes.
_NATIVE_CHECKS = """
import sys
import onnx, onnx.inliner
data = sys.stdin.buffer.read()
try:
    proto = onnx.load_model_from_string(data)
    onnx.checker.check_model(proto)
    if proto.functions:
        proto = onnx.inliner.inline_local_functions(proto)
        onnx.checker.check_model(proto)
    onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=False)
except Exception:
    sys.exit(3)  # a Python-level error: the real load raises it with a proper message
"""


class _NativeChecks:
    """onnx's C++ checker, inliner and shape inference on the skeleton, in a child process first.

    A malformed file can crash native code outright; in a child that costs a ModelLoadError, not
    the caller's process. A fresh interpreter rather than fork(): forking a process whose other
    threads hold locks can deadlock the child. It is started before the file is parsed, so its
    start-up overlaps the parse.
    """

    def __init__(self) -> None:
        self.child = subprocess.Popen(
            [sys.executable, "-c", _NATIVE_CHECKS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def check(self, skeleton: onnx.ModelProto, name: str) -> None:
        try:
            self.child.communicate(skeleton.SerializeToString())
        except BrokenPipeError:  # it died before reading: wait() below reports how
            self.child.wait()
        if self.child.returncode < 0:
            raise ModelLoadError(
                f"{name}: onnx's checker or shape inference crashed on this model (signal {-self.child.returncode}); "
                "the file is malformed or hostile"
            )

    def close(self) -> None:
        if self.child.poll() is None:
            self.child.kill()
            self.child.wait()
        for stream in (self.child.stdin, self.child.stdout, self.child.stderr):
            if stream is not None and not stream.closed:
                stream.close()


# Floating-point initializers larger than this leave the skeleton (see the module docstring).
_SKELETON_LIMIT = 1024
_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ, onnx.TensorProto.FLOAT8E5M2,
    onnx.TensorProto.FLOAT8E5M2FNUZ,
}
# the typed fields a tensor may hold its values in, instead of raw_data
_VALUE_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _skeleton(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[onnx.TensorProto], list[str]]:
    """The model with its large float initializers (top graph) as typed graph inputs, the weights
    taken out, and the names of the inputs that were added for them."""
    skeleton = onnx.ModelProto()
    for field, value in proto.ListFields():
        if field.name != "graph":
            _copy_field(skeleton, field, value)
    graph = proto.graph
    for field, value in graph.ListFields():
        if field.name != "initializer":
            _copy_field(skeleton.graph, field, value)
    declared = {value.name for value in graph.input}
    weights, added = [], []
    for tensor in graph.initializer:
        if tensor.data_type in _FLOAT_TYPES and _stored_bytes(tensor) > _SKELETON_LIMIT:
            weights.append(tensor)
            if tensor.name not in declared:
                skeleton.graph.input.append(
                    onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
                added.append(tensor.name)
        else:
            skeleton.graph.initializer.append(tensor)
    return skeleton, weights, added


def _copy_field(target, field, value) -> None:
    if field.is_repeated:
        getattr(target, field.name).extend(value)
    elif field.type == field.TYPE_MESSAGE:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


def _with_weights(model: ir.Model, weights: list[onnx.TensorProto], added: list[str], base_dir) -> None:
    """The weights back into the IR as initializers of the values that stood in for them (their
    stand-in graph inputs removed). onnx-ir wraps each TensorProto without copying its bytes. External
    data (its paths checked already) is read into the tensor here, so the IR holds every weight
    itself: a model serialized or saved elsewhere later never points back at the source folder."""
    graph = model.graph
    values = {value.name: value for value in graph.inputs}
    gone = set(added)
    for tensor in weights:
        if external_data_helper.uses_external_data(tensor):
            external_data_helper.load_external_data_for_tensor(tensor, str(base_dir))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
        value = values[tensor.name]
        value.const_value = ir.serde.deserialize_tensor(tensor)
        if tensor.name in gone:
            graph.inputs.remove(value)
        graph.register_initializer(value)


def _stored_bytes(tensor: onnx.TensorProto) -> int:
    """The bytes its dims declare (external data counts as large: exporters store only large tensors there)."""
    if external_data_helper.uses_external_data(tensor):
        return _SKELETON_LIMIT + 1
    return _data_bytes(tensor)


def _data_bytes(tensor: onnx.TensorProto) -> int:
    """The bytes of a checked tensor's values (``_check_tensor_storage``: a type kiln holds, dims >= 0)."""
    return math.prod(tensor.dims) * int(ir.DataType(tensor.data_type).itemsize)


def _check_tensor_storage(tensor: onnx.TensorProto, where: str) -> None:
    """A tensor kiln can hold, whose data is whole: a known element type kiln holds, no negative dim,
    its values in exactly one field (the one its type uses, or ``raw_data``), as many as the dims say.
    External data is checked against its file by ``_check_external_data``."""
    try:
        dtype = ir.DataType(tensor.data_type)
    except ValueError:
        dtype = ir.DataType.UNDEFINED
    if dtype == ir.DataType.UNDEFINED:
        raise ModelLoadError(f"{where} has no known element type (data_type {tensor.data_type})")
    if not dtypes.supported(dtype):
        raise UnsupportedModelError(f"{where} has element type {dtypes.onnx_name(dtype)}, which kiln cannot hold")
    if any(d < 0 for d in tensor.dims):
        raise ModelLoadError(f"{where} has a negative dimension {list(tensor.dims)}")
    itemsize = 8 if dtype == ir.DataType.STRING else int(dtype.itemsize)  # strings: one object pointer each
    if math.prod(max(d, 1) for d in tensor.dims) * itemsize >= 1 << 63:  # an empty [0, 2**62] too
        raise ModelLoadError(f"{where} has dims {list(tensor.dims)[:8]} that multiply past what numpy and torch "
                             "can index")
    fields = [f for f in _VALUE_FIELDS if len(getattr(tensor, f))]
    if tensor.HasField("raw_data"):
        fields.append("raw_data")
    if external_data_helper.uses_external_data(tensor):
        if fields:
            raise ModelLoadError(f"{where} has both external data and values in the file")
        if dtype == ir.DataType.STRING:
            raise ModelLoadError(f"{where} is a string tensor with external data; strings are stored in the model file")
        return
    count = math.prod(tensor.dims)
    if not fields and count == 0:
        return
    if len(fields) != 1:
        raise ModelLoadError(f"{where} must hold its values in exactly one field, found {fields or 'none'}")
    field = fields[0]
    typed = "string_data" if dtype == ir.DataType.STRING else onnx.helper.tensor_dtype_to_field(dtype)
    if field != typed and (field != "raw_data" or dtype == ir.DataType.STRING):
        raise ModelLoadError(f"{where} is a {dtypes.onnx_name(dtype)} tensor with its values in {field}; "
                             f"they belong in {typed}" + ("" if dtype == ir.DataType.STRING else " or raw_data"))
    if field == "raw_data":
        stored, expected, unit = len(tensor.raw_data), count * itemsize, "bytes"
    else:
        stored, unit = len(getattr(tensor, field)), "values"
        expected = count * (2 if dtype in (ir.DataType.COMPLEX64, ir.DataType.COMPLEX128) else 1)
    if stored != expected:
        raise ModelLoadError(
            f"{where} has dims {list(tensor.dims)} ({expected:,} {unit}) but holds {stored:,} {unit}; "
            "the file is truncated or corrupt"
        )


def _parse(data: bytes, label: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise ModelLoadError(f"{label}: not an ONNX model (truncated or corrupt protobuf: "
                             f"{first_line(error)})") from error
    return proto


def _check_structure(proto: onnx.ModelProto, name: str) -> None:
    # Arbitrary bytes can parse as a protobuf; a real model has a version, opsets and a graph.
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.opset_import:
        raise ModelLoadError(f"{name}: not an ONNX model (no IR version, opset or graph; is the file truncated?)")
    if not proto.graph.output:
        raise ModelLoadError(f"{name}: the graph has no outputs")


def _unknown_placeholder_dims(proto: onnx.ModelProto) -> None:
    """Every declared dim spelled as a placeholder becomes an unknown (dynamic) dim, in place.

    Some exporters write a dynamic dim as ``dim_value: -1`` (paddle2onnx: ``[-1, 3, ?, ?]``) or as
    ``dim_param: "?"``. onnxruntime treats both as dynamic, so kiln does too, before shape inference
    and onnx-ir see them: every later reader of a shape then sees a dynamic dim, never a size of -1
    or two axes that must agree because both are called "?". Values in tensors (Reshape's -1) are
    not dims and keep their meaning. Covers graph inputs, outputs and value_info in every subgraph
    and model-local function."""
    values = [v for g in graphs_of(proto.graph) for v in (*g.input, *g.output, *g.value_info)]
    for function in proto.functions:
        values.extend(function.value_info)
        values.extend(v for g in _subgraphs(function.node) for v in (*g.input, *g.output, *g.value_info))
    for value in values:
        _unknown_placeholders_in(value.type)


def _unknown_placeholders_in(type_proto: onnx.TypeProto) -> None:
    kind = type_proto.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        for dim in getattr(type_proto, kind).shape.dim:
            negative = dim.HasField("dim_value") and dim.dim_value < 0
            if negative or (dim.HasField("dim_param") and dim.dim_param == "?"):
                dim.ClearField(dim.WhichOneof("value"))  # its denotation stays
    elif kind in ("sequence_type", "optional_type"):
        _unknown_placeholders_in(getattr(type_proto, kind).elem_type)
    elif kind == "map_type":
        _unknown_placeholders_in(type_proto.map_type.value_type)


def graphs_of(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and its subgraphs, depth first, in node and attribute order."""
    yield graph
    yield from _subgraphs(graph.node)


def _subgraphs(nodes) -> Iterator[onnx.GraphProto]:
    """The graphs held by these nodes' attributes, and theirs in turn."""
    for node in nodes:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from graphs_of(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from graphs_of(sub)


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for g in graphs_of(graph):
        yield from g.node


def _all_tensors(proto: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    """Every dense tensor in the model and where it is: the initializers of every graph, the tensors
    of node attributes (of any attribute type: onnx's external-data loader reads a ``t`` wherever it
    is set), the values and indices of sparse tensors; in subgraphs and model-local functions."""
    yield from _graph_tensors(proto.graph, "")
    for function in proto.functions:
        yield from _node_tensors(function.node, f" in function {function.name!r}")


def _graph_tensors(graph: onnx.GraphProto, context: str) -> Iterator[tuple[onnx.TensorProto, str]]:
    for tensor in graph.initializer:
        yield tensor, f"initializer {tensor.name!r}{context}"
    for sparse in graph.sparse_initializer:
        yield from _sparse_parts(sparse, f"sparse initializer {sparse.values.name!r}{context}")
    yield from _node_tensors(graph.node, context)


def _node_tensors(nodes, context: str) -> Iterator[tuple[onnx.TensorProto, str]]:
    for node in nodes:
        for attr in node.attribute:
            where = f"attribute {attr.name!r} of node {node.name or node.op_type!r}{context}"
            if attr.HasField("t"):
                yield attr.t, f"the tensor of {where}"
            for index, tensor in enumerate(attr.tensors):
                yield tensor, f"tensor {index} of {where}"
            if attr.HasField("sparse_tensor"):
                yield from _sparse_parts(attr.sparse_tensor, f"the sparse tensor of {where}")
            for sparse in attr.sparse_tensors:
                yield from _sparse_parts(sparse, f"a sparse tensor of {where}")
            for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                inside = f" in subgraph {graph.name!r} of node {node.name or node.op_type!r}{context}"
                yield from _graph_tensors(graph, inside)


def _sparse_parts(sparse: onnx.SparseTensorProto, where: str) -> Iterator[tuple[onnx.TensorProto, str]]:
    yield sparse.values, f"the values of {where}"
    yield sparse.indices, f"the indices of {where}"


def _external_info(tensor: onnx.TensorProto, where: str) -> tuple[str, int | None, int | None]:
    """Location, offset and length of a tensor's external data (the last entry of a key wins, as in
    onnx), offset and length refused unless they are byte counts: at most 19 digits, nothing else."""
    entries = {entry.key: entry.value for entry in tensor.external_data}
    numbers = []
    for key in ("offset", "length"):
        text = entries.get(key)
        if text is not None and not (text.isascii() and text.isdigit() and len(text) <= 19):
            raise ModelLoadError(f"{where}: its external data {key} {text[:40]!r} is not a byte count "
                                 "(a non-negative integer)")
        numbers.append(None if text is None else int(text))
    return entries.get("location", ""), numbers[0], numbers[1]


def _check_external_data(tensors: list[tuple[onnx.TensorProto, str]], base_dir: Path, name: str,
                         max_bytes: int) -> None:
    """Each external reference names a regular file inside ``base_dir`` (walked with ``lstat``, so a
    FIFO or device is refused by its kind without being opened), with one link (as onnx's reader
    requires), holding from its offset as many bytes as the tensor's dims say."""
    root = base_dir.resolve()
    total = 0
    for tensor, place in tensors:
        location, offset, length = _external_info(tensor, f"{name}: {place}")
        where = f"{name}: {place} has external data at {location[:200]!r}"
        if not location:
            raise ModelLoadError(f"{where}: the location is empty")
        if "\0" in location:
            raise ModelLoadError(f"{where}: the location contains a NUL byte")
        if os.path.isabs(location) or Path(location).drive or location.startswith(("/", "\\")):
            raise ModelLoadError(f"{where}: an absolute path; external data must lie inside the model's folder")
        if ".." in Path(location.replace("\\", "/")).parts:
            raise ModelLoadError(f"{where}: the path leaves the model's folder ('..'); refused")
        info = _external_file(root, location, where)
        if info.st_nlink > 1:
            raise ModelLoadError(f"{where}: the file has {info.st_nlink} hard links; onnx reads external data only "
                                 "from a file with one (a hard link may lead anywhere); copy the file into the folder")
        file_size = info.st_size
        start = offset or 0
        if start > file_size or (length is not None and start + length > file_size):
            raise ModelLoadError(
                f"{where}: offset {start} + length {length} runs past the end of the {file_size}-byte file (truncated?)"
            )
        stored = length if length is not None else file_size - start
        expected = _data_bytes(tensor)
        if stored != expected:
            span = ("external data of" if length is not None
                    else f"external data (from offset {start} to the end of the file) of")
            raise ModelLoadError(f"{name}: {place} has dims {list(tensor.dims)} ({expected:,} bytes) "
                                 f"but {span} {stored:,} bytes")
        total += stored
        if total > max_bytes:
            raise ModelLoadError(f"{name}: external data exceeds the size limit ({max_bytes:,} bytes left for it)")


def _external_file(root: Path, location: str, where: str) -> os.stat_result:
    """The ``lstat`` of the regular file at ``location`` under ``root``, each step checked: no
    symbolic link (one leading out of the folder is named as such), the last step a regular file."""
    current = root
    parts = Path(location).parts
    for index, part in enumerate(parts):
        current = current / part
        try:
            info = os.lstat(current)
        except (FileNotFoundError, NotADirectoryError):
            raise ModelLoadError(f"{where}: no such file in the model's folder") from None
        except OSError as error:
            raise ModelLoadError(f"{where}: cannot examine it ({error.strerror or error})") from None
        if stat.S_ISLNK(info.st_mode):
            if not Path(os.path.realpath(current)).is_relative_to(root):
                raise ModelLoadError(f"{where}: the path resolves outside the model's folder (through a symlink); "
                                     "refused")
            raise ModelLoadError(f"{where}: {part!r} is a symbolic link; external data is read only from regular "
                                 "files in the model's folder, not through links (onnx refuses them)")
        if index < len(parts) - 1 and not stat.S_ISDIR(info.st_mode):
            raise ModelLoadError(f"{where}: no such file in the model's folder ({part!r} is not a folder)")
    if not parts:
        raise ModelLoadError(f"{where}: the location names the model's folder, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise ModelLoadError(f"{where}: it is {file_kind(info.st_mode)}, not a regular file")
    return info


@contextlib.contextmanager
def _reading_external_data(name: str) -> Iterator[None]:
    """onnx's reader refusing or failing on a checked file (changed since, or a path spelling it
    reads otherwise) as a ModelLoadError."""
    try:
        yield
    except (OSError, ValueError, onnx.checker.ValidationError) as error:
        raise ModelLoadError(f"{name}: cannot read external data: {first_line(error)}") from error


def _check_opsets(proto: onnx.ModelProto, name: str) -> None:
    for opset in proto.opset_import:
        domain = canonical_domain(opset.domain)
        limit = MAX_OPSETS.get(domain)
        if limit is not None and opset.version > limit:
            raise UnsupportedModelError(
                f"{name}: opset {opset.version} of domain {domain or 'ai.onnx'} is newer than kiln supports "
                f"(up to {limit}); re-export the model at opset {limit} or lower"
            )


def _check_ops(proto: onnx.ModelProto, name: str) -> None:
    opsets = {canonical_domain(o.domain): o.version for o in proto.opset_import}
    missing: dict[str, list[str]] = {}
    for node in _nodes(proto.graph):
        domain = canonical_domain(node.domain)
        version = opsets.get(domain)
        if version is None or lookup(domain, node.op_type, version) is None:
            key = f"{domain or 'ai.onnx'}::{node.op_type}" + (f" (opset {version})" if version
                                                                  else " (domain not imported)")
            missing.setdefault(key, []).append(node.name or "<unnamed>")
    if missing:
        parts = []
        for op, nodes in sorted(missing.items()):
            shown = ", ".join(repr(n) for n in nodes[:3]) + (f" and {len(nodes) - 3} more" if len(nodes) > 3 else "")
            parts.append(f"{op} at node {shown}")
        raise UnsupportedModelError(
            f"{name}: {len(missing)} op(s) kiln does not implement: " + "; ".join(parts)
            + ". Re-export without them, or add them to kiln.ops"
        )


_KNOWN_TYPES = frozenset(t.value for t in ir.DataType)


def _check_input_types(proto: onnx.ModelProto, name: str) -> None:
    initializers = {t.name for t in proto.graph.initializer}
    problems = []
    for value in proto.graph.input:
        kind = value.type.WhichOneof("value")
        if kind is None:
            problems.append(f"input {value.name!r} has no type")
        elif kind == "tensor_type":
            elem = value.type.tensor_type.elem_type
            if elem == onnx.TensorProto.UNDEFINED:
                problems.append(f"input {value.name!r} has no element type (dtype)")
            elif elem not in _KNOWN_TYPES:
                problems.append(f"input {value.name!r} has an unknown element type ({elem})")
            elif value.name not in initializers and not dtypes.supported(ir.DataType(elem)):
                problems.append(f"input {value.name!r} has element type {dtypes.onnx_name(elem)}, "
                                "which kiln cannot hold")
    if problems:
        raise UnsupportedModelError(f"{name}: " + "; ".join(problems))


def _check_no_sparse(proto: onnx.ModelProto, name: str) -> None:
    where = [f"sparse initializer {t.values.name!r}" for g in graphs_of(proto.graph) for t in g.sparse_initializer]
    where += [
        f"attribute {a.name!r} of node {n.name or n.op_type!r}"
        for n in _nodes(proto.graph)
        for a in n.attribute
        if a.type in (onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS)
    ]
    if where:
        raise UnsupportedModelError(
            f"{name}: sparse tensors are not supported ({'; '.join(where[:5])}); store them as dense tensors"
        )


def load_embedded_model(data: bytes, name: str, *, max_bytes: int | None = None) -> onnx.ModelProto:
    """An ONNX model carried inside another file (an engine's weight-free graph), checked as
    ``load_model`` checks a model file (native checks in a child process, onnx's checker, opsets,
    ops, input types, no sparse tensors, shape inference) and refused if any tensor anywhere in it,
    subgraphs and functions included, references external data: it has no folder it may read from.
    Returns the parsed proto, as it was in ``data``."""
    max_bytes = default_max_bytes() if max_bytes is None else max_bytes
    if len(data) > max_bytes:
        raise ModelLoadError(f"{name}: the embedded graph is {len(data):,} bytes, over the {max_bytes:,}-byte limit")
    native = _NativeChecks()
    try:
        with _utf8_strings(name):
            proto = _parse(data, name)
            external = next((where for tensor, where in _all_tensors(proto)
                            if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data)), None)
        if external is not None:
            raise ModelLoadError(f"{name}: {external} references external data; "
                                 "an embedded graph must hold all its data")
        load_model_proto(proto, name=name, max_bytes=max_bytes, _native=native)
        return proto
    finally:
        native.close()
