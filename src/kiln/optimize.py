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
from kiln.passes import PassContext, PassReport, run_passes

_PROTOBUF_LIMIT = 2**31 - 1


def optimize_model(
    model: ir.Model,
    *,
    passes: Sequence[str] | None = None,
    skip: Iterable[str] = (),
    precision: str = "fp32",
    kiln_ops: bool = False,
    dims: Mapping[str, int] | None = None,
) -> PassReport:
    """Run the chosen passes on ``model`` in place (no measurements: measuring passes decide by rule)."""
    ctx = PassContext(precision=precision, kiln_ops=kiln_ops, dims=dict(dims or {}))
    return run_passes(model, ctx, passes, skip)


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
        raise KilnError(f"{path}: could not write the model ({error.strerror or error}); nothing was changed") from error
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _drop_inferable_value_info(proto: onnx.ModelProto) -> bool:
    """Remove the value_info entries (the IR's shapes of intermediate values) that onnx's shape
    inference gives back as they are: a reader infers them anyway, and a file whose input had none
    must not grow by them. Entries inference cannot recompute (ai.kiln ops' outputs, say) stay.
    Returns whether anything was removed."""
    graphs = list(_graphs(proto.graph))
    entries = [list(g.value_info) for g in graphs]
    for g in graphs:
        del g.value_info[:]
    try:
        inferred = list(_graphs(onnx.shape_inference.infer_shapes(proto).graph))
    except Exception:  # noqa: BLE001  (inference failing on some op: keep every entry)
        inferred = [onnx.GraphProto() for _ in graphs]
    removed = False
    for g, again, kept in zip(graphs, inferred, entries):
        known = {vi.name: vi.type for vi in again.value_info}
        weights = {t.name for t in g.initializer}  # an initializer's tensor states its type
        g.value_info.extend(vi for vi in kept if known.get(vi.name) != vi.type and vi.name not in weights)
        removed |= len(g.value_info) < len(kept)
    return removed


def _graphs(graph: onnx.GraphProto):
    """``graph`` and its subgraphs, depth first, in node and attribute order."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graphs(sub)


def _check(model: onnx.ModelProto | str, name: str) -> None:
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        raise KilnError(f"{name}: the optimized graph fails onnx's checker ({str(error).splitlines()[0]}); "
                        "nothing was written. Skip the pass that produced it with --skip") from error
