"""Tactic selection, per layer and profile: every candidate allowed at the optimization level runs
on fresh random inputs at the opt shape, is checked against the kind's reference tactic at the same
precision (a wrong fast kernel is never chosen), and is timed (``kiln.timing.median_ms``: CUDA
events, median of repeated runs). Timings go to the timing cache; level 0 times nothing and trusts
the heuristic's first pick that passes its check. Node layers are timed on real values in the walk
(``time_node_layer``).

TensorRT's reading of --fp16/--bf16 holds: reduced precision is allowed, not imposed. A layer whose
fp32 (tf32) tactics are faster than its fp16/bf16 ones by more than ``WIDE_MARGIN`` runs wide.
"""

from __future__ import annotations

import zlib
from typing import Any

import onnx_ir as ir
import torch

from kiln import deadline as deadlines
from kiln.builder.layers import FLOAT_TYPES, Layer
from kiln.builder.state import BuildState, Choice, PlannedLayer
from kiln.builder.tactics import registry as tactic_registry
from kiln.builder.tactics.base import Tactic
from kiln.builder.tactics.conv import conv_runs_nhwc
from kiln.errors import KilnError
from kiln.precision import PRECISION_DTYPES, layer_rtol, scaled_error, tf32_for
from kiln.timing import median_ms

WIDE_MARGIN = 0.9  # a layer runs wide when that is at least 10% faster (prefer_faster_wide) ...
WIDE_MIN_GAIN_MS = 0.02  # ... and, on a GPU, saves more than two small kernels (the casts at its edges) cost


def select_all(state: BuildState, index: int, item: PlannedLayer, precision: str | None = None) -> list[Choice]:
    """The layer's choice at every profile (``select``)."""
    return [select(state, index, item, p, precision) for p in range(len(state.profiles))]


def select(state: BuildState, index: int, item: PlannedLayer, profile: int, precision: str | None = None) -> Choice:
    """The fastest candidate that passes its check at ``precision`` (default: the layer's), from the
    timing cache where it has the entry; a Node layer's reference tactic, untimed here."""
    precision = precision or item.precision
    layer = item.layer
    candidates = _candidates(state, item, precision)
    if layer.kind == "Node":
        t, cfg = candidates[0]
        return Choice(t.name, cfg, None)
    facts = state.facts[profile]
    weights = state.weights(index, layer)
    key_fields = {
        "kind": layer.kind, "attrs": layer.attrs, "inputs": [list(facts.shapes[n]) for n in layer.inputs],
        "precision": precision, "weights": {r: list(w.shape) for r, w in sorted(weights.items())},
        "in_dtypes": [str(facts.dtypes.get(n)) for n in layer.inputs],
    }
    if state.level == 0:
        return _heuristic_choice(state, index, item, candidates, precision, profile)
    inputs = None
    reference = None
    best: Choice | None = None
    cached_failures: list[tuple[Tactic, dict]] = []
    for attempt in range(2):
        for t, cfg in candidates if attempt == 0 else cached_failures:
            state.check_time(f"tactic selection for layer {layer.name!r} (op {'+'.join(layer.op_types)})")
            key = state.cache.key({**key_fields, "tactic": t.name, "config": cfg})
            entry = state.cache.get(key) if attempt == 0 else None
            if entry is None:
                if inputs is None:
                    inputs = _layer_inputs(state, layer, profile, precision)
                    reference = _reference_output(state, index, item, inputs, precision)
                entry = time_tactic(state, t, cfg, item, index, inputs, reference, precision)
                state.cache.put(key, entry)
                state.report.timed += 1
            elif not entry["ok"]:
                cached_failures.append((t, cfg))
            if not entry["ok"]:
                state.report.rejected += 1
                item.notes.append(f"{t.name} {cfg or ''} rejected: {entry.get('reason', 'mismatch')}")
                continue
            if best is None or entry["ms"] < best.time_ms:
                best = Choice(t.name, cfg, entry["ms"])
        if best is not None:  # a cache may only speed a build up: its failures are checked before giving up
            break
    if best is None:
        raise KilnError(f"{state.name}: every tactic for layer {layer.name!r} ({layer.kind}) failed its check "
                        f"at {precision}")
    return best


def _candidates(state: BuildState, item: PlannedLayer, precision: str) -> list[tuple[Tactic, dict]]:
    """The tactics (and configs) to try, best heuristic first. The reference tactic stays unless
    denied by its full name: where the lists and the level leave nothing else (it is a layout
    alternative only from level 4, say), it is tried with every config it has."""
    layer, config, device = item.layer, state.config, state.device.type
    found = []
    reference = None
    for t in tactic_registry.tactics_for(layer.kind):
        if device not in t.devices or precision not in t.precisions:
            continue
        if any(t.matches(p) for p in config.deny_tactics) and not (t.reference and t.name not in config.deny_tactics):
            continue
        if config.allow_tactics and not t.reference and not any(t.matches(p) for p in config.allow_tactics):
            continue
        if not t.supports(layer, precision, device):
            continue
        reference = t if t.reference else reference
        level = 3 if state.level == 0 else state.level
        if t.level > level:
            continue
        for cfg in t.configs(layer, level, precision, device):
            found.append((t, cfg))
    if not found and reference is not None:
        found = [(reference, cfg) for cfg in reference.configs(layer, 5, precision, device)]
    if not found:
        raise KilnError(
            f"{state.name}: no tactic is left for layer {layer.name!r} ({layer.kind}, op {'+'.join(layer.op_types)}) "
            f"at {precision} after the tactic allow/deny lists; allow at least its reference tactic"
        )
    found.sort(key=lambda tc: -tc[0].heuristic(layer, precision, device))
    return found


def _heuristic_choice(state: BuildState, index: int, item: PlannedLayer, candidates, precision: str,
                      profile: int) -> Choice:
    """Level 0: the heuristic's first pick that passes its correctness check; nothing is timed."""
    inputs = _layer_inputs(state, item.layer, profile, precision)
    reference = _reference_output(state, index, item, inputs, precision)
    for t, cfg in candidates:
        ok, reason = _check(state, t, cfg, item, index, inputs, reference, precision)
        if ok:
            return Choice(t.name, cfg, None)
        state.report.rejected += 1
        item.notes.append(f"{t.name} rejected: {reason}")
    raise KilnError(f"{state.name}: every tactic for layer {item.layer.name!r} failed its check at {precision}")


def _layer_inputs(state: BuildState, layer: Layer, profile: int, precision: str) -> list[torch.Tensor]:
    facts = state.facts[profile]
    generator = torch.Generator(device="cpu").manual_seed(state.config.seed * 7919 + zlib.crc32(layer.name.encode()))
    dtype = PRECISION_DTYPES[precision]
    inputs = []
    for name in layer.inputs:
        shape = facts.shapes[name]
        kind = facts.dtypes.get(name)
        if kind in FLOAT_TYPES:
            value = torch.randn(shape, generator=generator).to(state.device, dtype)
            if layer.kind == "Conv" and value.dim() == 4 and conv_runs_nhwc(layer, precision, state.device.type):
                value = value.contiguous(memory_format=torch.channels_last)
            inputs.append(value)
        else:
            raise KilnError(f"{state.name}: layer {layer.name!r} has a non-float input {name!r}; this is a kiln bug")
    return inputs


def _runner(state: BuildState, t: Tactic, cfg: dict, item: PlannedLayer, index: int, precision: str):
    prepared = t.prepare(item.layer, state.weights(index, item.layer), precision, cfg)
    return t.runner(item.layer, prepared, precision, cfg, state)


def _reference_output(state: BuildState, index: int, item: PlannedLayer, inputs, precision: str) -> list[Any]:
    ref = tactic_registry.reference_for(item.layer.kind)
    with tf32_for(precision), torch.inference_mode():
        got = _runner(state, ref, {}, item, index, precision)(list(inputs))
        return [v.clone() if isinstance(v, torch.Tensor) else v for v in got]


def _failure(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def _mismatch(got, reference, precision: str) -> str | None:
    """Why ``got`` is not the reference's output at ``precision`` (None: it is, within tolerance)."""
    for a, b in zip(got, reference):
        err = scaled_error(a, b)
        if not err <= layer_rtol(precision):
            return f"relative error {err:.3g} over {layer_rtol(precision):g}"
    return None


def _check(state: BuildState, t, cfg, item, index, inputs, reference, precision) -> tuple[bool, str]:
    try:
        run = _runner(state, t, cfg, item, index, precision)
        with tf32_for(precision), torch.inference_mode():
            got = run(list(inputs))
    except deadlines.RunStopped:
        raise
    except Exception as error:  # noqa: BLE001 - a tactic that cannot run is not chosen
        return False, _failure(error)
    reason = _mismatch(got, reference, precision)
    return reason is None, reason or ""


def time_tactic(state: BuildState, t: Tactic, cfg: dict, item: PlannedLayer, index: int, inputs, reference,
                precision: str) -> dict:
    """One candidate checked against the reference output and timed: the timing cache's entry
    (``ok``, ``ms``, ``workspace`` or the ``reason`` it was rejected)."""
    try:
        run = _runner(state, t, cfg, item, index, precision)
        with tf32_for(precision), torch.inference_mode():
            workspace = _workspace(run, inputs, state.device)
            got = run(list(inputs))
    except deadlines.RunStopped:
        raise
    except Exception as error:  # noqa: BLE001 - a tactic that cannot run is not chosen
        return {"ms": None, "ok": False, "reason": _failure(error)}
    reason = _mismatch(got, reference, precision)
    if reason is not None:
        return {"ms": None, "ok": False, "reason": reason}
    limit = state.config.memory_limit
    if limit is not None and workspace is not None and workspace > limit:
        return {"ms": None, "ok": False,
                "reason": f"needs {workspace} bytes of scratch memory, over the limit of {limit}"}
    with tf32_for(precision), torch.inference_mode():
        ms = median_ms(lambda: run(list(inputs)), state.device, state.reps)
    return {"ms": ms, "ok": True, "workspace": workspace}


def _workspace(run, inputs, device: torch.device) -> int | None:
    """Bytes a tactic allocates beyond its outputs (its scratch memory), on CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = run(list(inputs))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    produced = sum(o.numel() * o.element_size() for o in out if isinstance(o, torch.Tensor))
    return max(0, peak - base - produced)


# -- running a layer as the engine runs it ---------------------------------------------------------

def cast_inputs(item: PlannedLayer, values: list[Any], precision: str) -> list[Any]:
    """``values`` with the inputs the plan casts (``item.cast_inputs``) in ``precision``'s dtype."""
    dtype = PRECISION_DTYPES.get(precision)
    out = list(values)
    if dtype is None:
        return out
    for i in item.cast_inputs:
        if isinstance(out[i], torch.Tensor) and out[i].dtype != dtype:
            out[i] = out[i].to(dtype)
    return out


def run_choice(state: BuildState, index: int, item: PlannedLayer, choice: Choice, precision: str, values: list[Any],
               runners: dict | None = None):
    """One layer as the engine runs it: inputs cast as the plan casts them, the tactic's runner
    on its prepared weights (kept in ``runners``, where given, for the next call)."""
    key = (index, choice.tactic, repr(sorted(choice.config.items())), precision)
    run = runners.get(key) if runners is not None else None
    if run is None:
        tactic = tactic_registry.get(choice.tactic)
        assert tactic is not None, f"{choice.tactic} is one of the registered candidates"
        run = _runner(state, tactic, choice.config, item, index, precision)
        if runners is not None:
            runners[key] = run
    with tf32_for(precision), torch.inference_mode():
        return run(cast_inputs(item, values, precision))


# -- running wide where that is faster --------------------------------------------------------------

def prefer_faster_wide(state: BuildState, index: int, item: PlannedLayer) -> None:
    """A layer whose timed fp32 tactics (tf32 where allowed) beat its fp16/bf16 ones runs wide
    (``_widen_if_faster``). On a CPU, which emulates fp16 convolutions and GEMMs, that is most of
    them. Nothing changes at level 0 (nothing is timed); Node layers are timed, and so decided, in
    the walk (``time_node_layer``)."""
    if state.level == 0 or item.layer.kind == "Node" or not _may_widen(state, item):
        return
    try:
        choices = select_all(state, index, item, state.wide_precision())
    except deadlines.RunStopped:
        raise
    except KilnError:  # no tactic runs wide: the layer stays as it is
        return
    _widen_if_faster(state, item, _total_ms(item.choices), _total_ms(choices), choices)


def time_node_layer(state: BuildState, index: int, item: PlannedLayer, ref_inputs: list[Any]) -> None:
    """A Node layer timed on the walk's real values (its reference op on fp32 inputs), then run
    wide where that is faster: the reference op on fp32 (tf32) inputs against fp16/bf16 ones."""
    low_ms = item.choices[0].time_ms = time_node(state, index, item, ref_inputs)
    if not _may_widen(state, item) or low_ms is None:
        return
    wide_ms = time_node(state, index, item, ref_inputs, state.wide_precision())
    choices = [Choice(c.tactic, c.config, wide_ms if p == 0 else c.time_ms) for p, c in enumerate(item.choices)]
    _widen_if_faster(state, item, low_ms, wide_ms, choices)


def time_node(state: BuildState, index: int, item: PlannedLayer, ref_inputs: list[Any],
              precision: str | None = None) -> float | None:
    """Milliseconds of a Node layer's reference op on ``ref_inputs`` at ``precision`` (default: the
    layer's), from the timing cache where it has them; None where it cannot run."""
    precision = precision or item.precision
    facts = state.facts[0]
    key = state.cache.key({
        "kind": "Node", "op": item.layer.op_types[0], "node": _node_signature(state.steps[item.layer.nodes[0]].op.node),
        "inputs": [list(facts.shapes.get(n, ())) for n in item.layer.inputs],
        "in_dtypes": [str(facts.dtypes.get(n)) for n in item.layer.inputs], "precision": precision,
        "tactic": "node.reference", "config": {},
    })
    entry = state.cache.get(key)
    if entry is None:
        try:
            node_reference = tactic_registry.get("node.reference")
            assert node_reference is not None, "node.reference is a built-in tactic"
            run = _runner(state, node_reference, {}, item, index, precision)
            values = cast_inputs(item, ref_inputs, precision)
            with torch.inference_mode():
                ms = median_ms(lambda: run(values), state.device, 3)
            entry = {"ms": ms, "ok": True}
        except deadlines.RunStopped:
            raise
        except Exception as error:  # noqa: BLE001 - timing is informative only
            entry = {"ms": None, "ok": False, "reason": type(error).__name__}
        state.cache.put(key, entry)
    return entry["ms"]


def _may_widen(state: BuildState, item: PlannedLayer) -> bool:
    """Pinned layers and strongly typed builds keep their precision; only fp16/bf16 can widen."""
    return not item.constrained and not state.config.strongly_typed and item.precision in ("fp16", "bf16")


def _widen_if_faster(state: BuildState, item: PlannedLayer, low_ms: float | None, wide_ms: float | None,
                     choices: list[Choice]) -> None:
    """Run ``item`` wide (with ``choices``) when that is more than 10% faster and, on a GPU, saves
    more than ``WIDE_MIN_GAIN_MS``: the margins stand for the casts at its edges, which timing one
    layer does not see, and for timing noise on small GPU layers."""
    gain = WIDE_MIN_GAIN_MS if state.device.type == "cuda" else 0.0
    if low_ms is None or wide_ms is None or not wide_ms < WIDE_MARGIN * low_ms or low_ms - wide_ms <= gain:
        return
    wide = state.wide_precision()
    item.notes.append(f"layer {item.layer.name!r} ({'+'.join(item.layer.op_types)}): runs in {wide}, "
                      f"{wide_ms:.3g} ms against {low_ms:.3g} ms in {item.precision}")
    item.precision, item.choices, item.widened_for_speed = wide, choices, True


def _total_ms(choices: list[Choice]) -> float | None:
    """The choices' times over every profile; None where one was not timed."""
    total = 0.0
    for choice in choices:
        if choice.time_ms is None:
            return None
        total += choice.time_ms
    return total


def _node_signature(node: ir.Node) -> str:
    attrs = []
    for name, attr in sorted(node.attributes.items()):
        if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS, ir.AttributeType.TENSOR,
                         ir.AttributeType.TENSORS):
            attrs.append(f"{name}=<{attr.type.name}>")
        else:
            attrs.append(f"{name}={attr.value!r}")
    return f"{node.domain}::{node.op_type}({','.join(attrs)})"
