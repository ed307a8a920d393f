"""The op table: one function per ONNX op and opset range.

An op function is the reference *tactic* of its op: plain torch, correct for every case the ONNX
spec defines, on CPU and CUDA. Later tactics (fused, Triton, low precision) are checked against it.

    @register("Relu", since=6)
    def relu(op: OpContext, x):
        return torch.relu(x)

The executor calls ``fn(op, *inputs)`` with one positional argument per node input (``None`` for
an omitted optional input). It returns one value, or a ``tuple`` with one value per node output
(extra trailing values are dropped). Values are ``torch.Tensor``; an ONNX sequence is a Python
``list``; an empty optional is ``None``; a string tensor is a numpy object array.
A function registered ``since=N`` serves opsets N and up, until the next registration of the same
op. Where an op's inputs or attributes changed between opsets (Split, Reduce*, Pad, Clip, ...), it
has one registration per version range.

A registration also declares the op's *facts*, what the builder, the engine, the passes and the
doctor need to know about it besides running it (:class:`OpFacts`): ``register("Reshape", since=5,
shape_inputs=(1,), host_inputs=(1,))``. Facts belong to the op, whatever its opset: declare them
once, at the op's newest registration, and read them with :func:`op_facts` (after
``import kiln.ops``, which registers every op).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from kiln.dtypes import tensor_from_numpy
from kiln.errors import UnsupportedModelError
from kiln.limits import check_tensor_bytes

OpFunction = Callable[..., Any]

_TABLE: dict[tuple[str, str], list[tuple[int, OpFunction]]] = {}

DEFAULT_DOMAINS = ("", "ai.onnx")


def canonical_domain(domain: str) -> str:
    return "" if domain in DEFAULT_DOMAINS else domain


@dataclass(frozen=True)
class OpFacts:
    """What is known about an op besides how to run it (input positions count from 0).

    ``shape_inputs``: inputs whose values decide the output's shape (the builder follows them back
    to find the shape arithmetic it computes once per input shape). ``host_inputs``: inputs the
    reference op reads with ``tolist()``; constants there stay on the CPU, so reading them neither
    waits for the GPU nor breaks CUDA-graph capture. ``host_reads``: every input the reference op
    reads on the host as Python numbers (``host_inputs`` and those read with ``item()``), which the
    doctor flags when data-dependent. ``metadata``: reads only its input's shape and type, never its
    values (Shape, Size). ``random``: may draw random numbers, so it is never folded into a
    constant. ``reads_torch_flags``: its torch kernels (or its subgraphs) read the TF32/cuDNN switches.
    ``control_flow``: runs subgraphs (If, Loop, Scan, SequenceMap). ``sequence``: makes or reads an
    ONNX sequence. ``optional``: makes or reads an ONNX optional. ``data_dependent``: its output's size
    is known only once its input's values are (NonZero, Unique, ...). ``accumulate_fp32``: computes in
    fp32 inside a reduced-precision layer (sums of squares, products, norms: the "statistics in fp32"
    rule). ``parameter_inputs``: inputs that carry parameters, not data, never cast to a reduced precision.
    """

    shape_inputs: tuple[int, ...] = ()
    host_inputs: tuple[int, ...] = ()
    host_reads: tuple[int, ...] = ()
    metadata: bool = False
    random: bool = False
    reads_torch_flags: bool = False
    control_flow: bool = False
    sequence: bool = False
    optional: bool = False
    data_dependent: bool = False
    accumulate_fp32: bool = False
    parameter_inputs: tuple[int, ...] = ()


_FACTS: dict[tuple[str, str], OpFacts] = {}
_NO_FACTS = OpFacts()


def register(op_type: str, since: int = 1, domain: str = "", **facts: Any) -> Callable[[OpFunction], OpFunction]:
    """Register ``fn`` as the implementation of ``domain::op_type`` from opset ``since`` on, with the
    op's facts where this registration declares them (keywords of :class:`OpFacts`; input positions
    as tuples; ``host_reads`` always includes ``host_inputs``)."""
    if "host_inputs" in facts:
        facts["host_reads"] = tuple(sorted({*facts.get("host_reads", ()), *facts["host_inputs"]}))
    declared = OpFacts(**facts)

    def decorate(fn: OpFunction) -> OpFunction:
        key = (canonical_domain(domain), op_type)
        versions = _TABLE.setdefault(key, [])
        if any(v == since for v, _ in versions):
            raise ValueError(f"{domain or 'ai.onnx'}::{op_type} since {since} registered twice")
        if declared != _NO_FACTS:
            if _FACTS.get(key, declared) != declared:
                raise ValueError(f"{domain or 'ai.onnx'}::{op_type}: facts declared twice, differently")
            _FACTS[key] = declared
        bisect.insort(versions, (since, fn), key=lambda item: item[0])
        return fn

    return decorate


def op_facts(op_type: str, domain: str | None = "") -> OpFacts:
    """The facts declared for ``domain::op_type`` (none declared: all empty). ``domain=None``: the op
    of that name in the default domain, else in whichever domain registers one (for callers that
    keep only op types, such as an engine plan's layers)."""
    if domain is None:
        domains = sorted(d for d, name in _TABLE if name == op_type)  # the default domain "" sorts first
        domain = domains[0] if domains else ""
    return _FACTS.get((canonical_domain(domain), op_type), _NO_FACTS)


def lookup(domain: str, op_type: str, opset: int) -> OpFunction | None:
    """The implementation serving ``op_type`` at ``opset``, or None when kiln has none."""
    versions = _TABLE.get((canonical_domain(domain), op_type))
    if not versions:
        return None
    index = bisect.bisect_right([v for v, _ in versions], opset) - 1
    return versions[index][1] if index >= 0 else None


def registered_ops() -> dict[tuple[str, str], list[int]]:
    """Every registered op with the opsets its versions start at (for docs and tests)."""
    return {key: [v for v, _ in versions] for key, versions in sorted(_TABLE.items())}


def _attribute_value(attr: ir.Attr, device: torch.device) -> Any:
    kind = attr.type
    if kind == ir.AttributeType.TENSOR:
        return tensor_from_numpy(attr.value.numpy(), device)
    if kind == ir.AttributeType.TENSORS:
        return [tensor_from_numpy(t.numpy(), device) for t in attr.value]
    if kind in (ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS):
        return list(attr.value)
    if kind == ir.AttributeType.GRAPHS:
        return list(attr.value)
    if kind == ir.AttributeType.SPARSE_TENSOR:
        raise UnsupportedModelError(
            f"attribute {attr.name!r} is a sparse tensor, which kiln does not support; store it densely"
        )
    return attr.value  # INT, FLOAT, STRING, GRAPH, TYPE_PROTO


class OpContext:
    """What an op function knows about its node: attributes, opset, device, outputs wanted.

    ``run_graph(graph, inputs)`` runs a subgraph attribute (If/Loop/Scan bodies) with the values of
    the enclosing scope visible, and returns its outputs as a list.
    """

    __slots__ = ("node", "name", "op_type", "domain", "opset", "attrs", "device", "outputs", "_run_graph", "_scopes")

    def __init__(
        self,
        node: ir.Node,
        opset: int,
        device: torch.device,
        run_graph: Callable[[ir.Graph, Sequence[Any], Any], list[Any]] | None = None,
    ) -> None:
        self.node = node
        self.name = node.name or f"<unnamed {node.op_type}>"
        self.op_type = node.op_type
        self.domain = canonical_domain(node.domain)
        self.opset = opset
        self.device = device
        self.attrs = {name: _attribute_value(attr, device) for name, attr in node.attributes.items()}
        # True for each output position the model actually uses (an empty name means "not wanted").
        self.outputs = [bool(v.name) for v in node.outputs]
        self._run_graph = run_graph
        # The enclosing scope a subgraph sees, set around each call. Per thread: an engine's steps
        # (and so this op) are shared by execution contexts running in several threads at once.
        self._scopes = threading.local()

    @property
    def _outer(self) -> Any:
        return getattr(self._scopes, "outer", None)

    @_outer.setter
    def _outer(self, scope: Any) -> None:
        self._scopes.outer = scope

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def run_graph(self, graph: ir.Graph, inputs: Sequence[Any]) -> list[Any]:
        assert self._run_graph is not None
        return self._run_graph(graph, inputs, self._outer)

    def fail(self, reason: str) -> UnsupportedModelError:
        """An error naming this node and op, for cases kiln does not cover: ``raise op.fail(...)``."""
        return UnsupportedModelError(
            f"node {self.name!r} (op {self.domain or 'ai.onnx'}::{self.op_type}, opset {self.opset}): {reason}"
        )

    def check_output(self, shape: Sequence[int], dtype: Any, index: int = 0, what: str | None = None) -> None:
        """Refuse, before it is allocated, an output of ``shape`` and ``dtype`` (torch, numpy or
        onnx-ir) over the tensor-size ceiling (``kiln.limits``): a ``ResourceLimitError`` naming
        this node, its op and output ``index`` (or ``what``), the shape and the bytes."""
        if what is None:
            value = self.node.outputs[index] if index < len(self.node.outputs) else None
            what = f"output {value.name!r}" if value is not None and value.name else f"output {index}"
        check_tensor_bytes(shape, dtype, f"node {self.name!r} (op {self.op_type}): {what}", device=self.device)

    def tensor(self, data: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A new tensor on this op's device."""
        if isinstance(data, np.ndarray):
            return torch.as_tensor(data, device=self.device, dtype=dtype)
        return torch.tensor(data, device=self.device, dtype=dtype)
