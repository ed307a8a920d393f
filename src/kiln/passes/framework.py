"""The pass framework: what a pass is, the context it runs in, what it finds, and how passes run.

A pass is one module of ``kiln.passes`` and one ``Pass`` subclass registered with ``@register_pass``.
It has two halves that share one matcher, so the advisor and the rewrite never disagree:

- ``find(model, ctx)`` lists every place the rule applies as ``Finding`` objects and changes nothing
  (``kiln doctor`` reports them);
- ``apply(model, ctx)`` rewrites those places in the IR and returns how many it rewrote.

A pass that cannot prove its precondition (a shape it does not know, a weight that is not constant,
a value with another consumer or that is a graph output) leaves that place alone. New nodes get
unique names, new values get their dtype and shape where known. Passes emit standard ONNX ops; the
fused ops ONNX lacks at the model's opset live in the ``ai.kiln`` domain (``kiln.ops.kiln_domain``)
and are emitted only when ``ctx.kiln_ops`` is true (the builder; ``kiln optimize --kiln-ops``).

``run_passes`` runs the registered passes in ``ORDER`` (or a chosen subset) and returns a report.
Every pass must leave a valid, topologically sorted graph (subgraphs included): ``run_passes``
checks that after each one and names the pass that did not. After the last pass it removes what
the rewrites left unused (nodes, initializers, functions, opset imports; ``_cleanup``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_ir as ir

from kiln.errors import KilnError
from kiln.passes._cleanup import order_error, remove_dead_code
from kiln.passes.rewriting import opset, unique_node_names
from kiln.precision import ALIGNMENT, ALL_PRECISIONS, LOW_PRECISIONS

KILN_DOMAIN = "ai.kiln"
KILN_DOMAIN_VERSION = 1



@dataclass
class Finding:
    """One place a performance rule applies. Its estimated cost is not part of it: ``kiln doctor``
    sizes every finding with ``kiln.cost`` (one cost model, at the shapes the doctor knows)."""

    rule: str  # short id, e.g. "reduce-not-last-axis"
    title: str  # one line for humans
    nodes: list[str]  # node names involved (first one is where it is)
    why: str  # why it costs time
    fix: str  # "fixed automatically by pass X" or what the user should change
    pass_name: str | None = None  # the pass that fixes it, if one does
    shapes: dict[str, list[int | str]] = field(default_factory=dict)  # value name -> shape
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule, "title": self.title, "nodes": list(self.nodes), "why": self.why, "fix": self.fix,
            "pass": self.pass_name, "shapes": {k: list(v) for k, v in self.shapes.items()},
            "details": self.details,
        }


@dataclass
class PassContext:
    """What a pass may assume about the build it serves."""

    precision: str = "fp32"  # the precision layers will mostly run at: alignment and layout follow it
    kiln_ops: bool = False  # may emit ai.kiln ops (fused ops standard ONNX lacks at this opset)
    device: str = "cpu"  # where measuring passes time their alternatives ("cpu" or "cuda")
    # symbolic dimension name -> value, for passes that need concrete sizes (from the opt shapes)
    dims: dict[str, int] = field(default_factory=dict)
    # measuring passes call this with two zero-argument callables and get (ms_a, ms_b), or None to
    # decide by rule; the builder sets it on CUDA (kiln.timing.median_ms)
    measure: Callable[[Callable[[], Any], Callable[[], Any]], tuple[float, float]] | None = None
    log: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.precision not in ALL_PRECISIONS:
            raise KilnError(f"precision must be one of {', '.join(ALL_PRECISIONS)}, got {self.precision!r}")

    @property
    def low_precision(self) -> bool:
        return self.precision in LOW_PRECISIONS

    @property
    def alignment(self) -> int:
        return ALIGNMENT[self.precision]

    def dim(self, d: int | ir.SymbolicDim | None) -> int | None:
        """A dimension's value: its int, a symbolic name's value from ``dims``, or None (also for a
        negative int: an in-memory model's ``-1`` is a dynamic dim, as it is in a loaded file)."""
        if isinstance(d, int):
            return d if d >= 0 else None
        if d is None:
            return None
        value = getattr(d, "value", None)
        if isinstance(value, int):
            return value
        return self.dims.get(str(value)) if value is not None else None

    def concrete(self, shape: ir.Shape | None) -> list[int] | None:
        """A value's shape with every dimension known, or None."""
        if shape is None:
            return None
        dims = [self.dim(d) for d in shape]
        return None if any(d is None for d in dims) else dims  # type: ignore[return-value]


class Pass:
    """One rewrite. Subclasses set ``name`` (the module's name), ``rule`` (the playbook rule it
    applies, one line) and implement ``find`` and ``apply``."""

    name: ClassVar[str] = ""
    rule: ClassVar[str] = ""
    # True: may only run when ctx.kiln_ops (every rewrite it makes needs an ai.kiln op)
    needs_kiln_ops: ClassVar[bool] = False
    # False: builds skip it unless BuildConfig.passes names it (the builder's layers already do it)
    in_builds: ClassVar[bool] = True

    def find(self, model: ir.Model, ctx: PassContext) -> list[Finding]:
        raise NotImplementedError

    def apply(self, model: ir.Model, ctx: PassContext) -> int:
        raise NotImplementedError

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "find" in cls.__dict__:
            # wrapping the subclass's own method on purpose; mypy forbids assigning to any method
            cls.find = _keeping_tensor_names(cls.__dict__["find"])  # type: ignore[method-assign]


def _keeping_tensor_names(find: Callable) -> Callable:
    """``find`` that puts back the names of the model's tensors afterwards: onnx-ir and onnxscript
    name a constant's tensor after its value when a matcher reads it (clones share tensors too), and
    find() must leave the model exactly as it was."""

    @functools.wraps(find)
    def wrapper(self: Pass, model: ir.Model, ctx: PassContext) -> list[Finding]:
        with _tensor_names_kept(model, initializers=True):
            return find(self, model, ctx)

    return wrapper


@contextlib.contextmanager
def _tensor_names_kept(model: ir.Model, initializers: bool) -> Iterator[None]:
    """Put back the names of the tensors of Constant nodes (and of initializers) when done. A
    Constant's tensor needs no name, and a file must not grow by one per Constant a matcher read."""
    tensors = [attr.value for node in model.graph.all_nodes() for attr in node.attributes.values()
               if attr.type == ir.AttributeType.TENSOR]
    if initializers:
        tensors += [v.const_value for v in model.graph.initializers.values() if v.const_value is not None]
    names = [(t, t.name) for t in tensors]
    try:
        yield
    finally:
        for tensor, name in names:
            if tensor.name != name:
                tensor.name = name or None


_PASSES: dict[str, Pass] = {}

# The order run_passes uses: clean up first, fuse next, then shape the remaining math for the GPU.
ORDER = (
    "fold_constants",
    "fold_batchnorm",
    "drop_noop_shuffles",
    "fuse_layernorm",
    "fuse_gelu",
    "fuse_attention",
    "fuse_conv_activation",
    "flatten_matmul",
    "reduce_to_last_axis",
    "pad_input_channels",
    "pad_for_tensor_cores",
    "choose_layout",
    "fuse_gemm_activation",
    "fuse_layernorm_residual",
    "fuse_pointwise",
)


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not cls.name or cls.name in _PASSES:
        raise ValueError(f"pass {cls.__name__} needs a unique name, got {cls.name!r}")
    _PASSES[cls.name] = cls()
    return cls


def _load_all() -> None:
    for name in ORDER:
        try:
            importlib.import_module(f"kiln.passes.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"kiln.passes.{name}":
                raise


def registered_passes() -> dict[str, Pass]:
    """Every pass by name, in ``ORDER``."""
    _load_all()
    return {name: _PASSES[name] for name in ORDER if name in _PASSES}


def get_pass(name: str) -> Pass:
    passes = registered_passes()
    if name not in passes:
        raise KilnError(f"no pass named {name!r}; the passes are: {', '.join(passes)}")
    return passes[name]


def select_passes(only: Sequence[str] | None = None, skip: Iterable[str] = (), build: bool = False) -> list[Pass]:
    """The passes to run: ``only`` (in ORDER) or all (for a build: all with ``in_builds``), less
    ``skip``. Unknown names raise KilnError."""
    passes = registered_passes()
    skip = list(skip)
    for name in [*(only or []), *skip]:
        get_pass(name)
    return [p for name, p in passes.items()
            if (name in only if only is not None else (p.in_builds or not build)) and name not in skip]


@dataclass
class PassReport:
    """What ``run_passes`` did: rewrites per pass, node counts per op before and after."""

    rewrites: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # pass -> why it did not run
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"rewrites": dict(self.rewrites), "skipped": dict(self.skipped), "ops_before": dict(self.ops_before),
                "ops_after": dict(self.ops_after), "log": list(self.log)}


def op_counts(model: ir.Model) -> dict[str, int]:
    """Nodes per op type in the main graph (``domain::Op`` outside the default domain)."""
    counts: dict[str, int] = {}
    for node in model.graph:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def run_passes(
    model: ir.Model, ctx: PassContext, only: Sequence[str] | None = None, skip: Iterable[str] = (), build: bool = False
) -> PassReport:
    """Run the chosen passes on ``model`` in place (``build``: as the builder does, see
    ``select_passes``). Node names are made unique first."""
    ctx.validate()
    report = PassReport(ops_before=op_counts(model))
    name = model.graph.name or "model"
    if order_error(model.graph):  # a graph built in memory may list its nodes in any order
        model.graph.sort()
        if (error := order_error(model.graph)) is not None:
            raise KilnError(f"{name}: the graph is not valid ({error}); no pass ran")
    unique_node_names(model)
    for p in select_passes(only, skip, build):
        if p.needs_kiln_ops and not ctx.kiln_ops:
            report.skipped[p.name] = "emits ai.kiln ops, which this output may not hold (use --kiln-ops)"
            continue
        start = len(ctx.log)
        try:
            with _tensor_names_kept(model, initializers=False):
                report.rewrites[p.name] = p.apply(model, ctx)
        except KilnError:
            raise
        except Exception as error:  # a pass bug must not surface as a bare traceback
            first_line = str(error).splitlines()[0][:200] if str(error) else ''
            raise KilnError(
                f"{name}: graph pass {p.name} failed ({type(error).__name__}: {first_line}); "
                f"{_SKIP_IT.format(p.name)}"
            ) from error
        if (problem := order_error(model.graph)) is not None:
            raise KilnError(f"{name}: graph pass {p.name} left an invalid graph: {problem}; {_SKIP_IT.format(p.name)}")
        report.log.extend(f"{p.name}: {line}" for line in ctx.log[start:])
    if any(n.domain == KILN_DOMAIN for n in model.graph.all_nodes()):
        model.opset_imports.setdefault(KILN_DOMAIN, KILN_DOMAIN_VERSION)
    removed = {what: n for what, n in remove_dead_code(model).items() if n}
    if removed:
        report.log.append("dead code removed: " + ", ".join(f"{n} {what}" for what, n in removed.items()))
    report.ops_after = op_counts(model)
    return report


_SKIP_IT = "build or optimize without it (--skip-passes {0} / --skip {0}) and please report the model"


def find_all(model: ir.Model, ctx: PassContext, only: Sequence[str] | None = None) -> list[Finding]:
    """Every finding of every chosen pass (nothing is changed)."""
    ctx.validate()
    unique_node_names(model)
    findings: list[Finding] = []
    for p in select_passes(only):
        findings.extend(p.find(model, ctx))
    return findings


def fused_op(model: ir.Model, ctx: PassContext, standard_op: str, since: int) -> tuple[str, str] | None:
    """(domain, op_type) to emit for a fused op that standard ONNX has from opset ``since``: the
    standard op when the model's opset has it, the ai.kiln op of the same name and semantics when
    ``ctx.kiln_ops``, else None (the pass must not fire)."""
    if opset(model) >= since:
        return "", standard_op
    if ctx.kiln_ops:
        return KILN_DOMAIN, standard_op
    return None
