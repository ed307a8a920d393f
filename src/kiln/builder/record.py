"""Shape recording: the model on the reference executor at a profile's opt shapes, every value's
shape and dtype noted as it is computed, and the values computed from constants alone kept (the
builder's constant folding). Runs of the model inside the build go through ``run_reference``, so a
failure of the model itself is reported once, the same way (``failed_run``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from kiln import deadline as deadlines
from kiln import dtypes
from kiln.builder.layers import GraphFacts
from kiln.builder.state import BuildState
from kiln.errors import KilnError, OpError
from kiln.executor import NodeStep
from kiln.ops.registry import op_facts


def has_subgraph(node: ir.Node) -> bool:
    """Whether ``node`` holds a subgraph (If, Loop, Scan)."""
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())


def record(state: BuildState, feeds: Mapping[str, torch.Tensor | np.ndarray]) -> GraphFacts:
    """The model's value shapes, dtypes and constants on ``feeds``; the first call's outputs become
    the fp32 reference (``state.reference``)."""
    shapes: dict[str, tuple[int, ...]] = {}
    kinds: dict[str, ir.DataType] = {}
    constants: dict[str, Any] = dict(state.executor.constants)
    for name, value in {**constants, **feeds}.items():
        if isinstance(value, torch.Tensor):
            shapes[name] = tuple(value.shape)
            if value.dtype in dtypes.ONNX_DTYPES:
                kinds[name] = dtypes.ONNX_DTYPES[value.dtype]

    def observe(step: NodeStep, outputs: tuple) -> None:
        # A node computed from constants alone is a constant (the builder's constant folding);
        # random ops are not, and neither is anything reading a subgraph.
        op = step.op
        folded = op.domain == "" and not op_facts(op.op_type).random and not has_subgraph(op.node) and (
            op.op_type == "Constant" or (any(step.inputs) and all(n in constants for n in step.inputs if n)))
        for out_name, value in zip(step.outputs, outputs):
            if out_name and isinstance(value, torch.Tensor):
                shapes[out_name] = tuple(value.shape)
                if value.dtype in dtypes.ONNX_DTYPES:
                    kinds[out_name] = dtypes.ONNX_DTYPES[value.dtype]
                if folded:
                    constants[out_name] = value

    outputs = run_reference(state, feeds, observe)
    if not state.reference:
        state.reference = outputs
    return GraphFacts(shapes, kinds, constants)


def run_reference(state: BuildState, feeds: Mapping[str, torch.Tensor | np.ndarray],
                  observe: Callable[[NodeStep, tuple], None]) -> dict[str, Any]:
    """The model on the reference executor (fp32 means IEEE fp32), ``observe(step, outputs)`` after
    each main-graph node (``Executor.run``'s ``on_node``). A failure of the model's own nodes is
    reported by ``failed_run``; an error the observer raises passes through as it is."""
    raised: list[BaseException] = []

    def guarded(step: NodeStep, outputs: tuple) -> None:
        try:
            observe(step, outputs)
        except BaseException as error:
            raised.append(error)
            raise

    try:
        return state.executor.run(feeds, on_node=guarded)
    except deadlines.RunStopped:
        raise
    except KilnError as error:
        if raised and error is raised[0]:
            raise
        raise failed_run(state, str(error)) from error


def failed_run(state: BuildState, cause: str) -> KilnError:
    """A run of the model inside the build (recording shapes, the precision walk, the end-to-end
    check) failed with ``cause`` (naming the node, op and error): one line that says so and, where
    the build made inputs up, which ones, and that ``--inputs`` gives real values. Random integers
    in [0, 2) are no sample rate, size or index a real model takes."""
    name = state.name
    cause = " ".join(cause.split())
    while cause.startswith(f"{name}: "):
        cause = cause[len(name) + 2:]
    made_up = [v for v in state.executor.inputs if v.name in state.made_up]
    if not made_up:
        return OpError(f"{name}: the model failed on the calibration inputs: {cause}")
    shown = [v for v in made_up if v.dtype is None or not v.dtype.is_floating_point()] or made_up
    return OpError(
        f"{name}: the model failed on the build's random inputs: {cause}; "
        f"{', '.join(_described(v) for v in shown)} got random values: pass real ones with --inputs FILE.npz "
        f"(builds run the model on those inputs to record shapes, check precision and check the engine's outputs)"
    )


def _described(value: ir.Value) -> str:
    """An input and the random values the build gave it, for error messages."""
    if value.shape is None:
        shape = "tensor"
    elif len(value.shape) == 0:
        shape = "scalar"
    else:
        shape = "[" + ", ".join(str(d) if isinstance(d, int) else (d.value or "?") for d in value.shape) + "]"
    kind = dtypes.onnx_name(value.dtype) if value.dtype is not None else "?"
    if value.dtype == ir.DataType.BOOL:
        made = "coin flips"
    elif value.dtype is not None and value.dtype.is_floating_point():
        made = "standard normal"
    else:
        made = "integers in [0, 2)"
    return f"{value.name} ({kind} {shape}, {made})"
