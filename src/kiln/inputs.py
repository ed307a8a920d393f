"""Model inputs from the outside world: ``--shapes`` text, npz files, random tensors of declared shapes.

Random inputs are never zeros: floats are standard normal, integers are uniform in [0, 2) (valid as
token ids, segment ids and attention masks alike), bools are fair coin flips. A dynamic dimension
must be given a size with ``--shapes``; kiln does not guess one.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from kiln.atomic_file import write_atomically
from kiln.errors import InputError

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


def read_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Arrays by name from an npz file, refusing pickled objects."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except FileNotFoundError as error:
        raise InputError(f"{path}: no such inputs file") from error
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        raise InputError(f"{path}: not a readable .npz of arrays ({str(error).splitlines()[0][:200]})") from error


def write_npz(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> None:
    """Write the arrays to an .npz atomically (never half a file, even on a full disk)."""
    write_atomically(path, lambda handle: np.savez(handle, **{k: np.asarray(v) for k, v in arrays.items()}))


def concrete_shape(value: ir.Value, shapes: Mapping[str, Sequence[int]], model: str) -> tuple[int, ...]:
    """The shape to use for an input: ``--shapes`` if given, else its declared static shape."""
    if value.name in shapes:
        given = tuple(shapes[value.name])
        declared = value.shape
        if declared is not None:
            if len(declared) != len(given):
                raise InputError(f"{model}: --shapes gives input {value.name!r} rank {len(given)}, the model declares rank {len(declared)}")
            for axis, (dim, size) in enumerate(zip(declared, given)):
                if isinstance(dim, int) and dim != size:
                    raise InputError(f"{model}: --shapes gives input {value.name!r} size {size} on axis {axis}, the model fixes it at {dim}")
        return given
    if value.shape is None:
        raise InputError(f"{model}: input {value.name!r} has no declared shape; give one with --shapes {value.name}:AxB...")
    dynamic = [axis for axis, dim in enumerate(value.shape) if not isinstance(dim, int)]
    if dynamic:
        names = [str(value.shape[a].value or "?") for a in dynamic]
        raise InputError(
            f"{model}: input {value.name!r} has dynamic dimension(s) {names} at axis {dynamic}; "
            f"give sizes with --shapes {value.name}:{'x'.join(str(d) if isinstance(d, int) else 'N' for d in value.shape)}"
        )
    return tuple(int(d) for d in value.shape)


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
        values.append(ir.Value(name=spec["name"], type=ir.TensorType(getattr(ir.DataType, spec["dtype"].upper())), shape=shape))
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
            raise InputError(f"{model}: cannot make a random value for input {value.name!r} of type {value.type}; pass --inputs")
        np_dtype = dtype.numpy()
        if dtype == ir.DataType.BOOL:
            array = rng.random(shape) < 0.5
        elif dtype.is_floating_point():
            array = rng.standard_normal(shape, dtype=np.float32).astype(np_dtype)
        else:
            array = rng.integers(0, 2, size=shape).astype(np_dtype)
        feeds[value.name] = array
    return feeds
