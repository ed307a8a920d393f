"""What ``kiln bench`` measures (``BenchOptions``), its checks, and the parsers of its ``--batch`` and
``--batch-axes`` flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.errors import KilnError


@dataclass
class BenchOptions:
    """What to measure. ``batches``: batch sizes, set along each batched input's batch axis; None
    measures the shapes as given (``shapes`` and the model's static dims). ``batch_axes``: input name
    -> its batch axis; the inputs it leaves out keep their shapes; empty: the default of
    ``batch_axes()``. ``build``: the BuildConfig for an ONNX model
    (its ``profiles`` are replaced by one per batch size). ``onnx``: for a ``.kiln`` engine, the
    ONNX file it was built from (the peers and the reference need it). ``reference``: compare every
    target with the ONNX model on kiln's reference executor. ``atol``/``rtol``: override the
    tolerance table for those comparisons. ``inputs``: real data for some inputs
    (name -> array, trtexec's ``--loadInputs``); its shape sets the input's shape, and at each batch
    size it is repeated in turn or cut to that size along the input's batch axis (an input that does
    not batch, a scalar say, is used as given); the other inputs are random. An ONNX model's build
    runs on them too (its calibration data)."""

    batches: list[int] | None = None
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    batch_axes: dict[str, int] = field(default_factory=dict)
    build: Any = None
    warmup_ms: float = 200.0
    duration_s: float | None = 3.0
    iterations: int | None = None
    repeats: int = 2
    peers: list[str] = field(default_factory=list)
    profile_layers: bool = False
    cuda_graph: bool = False
    contexts: int = 1
    aux_streams: int | None = None
    profile: int | None = None
    onnx: str | os.PathLike[str] | None = None
    seed: int = 0
    reference: bool = True
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    atol: float | None = None
    rtol: float | None = None
    timeout_s: float | None = None  # the benchmark once the model is loaded (kiln.deadline); None: no limit


def check_options(options: BenchOptions) -> None:
    if options.batches is not None and (not options.batches or any(b < 1 for b in options.batches)):
        raise KilnError(f"batch sizes must be 1 or more, got {options.batches}")
    if options.contexts < 1:
        raise KilnError(f"--contexts must be 1 or more, got {options.contexts}")
    if options.repeats < 1:
        raise KilnError(f"repeats must be 1 or more, got {options.repeats}")
    if options.iterations is not None and options.iterations < 1:
        raise KilnError(f"--iterations must be 1 or more, got {options.iterations}")
    if options.duration_s is not None and options.duration_s <= 0:
        raise KilnError(f"--duration-s must be above 0, got {options.duration_s}")
    if options.warmup_ms < 0:
        raise KilnError(f"--warmup-ms must be 0 or more, got {options.warmup_ms}")


def parse_batches(text: str | None) -> list[int] | None:
    """``"1,8,32"`` -> [1, 8, 32] (sorted, without repeats)."""
    if not text:
        return None
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError as error:
        raise KilnError(f"--batch takes sizes like 1,8,32, got {text!r}") from error
    return sizes


def parse_batch_axes(text: str | None) -> dict[str, int]:
    """``"input:0,state:1"`` -> {"input": 0, "state": 1}."""
    axes: dict[str, int] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, axis = item.strip().rpartition(":")
        if not sep or not name or not axis.strip().removeprefix("-").isdigit():
            raise KilnError(f"--batch-axes: {item.strip()!r} is not NAME:AXIS (for example state:1)")
        axes[name] = int(axis)
    return axes
