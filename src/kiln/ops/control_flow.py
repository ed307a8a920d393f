"""Ops with subgraphs (If, Loop, Scan, SequenceMap), sequences and optionals.

A sequence is a Python list of values; an empty optional is ``None`` and a full one is its value.
Subgraphs run through ``op.run_graph``, which makes the enclosing scope visible to the body.
Tensors are torch tensors, or numpy object arrays for strings: the helpers below take both.

Limits: every iteration of Loop, Scan and SequenceMap checks the time limit in effect
(``kiln.deadline``), so a Loop of 2^62 trips, or one whose condition never turns false, stops
there; scan outputs are stacked as they grow (``_Stacked``) and refused once they would pass the
tensor-size ceiling (``kiln.limits``), before the iteration's value is kept.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from kiln import deadline as deadlines
from kiln import dtypes
from kiln.ops.registry import OpContext, register


# -- helpers ------------------------------------------------------------------------------------
def _flag(op: OpContext, value: Any, what: str) -> bool:
    """The truth of a one-element bool tensor (If's cond, Loop's cond)."""
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = list(value.shape) if hasattr(value, "shape") else type(value).__name__
        raise op.fail(f"{what} must be a tensor with one element, got {shape}")
    return bool(value.reshape(()).item())


def _index(op: OpContext, value: Any, what: str) -> int:
    """A Python int from a scalar (or one-element) integer tensor."""
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise op.fail(f"{what} must be a scalar integer tensor")
    return int(value.reshape(()).item())


def _is_tensor(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def _select(x: Any, axis: int, i: int) -> Any:
    """``x`` indexed at ``i`` along ``axis`` (rank one less)."""
    if isinstance(x, np.ndarray):
        return np.take(x, i, axis=axis)
    return x.select(axis, i)


def _stack(xs: list[Any], axis: int) -> Any:
    if isinstance(xs[0], np.ndarray):
        return np.stack(xs, axis=axis)
    return torch.stack(xs, dim=axis)


def _concat(xs: list[Any], axis: int) -> Any:
    if isinstance(xs[0], np.ndarray):
        return np.concatenate(xs, axis=axis)
    return torch.cat(xs, dim=axis)


def _axis(op: OpContext, axis: int, rank: int, what: str = "axis") -> int:
    if not -rank <= axis < rank:
        raise op.fail(f"{what} {axis} is out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def _empty_like_output(op: OpContext, value: ir.Value, lead: tuple[int, ...]) -> Any:
    """A tensor of shape ``lead + <declared shape of value>`` with no elements, for scan outputs of
    loops that ran zero times: the body never ran, so its declared type is all there is to go on."""
    if not isinstance(value.type, ir.TensorType) or value.dtype is None:
        raise op.fail(f"zero iterations and scan output {value.name!r} has no declared tensor type")
    if value.shape is None:
        raise op.fail(f"zero iterations and scan output {value.name!r} has no declared shape")
    dims = [d if isinstance(d, int) else 0 for d in value.shape]
    shape = (*lead, *dims)
    if value.dtype == ir.DataType.STRING:
        return np.empty(shape, dtype=object)
    return torch.empty(shape, dtype=dtypes.to_torch_dtype(value.dtype), device=op.device)


def _check_time(op: OpContext, deadline: deadlines.Deadline | None, iteration: int) -> None:
    """Stop at the time limit in effect (``kiln.deadline``), naming this node and the iteration."""
    if deadline is not None and deadline.expired():
        raise deadline.stopped(f"node {op.name!r} (op {op.op_type}, iteration {iteration})")


class _Stacked:
    """One scan output's per-iteration values, stacked along a new axis 0 as they come.

    Every ``CHUNK`` values are stacked into one tensor at once: a list of a million one-element
    tensors costs a hundred times their bytes, so the values held stay near the size of their
    stack. Before each value is kept, the stack it would make is checked against the tensor-size
    ceiling, so a Loop whose scan output grows past it stops with ``ResourceLimitError``."""

    CHUNK = 256

    def __init__(self, op: OpContext, index: int) -> None:
        self.op, self.index = op, index
        self.count = 0
        self.chunks: list[Any] = []
        self.pending: list[Any] = []

    def add(self, value: Any) -> None:
        self.op.check_output((self.count + 1, *value.shape), value.dtype, self.index)
        self.count += 1
        self.pending.append(value)
        if len(self.pending) >= self.CHUNK:
            self.chunks.append(_stack(self.pending, 0))
            self.pending = []

    def result(self) -> Any:
        """The stack of every value (None when there were none)."""
        if self.pending:
            self.chunks.append(_stack(self.pending, 0))
            self.pending = []
        if not self.chunks:
            return None
        return self.chunks[0] if len(self.chunks) == 1 else _concat(self.chunks, 0)


def _zeros_like(x: Any, shape: tuple[int, ...]) -> Any:
    if isinstance(x, np.ndarray):
        return np.full(shape, "", dtype=object)
    return torch.zeros(shape, dtype=x.dtype, device=x.device)


# -- If / Loop / Scan ---------------------------------------------------------------------------
@register("If", since=1, reads_torch_flags=True, control_flow=True)
def if_(op, cond):
    """Runs then_branch or else_branch; its outputs (tensors, sequences, optionals) are If's."""
    branch = op.attr("then_branch") if _flag(op, cond, "cond") else op.attr("else_branch")
    return tuple(op.run_graph(branch, []))


@register("Loop", since=1, reads_torch_flags=True, control_flow=True)
def loop(op, max_trip_count, cond, *initial):
    """Body (iteration_num, cond, carried...) -> (cond, carried..., scan...); scans stack on axis 0."""
    body: ir.Graph = op.attr("body")
    n_carried = len(initial)
    if len(body.inputs) != n_carried + 2:
        raise op.fail(f"body has {len(body.inputs)} inputs, expected {n_carried + 2} (iteration, cond, carried...)")
    n_scan = len(body.outputs) - 1 - n_carried
    if n_scan < 0:
        raise op.fail(f"body has {len(body.outputs)} outputs, expected at least {n_carried + 1}")
    trips = None if max_trip_count is None else _index(op, max_trip_count, "M (max trip count)")
    use_cond = cond is not None
    if trips is None and not use_cond:
        raise op.fail("neither M nor cond is given, so the loop never ends")
    keep_going = _flag(op, cond, "cond") if use_cond else True
    cond_value = cond if use_cond else torch.tensor(True, device=op.device)
    carried = list(initial)
    scans = [_Stacked(op, n_carried + k) for k in range(n_scan)]
    deadline = deadlines.current()
    i = 0
    while keep_going and (trips is None or i < trips):
        _check_time(op, deadline, i)
        iteration = torch.tensor(i, dtype=torch.int64, device=op.device)
        outs = op.run_graph(body, [iteration, cond_value, *carried])
        cond_value = outs[0]
        carried = list(outs[1 : 1 + n_carried])
        for k, value in enumerate(outs[1 + n_carried :]):
            if not _is_tensor(value):
                raise op.fail(f"scan output {k} is a {type(value).__name__}; Loop scan outputs must be tensors")
            scans[k].add(value)
        if use_cond:
            keep_going = _flag(op, cond_value, "the body's cond output")
        i += 1
    stacked = [scan.result() for scan in scans]
    stacked = [value if value is not None else _empty_like_output(op, body.outputs[1 + n_carried + k], (0,))
               for k, value in enumerate(stacked)]
    return (*carried, *stacked)


def _scan_outputs(op, body, n_state, collected: list[_Stacked], out_axes, out_dirs):
    """Each scan output's per-iteration values along its axis (reversed if its direction is 1)."""
    results = []
    for k, stacked in enumerate(collected):
        value = stacked.result()
        if value is None:
            value = _empty_like_output(op, body.outputs[n_state + k], (0,))
        elif out_dirs[k]:
            value = value[::-1] if isinstance(value, np.ndarray) else value.flip(0)
        axis = _axis(op, out_axes[k], value.ndim, "scan_output_axes entry")
        if axis:
            value = (np.moveaxis(value, 0, axis) if isinstance(value, np.ndarray)
                     else value.movedim(0, axis).contiguous())
        results.append(value)
    return results


def _scan_arity(op, inputs) -> tuple[ir.Graph, int, int, int]:
    """The body and the counts of scan inputs, state variables and scan outputs."""
    body: ir.Graph = op.attr("body")
    m = op.attr("num_scan_inputs")
    n_state = len(inputs) - (m or 0)
    if m is None or m < 1 or n_state < 0:
        raise op.fail(f"num_scan_inputs={m} does not fit the {len(inputs)} inputs")
    return body, m, n_state, len(body.outputs) - n_state


@register("Scan", since=9, reads_torch_flags=True, control_flow=True)
def scan(op, *inputs):
    """Body (state..., scan_elem...) -> (state..., scan_out_elem...), per position along each scan axis."""
    body, m, n_state, k = _scan_arity(op, inputs)
    in_axes = op.attr("scan_input_axes") or [0] * m
    in_dirs = op.attr("scan_input_directions") or [0] * m
    out_axes = op.attr("scan_output_axes") or [0] * k
    out_dirs = op.attr("scan_output_directions") or [0] * k
    if len(in_axes) != m or len(in_dirs) != m or len(out_axes) != k or len(out_dirs) != k:
        raise op.fail("scan_input_*/scan_output_* attributes must have one entry per scan input/output")
    xs = inputs[n_state:]
    axes = [_axis(op, a, x.ndim, "scan_input_axes entry") for a, x in zip(in_axes, xs, strict=True)]
    lengths = {x.shape[a] for x, a in zip(xs, axes, strict=True)}
    if len(lengths) != 1:
        raise op.fail(f"scan inputs have different lengths along their scan axes: {sorted(lengths)}")
    length = lengths.pop()
    states = list(inputs[:n_state])
    collected = [_Stacked(op, n_state + j) for j in range(k)]
    deadline = deadlines.current()
    for t in range(length):
        _check_time(op, deadline, t)
        elems = [_select(x, a, length - 1 - t if d else t) for x, a, d in zip(xs, axes, in_dirs, strict=True)]
        outs = op.run_graph(body, [*states, *elems])
        states = list(outs[:n_state])
        for j, value in enumerate(outs[n_state:]):
            collected[j].add(value)
    return (*states, *_scan_outputs(op, body, n_state, collected, out_axes, out_dirs))


@register("Scan", since=8)
def scan_8(op, sequence_lens, *inputs):
    """Scan-8: batch axis 0, scan axis 1, optional per-batch sequence_lens; short outputs zero-padded."""
    body, m, n_state, k = _scan_arity(op, inputs)
    dirs = op.attr("directions") or [0] * m
    if len(dirs) != m:
        raise op.fail("directions must have one entry per scan input")
    xs = inputs[n_state:]
    if any(x.ndim < 2 for x in xs):
        raise op.fail("Scan-8 scan inputs need a batch axis 0 and a scan axis 1")
    batch, max_len = xs[0].shape[0], xs[0].shape[1]
    if any(x.shape[0] != batch or x.shape[1] != max_len for x in xs):
        raise op.fail("Scan-8 scan inputs must share batch size and sequence length")
    lens = [max_len] * batch if sequence_lens is None else [int(v) for v in sequence_lens.reshape(-1).tolist()]
    if len(lens) != batch or any(not 0 <= n <= max_len for n in lens):
        raise op.fail(f"sequence_lens {lens} does not fit batch {batch} and max length {max_len}")
    final_states: list[list[Any]] = [[] for _ in range(n_state)]
    per_batch: list[list[Any]] = []  # per batch, per output: stacked values (or None when empty)
    deadline = deadlines.current()
    iteration = 0
    for b in range(batch):
        states = [_select(s, 0, b) for s in inputs[:n_state]]
        rows = [_select(x, 0, b) for x in xs]
        collected = [_Stacked(op, n_state + j) for j in range(k)]
        n = lens[b]
        for t in range(n):
            _check_time(op, deadline, iteration)
            iteration += 1
            elems = [_select(r, 0, n - 1 - t if d else t) for r, d in zip(rows, dirs, strict=True)]
            outs = op.run_graph(body, [*states, *elems])
            states = list(outs[:n_state])
            for j, value in enumerate(outs[n_state:]):
                collected[j].add(value)
        for j, s in enumerate(states):
            final_states[j].append(s)
        per_batch.append([stacked.result() for stacked in collected])
    results = []
    for j in range(k):
        sample = next((row[j] for row in per_batch if row[j] is not None), None)
        if sample is None:
            results.append(_empty_like_output(op, body.outputs[n_state + j], (batch, max_len)))
            continue
        op.check_output((batch, max_len, *sample.shape[1:]), sample.dtype, n_state + j)
        padded = []
        for row in per_batch:
            value = row[j]
            if value is None or value.shape[0] < max_len:
                pad = _zeros_like(sample, (max_len - (0 if value is None else value.shape[0]), *sample.shape[1:]))
                value = pad if value is None else _concat([value, pad], 0)
            padded.append(value)
        results.append(_stack(padded, 0))
    return (*[_stack(s, 0) for s in final_states], *results)


# -- sequences ----------------------------------------------------------------------------------
@register("SequenceMap", since=17, reads_torch_flags=True, control_flow=True, sequence=True)
def sequence_map(op, sequence, *extra):
    """Runs body once per element; extra sequence inputs are zipped, extra tensors given each time."""
    body: ir.Graph = op.attr("body")
    n = len(sequence)
    for x in extra:
        if isinstance(x, list) and len(x) != n:
            raise op.fail(f"sequence inputs have different lengths ({n} and {len(x)})")
    outputs: list[list[Any]] = [[] for _ in body.outputs]
    deadline = deadlines.current()
    for i in range(n):
        _check_time(op, deadline, i)
        args = [sequence[i], *[x[i] if isinstance(x, list) else x for x in extra]]
        for j, value in enumerate(op.run_graph(body, args)):
            outputs[j].append(value)
    return tuple(outputs)


@register("SequenceEmpty", since=11, sequence=True)
def sequence_empty(op):
    return []


def _element_type(x: Any) -> Any:
    return "string" if isinstance(x, np.ndarray) else x.dtype


def _check_elements(op: OpContext, xs: list[Any]) -> None:
    """A sequence holds tensors of one element type."""
    kinds = {_element_type(x) for x in xs}
    if len(kinds) > 1:
        raise op.fail(f"sequence elements must share one element type, got {sorted(map(str, kinds))}")


@register("SequenceConstruct", since=11, sequence=True)
def sequence_construct(op, *xs):
    _check_elements(op, list(xs))
    return list(xs)


def _position(op: OpContext, position: Any, size: int, inclusive_end: bool) -> int:
    """A sequence position in [-size, size-1] (or [-size, size] for insertion), made non-negative."""
    pos = _index(op, position, "position")
    high = size if inclusive_end else size - 1
    if not -size <= pos <= high:
        raise op.fail(f"position {pos} is out of range for a sequence of length {size}")
    return pos + size if pos < 0 else pos


@register("SequenceInsert", since=11, sequence=True)
def sequence_insert(op, sequence, tensor, position=None):
    out = list(sequence)
    _check_elements(op, [*out[:1], tensor])
    if position is None:
        out.append(tensor)
    else:
        out.insert(_position(op, position, len(out), True), tensor)
    return out


@register("SequenceErase", since=11, sequence=True)
def sequence_erase(op, sequence, position=None):
    out = list(sequence)
    if not out:
        raise op.fail("cannot erase from an empty sequence")
    del out[-1 if position is None else _position(op, position, len(out), False)]
    return out


@register("SequenceAt", since=11, sequence=True)
def sequence_at(op, sequence, position):
    return sequence[_position(op, position, len(sequence), False)]


@register("SequenceLength", since=11, sequence=True)
def sequence_length(op, sequence):
    return torch.tensor(len(sequence), dtype=torch.int64, device=op.device)


@register("SplitToSequence", since=11, sequence=True)
def split_to_sequence(op, x, split=None):
    """Split into a list: scalar split = chunks of that size (last may be short), 1-D = sizes."""
    axis = _axis(op, op.attr("axis", 0), x.ndim)
    dim = x.shape[axis]
    if split is None:
        sizes = [1] * dim
    elif split.ndim == 0:
        size = int(split)
        if size <= 0:
            raise op.fail(f"scalar split must be positive, got {size}")
        sizes = [size] * (dim // size) + ([dim % size] if dim % size else [])
    elif split.ndim == 1:
        sizes = [int(s) for s in split.tolist()]
        if any(s < 0 for s in sizes) or sum(sizes) != dim:
            raise op.fail(f"split {sizes} must be non-negative and sum to the axis size {dim}")
    else:
        raise op.fail(f"split must be a scalar or 1-D, got rank {split.ndim}")
    if isinstance(x, np.ndarray):
        parts = np.split(x, np.cumsum(sizes)[:-1].tolist(), axis=axis) if sizes else []
    else:
        parts = list(torch.split(x, sizes, dim=axis))
    if split is None and not op.attr("keepdims", 1):
        parts = [_select(p, axis, 0) for p in parts]
    return parts


@register("ConcatFromSequence", since=11, sequence=True)
def concat_from_sequence(op, sequence):
    """torch.cat along axis, or torch.stack when new_axis=1 (axis may then be rank)."""
    if not sequence:
        raise op.fail("the input sequence is empty: the result's shape and type are unknown")
    if op.attr("axis") is None:
        raise op.fail("the 'axis' attribute is required")
    rank = sequence[0].ndim
    first = sequence[0]
    if op.attr("new_axis", 0):
        axis = _axis(op, op.attr("axis"), rank + 1)
        op.check_output((*first.shape[:axis], len(sequence), *first.shape[axis:]), first.dtype)
        return _stack(list(sequence), axis)
    axis = _axis(op, op.attr("axis"), rank)
    if all(x.ndim == rank for x in sequence):
        joined = sum(x.shape[axis] for x in sequence)
        op.check_output((*first.shape[:axis], joined, *first.shape[axis + 1:]), first.dtype)
    return _concat(list(sequence), axis)


# -- optionals ----------------------------------------------------------------------------------
@register("Optional", since=15, optional=True)
def optional(op, x=None):
    """A full optional is its value; with no input (only a type attribute) it is empty (None)."""
    if x is None and op.attr("type") is None:
        raise op.fail("Optional needs an input or a 'type' attribute")
    return x


@register("OptionalHasElement", since=15, optional=True)
def optional_has_element(op, x=None):
    return torch.tensor(x is not None, device=op.device)


@register("OptionalGetElement", since=15, optional=True)
def optional_get_element(op, x):
    """Opset 18 also accepts a plain tensor or sequence, which is already its own element."""
    if x is None:
        raise op.fail("the optional input is empty")
    return x
