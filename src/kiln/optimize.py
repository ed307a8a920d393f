"""``kiln optimize``: the graph passes applied to an ONNX file, written back as ONNX.

The result serves onnxruntime and TensorRT users too, so by default it is standard ONNX: passes
whose rewrite needs an ``ai.kiln`` op (a fused conv, attention before opset 23, ...) do not run,
and the report says so. ``kiln_ops=True`` writes a kiln-only file with those ops as well. Every
file written passes onnx's checker first; it is written atomically (with its weights in a
``.data`` file beside it when the model is over protobuf's 2 GB limit).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import onnx
import onnx_ir as ir

from kiln.atomic_file import write_atomically
from kiln.errors import KilnError
from kiln.onnx_io import MAX_OPSETS, graphs_of, load_model_proto
from kiln.passes.framework import PassContext, PassReport, op_counts, run_passes, select_passes
from kiln.passes.rewriting import opset

_PROTOBUF_LIMIT = 2**31 - 1


def optimize_model(
    model: ir.Model,
    *,
    passes: Sequence[str] | None = None,
    skip: Iterable[str] = (),
    precision: str = "fp32",
    kiln_ops: bool = False,
    dims: Mapping[str, int] | None = None,
    target_opset: int | None = None,
    name: str = "model",
) -> PassReport:
    """Run the chosen passes on ``model`` in place (no measurements: measuring passes decide by rule),
    after converting it to ``target_opset`` of the default domain when one is given (see ``convert_opset``)."""
    ctx = PassContext(precision=precision, kiln_ops=kiln_ops, dims=dict(dims or {}))
    ctx.validate()
    select_passes(passes, skip)  # unknown pass names fail before the conversion
    before, source = op_counts(model), opset(model)
    if target_opset is not None and target_opset != source:
        convert_opset(model, target_opset, name)
    report = run_passes(model, ctx, passes, skip)
    if opset(model) != source:
        report.ops_before = before
        report.log.insert(0, f"converted from opset {source} to {opset(model)} (onnx's version converter)")
    return report


def convert_opset(model: ir.Model, target: int, name: str = "model") -> None:
    """Convert ``model`` in place to opset ``target`` of the default domain with onnx's version
    converter, so that passes can emit what the newer opset has (``LayerNormalization`` from 17,
    ``Gelu`` from 20, ``Attention`` from 23). The weights do not pass through the converter (it
    serializes the model, and they would double its memory and break protobuf's 2 GB limit): large
    ones stand in as typed graph inputs and come back unchanged. The result is checked and its
    shapes inferred as a loaded model's are. Raises ``KilnError`` naming what the converter cannot
    convert."""
    if not 1 <= target <= MAX_OPSETS[""]:
        raise KilnError(f"{name}: --target-opset must be between 1 and {MAX_OPSETS['']} (the newest opset kiln runs), "
                        f"got {target}")
    source = opset(model)
    proto = ir.serde.serialize_model(model)
    declared = {value.name for value in proto.graph.input}
    weights: list[onnx.TensorProto] = []
    kept: list[onnx.TensorProto] = []
    for tensor in proto.graph.initializer:
        large = tensor.data_type != onnx.TensorProto.STRING and _nbytes(tensor) > _STAND_IN_BYTES
        (weights if large else kept).append(tensor)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    stand_ins = [t.name for t in weights if t.name not in declared]
    proto.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in weights if t.name in stand_ins)
    try:
        converted = onnx.version_converter.convert_version(proto, target)
    except Exception as error:  # noqa: BLE001  (onnx raises RuntimeError, ValueError, IndexError ...)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        reason = reason.split("failed: ", 1)[-1]
        raise KilnError(f"{name}: onnx's version converter cannot convert opset {source} to {target}: {reason}; "
                        "optimize without --target-opset, or re-export the model at that opset") from error
    inputs = [v for v in converted.graph.input if v.name not in stand_ins]
    del converted.graph.input[:]
    converted.graph.input.extend(inputs)
    converted.graph.initializer.extend(weights)
    new = load_model_proto(converted, name=name)
    model.graph = new.graph
    model.ir_version = new.ir_version
    model.functions.clear()  # load_model_proto inlines local functions


_STAND_IN_BYTES = 1024  # initializers over this size skip the converter (shape constants are smaller)


def _nbytes(tensor: onnx.TensorProto) -> int:
    return len(tensor.raw_data) if tensor.HasField("raw_data") else tensor.ByteSize()


def save_onnx(model: ir.Model, path: str | os.PathLike[str], name: str = "model") -> None:
    """Write ``model`` as an ONNX file that onnx's checker accepts, atomically. Over protobuf's 2 GB
    limit the weights go to ``PATH.data`` beside it (both files are written under temporary names
    and checked before they replace anything)."""
    path = Path(path)
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if weight_bytes < _PROTOBUF_LIMIT - (64 << 20):
        proto = ir.serde.serialize_model(model)
        _drop_inferable_value_info(proto)
        _check(proto, name)
        data = proto.SerializeToString()
        write_atomically(path, lambda handle: handle.write(data))
        return
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = folder / path.name
        ir.save(model, staged, external_data=path.name + ".data")
        proto = onnx.load(str(staged), load_external_data=False)
        if _drop_inferable_value_info(proto):
            onnx.save(proto, str(staged))
        _check(str(staged), name)
        os.replace(folder / (path.name + ".data"), path.parent / (path.name + ".data"))
        os.replace(staged, path)
    except OSError as error:
        raise KilnError(f"{path}: could not write the model ({error.strerror or error}); "
                        "nothing was changed") from error
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _drop_inferable_value_info(proto: onnx.ModelProto) -> bool:
    """Remove the value_info entries (the IR's shapes of intermediate values) that onnx's shape
    inference gives back as they are: a reader infers them anyway, and a file whose input had none
    must not grow by them. Entries inference cannot recompute (ai.kiln ops' outputs, say) stay.
    Returns whether anything was removed."""
    graphs = list(graphs_of(proto.graph))
    entries = [list(g.value_info) for g in graphs]
    for g in graphs:
        del g.value_info[:]
    try:
        inferred = list(graphs_of(onnx.shape_inference.infer_shapes(proto).graph))
    except Exception:  # noqa: BLE001  (inference failing on some op: keep every entry)
        inferred = [onnx.GraphProto() for _ in graphs]
    removed = False
    for g, again, kept in zip(graphs, inferred, entries):
        known = {vi.name: vi.type for vi in again.value_info}
        weights = {t.name for t in g.initializer}  # an initializer's tensor states its type
        g.value_info.extend(vi for vi in kept if known.get(vi.name) != vi.type and vi.name not in weights)
        removed |= len(g.value_info) < len(kept)
    return removed


def _check(model: onnx.ModelProto | str, name: str) -> None:
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        raise KilnError(f"{name}: the optimized graph fails onnx's checker ({str(error).splitlines()[0]}); "
                        "nothing was written. Skip the pass that produced it with --skip") from error
