"""What a build knows, handed from job to job: the model, config and report, the reference executor,
the profiles with their feeds and recorded facts, and the decisions taken per layer (``PlannedLayer``).

``kiln.builder.build`` fills it in order (passes, profiles, recording, precision, tactics, walk,
plan); each job reads what the earlier ones wrote and adds its own part.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from kiln import deadline as deadlines
from kiln.builder.config import BuildConfig, Profile
from kiln.builder.layers import GraphFacts, Layer
from kiln.builder.plan import BuildReport
from kiln.builder.tactics import registry as tactic_registry
from kiln.builder.timing_cache import TimingCache
from kiln.errors import KilnError, named
from kiln.executor import Executor, NodeStep
from kiln.versions import environment


@dataclass
class Choice:
    """The tactic (and its config) a layer runs with at one profile, and its time (None: not timed)."""

    tactic: str
    config: dict
    time_ms: float | None


@dataclass
class PlannedLayer:
    """A layer with everything the build decided about it."""

    layer: Layer
    precision: str
    constrained: bool = False
    choices: list[Choice] = field(default_factory=list)  # one per profile
    cast_inputs: list[int] = field(default_factory=list)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    drift: float = 0.0  # its output's error against fp32 at its precision, as the walk measured it
    widened_for_speed: bool = False  # fp16/bf16 was allowed, but fp32 (tf32) was faster


class BuildState:
    """One build's shared state (see the module docstring). Tactics get it as their runner's
    context (``node_step``), as they get the engine at run time."""

    def __init__(self, model: ir.Model, config: BuildConfig, name: str, calibration: Mapping[str, Any] | None,
                 progress: Callable[[str, int, int], None] | None) -> None:
        self.model = model
        self.config = config
        self.name = name
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise KilnError("the build asks for device 'cuda' but torch sees no CUDA GPU; build with --device cpu")
        self.calibration = calibration
        self.progress = progress or (lambda phase, done, total: None)
        self.report = BuildReport()
        self.cache = TimingCache(config.timing_cache, environment(self.device),
                                 on_refusal=lambda message: self.report.log(f"warning: {message}"))
        self.opset = dict(model.opset_imports).get("", dict(model.opset_imports).get("ai.onnx", 1))
        self.level = config.opt_level
        self.reps = 11 if self.level >= 5 else 5  # repetitions per timing (kiln.timing.median_ms)
        self.pass_report: Any = None  # kiln.passes' report of the graph passes
        # filled in after the passes (kiln.builder.build): the reference executor, its steps by node
        # name, the profiles, and per profile its opt-shape feeds and the facts recorded on them
        self._executor: Executor | None = None
        self.steps: dict[str, NodeStep] = {}
        self.profiles: list[Profile] = []
        self.opt_feeds: list[dict[str, torch.Tensor | np.ndarray]] = []  # numpy: a string input
        self.facts: list[GraphFacts] = []
        self.made_up: set[str] = set()  # inputs the build gave random values (no calibration array)
        self.reference: dict[str, Any] = {}  # the fp32 reference's outputs on the first profile's feeds
        self.constants: dict[str, Any] = {}  # values known before the run (initializers, folded nodes)
        self.canonical: dict[int, dict[str, torch.Tensor]] = {}  # layer index -> its weights, canonical form
        self.output_precision = "fp32"  # what the engine's outputs are judged at

    @property
    def executor(self) -> Executor:
        """The reference executor over the passes' graph (set by ``kiln.builder.build`` after the passes)."""
        assert self._executor is not None, "the reference executor is made right after the passes"
        return self._executor

    @executor.setter
    def executor(self, executor: Executor) -> None:
        self._executor = executor

    def check_time(self, where: str) -> None:
        """Stop at the build's time limit (``BuildConfig.timeout_s``), naming the model and ``where``."""
        deadline = deadlines.current()
        if deadline is not None and deadline.expired():
            raise named(deadline.stopped(where), self.name)

    def node_step(self, name: str) -> NodeStep:
        """The reference executor's step for node ``name`` (a Node layer's tactic runs it)."""
        return self.steps[name]

    def weights(self, index: int, layer: Layer) -> dict[str, torch.Tensor]:
        """Layer ``index``'s weights in canonical form, made once per layer."""
        if index not in self.canonical:
            self.canonical[index] = tactic_registry.canonical(layer, self.constants)
        return self.canonical[index]

    def wide_precision(self) -> str:
        """The precision a layer widens to: tf32 where the config allows it, else fp32."""
        return "tf32" if self.config.tf32 else "fp32"
