"""The end-to-end check, the build's contract: on its inputs (the calibration inputs, else the seeded
random ones of the first profile) the planned network's outputs are within the tolerance of the
engine's loosest precision (``kiln.precision``) of the fp32 reference's.

Layers that pass the walk's check one by one (``kiln.builder.walk``) can still add up to more (drift
that later layers amplify, a softmax over thousands of classes). While an output is over, layers
move towards fp32 (fp16/bf16 to tf32 where allowed, else fp32; tf32 to fp32), those that drifted
most in the walk first, 1, then 2, 4, ... at a time, the network rerun after each move; the log and
the moved layers' notes say which and why. Layers the user pinned and a strongly typed build's stay
as they are. When every layer is in fp32 and an output is still over, the model run in float64
referees (``_fp32_rounding``): an engine as near to it as the fp32 reference is accepted, its
differences logged. Otherwise, with nothing left to move, the build fails (``PrecisionError``).

The planned network runs layer by layer in the plan's order, as the engine runs it (a layer is
several fused nodes, so this is not the reference executor's node loop).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kiln import deadline as deadlines
from kiln.builder.choose_tactic import run_choice, select_all
from kiln.builder.state import BuildState, PlannedLayer
from kiln.errors import OpError, PrecisionError, first_line, named
from kiln.executor import Executor
from kiln.float64 import distance, float64_model, widen
from kiln.precision import judge, tolerance

REDUCED = ("fp16", "bf16", "tf32")  # the precisions the end-to-end check may move a layer out of


def check_outputs(state: BuildState, planned: list[PlannedLayer]) -> None:
    """See the module docstring. The final differences are in ``report.output_diffs``. The first
    profile's tactics are the ones run: the precisions it settles hold for every profile."""
    config, report = state.config, state.report
    if not config.precision_check:
        return
    precision = state.output_precision
    tol = tolerance(precision, config.atol, config.rtol)
    inputs = state.executor.inputs
    made_up = [v.name or "" for v in inputs if v.name not in (state.calibration or {})]  # first profile's
    given = len(made_up) < len(inputs)
    on = ("seeded random inputs" if not given else "the calibration inputs" +
          (f" (random values for {', '.join(made_up)})" if made_up else ""))
    movable = [] if config.strongly_typed else [
        index for index, item in enumerate(planned) if not item.constrained and item.precision in REDUCED]
    movable.sort(key=lambda index: -planned[index].drift)  # stable: equal drifts in plan order
    runners: dict = {}
    batch = 1
    while True:
        state.progress("end-to-end check", 0, 1)
        got = _plan_outputs(state, planned, runners)
        verdicts = _judge_outputs(state, got, tol)
        over = {name: j for name, j in verdicts.items() if not j.ok}
        if not over:
            break
        worst = ", ".join(f"{name!r} {j.max_rel:.3g} from fp32 (max abs {j.max_abs:.3g}, {j.bad} elements over)"
                          for name, j in over.items())
        if not movable and not any(item.precision in REDUCED for item in planned):
            rounding, refereed = _fp32_rounding(state, got, over)
            if rounding:
                report.log(f"end-to-end check on {on}: output(s) {worst} over the {precision} tolerance ({tol}) "
                           f"with every layer in fp32; {refereed}: fp32 rounding the network amplifies, "
                           f"accepted")
                break
            worst += f"; {refereed}" if refereed else ""
        if not movable:
            pinned = [item.layer.name for item in planned if item.constrained and item.precision != "fp32"]
            held = (f"; layers pinned by --layer-precision: {', '.join(pinned)}" if pinned else
                    "; the build is strongly typed" if config.strongly_typed and precision != "fp32" else "")
            raise PrecisionError(
                f"{state.name}: on {on} the engine's output(s) {worst} are over the {precision} tolerance of fp32 "
                f"({tol}) with every layer that may move in fp32{held}; give representative inputs with --inputs, "
                f"compare the model itself with kiln run --compare onnxruntime, or pass --no-precision-check to "
                f"build it as it is"
            )
        chosen, movable = movable[:batch], movable[batch:]
        report.log(f"end-to-end check on {on}: output(s) {worst} over the {precision} tolerance ({tol}); "
                   f"moving {len(chosen)} layer(s) with the largest drift towards fp32")
        for index in chosen:
            item = planned[index]
            before = item.precision
            target = "tf32" if before != "tf32" and config.tf32 else "fp32"
            item.precision = target
            item.choices = select_all(state, index, item, target)
            if target == "tf32":
                movable.append(index)
            message = (f"layer {item.layer.name!r} ({item.layer.described_ops}): moved from {before} to {target}: "
                       f"the engine's outputs were over the {precision} tolerance of fp32 end to end "
                       f"(its own drift in {before}: {item.drift:.3g})")
            item.notes.append(message)
            report.fallbacks.append(message)
            report.log(message)
        batch *= 2
    state.progress("end-to-end check", 1, 1)
    report.output_diffs = {name: j.max_rel for name, j in verdicts.items()}
    if verdicts:
        diffs = ", ".join(f"{name!r} {j.max_rel:.3g}" for name, j in verdicts.items())
        report.log(f"end-to-end check on {on}: every float output within the {precision} tolerance of fp32 "
                   f"({tol}); max relative differences {diffs}")
    moved = sum(1 for item in planned if any("end to end" in note for note in item.notes))
    if moved:
        report.log(f"end-to-end check: {moved} layer(s) moved towards fp32 to meet atol {tol.atol:g} + rtol "
                   f"{tol.rtol:g} |fp32| per element; where outputs are large (logits, pixel coordinates) an "
                   f"atol that fine is below {precision}'s spacing there: give the build --atol for your outputs' "
                   f"scale to keep {precision}")


def _fp32_rounding(state: BuildState, got: Mapping[str, Any], over: Mapping[str, Any]) -> tuple[bool, str]:
    """With every layer in fp32, are the outputs over fp32's tolerance of the reference only
    fp32 rounding that the network amplifies? The model run in float64 (``kiln.float64``)
    referees: yes when each such output of the engine is no farther from it than twice the fp32
    reference's distance (kernels that sum in another order are as exact; a kernel that is off
    is farther). Returns the verdict and what the referee measured, for the log or the error."""
    try:
        executor = Executor(float64_model(state.model), state.device, f"{state.name} (float64)")
        exact = executor.run(widen(state.opt_feeds[0]))
    except deadlines.RunStopped:
        raise
    except Exception as error:  # noqa: BLE001 - without a referee the contract stands as it is
        return False, f"the float64 referee could not run the model ({first_line(error)})"
    verdict, parts = True, []
    for name in over:
        engine, reference = distance(got[name], exact[name]), distance(state.reference[name], exact[name])
        verdict = verdict and engine <= 2 * reference
        parts.append(f"{name!r} {engine:.3g} from the model run in float64, the fp32 reference {reference:.3g}")
    return verdict, "; ".join(parts)


def _plan_outputs(state: BuildState, planned: list[PlannedLayer], runners: dict) -> dict[str, Any]:
    """The planned layers run end to end on the first profile's feeds, as the engine runs them."""
    last_read: dict[str, int] = {}
    for index, item in enumerate(planned):
        for name in item.layer.inputs:
            last_read[name] = index
    env: dict[str, Any] = dict(state.opt_feeds[0])
    for index, item in enumerate(planned):
        layer = item.layer
        where = f"layer {layer.name!r} (op {layer.described_ops})"
        state.check_time(f"the end-to-end check, {where}")
        try:
            result = run_choice(state, index, item, item.choices[0], item.precision, [env[n] for n in layer.inputs],
                                runners)
        except deadlines.RunStopped as error:
            raise named(error, state.name) from error
        except Exception as error:
            reduced = [p.layer.name for p in planned[:index] if p.precision in ("fp16", "bf16", "tf32")]
            if not reduced and item.precision not in ("fp16", "bf16", "tf32"):
                raise  # the same computation as the fp32 reference, which ran: kiln's bug
            # values computed in reduced precision that a layer cannot take (a count, a size)
            upstream = f" or the reduced-precision layers before it ({', '.join(reduced[-3:])}" \
                       f"{', ...' if len(reduced) > 3 else ''})" if reduced else ""
            raise OpError(
                f"{state.name}: layer {layer.name!r} ({layer.described_ops}, {item.precision}) failed in the "
                f"end-to-end run of the planned engine, where the fp32 reference ran: {type(error).__name__}: "
                f"{first_line(error)}; pin it{upstream} to fp32 with --layer-precision NAME:fp32") from error
        env.update((name, value) for name, value in zip(layer.outputs, result) if name)
        for name in layer.inputs:
            if last_read[name] == index and name not in state.reference:
                env.pop(name, None)
    return {name: env[name] for name in state.reference if name in env}


def _judge_outputs(state: BuildState, got: Mapping[str, Any], tol) -> dict[str, Any]:
    """``kiln.precision.judge`` per float output against the fp32 reference's."""
    verdicts = {}
    for name, ref in state.reference.items():
        value = got.get(name)
        if isinstance(ref, torch.Tensor) and ref.is_floating_point() and isinstance(value, torch.Tensor):
            verdicts[name] = judge(value.detach().to(torch.float64).cpu().numpy(),
                                   ref.detach().to(torch.float64).cpu().numpy(), tol)
    return verdicts
