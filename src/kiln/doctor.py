"""``kiln doctor``: every place a performance rule applies to a model, ranked by the work it touches.

``diagnose(model)`` reads the IR and changes nothing but node names (made unique, so findings can
name nodes). It collects:

1. the findings of every registered graph pass (``Pass.find`` with ``PassContext(precision=...,
   kiln_ops=True)``): each says "fixed automatically by pass X" because ``kiln build`` and
   ``kiln optimize --kiln-ops`` run that pass;
2. two rules no pass can fix, which need a change in the model or in how it is built:

   - ``dynamic-input-without-profile``: a graph input with a symbolic or unknown dimension that no
     optimization profile covers. ``kiln build`` chooses and times tactics at a profile's opt
     shape and refuses such an input; the fix is ``--min-shapes/--opt-shapes/--max-shapes``.
   - ``slow-path-op``: a node the builder can only run through kiln's reference op (it becomes a
     "Node" layer: ``kiln.builder.layers`` fuses only convolutions, GEMMs, LayerNorm, Softmax,
     attention and elementwise chains into layers with fast tactics) *and* whose reference op is
     slow on a GPU. The kinds, and why each is slow:

     * control flow (``If``, ``Loop``, ``Scan``, ``SequenceMap``): the body runs node by node in the
       reference executor, nothing in it is fused or timed, and the engine never treats it as
       shape arithmetic (the op facts ``random``/``control_flow``), so a condition or trip count is read back from
       the GPU on every run;
     * data-dependent output shapes (``NonZero``, ``Unique``, ``Compress``, ``NonMaxSuppression``):
       the output's size is known only after the GPU has computed it, so the host waits for the
       GPU, and the engine's CUDA graph cannot be captured (it runs layer by layer);
     * host reads: an input the reference op reads as a list of Python ints (the op facts' ``host_reads``:
       its ``host_inputs`` - Reshape's shape, Slice's starts/ends/axes/steps, Expand, Tile,
       Split, Squeeze/Unsqueeze axes, ConstantOfShape - plus TopK's k, OneHot's depth, Range's
       bounds, Pad's pads, Resize/Upsample scales and sizes, CumSum's axis, Reduce* axes,
       CenterCropPad's shape) that is computed from data at run time. Constants and values derived
       from input shapes alone are fine (the engine computes them once per input shape, as
       TensorRT's shape tensors); a data-dependent one costs a GPU->host copy and a wait per run
       and prevents CUDA-graph capture;
     * strings (any node reading or writing a string tensor: StringConcat, StringSplit,
       StringNormalizer, RegexFullMatch, TfIdfVectorizer, LabelEncoder, Cast to/from string): numpy
       object arrays computed element by element in Python on the host;
     * sequences and optionals (SequenceConstruct/At/Insert/Erase/Length/Empty, SplitToSequence,
       ConcatFromSequence, Optional*): Python lists of tensors, one op at a time, never fused;
     * heavy ops without a fast tactic: RNN/GRU/LSTM (a Python loop over time steps, a few small
       kernels per step and direction); MatMulInteger/ConvInteger/QLinearMatMul/QLinearConv (the
       reference computes exact integer products in float64: no int8 tensor cores, and float64
       throughput); NonMaxSuppression (Python loops over batches, classes and boxes);
       ``ai.onnx.ml`` TreeEnsemble (one host-synchronised step per tree level).

     A node whose inputs are all constants or input-shape arithmetic is not reported (the builder
     folds it, or the engine computes it once per shape); control flow always is. Not reported
     either: Node layers whose reference op is one torch library call on the GPU (a 1-D/3-D or
     SAME-padded Conv, ConvTranspose, a MatMul of two activations, Einsum, pooling, Resize, ...):
     they miss the fused tactics but do not leave the GPU or wait for it.

3. each finding's share of the model's estimated FLOPs and bytes (``kiln.cost``; the larger of the
   two is its impact), and sorts by it. A dynamic-input finding's share is that of every node
   downstream of the input. Where shape inference left dimensions it cannot name (the exporters'
   computed reshapes give ``unk__N``), the model is run once by the reference executor on the CPU,
   on random inputs, and the recorded shapes are used; ``run_reference=False`` (``--no-run``) keeps
   to the inferred shapes. Each input's shape for that run is its ``shapes`` entry (which sizes
   unnamed dims too), else the first profile's opt shape, else its declared dims: the model's own
   static sizes, symbolic ones sized by a named dim given elsewhere, and only the rest taken as 1,
   every one of those named in the report (``Report.assumed``) with the ``--shapes`` to give. A run
   that fails is a note quoting the whole error, not a failure of the report.

``render_text`` prints a one-screen summary (model, precision, nodes, GFLOPs, MB, findings per rule
and the pass that fixes them, the top five) and then one block per finding; ``Report.to_json`` is
the machine-readable form (``kiln doctor --json``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from kiln.builder.config import Profile
from kiln.cost import ModelCost, model_cost, symbol_value
from kiln.errors import InputError
from kiln.ops.registry import OpFacts, op_facts
from kiln.passes.framework import Finding, PassContext, registered_passes
from kiln.passes.rewriting import shape_of, unique_node_names
from kiln.tables import Column, plain_lines

DYNAMIC_INPUT = "dynamic-input-without-profile"
SLOW_PATH = "slow-path-op"

STRING_OPS = frozenset({"StringConcat", "StringSplit", "StringNormalizer", "RegexFullMatch", "TfIdfVectorizer",
                        "LabelEncoder"})
HEAVY_OPS = {
    "RNN": "runs as a Python loop over time steps (a few small kernels per step and direction)",
    "GRU": "runs as a Python loop over time steps (a few small kernels per step and direction)",
    "LSTM": "runs as a Python loop over time steps (a few small kernels per step and direction)",
    "MatMulInteger": "is computed exactly in float64 by the reference op: no int8 tensor cores",
    "ConvInteger": "is computed exactly in float64 by the reference op: no int8 tensor cores",
    "QLinearMatMul": "is computed exactly in float64 by the reference op: no int8 tensor cores",
    "QLinearConv": "is computed exactly in float64 by the reference op: no int8 tensor cores",
    "NonMaxSuppression": "runs Python loops over batches, classes and boxes, reading each score on the host",
    "TreeEnsemble": "walks the trees one host-synchronised step per tree level",
}
_ML_DOMAIN = "ai.onnx.ml"
TOP = 5
NODES_SHOWN = 4
DERIVED_SHOWN = 6  # more (or longer) dims shape inference could not size are counted, not listed


@dataclass
class Entry:
    """One finding with the estimated FLOPs and bytes of its nodes (``kiln.cost``) and their share of
    the model's."""

    finding: Finding
    flops: float = 0.0
    bytes: float = 0.0
    flops_share: float = 0.0
    bytes_share: float = 0.0

    @property
    def share(self) -> float:
        """The estimated impact: the larger of the two shares."""
        return max(self.flops_share, self.bytes_share)

    @property
    def measure(self) -> str:
        return "FLOPs" if self.flops_share >= self.bytes_share else "bytes"

    def to_json(self) -> dict[str, Any]:
        return {**self.finding.to_json(), "flops": self.flops, "bytes": self.bytes, "share": self.share,
                "flops_share": self.flops_share,
                "bytes_share": self.bytes_share}


@dataclass
class Report:
    """What ``diagnose`` found, sorted by impact (largest share first)."""

    model: str
    precision: str
    nodes: int
    cost: ModelCost
    entries: list[Entry] = field(default_factory=list)
    dims: dict[str, int] = field(default_factory=dict)  # symbolic dims sized by the given shapes
    profiles: int = 0
    errors: list[str] = field(default_factory=list)  # passes whose find() failed, with the error
    notes: list[str] = field(default_factory=list)  # how the estimate got its shapes
    # input -> its dims nothing sized, taken as 1 ("batch", or "? (axis 2)" for an unnamed dim)
    assumed: dict[str, list[str]] = field(default_factory=dict)
    example: dict[str, str] = field(default_factory=dict)  # input -> its shape as --shapes takes it, to fill in

    @property
    def findings(self) -> list[Finding]:
        return [e.finding for e in self.entries]

    def rule_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry in self.entries:
            counts[entry.finding.rule] = counts.get(entry.finding.rule, 0) + 1
        return counts

    def fixed_by(self) -> dict[str, int]:
        """Findings per pass that fixes them automatically."""
        counts: dict[str, int] = {}
        for entry in self.entries:
            if entry.finding.pass_name:
                counts[entry.finding.pass_name] = counts.get(entry.finding.pass_name, 0) + 1
        return counts

    def summary(self) -> dict[str, Any]:
        fixed = self.fixed_by()
        return {
            "model": self.model, "precision": self.precision, "nodes": self.nodes, "gflops": self.cost.flops / 1e9,
            "mbytes": self.cost.bytes / 1e6, "dims": dict(self.dims), "profiles": self.profiles,
            "assumed_dims": list(self.cost.assumed),
            "assumed_input_dims": {k: list(v) for k, v in self.assumed.items()},
            "unmodelled_ops": dict(self.cost.unmodelled),
            "findings": len(self.entries), "by_rule": self.rule_counts(), "fixed_automatically": sum(fixed.values()),
            "fixed_by": fixed, "need_model_change": sum(1 for e in self.entries if not e.finding.pass_name),
            "errors": list(self.errors), "notes": list(self.notes),
        }

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types only (a pass's details may hold numpy scalars or tuples)."""
        return _plain({"summary": self.summary(), "findings": [e.to_json() for e in self.entries]})


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((_plain(v) for v in value), key=str)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    return str(value)


def dims_from_shapes(model: ir.Model, shapes: Mapping[str, Sequence[int]], label: str = "model") -> dict[str, int]:
    """Symbolic dimension name -> size, read off concrete input shapes (``--shapes``, a profile's opt)."""
    inputs = {v.name or "": v for v in _graph_inputs(model)}
    dims: dict[str, int] = {}
    for name, given in shapes.items():
        if name not in inputs:
            raise InputError(f"{label}: unknown input {name!r} in the shapes; inputs are {sorted(inputs)}")
        declared = inputs[name].shape
        if declared is None:
            continue
        if len(declared) != len(given):
            raise InputError(f"{label}: shapes give input {name!r} rank {len(given)}, the model declares rank "
                             f"{len(declared)}")
        for axis, (dim, size) in enumerate(zip(declared, given)):
            if isinstance(dim, int):
                if dim != size:
                    raise InputError(f"{label}: shapes give input {name!r} size {size} on axis {axis}, the model fixes "
                                     f"it at {dim}")
            elif getattr(dim, "value", None) is not None:
                dims.setdefault(str(dim.value), int(size))
    return dims


def diagnose(
    model: ir.Model,
    precision: str = "fp32",
    profiles: Sequence[Profile] = (),
    shapes: Mapping[str, Sequence[int]] | None = None,
    name: str | None = None,
    run_reference: bool = True,
) -> Report:
    """Every finding for ``model`` at ``precision``, with shares, sorted by impact.

    ``profiles`` (``kiln.Profile``, as ``kiln build`` takes them): the inputs they all cover need no
    dynamic-input finding, and the first one's opt shapes size symbolic dims. ``shapes`` (name ->
    concrete shape) sizes symbolic dims, named or not. Unsized dims count as 1 in the estimates, and
    the report says which. ``run_reference``: see the module docstring.
    """
    label = name or model.graph.name or "model"
    PassContext(precision=precision).validate()
    unique_node_names(model)
    dims: dict[str, int] = {}
    if shapes:
        dims.update(dims_from_shapes(model, shapes, label))
    for index, profile in enumerate(profiles):
        profile.validate(index)
        for which in (0, 2):  # min and max must fit the model as the opt shapes do
            dims_from_shapes(model, {n: s[which] for n, s in profile.shapes.items()}, label)
        opt = dims_from_shapes(model, {n: s[1] for n, s in profile.shapes.items()}, label)
        if index == 0:
            for key, value in opt.items():
                dims.setdefault(key, value)
    ctx = PassContext(precision=precision, kiln_ops=True, dims=dict(dims))
    cost = model_cost(model, dims)
    notes = []
    recorded = None
    sizes, assumed, example, inputs_at_one = _input_sizes(model, dims, shapes or {}, profiles[0] if profiles else None)
    if run_reference and set(cost.assumed) - set(inputs_at_one):
        recorded, note = _recorded_shapes(model, sizes, assumed, example, label)
        notes.append(note)
        if recorded is not None:
            cost = model_cost(model, dims, recorded)
            cost.assumed = sorted(set(cost.assumed) | set(inputs_at_one))
    report = Report(label, precision, len(model.graph), cost, dims=dims, profiles=len(profiles), notes=notes,
                    assumed=assumed, example=example)

    findings: list[Finding] = []
    for pass_ in registered_passes().values():
        try:
            findings.extend(pass_.find(model, ctx))
        except Exception as error:  # noqa: BLE001 - one broken pass must not hide the other findings
            report.errors.append(f"{pass_.name}: {type(error).__name__}: "
                                 f"{str(error).splitlines()[0][:200] if str(error) else ''}")
    findings.extend(_dynamic_input_findings(model, profiles, shapes or {}, label))
    findings.extend(_slow_path_findings(model))

    downstream = {f.details["input"]: f.details.pop("_downstream") for f in findings
                  if f.rule == DYNAMIC_INPUT and "_downstream" in f.details}
    for finding in findings:
        if finding.rule != DYNAMIC_INPUT:
            finding.shapes = _sized(finding.shapes, None if inputs_at_one else recorded, dims)
        names = (downstream.get(finding.details.get("input"), finding.nodes) if finding.rule == DYNAMIC_INPUT
                 else finding.nodes)
        estimate = cost.of(names)
        report.entries.append(Entry(
            finding, flops=estimate.flops, bytes=estimate.bytes,
            flops_share=estimate.flops / cost.flops if cost.flops else 0.0,
            bytes_share=estimate.bytes / cost.bytes if cost.bytes else 0.0,
        ))
    report.entries.sort(key=lambda e: (-e.share, -e.flops, -e.bytes, e.finding.rule,
                                       e.finding.nodes[0] if e.finding.nodes else ""))
    return report


# -- doctor-only rules --------------------------------------------------------------------------------


def _sized(shapes: Mapping[str, Sequence[int | str]], recorded: Mapping[str, Sequence[int]] | None,
           dims: Mapping[str, int]) -> dict[str, list[int | str]]:
    """A finding's shapes with the symbolic dims the given shapes size (and, when every input dim was
    given, the shapes the reference run recorded); dims nothing sizes keep their names."""
    out: dict[str, list[int | str]] = {}
    for name, shape in shapes.items():
        got = recorded.get(name) if recorded is not None else None
        if got is not None and len(got) == len(shape):
            out[name] = [int(d) for d in got]
        else:
            sized = [symbol_value(d, dims) if isinstance(d, str) else None for d in shape]
            out[name] = [d if v is None else v for d, v in zip(shape, sized)]
    return out


def _graph_inputs(model: ir.Model) -> list[ir.Value]:
    return [v for v in model.graph.inputs if v.name not in model.graph.initializers]


def _input_sizes(model: ir.Model, dims: Mapping[str, int], shapes: Mapping[str, Sequence[int]], profile: Profile | None
                 ) -> tuple[dict[str, tuple[int, ...] | None], dict[str, list[str]], dict[str, str], list[str]]:
    """Each graph input's shape for the reference run (see the module docstring; None: no declared
    rank), the dims taken as 1 per input ("batch", or "? (axis 2)" for an unnamed one), each such
    input's shape as --shapes takes it with those dims to fill in, and their names as ``kiln.cost``
    lists assumed dims ("?" for unnamed ones)."""
    given = {**({name: s[1] for name, s in profile.shapes.items()} if profile else {}), **shapes}
    sizes: dict[str, tuple[int, ...] | None] = {}
    assumed: dict[str, list[str]] = {}
    example: dict[str, str] = {}
    names: dict[str, None] = {}
    for value in _graph_inputs(model):
        key = value.name or ""
        if key in given:
            sizes[key] = tuple(int(d) for d in given[key])
            continue
        if value.shape is None:
            sizes[key] = None
            continue
        shape = []
        for axis, dim in enumerate(value.shape):
            name = None if isinstance(dim, int) else getattr(dim, "value", None)
            if isinstance(dim, int) or (name is not None and str(name) in dims):
                shape.append(int(dim) if isinstance(dim, int) else int(dims[str(name)]))
                continue
            shape.append(1)
            assumed.setdefault(key, []).append(str(name) if name is not None else f"? (axis {axis})")
            names[str(name) if name is not None else "?"] = None
        sizes[key] = tuple(shape)
        if key in assumed:
            example[key] = "x".join(str(d) if isinstance(d, int) else _placeholder(d) for d in value.shape)
    return sizes, assumed, example, list(names)


def _placeholder(dim) -> str:
    """A symbolic dim as a --shapes placeholder: its name where that reads as one, else N."""
    name = str(getattr(dim, "value", None) or "")
    return name if name.isidentifier() else "N"


def _recorded_shapes(model: ir.Model, sizes: Mapping[str, tuple[int, ...] | None], assumed: Mapping[str, list[str]],
                     example: Mapping[str, str], label: str) -> tuple[dict[str, tuple[int, ...]] | None, str]:
    """Every main-graph value's shape from one reference run on the CPU at ``sizes``, and a note
    saying what was done; (None, why, quoting the whole error) when the run is impossible or fails."""
    from kiln.executor import Executor
    from kiln.inputs import random_inputs

    hint = ("; give " + " ".join(f"--shapes {k}:{v}" for k, v in example.items()) + " with the sizes you run at"
            if example else "")
    unranked = [name for name, shape in sizes.items() if shape is None]
    if unranked:
        return None, (f"no reference run: input {unranked[0]!r} has no declared rank (give its shape with --shapes "
                      f"{unranked[0]}:AxB...); dims unknown to shape inference taken as 1")
    ranked = {name: shape for name, shape in sizes.items() if shape is not None}  # all of them (checked above)
    recorded: dict[str, tuple[int, ...]] = {}

    def observe(step, outputs) -> None:
        for out_name, result in zip(step.outputs, outputs):
            if out_name and hasattr(result, "shape"):
                recorded[out_name] = tuple(int(d) for d in result.shape)

    shown = ", ".join(f"{k}:{'x'.join(map(str, v))}" for k, v in ranked.items())
    taken = (" (" + "; ".join(f"{name} {', '.join(dims)} taken as 1" for name, dims in assumed.items()) + ")"
             if assumed else "")
    try:
        executor = Executor(model, device="cpu", name=label)
        feeds = random_inputs(executor.inputs, ranked, model=label)
        for name, array in feeds.items():
            recorded[name] = tuple(array.shape)
        executor.run(feeds, on_node=observe)
    except Exception as error:  # noqa: BLE001 - without the run the estimate stands on inferred shapes
        return None, (f"no reference run at {shown}{taken}: {type(error).__name__}: {' '.join(str(error).split())}"
                      f"{hint}; dims unknown to shape inference taken as 1")
    return recorded, f"shapes recorded by a reference run on the CPU at {shown}{taken}"


def _show_dim(dim) -> str:
    return str(dim) if isinstance(dim, int) else str(getattr(dim, "value", None) or "?")


def _dynamic_input_findings(model: ir.Model, profiles: Sequence[Profile], shapes: Mapping[str, Sequence[int]],
                            label: str) -> list[Finding]:
    findings = []
    for value in _graph_inputs(model):
        declared = value.shape
        # None: not even the rank is declared
        dynamic = None if declared is None else [axis for axis, d in enumerate(declared) if not isinstance(d, int)]
        if declared is not None and not dynamic:
            continue
        if profiles and all(value.name in p.shapes for p in profiles):
            continue
        shown = "?" if declared is None else "x".join(_show_dim(d) for d in declared)
        if value.name is not None and value.name in shapes:
            example = "x".join(str(int(s)) for s in shapes[value.name])
            flags = (f"--min-shapes {value.name}:{example} --opt-shapes {value.name}:{example} "
                     f"--max-shapes {value.name}:{example}")
            hint = " (your --shapes as min = opt = max; widen min and max to the range you will run)"
        else:
            flags = (f"--min-shapes {value.name}:{shown} --opt-shapes {value.name}:{shown} "
                     f"--max-shapes {value.name}:{shown}")
            dims = (", ".join(_show_dim(declared[a]) for a in dynamic) if declared is not None and dynamic is not None
                    else "the whole shape")
            hint = f" with sizes for the dynamic dims ({dims})"
        consumers = list(dict.fromkeys(node.name or "" for node, _ in value.uses() if node.graph is model.graph))
        findings.append(Finding(
            rule=DYNAMIC_INPUT,
            title=f"input {value.name!r} has dynamic dims ({shown}) and no optimization profile",
            nodes=consumers,
            why=("kiln build chooses and times every tactic at a profile's opt shape and sizes the engine's buffers "
                 "for its max shape; an input with dynamic dims and no profile cannot be built (kiln build refuses "
                 "it), and a profile far from the real shapes picks tactics for the wrong sizes."),
            fix=f"give kiln build an optimization profile: {flags}{hint}; several profiles for distinct ranges "
                f"(repeat the flags).",
            shapes={value.name or "": shape_of(value) or []},
            details={"input": value.name, "dynamic_axes": dynamic, "model": label,
                     "_downstream": _downstream(model, value)},
        ))
    return findings


def _downstream(model: ir.Model, value: ir.Value) -> list[str]:
    """Names of the main-graph nodes that depend on ``value``."""
    seen: dict[str, None] = {}
    stack = [value]
    visited: set[int] = set()
    while stack:
        current = stack.pop()
        for node, _ in current.uses():
            if node.graph is not model.graph or id(node) in visited:
                continue
            visited.add(id(node))
            seen[node.name or ""] = None
            stack.extend(node.outputs)
    return list(seen)


def _derived_values(model: ir.Model) -> set[int]:
    """ids of values computed from constants and input shapes alone (what the builder folds or the
    engine computes once per input shape)."""
    derived = {id(v) for v in model.graph.initializers.values()}
    for node in model.graph:
        facts = op_facts(node.op_type, node.domain)
        if facts.random or facts.control_flow or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                                              for a in node.attributes.values()):
            continue
        if facts.metadata or all(v is None or not v.name or id(v) in derived for v in node.inputs):
            derived.update(id(v) for v in node.outputs)
    return derived


def _is_string(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.STRING


def _slow_reason(node: ir.Node, derived: set[int]) -> tuple[str, str] | None:
    """(kind, why) when ``node`` runs on a slow path, else None."""
    op = node.op_type
    standard = node.domain in ("", "ai.onnx")
    facts = op_facts(op) if standard else OpFacts()  # the rules below are about standard ops
    if facts.control_flow:
        return "control-flow", (f"{op} runs its body node by node in kiln's reference executor: nothing inside is "
                                "fused or timed, and its condition or trip count is read back from the GPU on every "
                                "run")
    if all(v is None or not v.name or id(v) in derived for v in node.inputs):
        return None  # folded at build time, or computed once per input shape
    if any(_is_string(v) for v in [*node.inputs, *node.outputs]) or (standard and op in STRING_OPS) \
            or (node.domain == _ML_DOMAIN and op == "LabelEncoder"):
        return "strings", (f"{op} works on string tensors: numpy object arrays computed element by element in Python "
                           "on the host, with a copy from and to the GPU")
    if (facts.sequence and not facts.control_flow) or facts.optional:
        return "sequences", (f"{op} handles an ONNX sequence or optional: a Python list of tensors, one op at a time, "
                             "never fused")
    if (standard or node.domain == _ML_DOMAIN) and op in HEAVY_OPS:
        return "no-fast-tactic", f"{op} has no fast tactic: kiln's reference op {HEAVY_OPS[op]}"
    if facts.data_dependent:
        return "data-dependent-shape", (f"{op}'s output size depends on the values it reads: the host waits for the "
                                        "GPU on every run and the engine cannot capture a CUDA graph")
    if standard:
        for index, value in enumerate(node.inputs):
            if index in facts.host_reads and value is not None and value.name and id(value) not in derived:
                return "host-read", (f"{op} reads input {index} ({value.name!r}) on the host as numbers, and that "
                                     "value is computed from data at run time: a GPU->host copy and a wait on every "
                                     "run, and the engine cannot capture a CUDA graph")
    return None


_SLOW_FIXES = {
    "control-flow": ("export without data-dependent control flow where you can (trace it: a fixed loop count "
                     "unrolled, an If on a static condition resolved at export); keep what must stay small"),
    "data-dependent-shape": ("move the op to the end of the model or out of it (post-processing on the host), or "
                             "replace it by a fixed-size equivalent (a mask with Where instead of NonZero/Compress, "
                             "TopK with a constant k instead of a dynamic filter)"),
    "host-read": ("make the value a constant or derive it from input shapes only (Shape -> Gather -> ...), not "
                  "from tensor values; for dynamic sizes export with dynamic axes instead of computing sizes from "
                  "data"),
    "strings": "do the string processing (tokenizing, label mapping) outside the model, before or after kiln runs it",
    "sequences": "export with fixed tensors (Concat/Split) instead of sequence ops",
    "no-fast-tactic": ("replace the op: RNNs by an unrolled or attention-based layer where you can; quantized "
                       "integer ops by float (fp16/bf16) weights; NMS and tree ensembles as post-processing outside "
                       "the model"),
}


def _slow_path_findings(model: ir.Model) -> list[Finding]:
    derived = _derived_values(model)
    findings = []
    for node in model.graph:
        reason = _slow_reason(node, derived)
        if reason is None:
            continue
        kind, why = reason
        values = [v for v in [*node.inputs, *node.outputs] if v is not None and v.name]
        findings.append(Finding(
            rule=SLOW_PATH,
            title=f"{node.op_type} {node.name!r} runs on a slow path ({kind})",
            nodes=[node.name or ""],
            why=why,
            fix=_SLOW_FIXES[kind],
            shapes={v.name or "": shape for v in values if (shape := shape_of(v)) is not None},
            details={"kind": kind, "op_type": node.op_type, "domain": node.domain},
        ))
    return findings


# -- rendering ----------------------------------------------------------------------------------------


def _amount(value: float, unit: str) -> str:
    """``1.23 GFLOPs``, ``45.6 MB``: three significant digits with an SI prefix."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _percent(share: float) -> str:
    return f"{100 * share:.1f}%" if share >= 0.001 or share == 0 else "<0.1%"


def _shape_text(shape: Sequence[int | str]) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


def _nodes_text(nodes: Sequence[str]) -> str:
    if not nodes:
        return "-"
    shown = ", ".join(nodes[:NODES_SHOWN])
    return shown + (f" (+{len(nodes) - NODES_SHOWN} more, {len(nodes)} in all)" if len(nodes) > NODES_SHOWN else "")


def render_text(report: Report) -> str:
    """A one-screen summary, then one block per finding (most impact first)."""
    s = report.summary()
    lines = [f"kiln doctor: {report.model}",
             f"  precision {report.precision}, {report.nodes} nodes, {_amount(report.cost.flops, 'FLOPs')}, "
             f"{_amount(report.cost.bytes, 'B')} moved (estimated per run)"]
    if report.dims:
        lines.append("  sized with " + ", ".join(f"{k}={v}" for k, v in report.dims.items()))
    if report.assumed:
        lines.append("  input dims nothing sizes, taken as 1: "
                     + "; ".join(f"{name} {', '.join(dims)}" for name, dims in report.assumed.items())
                     + " (size them with " + " ".join(f"--shapes {k}:{v}" for k, v in report.example.items())
                     + " or --opt-shapes)")
    inputs_at_one = {d.split(" (axis ")[0] for dims in report.assumed.values() for d in dims}
    derived = [d for d in report.cost.assumed if d not in inputs_at_one]
    if derived:
        shown = ", ".join(derived) if len(derived) <= DERIVED_SHOWN and all(len(d) <= 24 for d in derived) else \
            f"{len(derived)} (kiln doctor --json lists them)"
        lines.append(f"  dims shape inference derived or could not size, taken as 1: {shown}")
    if report.cost.unmodelled:
        lines.append("  counted as bytes only (no FLOP model): "
                     + ", ".join(f"{op} x{n}" for op, n in report.cost.unmodelled.items()))
    for note in report.notes:
        lines.append(f"  {note}")
    for error in report.errors:
        lines.append(f"  ! pass failed, its findings are missing: {error}")
    if not report.entries:
        lines.append("  no findings: no performance rule applies to this model at this precision")
        return "\n".join(lines) + "\n"
    fixed = report.fixed_by()
    lines.append(f"  {len(report.entries)} findings: {sum(fixed.values())} fixed automatically by kiln's passes, "
                 f"{s['need_model_change']} need a change in the model or the build")
    rows = []
    for rule, count in report.rule_counts().items():
        fixers: dict[str | None, int] = {}
        for entry in report.entries:
            if entry.finding.rule == rule:
                fixers[entry.finding.pass_name] = fixers.get(entry.finding.pass_name, 0) + 1
        by = ", ".join((f"fixed by {name}" if name else "not fixed automatically") + (f" ({n})" if len(fixers) > 1
                                                                                      else "")
                       for name, n in fixers.items())
        rows.append([rule, f"x{count}", by])
    lines += plain_lines([Column("rule"), Column("count", numeric=True), Column("fixed by")], rows, header=False,
                         indent="    ")
    lines.append(f"  top {min(TOP, len(report.entries))} by estimated impact:")
    for rank, entry in enumerate(report.entries[:TOP], 1):
        f = entry.finding
        lines.append(f"    {rank}. {_percent(entry.share):>6} of {entry.measure:<5}  {f.rule}: {f.title}")
    lines.append("")
    for rank, entry in enumerate(report.entries, 1):
        f = entry.finding
        lines.append(f"[{rank}] {f.rule}: {f.title}")
        lines.append(f"    nodes:  {_nodes_text(f.nodes)}")
        if f.shapes:
            shapes = list(f.shapes.items())
            text = ", ".join(f"{k} {_shape_text(v)}" for k, v in shapes[:6]) + (f" (+{len(shapes) - 6} more)"
                                                                                if len(shapes) > 6 else "")
            lines.append(f"    shapes: {text}")
        lines.append(f"    impact: {_percent(entry.flops_share)} of FLOPs, {_percent(entry.bytes_share)} of bytes "
                     f"({_amount(entry.flops, 'FLOPs')}, {_amount(entry.bytes, 'B')})")
        lines.append(f"    why:    {f.why}")
        lines.append(f"    fix:    {f.fix}")
    return "\n".join(lines) + "\n"
