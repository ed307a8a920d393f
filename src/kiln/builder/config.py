"""What a build may do: precisions, optimization level, profiles, constraints, tactic lists.

``BuildConfig`` is TensorRT's ``IBuilderConfig`` in one dataclass. It is checked once, up front
(``validate``), so a typo in a layer name or a tactic pattern fails before minutes of timing.

Precision flags say what layers *may* use; the builder picks per layer. fp32 is always allowed.
With ``fp16`` and ``bf16`` both set, layers run fp16 and fall back to bf16 (same range as fp32)
before fp32 when fp16 overflows. ``strongly_typed`` lets the model's own tensor types decide
(an fp16 ONNX model runs in fp16) and forbids the flags, as TensorRT's strongly typed networks do.
``passes`` / ``skip_passes`` choose the graph passes (``kiln.passes``) run before lowering; by
default all of them run. ``max_aux_streams`` lets independent branches run on up to that many
streams beside each execution context's own (``kiln.builder.schedule``). ``timeout_s`` bounds
the whole build, the model's runs inside it included (``kiln.deadline``); it does not shape the
engine, so it is not stored in it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kiln.device import DEVICES, default_device
from kiln.errors import KilnError
from kiln.precision import PRECISIONS

OPT_LEVELS = range(0, 6)
DEFAULT_OPT_LEVEL = 3


@dataclass(frozen=True)
class Profile:
    """Shapes one optimization profile covers: per input name, (min, opt, max) shapes.

    Tactics are timed at ``opt``; the engine accepts any shape between ``min`` and ``max``.
    Inputs with fully static shapes need no entry.
    """

    shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    @staticmethod
    def from_lists(
        min_shapes: Mapping[str, Sequence[int]] | None = None,
        opt_shapes: Mapping[str, Sequence[int]] | None = None,
        max_shapes: Mapping[str, Sequence[int]] | None = None,
    ) -> Profile:
        """trtexec's rule: a missing min or max shape is the opt shape; a missing opt is the max.
        A rank-0 input's shape is ``()``: given, not missing."""
        min_shapes, opt_shapes, max_shapes = min_shapes or {}, opt_shapes or {}, max_shapes or {}
        shapes = {}
        for name in sorted(set(min_shapes) | set(opt_shapes) | set(max_shapes)):
            opt = next(given[name] for given in (opt_shapes, max_shapes, min_shapes) if name in given)
            lo = tuple(min_shapes.get(name, opt))
            hi = tuple(max_shapes.get(name, opt))
            shapes[name] = (lo, tuple(opt), hi)
        return Profile(shapes)

    def validate(self, index: int) -> None:
        for name, (lo, opt, hi) in self.shapes.items():
            if not (len(lo) == len(opt) == len(hi)):
                raise KilnError(f"profile {index}: input {name!r} has min/opt/max shapes of different ranks: {lo}, "
                                f"{opt}, {hi}")
            if any(d < 0 for d in lo) or not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise KilnError(f"profile {index}: input {name!r} needs min <= opt <= max on every axis, got {lo}, "
                                f"{opt}, {hi}")

    def to_json(self) -> dict:
        return {name: [list(lo), list(opt), list(hi)] for name, (lo, opt, hi) in sorted(self.shapes.items())}

    @staticmethod
    def from_json(data: Mapping) -> Profile:
        return Profile({name: (tuple(int(d) for d in lo), tuple(int(d) for d in opt), tuple(int(d) for d in hi))
                        for name, (lo, opt, hi) in data.items()})  # [min, opt, max] each (kiln.engine_schema)


@dataclass
class BuildConfig:
    """Everything a build is allowed to do. See the module docstring."""

    fp16: bool = False
    bf16: bool = False
    tf32: bool = False
    strongly_typed: bool = False
    opt_level: int = DEFAULT_OPT_LEVEL
    timing_cache: str | os.PathLike[str] | None = None
    profiles: list[Profile] = field(default_factory=list)
    # node name or op type -> precision ("fp32", "tf32", "fp16", "bf16")
    layer_precisions: dict[str, str] = field(default_factory=dict)
    # tactic patterns: a tactic's full name ("gemm.triton"), its kind ("gemm") or its source ("triton")
    allow_tactics: list[str] = field(default_factory=list)
    deny_tactics: list[str] = field(default_factory=list)
    # most scratch memory (bytes) one tactic may use beyond its inputs and outputs; None = no limit
    memory_limit: int | None = None
    # "cuda" when torch sees a GPU, else "cpu" with a one-line note (kiln.device)
    device: str = field(default_factory=default_device)
    # check each reduced-precision layer against fp32 and fall back where it overflows or drifts, and
    # the whole network's outputs against fp32 (kiln.precision's tolerance; atol/rtol override it)
    precision_check: bool = True
    atol: float | None = None
    rtol: float | None = None
    seed: int = 0
    # graph passes (kiln.passes) by name: None = all of them; skip_passes removes some
    passes: list[str] | None = None
    skip_passes: list[str] = field(default_factory=list)
    # auxiliary streams independent branches may run on, beside each context's own (0: none)
    max_aux_streams: int = 0
    # seconds the whole build may take (kiln.deadline.RunStopped after); None = no limit
    timeout_s: float | None = None

    def validate(self) -> None:
        if self.opt_level not in OPT_LEVELS:
            raise KilnError(f"optimization level must be 0-5, got {self.opt_level}")
        if self.strongly_typed and (self.fp16 or self.bf16 or self.tf32):
            raise KilnError("a strongly typed build takes precisions from the model; drop --fp16/--bf16/--tf32 or "
                            "--strongly-typed")
        for key, precision in self.layer_precisions.items():
            if precision not in PRECISIONS:
                raise KilnError(f"layer precision for {key!r} must be one of {', '.join(PRECISIONS)}, got "
                                f"{precision!r}")
            if precision != "fp32" and not self.strongly_typed and not getattr(self, precision):
                raise KilnError(f"layer precision {key}:{precision} needs the --{precision} flag as well")
        if (not isinstance(self.max_aux_streams, int) or isinstance(self.max_aux_streams, bool)
                or self.max_aux_streams < 0):
            raise KilnError(f"max_aux_streams must be a number >= 0, got {self.max_aux_streams!r}")
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                          and value >= 0):
                raise KilnError(f"{name} must be a number >= 0, got {value!r}")
        from kiln.deadline import check_timeout

        check_timeout(self.timeout_s)
        if self.memory_limit is not None and self.memory_limit < 0:
            raise KilnError(f"memory limit must be >= 0 bytes, got {self.memory_limit}")
        if self.device not in DEVICES:
            raise KilnError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        for index, profile in enumerate(self.profiles):
            profile.validate(index)
        from kiln.passes.framework import select_passes

        select_passes(self.passes, self.skip_passes)  # unknown pass names fail here, before any work

    @property
    def low_precisions(self) -> list[str]:
        """Reduced precisions in the order layers try them (fp16 first: more mantissa)."""
        return [p for p in ("fp16", "bf16") if getattr(self, p)]

    def default_precision(self) -> str:
        """What a layer runs at when nothing constrains it."""
        if self.low_precisions:
            return self.low_precisions[0]
        return "tf32" if self.tf32 else "fp32"

    def to_json(self) -> dict:
        """The parts of the config that shape the engine (stored in it; no paths, no device)."""
        return {
            "fp16": self.fp16,
            "bf16": self.bf16,
            "tf32": self.tf32,
            "strongly_typed": self.strongly_typed,
            "opt_level": self.opt_level,
            "profiles": [p.to_json() for p in self.profiles],
            "layer_precisions": dict(sorted(self.layer_precisions.items())),
            "allow_tactics": list(self.allow_tactics),
            "deny_tactics": list(self.deny_tactics),
            "memory_limit": self.memory_limit,
            "precision_check": self.precision_check,
            "atol": self.atol,
            "rtol": self.rtol,
            "passes": list(self.passes) if self.passes is not None else None,
            "skip_passes": list(self.skip_passes),
            "max_aux_streams": self.max_aux_streams,
        }
