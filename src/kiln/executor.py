"""The reference executor: runs an ONNX graph node by node with torch, on CPU or CUDA.

It is an interpreter in the shape of ``torch.fx.Interpreter``: a plan is made once per graph (each
node bound to its registered op function and attributes), then ``run`` walks the plan with one value
table, freeing each value after its last use so memory stays flat. Subgraphs (If/Loop/Scan bodies)
get plans of their own and see the enclosing scope's values.

Example::

    model = kiln.load_model("resnet50.onnx")
    outputs = Executor(model, device="cuda").run({"input": images})

``run(feeds, on_node=hook)`` calls ``hook(step, outputs)`` after each main-graph node, and a tuple
it returns replaces the node's outputs: the builder records shapes and walks its chosen tactics
beside fp32 with it, so this loop is the one that runs a model node by node.

float32 means float32: while a model runs, TF32 is switched off in cuBLAS and cuDNN so results match
onnxruntime's fp32 within 1e-4. Faster precisions are the builder's job, chosen per layer.

Limits: ``run(feeds, timeout_s=...)`` stops at the time limit (checked between main-graph nodes
and at every loop iteration; ``kiln.deadline``), ``cancel()`` from another thread stops the run in
progress, and ops whose output size is known before they allocate are refused over the tensor-size
ceiling (``kiln.ops.sizes``, ``kiln.limits``). Every error names the model first, then the node
and op.
"""

from __future__ import annotations

import contextlib
from collections import ChainMap
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from kiln import deadline as deadlines
from kiln import dtypes
from kiln.errors import InputError, KilnError, OpError, UnsupportedModelError, named
from kiln.ops import lookup, sizes
from kiln.ops.registry import OpContext, canonical_domain
from kiln.precision import tf32_for


@dataclass
class NodeStep:
    """One node bound to its op: ``fn(op, *inputs)`` computes the node's ``outputs`` from the values
    named ``inputs``; ``free_after`` are the values the run drops once it has run."""

    fn: Any
    op: OpContext
    inputs: list[str | None]
    outputs: list[str]
    free_after: list[str]


OnNode = Callable[[NodeStep, tuple], "tuple | None"]  # Executor.run's per-node hook (see its docstring)


class _GraphPlan:
    """A graph bound to op functions, with the point after which each value can be dropped."""

    def __init__(self, graph: ir.Graph, executor: Executor) -> None:
        self.graph = graph
        self.input_names = [v.name or "" for v in graph.inputs]  # unnamed (built in Python): "", as in the file
        self.output_names = [v.name or "" for v in graph.outputs]
        self.constants: dict[str, Any] = {}
        for name, value in graph.initializers.items():
            if value.const_value is not None:
                self.constants[name] = executor.constant(value.const_value)
        self.steps: list[NodeStep] = []
        last_use: dict[str, int] = {}
        for index, node in enumerate(graph):
            domain = canonical_domain(node.domain)
            opset = executor.opsets.get(domain, executor.opsets.get("", 1))
            fn = lookup(domain, node.op_type, opset)
            if fn is None:
                raise executor.unsupported(node, opset)
            fn = sizes.bind(domain, node.op_type, fn)
            op = OpContext(node, opset, executor.device, executor.run_subgraph)
            inputs = [v.name if v is not None and v.name else None for v in node.inputs]
            outputs = [v.name or "" for v in node.outputs]
            self.steps.append(NodeStep(fn, op, inputs, outputs, []))
            for name in [n for n in inputs if n] + sorted(_captured_names(node)):
                last_use[name] = index
        keep = set(self.output_names)
        for name, index in last_use.items():
            if name not in keep:
                self.steps[index].free_after.append(name)


def _captured_names(node: ir.Node) -> set[str]:
    """Names a node's subgraphs read from enclosing scopes (they keep those values alive)."""
    names: set[str] = set()
    for attr in node.attributes.values():
        graphs = []
        if attr.type == ir.AttributeType.GRAPH:
            graphs = [attr.value]
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = list(attr.value)
        for graph in graphs:
            defined = {v.name for v in graph.inputs} | set(graph.initializers)
            for inner in graph:
                defined.update(v.name for v in inner.outputs)
            for inner in graph:
                names.update(v.name for v in inner.inputs if v is not None and v.name and v.name not in defined)
                names.update(_captured_names(inner) - defined)
            names.update(v.name for v in graph.outputs if v.name not in defined)
    return names


@contextlib.contextmanager
def _exact_fp32(device: torch.device) -> Iterator[None]:
    """Switch TF32 off while a model runs: ONNX float32 means IEEE float32."""
    if device.type != "cuda":
        yield
        return
    with tf32_for("fp32"):
        yield


class Executor:
    """Runs an ``ir.Model`` with the registered reference ops. See the module docstring.

    One executor serves one thread at a time (a run keeps its subgraph scope on the plan); give
    each thread its own executor.
    """

    def __init__(self, model: ir.Model, device: str | torch.device = "cpu", name: str | None = None) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise KilnError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu")
        self.model = model
        self.name = name or model.graph.name or "model"
        self.opsets = {canonical_domain(d): v for d, v in model.opset_imports.items()}
        self._plans: dict[int, _GraphPlan] = {}
        self._running: deadlines.Deadline | None = None
        self._on_node: OnNode | None = None
        self._main = self._plan(model.graph)
        graph = model.graph
        self.inputs = [v for v in graph.inputs if v.name not in self._main.constants]
        self.outputs = list(graph.outputs)

    # -- building ---------------------------------------------------------------------------
    def constant(self, tensor: ir.TensorProtocol) -> Any:
        return dtypes.tensor_from_numpy(tensor.numpy(), self.device)

    def unsupported(self, node: ir.Node, opset: int) -> KilnError:
        domain = canonical_domain(node.domain) or "ai.onnx"
        return UnsupportedModelError(
            f"{self.name}: node {node.name!r} uses op {domain}::{node.op_type} (opset {opset}), "
            "which kiln does not implement; see `kiln.ops.registered_ops()` for what it runs"
        )

    def _plan(self, graph: ir.Graph) -> _GraphPlan:
        plan = self._plans.get(id(graph))
        if plan is None:
            plan = self._plans[id(graph)] = _GraphPlan(graph, self)
        return plan

    def node_steps(self) -> dict[str, NodeStep]:
        """The main graph's bound steps by node name, in the order ``run`` runs them (the builder's
        Node layers run them)."""
        return {step.op.node.name or "": step for step in self._main.steps}

    @property
    def constants(self) -> dict[str, Any]:
        """The main graph's initializers with values, as the run holds them (name -> tensor)."""
        return dict(self._main.constants)

    # -- running ----------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, Any], timeout_s: float | None = None, *,
            on_node: OnNode | None = None) -> dict[str, Any]:
        """Run the model on ``feeds`` (name -> numpy array or torch tensor); returns name -> value.
        ``timeout_s``: stop with ``kiln.deadline.RunStopped`` after that many seconds (the time
        limit in effect, ``kiln.deadline.time_limit``, applies too).

        ``on_node(step, outputs)`` is called after each main-graph node (not inside subgraphs) with
        the values it computed; when it returns a tuple, the rest of the run sees those values as
        the node's outputs instead. The builder records shapes with it and walks the network with
        its chosen tactics beside fp32; ``kiln doctor`` records shapes. An error it raises ends the
        run and passes through as it is."""
        values = self._check_feeds(feeds)
        deadline = deadlines.begin(timeout_s)
        self._running, self._on_node = deadline, on_node
        try:
            with deadlines.running(deadline), torch.inference_mode(), _exact_fp32(self.device):
                outputs = self._execute(self._main, values, None)
        finally:
            self._running = self._on_node = None
        return dict(zip(self._main.output_names, outputs))

    def cancel(self) -> bool:
        """Stop the run in progress (from another thread) at its next check; False when none is."""
        running = self._running
        if running is None:
            return False
        running.cancel()
        return True

    def run_subgraph(self, graph: ir.Graph, inputs: Sequence[Any], outer: Any) -> list[Any]:
        plan = self._plan(graph)
        values = dict(zip(plan.input_names, inputs))
        return self._execute(plan, values, outer)

    def _execute(self, plan: _GraphPlan, values: dict[str, Any], outer: Any) -> list[Any]:
        local: dict[str, Any] = {**plan.constants, **values}
        env = ChainMap(local, outer) if outer is not None else local
        # the time limit is checked between main-graph nodes; loop ops check it at each iteration.
        # Not while torch.compile traces the executor (bench's peer): a traced graph runs as one
        # piece, and reading the context variable would break the graph inside this loop.
        deadline = deadlines.current() if plan is self._main and not torch.compiler.is_compiling() else None
        for step in plan.steps:
            if deadline is not None and deadline.expired():
                raise named(deadline.stopped(f"node {step.op.name!r} (op {step.op.op_type})"), self.name)
            args = [env[name] if name is not None else None for name in step.inputs]
            step.op._outer = env
            try:
                result = step.fn(step.op, *args)
            except deadlines.RunStopped as error:  # it names where it stopped
                if str(error).startswith(f"{self.name}: "):
                    raise
                raise named(error, self.name) from error
            except KilnError as error:
                text = str(error).removeprefix(f"{self.name}: ")
                if step.op.name not in text:  # raised inside a subgraph: name the node that holds it
                    text = f"node {step.op.name!r} (op {step.op.op_type}), in its subgraph: {text}"
                raise type(error)(f"{self.name}: {text}") from error
            except Exception as error:  # noqa: BLE001 - any op failure is reported with its node
                raise OpError(
                    f"{self.name}: node {step.op.name!r} (op {step.op.op_type}) failed: "
                    f"{type(error).__name__}: {error}"
                ) from error
            finally:
                step.op._outer = None
            if not isinstance(result, tuple):
                result = (result,)
            if self._on_node is not None and plan is self._main:
                replaced = self._on_node(step, result)
                result = result if replaced is None else tuple(replaced)
            for name, value in zip(step.outputs, result):
                if name:
                    local[name] = value
            for name in step.free_after:
                local.pop(name, None)
        return [env[name] for name in plan.output_names]

    def _check_feeds(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        expected = {v.name or "": v for v in self.inputs}
        unknown = sorted(set(feeds) - set(expected) - set(self._main.constants))
        if unknown:
            raise InputError(f"{self.name}: unknown input(s) {unknown}; the model's inputs are {sorted(expected)}")
        missing = sorted(set(expected) - set(feeds))
        if missing:
            raise InputError(f"{self.name}: missing input(s) {missing}")
        values: dict[str, Any] = {}
        for name, given in feeds.items():
            value = self._to_value(name, given)
            spec = expected.get(name)
            if spec is not None:
                value = _check_against_spec(self.name, spec, value)
            values[name] = value
        return values

    def _to_value(self, name: str, given: Any) -> Any:
        if isinstance(given, torch.Tensor):
            return given.to(self.device)
        if isinstance(given, list):
            return [self._to_value(name, item) for item in given]
        if given is None:
            return None
        try:
            return dtypes.tensor_from_numpy(np.asarray(given), self.device)
        except KeyError as error:
            raise InputError(f"{self.name}: input {name!r} has dtype {np.asarray(given).dtype}, "
                             f"which kiln cannot hold") from error


def _check_against_spec(model_name: str, spec: ir.Value, value: Any) -> Any:
    """``value`` if it fits the declared input; raises ``InputError`` otherwise."""
    if not isinstance(value, (torch.Tensor, np.ndarray)) or not isinstance(spec.type, ir.TensorType):
        return value
    want = spec.dtype
    if isinstance(value, np.ndarray):
        got_name = "string"
        ok = want == ir.DataType.STRING
    else:
        got = dtypes.ONNX_DTYPES.get(value.dtype)
        got_name = dtypes.onnx_name(got) if got is not None else str(value.dtype)
        ok = got == want
    if want is not None and not ok:
        raise InputError(
            f"{model_name}: input {spec.name!r} has dtype {got_name}, the model expects {dtypes.onnx_name(want)}"
        )
    shape = spec.shape
    if shape is None:
        return value
    if len(shape) != value.ndim:
        raise InputError(
            f"{model_name}: input {spec.name!r} has rank {value.ndim} (shape {list(value.shape)}), "
            f"the model expects rank {len(shape)} ({_shape_text(shape)})"
        )
    for axis, (dim, size) in enumerate(zip(shape, value.shape)):
        if isinstance(dim, int) and dim != size:
            raise InputError(
                f"{model_name}: input {spec.name!r} has shape {list(value.shape)}, the model expects "
                f"{_shape_text(shape)} (axis {axis} must be {dim})"
            )
    return value


def _shape_text(shape: ir.Shape) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else (d.value or "?") for d in shape) + "]"
