"""Which inputs of a benchmarked model batch, along which axis, and its inputs at each batch size
(``--batch``, ``--batch-axes``, ``--shapes``, ``--inputs``)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from kiln.bench.options import BenchOptions
from kiln.errors import KilnError


def batch_axes(values, options: BenchOptions, model: str = "model") -> tuple[dict[str, int], str]:
    """Which inputs batch, along which axis (input name -> axis), and a one-line note saying so.

    ``options.batch_axes`` when given (the inputs it leaves out keep their shapes). Otherwise the
    symbolic dim that most inputs share (``batch`` in ``input[batch, seq]`` and
    ``state[2, batch, 128]``; on a tie the one nearest axis 0), at its axis in each input that has
    it; else axis 0 of each input whose axis 0 is dynamic; else (a model with static shapes) axis 0
    of every input with one, which then runs only at its own batch size. Scalars never batch."""
    names = [v.name for v in values]
    ranks = {v.name: _rank(v, options) for v in values}
    if options.batch_axes:
        unknown = sorted(set(options.batch_axes) - set(names))
        if unknown:
            raise KilnError(f"{model}: --batch-axes names unknown input(s) {unknown}; inputs are {names}")
        axes = {}
        for name, axis in options.batch_axes.items():
            rank = ranks[name]
            if rank is not None and not -rank <= axis < rank:
                raise KilnError(f"{model}: --batch-axes gives input {name!r} batch axis {axis}, but it has rank {rank}"
                                + (" (a scalar does not batch; leave it out)" if rank == 0 else ""))
            axes[name] = axis % rank if rank else axis
        how = "--batch-axes"
    else:
        # symbolic dim name -> (input index, axis) of each input having it
        places: dict[str, list[tuple[int, int]]] = {}
        for index, value in enumerate(values):
            for axis, dim in enumerate(value.shape or ()):
                symbol = None if isinstance(dim, int) else getattr(dim, "value", None)
                if isinstance(symbol, str) and all(i != index for i, _ in places.get(symbol, [])):
                    places.setdefault(symbol, []).append((index, axis))
        shared = {symbol: where for symbol, where in places.items() if len(where) >= 2}
        if shared:
            symbol = min(shared, key=lambda k: (-len(shared[k]), min(a for _, a in shared[k]), shared[k][0]))
            axes = {names[index]: axis for index, axis in shared[symbol]}
            how = f"the symbolic dim {symbol!r} that {len(axes)} inputs share"
        else:
            axes = {v.name: 0 for v in values if ranks[v.name] and (v.shape is None or not isinstance(v.shape[0], int))}
            how = "axis 0 of each input whose axis 0 is dynamic"
            if not axes:
                axes = {name: 0 for name in names if ranks[name]}
                how = "axis 0 of every input: none has a dynamic batch dim"
    kept = [name for name in names if name not in axes]
    note = (f"batch axes ({how}): " + ", ".join(f"{name}:{axis}" for name, axis in axes.items())
            + (f"; as given: {', '.join(kept)}" if kept else "") + " (choose with --batch-axes NAME:AXIS,...)")
    return axes, note


def _rank(value, options: BenchOptions) -> int | None:
    """An input's rank: declared, else from ``--shapes`` or its ``--inputs`` array (None: unknown)."""
    if value.shape is not None:
        return len(value.shape)
    if value.name in options.shapes:
        return len(options.shapes[value.name])
    if value.name in options.inputs:
        return np.ndim(options.inputs[value.name])
    return None


def batch_shapes(values, shapes: Mapping[str, tuple[int, ...]], batch: int | None, axes: Mapping[str, int],
                  model: str) -> dict[str, tuple[int, ...]]:
    """``shapes`` with each batched input's batch axis set to ``batch`` (a fixed one must equal it);
    the other inputs as given or declared."""
    if batch is None:
        return dict(shapes)
    result = {}
    for value in values:
        given = shapes.get(value.name)
        dims = list(given) if given is not None else ([d if isinstance(d, int) else None for d in value.shape]
                                                       if value.shape is not None else None)
        if dims is None:
            raise KilnError(f"{model}: input {value.name!r} has no declared shape; give it with --shapes "
                            f"{value.name}:AxB...")
        axis = axes.get(value.name)
        if axis is not None:
            if axis >= len(dims):
                raise KilnError(f"{model}: input {value.name!r} has shape {dims}: no batch axis {axis}")
            declared = value.shape[axis] if value.shape is not None and axis < len(value.shape) else None
            if isinstance(declared, int) and declared != batch:
                raise KilnError(f"{model}: input {value.name!r} has a fixed batch of {declared} (axis {axis}); it "
                                f"cannot run at batch {batch} (choose the inputs and axes that batch with --batch-axes "
                                "NAME:AXIS,...)")
            dims[axis] = batch
        if any(d is None for d in dims):
            shown = "x".join(str(d) if isinstance(d, int) else (d.value or "?") for d in value.shape)
            raise KilnError(f"{model}: input {value.name!r} has dynamic dimensions ({shown}); give them with --shapes "
                            f"{value.name}:{'x'.join(str(d or 'N') for d in dims)}"
                            + ("" if axis is not None else f", or batch it with --batch-axes {value.name}:AXIS"))
        result[value.name] = tuple(d for d in dims if d is not None)  # none is None (checked above)
    return result


def shapes_with_inputs(values, options: BenchOptions, axes: Mapping[str, int],
                       model: str) -> dict[str, tuple[int, ...]]:
    """``--shapes`` plus the shape of each array given in ``inputs`` (the two must agree but on the
    batch axis)."""
    known = {v.name: v for v in values}
    unknown = sorted(set(options.inputs) - set(known))
    if unknown:
        raise KilnError(f"{model}: --inputs has array(s) {unknown} that are not inputs of the model; its inputs are "
                        f"{list(known)}")
    shapes = {name: tuple(shape) for name, shape in options.shapes.items()}
    for name, array in options.inputs.items():
        given = tuple(np.shape(array))
        declared = known[name].shape
        if declared is not None and len(declared) != len(given):
            raise KilnError(f"{model}: input {name!r} from --inputs has shape {list(given)}, the model declares rank "
                            f"{len(declared)}")
        axis = axes.get(name)
        if axis is not None and given[axis] == 0:
            raise KilnError(f"{model}: input {name!r} from --inputs has no rows on its batch axis {axis} (shape "
                            f"{list(given)})")
        if name in shapes:
            same = len(shapes[name]) == len(given) and all(a == axis or s == g
                                                           for a, (s, g) in enumerate(zip(shapes[name], given)))
            if not same:
                raise KilnError(f"{model}: --shapes gives input {name!r} shape {list(shapes[name])}, but its array in "
                                f"--inputs has shape {list(given)}; give one of the two")
        shapes.setdefault(name, given)
    return shapes


def feeds_at(engine, options: BenchOptions, batch: int | None, axes: Mapping[str, int],
             model: str) -> dict[str, np.ndarray]:
    """The inputs at one batch size: ``options.inputs`` (repeated in turn or cut to the batch along
    the input's batch axis; as given when it does not batch), random arrays for the rest."""
    from kiln.inputs import engine_input_values, random_inputs

    values = engine_input_values(engine)
    shapes = batch_shapes(values, options.shapes, batch, axes, model)
    rest = [v for v in values if v.name not in options.inputs]
    feeds = random_inputs(rest, {v.name: shapes[v.name] for v in rest if v.name in shapes}, seed=options.seed,
                          model=model)
    for value in values:
        if value.name in options.inputs:
            feeds[value.name] = batched(options.inputs[value.name], axes.get(value.name), batch)
    return {v.name or "": feeds[v.name or ""] for v in values}


def batched(array, axis: int | None, batch: int | None) -> np.ndarray:
    """An ``inputs`` array at one batch size: repeated in turn or cut along its batch axis; as given
    when it does not batch (or no batch size is set). C order, a scalar kept rank 0."""
    array = np.asarray(array)
    if batch is not None and axis is not None and array.shape[axis] != batch:
        array = np.take(array, np.arange(batch) % array.shape[axis], axis=axis)
    return np.require(array, requirements="C")  # np.ascontiguousarray would make a scalar 1-D


def batch_size(feeds: Mapping[str, np.ndarray], axes: Mapping[str, int]) -> int:
    """The batch the given shapes run at: the first batched input's size on its batch axis (1: none)."""
    for name, axis in axes.items():
        if name in feeds and np.ndim(feeds[name]) > axis:
            return int(np.shape(feeds[name])[axis])
    return 1
