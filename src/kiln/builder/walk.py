"""The walk: the first profile's feeds through the reference executor in fp32 (``Executor.run``'s
per-node hook), and beside it, as each layer's last node finishes, the layer's chosen tactic on the
fp32 values of its inputs. A reduced-precision layer whose output overflows or drifts from fp32
falls back (fp16 -> bf16 -> fp32, or tf32 where allowed), its drift recorded for the end-to-end
check (``kiln.builder.check_outputs``); Node layers are timed on those real values.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln import deadline as deadlines
from kiln.builder.choose_tactic import run_choice, select_all, time_node_layer
from kiln.builder.record import run_reference
from kiln.builder.state import BuildState, PlannedLayer
from kiln.executor import NodeStep
from kiln.precision import layer_rtol, scaled_error


def walk(state: BuildState, planned: list[PlannedLayer]) -> None:
    """Check (reduced precisions against fp32, on the fp32 values of its inputs) and, for Node
    layers, time each layer as its last node finishes in the reference run."""
    config = state.config
    low = [p for p in planned if p.precision in ("fp16", "bf16")]
    check = bool(low) and config.precision_check and not config.strongly_typed
    if not check and state.level == 0:
        return
    phase = "precision check" if check else "profiling"
    order = {name: position for position, name in enumerate(state.steps)}
    finishing = {max(item.layer.nodes, key=order.__getitem__): index for index, item in enumerate(planned)}
    last_read: dict[str, int] = {}  # layer inputs and outputs -> the last layer that needs them here
    for index, item in enumerate(planned):
        for name in item.layer.inputs + item.layer.outputs:
            last_read[name] = index
    feeds = state.opt_feeds[0]
    held = {name: value for name, value in feeds.items() if name in last_read}

    def observe(step: NodeStep, outputs: tuple) -> None:
        held.update((name, value) for name, value in zip(step.outputs, outputs) if name in last_read)
        index = finishing.get(step.op.node.name or "")
        if index is None:
            return
        state.progress(phase, index, len(planned))
        item = planned[index]
        layer = item.layer
        ref_inputs = [held.get(n) for n in layer.inputs]
        ref_out = [held.get(n) for n in layer.outputs]
        if check and item.precision in ("fp16", "bf16") and not item.constrained:
            _check_precision(state, index, item, ref_inputs, ref_out)
        if layer.kind == "Node" and state.level > 0 and item.choices:
            time_node_layer(state, index, item, ref_inputs)
        for name in layer.inputs + layer.outputs:
            if last_read.get(name) == index:
                held.pop(name, None)

    run_reference(state, feeds, observe)
    state.progress(phase, len(planned), len(planned))


def _check_precision(state: BuildState, index: int, item: PlannedLayer, ref_inputs: list[Any],
                     ref_out: list[Any]) -> None:
    """Move the layer down its chain of precisions (the config's reduced ones, then the wide one)
    until its output neither overflows nor drifts; each move is noted, logged and reported."""
    chain = state.config.low_precisions
    if item.precision not in chain:
        return
    order = chain[chain.index(item.precision):] + [state.wide_precision()]
    for position, precision in enumerate(order):
        if position > 0:
            item.precision = precision
            item.choices = select_all(state, index, item, precision)
        if position == len(order) - 1:
            return
        reason = _precision_problem(state, index, item, precision, ref_inputs, ref_out)
        if reason is None:
            return
        message = (f"layer {item.layer.name!r} ({item.layer.described_ops}): {reason} in {precision}; "
                   f"falls back to {order[position + 1]}")
        item.notes.append(message)
        state.report.fallbacks.append(message)
        state.report.log(message)


def _precision_problem(state: BuildState, index: int, item: PlannedLayer, precision: str, ref_inputs: list[Any],
                       ref_out: list[Any]) -> str | None:
    """Why the layer cannot run at ``precision`` (None: it can; its drift is then recorded)."""
    try:
        got = run_choice(state, index, item, item.choices[0], precision, ref_inputs)
    except deadlines.RunStopped:
        raise
    except Exception as error:  # noqa: BLE001 - an op without a kernel at this precision falls back
        return f"cannot run ({type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''})"
    worst = 0.0
    for a, b in zip(got, ref_out):
        if not isinstance(b, torch.Tensor) or not isinstance(a, torch.Tensor):
            continue
        if b.is_floating_point():
            finite = torch.isfinite(b)
            if bool((finite & ~torch.isfinite(a.float())).any()):
                return "output overflows"
            err = scaled_error(a, b)
            if err > layer_rtol(precision):
                return f"output drifts from fp32 by {err:.3g}"
            worst = max(worst, err)
        elif a.shape != b.shape or not torch.equal(a, b.to(a.dtype)):
            return "integer output differs from fp32"
    item.drift = worst
    return None
