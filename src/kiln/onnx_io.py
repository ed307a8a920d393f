"""Safe loading of ONNX files into onnx-ir.

A model file is untrusted input. ``load_model`` accepts it only after these checks, each failing
with a ``ModelLoadError`` or ``UnsupportedModelError`` that names the file (and node) and the reason:

1. the path is a regular, non-empty file no larger than ``max_bytes`` (external data counted too);
2. it parses as a ModelProto that onnx's checker accepts (truncated or foreign bytes do not);
3. every external-data reference stays inside the model's folder: no absolute path, no ``..``,
   no symlink leading out, no offset/length past the end of its file. This is checked before any
   external file is opened, so a hostile model makes kiln read nothing outside its folder;
4. the opsets are ones kiln supports, every op has a kiln implementation (all missing ones are
   listed at once), and every graph input has an element type kiln can hold.

Model-local functions are inlined and onnx's shape inference runs, so the IR carries the types and
shapes the builder needs. For a file, onnx's native checks run first in a child process, so a file
that crashes onnx's C++ code yields a ``ModelLoadError`` instead of killing the caller; a
``ModelProto`` given in memory is the caller's own object and skips that step.

onnx's checker and shape inference run on a *skeleton* of the model: the graph with its large
floating-point initializers turned into typed graph inputs. Shape inference reads initializer values
only for shape-like inputs (integers, and small float ``scales``), so it infers the same types; the
weights themselves (hundreds of MB for BERT) are then not copied, serialized and parsed again by
each check. Their storage is checked by ``_check_tensor_storage`` instead (one value field, as many
bytes as the dims say).
"""

from __future__ import annotations

import contextlib
import logging
import os
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
from kiln.errors import ModelLoadError, UnsupportedModelError, first_line
from kiln.ops import lookup
from kiln.ops.registry import canonical_domain

# Highest opset of each domain kiln implements (onnx 1.23's: its node tests are kiln's conformance suite).
MAX_OPSETS = {"": 28, "ai.onnx.ml": 5, "ai.onnx.preview.training": 1, "ai.onnx.preview": 1, "ai.kiln": 1}

DEFAULT_MAX_BYTES = int(os.environ.get("KILN_MAX_MODEL_BYTES", 8 << 30))

log = logging.getLogger(__name__)


def load_model(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES) -> ir.Model:
    """Read, check and convert an ONNX file. See the module docstring for what is refused."""
    path = Path(path)
    label = str(path)
    if not path.exists():
        raise ModelLoadError(f"{label}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{label}: not a regular file")
    size = path.stat().st_size
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
            proto = _parse(path.read_bytes(), label)
        return load_model_proto(proto, name=label, base_dir=path.parent, max_bytes=max_bytes - size, _native=native)
    finally:
        native.close()


@contextlib.contextmanager
def _onnx_notes(name: str) -> Iterator[None]:
    """onnx's Python warnings (an unknown external-data key, met once per helper that reads it) as
    one kiln note each, on logger ``kiln``, instead of Python's two-line warnings on the terminal."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for text in dict.fromkeys(first_line(w.message) for w in caught):
                log.warning("%s: %s", name, text)


def load_model_proto(
    proto: onnx.ModelProto,
    *,
    name: str = "model",
    base_dir: str | os.PathLike[str] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    _native: _NativeChecks | None = None,
) -> ir.Model:
    """Check and convert a ModelProto already in memory. External data is read from ``base_dir``."""
    with _onnx_notes(name):
        return _load_proto(proto, name, base_dir, max_bytes, _native)


def _load_proto(proto: onnx.ModelProto, name: str, base_dir: str | os.PathLike[str] | None, max_bytes: int,
                _native: _NativeChecks | None) -> ir.Model:
    _check_structure(proto, name)
    external = list(_external_tensors(proto.graph))
    if external:
        if base_dir is None:
            raise ModelLoadError(f"{name}: the model references external data but no folder to read it from was given")
        _check_external_data(external, Path(base_dir), name, max_bytes)
    skeleton, weights, added_inputs = _skeleton(proto, name)
    _unknown_placeholder_dims(skeleton)
    if external:
        # what stays in the skeleton is small: the checker and shape inference see its values
        external_data_helper.load_external_data_for_model(skeleton, str(base_dir))
    if _native is not None:
        _native.check(skeleton, name)
    inferred = _check_and_infer(skeleton, name)
    try:
        model = ir.serde.deserialize_model(inferred)
        _with_weights(model, weights, added_inputs, base_dir)
    except Exception as error:  # noqa: BLE001 - onnx-ir wraps what it cannot read in several types
        raise ModelLoadError(f"{name}: cannot convert the model to kiln's IR: {first_line(error)}") from error
    return model


def _check_and_infer(proto: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """onnx's checker, kiln's own checks, function inlining and shape inference (on the skeleton)."""
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError) as error:
        raise ModelLoadError(f"{name}: not a valid ONNX model: {first_line(error)}") from error
    _check_opsets(proto, name)
    if proto.functions:
        proto = onnx.inliner.inline_local_functions(proto)
    _check_ops(proto, name)
    _check_input_types(proto, name)
    _check_no_sparse(proto, name)
    try:
        # data_prop=False: onnx 1.23's data propagation crashes the process on some valid models
        # (a Slice with steps = INT64_MAX).
        return onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=False)
    except Exception as error:  # noqa: BLE001 - onnx raises several unrelated types here
        raise ModelLoadError(f"{name}: shape inference failed: {first_line(error)}") from error


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
# the typed field each float element type stores its values in, when not in raw_data
_VALUE_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _skeleton(proto: onnx.ModelProto, name: str) -> tuple[onnx.ModelProto, list[onnx.TensorProto], list[str]]:
    """The model with its large float initializers (top graph) as typed graph inputs, the weights
    taken out (their storage checked), and the names of the inputs that were added for them."""
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
            _check_tensor_storage(tensor, name)
            weights.append(tensor)
            if tensor.name not in declared:
                skeleton.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
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
    count = 1
    for d in tensor.dims:
        count *= max(d, 0)
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _check_tensor_storage(tensor: onnx.TensorProto, name: str) -> None:
    """What onnx's checker would say of a weight that left the skeleton, and that its data is whole."""
    where = f"{name}: initializer {tensor.name!r}"
    if any(d < 0 for d in tensor.dims):
        raise ModelLoadError(f"{where} has a negative dimension {list(tensor.dims)}")
    count = 1
    for d in tensor.dims:
        count *= d
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    fields = [f for f in _VALUE_FIELDS if len(getattr(tensor, f))]
    if tensor.HasField("raw_data"):
        fields.append("raw_data")
    if external_data_helper.uses_external_data(tensor):
        info = external_data_helper.ExternalDataInfo(tensor)
        if fields:
            raise ModelLoadError(f"{where} has both external data and values in the file")
        if info.length is not None and info.length != count * itemsize:
            raise ModelLoadError(
                f"{where} has dims {list(tensor.dims)} ({count * itemsize:,} bytes) but external data of {info.length:,} bytes"
            )
        return
    if len(fields) != 1:
        raise ModelLoadError(f"{where} must hold its values in exactly one field, found {fields or 'none'}")
    stored = len(tensor.raw_data) if fields[0] == "raw_data" else len(getattr(tensor, fields[0]))
    expected = count * itemsize if fields[0] == "raw_data" else count
    if stored != expected:
        unit = "bytes" if fields[0] == "raw_data" else "values"
        raise ModelLoadError(
            f"{where} has dims {list(tensor.dims)} ({expected:,} {unit}) but holds {stored:,} {unit}; the file is truncated or corrupt"
        )


def _parse(data: bytes, label: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise ModelLoadError(f"{label}: not an ONNX model (truncated or corrupt protobuf: {first_line(error)})") from error
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
    values = [v for g in _graphs(proto.graph) for v in (*g.input, *g.output, *g.value_info)]
    for function in proto.functions:
        values.extend(function.value_info)
        values.extend(v for g in _subgraphs(function.node) for v in (*g.input, *g.output, *g.value_info))
    for value in values:
        _unknown_placeholders_in(value.type)


def _unknown_placeholders_in(type_proto: onnx.TypeProto) -> None:
    kind = type_proto.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        for dim in getattr(type_proto, kind).shape.dim:
            if (dim.HasField("dim_value") and dim.dim_value < 0) or (dim.HasField("dim_param") and dim.dim_param == "?"):
                dim.ClearField(dim.WhichOneof("value"))  # its denotation stays
    elif kind in ("sequence_type", "optional_type"):
        _unknown_placeholders_in(getattr(type_proto, kind).elem_type)
    elif kind == "map_type":
        _unknown_placeholders_in(type_proto.map_type.value_type)


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    yield from _subgraphs(graph.node)


def _subgraphs(nodes) -> Iterator[onnx.GraphProto]:
    """The graphs held by these nodes' attributes, and theirs in turn."""
    for node in nodes:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graphs(sub)


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for g in _graphs(graph):
        yield from g.node


def _external_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    for g in _graphs(graph):
        for tensor in g.initializer:
            if external_data_helper.uses_external_data(tensor):
                yield tensor
        for node in g.node:
            for attr in node.attribute:
                tensors = [attr.t] if attr.type == onnx.AttributeProto.TENSOR else list(attr.tensors)
                yield from (t for t in tensors if external_data_helper.uses_external_data(t))


def _check_external_data(tensors: list[onnx.TensorProto], base_dir: Path, name: str, max_bytes: int) -> None:
    root = base_dir.resolve()
    total = 0
    for tensor in tensors:
        info = external_data_helper.ExternalDataInfo(tensor)
        location = info.location
        where = f"{name}: tensor {tensor.name!r} has external data at {location!r}"
        if not location:
            raise ModelLoadError(f"{where}: the location is empty")
        if os.path.isabs(location) or Path(location).drive or location.startswith(("/", "\\")):
            raise ModelLoadError(f"{where}: an absolute path; external data must lie inside the model's folder")
        if ".." in Path(location.replace("\\", "/")).parts:
            raise ModelLoadError(f"{where}: the path leaves the model's folder ('..'); refused")
        target = (root / location).resolve()
        if not target.is_relative_to(root):
            raise ModelLoadError(f"{where}: the path resolves outside the model's folder (through a symlink); refused")
        if not target.is_file():
            raise ModelLoadError(f"{where}: no such file in the model's folder")
        file_size = target.stat().st_size
        offset = info.offset or 0
        length = info.length if info.length is not None else file_size - offset
        if offset < 0 or length < 0 or offset + length > file_size:
            raise ModelLoadError(
                f"{where}: offset {offset} + length {length} runs past the end of the {file_size}-byte file (truncated?)"
            )
        total += length
        if total > max_bytes:
            raise ModelLoadError(f"{name}: external data exceeds the size limit ({max_bytes:,} bytes left for it)")


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
            key = f"{domain or 'ai.onnx'}::{node.op_type}" + (f" (opset {version})" if version else " (domain not imported)")
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
            elif value.name not in initializers and not dtypes.supported(ir.DataType(elem)):
                problems.append(f"input {value.name!r} has element type {dtypes.onnx_name(elem)}, which kiln cannot hold")
    for tensor in proto.graph.initializer:
        if not dtypes.supported(ir.DataType(tensor.data_type)):
            problems.append(f"initializer {tensor.name!r} has element type {dtypes.onnx_name(tensor.data_type)}, which kiln cannot hold")
    if problems:
        raise UnsupportedModelError(f"{name}: " + "; ".join(problems))


def _check_no_sparse(proto: onnx.ModelProto, name: str) -> None:
    where = [f"sparse initializer {t.values.name!r}" for g in _graphs(proto.graph) for t in g.sparse_initializer]
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


def load_embedded_model(data: bytes, name: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> onnx.ModelProto:
    """An ONNX model carried inside another file (an engine's weight-free graph), checked as
    ``load_model`` checks a model file (native checks in a child process, onnx's checker, opsets,
    ops, input types, no sparse tensors, shape inference) and refused if any tensor anywhere in it,
    subgraphs and functions included, references external data: it has no folder it may read from.
    Returns the parsed proto, as it was in ``data``."""
    if len(data) > max_bytes:
        raise ModelLoadError(f"{name}: the embedded graph is {len(data):,} bytes, over the {max_bytes:,}-byte limit")
    native = _NativeChecks()
    try:
        proto = _parse(data, name)
        external = next(_tensors_with_external_data(proto), None)
        if external is not None:
            raise ModelLoadError(f"{name}: tensor {external!r} references external data; an embedded graph must hold all its data")
        load_model_proto(proto, name=name, max_bytes=max_bytes, _native=native)
        return proto
    finally:
        native.close()


def _tensors_with_external_data(message) -> Iterator[str]:
    """Names of the TensorProtos anywhere in a protobuf message (graphs, subgraphs, functions,
    attributes, sparse tensors) that reference external data."""
    stack = [message]
    while stack:
        item = stack.pop()
        if isinstance(item, onnx.TensorProto) and (item.data_location == onnx.TensorProto.EXTERNAL or len(item.external_data)):
            yield item.name or "<unnamed>"
        for field, value in item.ListFields():
            if field.type == field.TYPE_MESSAGE:
                stack.extend(value if field.is_repeated else [value])
