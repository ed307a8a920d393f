"""The peers ``kiln bench`` times beside kiln, in the same process, on the same inputs, under the same
``Target`` contract (``kiln.bench.targets``):

- ``eager`` (``EagerTarget``): PyTorch eager. Either the model rebuilt from the ONNX file by kiln's
  reference executor (``kiln.Executor``), which runs every ONNX node as torch ops on the device, or
  a ``torch.nn.Module`` given through the Python API. It is what the model costs with no compiler at
  all: the floor every optimizer is measured from. The executor path runs the model's own precision
  (an fp32 model runs in fp32, TF32 off, as the executor always does); ``dtype`` applies to a module.
- ``compile`` and ``compile-reduce-overhead`` (``CompileTarget``): the same computation under
  ``torch.compile`` (Inductor), in its default mode and in ``reduce-overhead`` (its CUDA graphs):
  PyTorch's own optimizer, the closest peer to kiln. On the executor path Dynamo breaks the graph
  inside the interpreter loop and compiles the pieces between the breaks; that is what
  ``torch.compile`` makes of that code, and it is reported as such (``graph_breaks``).
- ``onnxruntime`` and ``onnxruntime-cuda`` (``OrtTarget``): an onnxruntime ``InferenceSession`` on the
  ONNX file, with its graph optimizations on (``ORT_ENABLE_ALL``), on the CPU provider or the CUDA
  provider. The usual way to serve an ONNX file. (``kiln.compare.run_onnxruntime`` is different: the
  plain reference, optimizations off.)

``make_peers`` builds the ones asked for that can run here and says why the others cannot. A peer
that cannot run is reported with its reason; nothing else is ever timed in its place.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir
import torch

from kiln.bench.targets import Target, empty_like_on, host_buffers
from kiln.dtypes import tensor_to_numpy
from kiln.errors import KilnError, first_line
from kiln.executor import Executor
from kiln.onnx_io import load_model

if TYPE_CHECKING:
    import onnxruntime as ort

PEERS = ("eager", "compile", "compile-reduce-overhead", "onnxruntime", "onnxruntime-cuda")
COMPILE_MODES = {"compile": None, "compile-reduce-overhead": "reduce-overhead"}


class EagerTarget(Target):
    """PyTorch eager: ``module(*inputs)`` or the ONNX model on ``kiln.Executor``; see the module docstring.

    ``module``: called positionally, ``module(*tensors)``, with the inputs in the ONNX model's input
    order when the model is given (``onnx_path`` or ``model``), else in the order of the feeds. The
    module is moved to ``device`` (and ``dtype``) in place, as ``nn.Module.to`` does, and put in eval
    mode. It may return a tensor, or tuples, lists and dicts of them (flattened in order, None
    skipped); the outputs are named after ``output_names``, else the ONNX model's outputs, else a
    top-level dict's keys, else ``output_0``, ``output_1``, ...

    Without a module the ONNX model runs on ``kiln.Executor`` in its own precision (``dtype`` is not
    used there). With ``dtype`` (e.g. ``torch.float16``) the module's floating weights are cast to it
    and its floating inputs are cast on the device as part of each call (the feeds stay as given, as
    kiln's engine receives them); outputs stay in that dtype.

    On CUDA (``gpu_timed``) every call only queues torch ops on the current stream. The executor may
    read a few small values back to the host for shape arithmetic: those syncs are part of what it
    costs. Outputs that are not tensors (sequences, strings) are not copied or compared, as with
    ``KilnTarget``.
    """

    def __init__(
        self,
        *,
        onnx_path: str | os.PathLike[str] | None = None,
        model: ir.Model | None = None,
        module: torch.nn.Module | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        output_names: Sequence[str] | None = None,
        name: str = "eager",
    ) -> None:
        if module is None and model is None and onnx_path is None:
            raise KilnError(f"{name}: needs the ONNX file or a torch module")
        self.name = name
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise KilnError(f"{name}: device {self.device} was asked for but torch sees no CUDA GPU")
        self.gpu_timed = self.device.type == "cuda"
        if model is None and onnx_path is not None:
            model = load_model(onnx_path)
        self.model = model
        self.module = module
        self.dtype = dtype if module is not None else None
        if module is None:
            self.note = "the ONNX model on kiln's reference executor, in the model's own precision"
        else:
            self.note = f"the torch module in {str(dtype or 'its own dtype').removeprefix('torch.')}"
        self._output_names = list(output_names) if output_names is not None else None
        self._fn: Callable[..., Any] | None = None  # tensors in input order -> raw result
        self._input_names: list[str] = []
        self._names: list[str] = []  # output names, in the order _flatten gives the tensors
        self._host_in: dict[str, torch.Tensor | np.ndarray] = {}  # numpy: strings, which stay on the host
        self._args: tuple[torch.Tensor | np.ndarray, ...] = ()  # the device inputs, in input order
        self._device_out: list[torch.Tensor] = []
        self._host_out: list[torch.Tensor] = []

    # -- what runs --------------------------------------------------------------------------
    def _build(self) -> Callable[..., Any]:
        """The function each iteration calls: tensors in input order -> the raw result."""
        if self.module is not None:
            module = self.module.to(self.device)
            if self.dtype is not None:
                module = module.to(self.dtype)
            module.eval()
            dtype = self.dtype
            self._input_names = _graph_input_names(self.model) if self.model is not None else []

            def call_module(*tensors):
                if dtype is not None:
                    tensors = tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)
                return module(*tensors)

            return call_module

        assert self.model is not None  # __init__ loads it when there is no module
        executor = Executor(self.model, device=self.device)
        names = [_name(v) for v in executor.inputs]
        outputs = [_name(v) for v in executor.outputs]
        self._input_names = names

        def call_executor(*tensors):
            results = executor.run(dict(zip(names, tensors)))
            return tuple(results[n] for n in outputs)

        return call_executor

    def _call(self) -> Any:
        """One run on the device inputs (overridden by ``CompileTarget``)."""
        assert self._fn is not None  # setup builds it
        with torch.inference_mode():
            return self._fn(*self._args)

    # -- the Target contract ----------------------------------------------------------------
    def setup(self, feeds: Mapping[str, np.ndarray]) -> None:
        if self._fn is None:
            self._fn = self._build()
        order = self._input_names or list(feeds)
        missing = [n for n in order if n not in feeds]
        extra = [n for n in feeds if n not in order]
        if missing or extra:
            raise KilnError(f"{self.name}: the inputs are {order}; the feeds lack {missing} and add {extra}")
        on_gpu = self.device.type == "cuda"
        self._host_in = host_buffers({n: feeds[n] for n in order}, self.device)
        self._args = tuple(t.to(self.device) if on_gpu and isinstance(t, torch.Tensor) else t
                           for t in self._host_in.values())
        self._warm_up()
        self._host_out = [empty_like_on(t, torch.device("cpu"), pinned=on_gpu) for t in self._device_out]

    def _warm_up(self) -> None:
        """One run: it names the outputs and gives their shapes for the host buffers."""
        result = self._call()
        self._names = self._name_outputs(result)
        self._device_out = self._flatten(result)

    def h2d(self) -> None:
        if self.device.type == "cuda":
            for host, device in zip(self._host_in.values(), self._args):
                if isinstance(host, torch.Tensor) and isinstance(device, torch.Tensor):
                    device.copy_(host, non_blocking=True)

    def compute(self) -> None:
        self._device_out = []
        self._device_out = self._flatten(self._call())

    def d2h(self) -> None:
        if self.device.type == "cuda":
            for host, device in zip(self._host_out, self._device_out):
                host.copy_(device, non_blocking=True)

    def outputs(self) -> dict[str, np.ndarray]:
        source = self._host_out if self.device.type == "cuda" else self._device_out
        return {name: tensor_to_numpy(tensor) for name, tensor in zip(self._names, source)}

    def close(self) -> None:
        self._fn = None
        self._host_in, self._args, self._device_out, self._host_out = {}, (), [], []

    # -- outputs ----------------------------------------------------------------------------
    def _flatten(self, result: Any) -> list[torch.Tensor]:
        if self.module is None:  # the executor's tuple, in output order; non-tensors left out
            return [v for v in result if isinstance(v, torch.Tensor)]
        return _tensor_leaves(result, self.name)

    def _name_outputs(self, result: Any) -> list[str]:
        if self.module is None:
            assert self.model is not None  # __init__ loads it when there is no module
            outputs = [_name(v) for v in self.model.graph.outputs]
            return [n for n, v in zip(outputs, result) if isinstance(v, torch.Tensor)]
        count = len(_tensor_leaves(result, self.name))
        names = self._output_names
        if names is None and self.model is not None:
            names = [_name(v) for v in self.model.graph.outputs]
        if names is not None:
            if len(names) != count:
                raise KilnError(
                    f"{self.name}: the module returned {count} tensor(s), but there are {len(names)} output "
                    f"name(s) {names}; return the model's outputs in its order (wrap the module if need be)"
                )
            return list(names)
        if isinstance(result, Mapping) and all(v is None or isinstance(v, torch.Tensor) for v in result.values()):
            return [str(k) for k, v in result.items() if v is not None]
        return [f"output_{i}" for i in range(count)]


class CompileTarget(EagerTarget):
    """``torch.compile(fn, mode=mode, dynamic=dynamic)`` of what ``EagerTarget`` runs (the module, or
    the executor's run as ``*tensors -> tuple of outputs in output order``).

    ``setup`` calls the compiled function twice: the first call compiles (its wall time, compile
    plus one run, is ``compile_s``), the second lets ``reduce-overhead`` record its CUDA graph.
    ``graphs`` and ``graph_breaks`` count what Dynamo made of the code in those calls.

    ``dynamic=False`` (the default) compiles one graph per input shape, each specialized, as kiln
    times each profile at its own shape; None is torch's default (dynamic after the second shape).
    A batch sweep recompiles for each batch, so ``setup`` lifts Dynamo's recompile limit to at least
    64 and, for a module, makes hitting it an error: past the limit Dynamo would silently run the
    whole module eagerly, and that must never be timed as compiled. (On the executor path Dynamo
    compiles many small frames, some of them once per node; one falling back to eager there is what
    ``torch.compile`` makes of that code, as a graph break is.)

    With CUDA graphs (``reduce-overhead``, ``max-autotune`` on a GPU) the outputs are the graph's
    static buffers, overwritten by the next replay: each call begins a new step
    (``torch.compiler.cudagraph_mark_step_begin``), and ``d2h`` copies them out before the next call.
    """

    def __init__(self, *, mode: str | None = None, dynamic: bool | None = False, name: str = "compile",
                 **options: Any) -> None:
        super().__init__(name=name, **options)
        self.mode = None if mode == "default" else mode
        self.dynamic = dynamic
        self.compile_s: float | None = None
        self.graphs: int | None = None
        self.graph_breaks: int | None = None
        self._compiled: Callable[..., Any] | None = None
        self.note = f"torch.compile mode={self.mode or 'default'} of {self.note}"

    def _call(self) -> Any:
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        assert self._compiled is not None  # _warm_up compiles it
        with torch.inference_mode():
            return self._compiled(*self._args)

    def _warm_up(self) -> None:
        import torch._dynamo as dynamo
        from torch._dynamo.utils import counters

        if self._compiled is None:
            self._compiled = torch.compile(self._fn, mode=self.mode, dynamic=self.dynamic)
        graphs = counters["stats"]["unique_graphs"]
        breaks = sum(counters["graph_break"].values())
        limit = max(dynamo.config.recompile_limit, 64)
        with dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=self.module is not None):
            start = time.perf_counter()
            self._call()
            _sync(self.device)
            self.compile_s = time.perf_counter() - start
            super()._warm_up()
        self.graphs = counters["stats"]["unique_graphs"] - graphs
        self.graph_breaks = sum(counters["graph_break"].values()) - breaks

    def close(self) -> None:
        super().close()
        self._compiled = None


class OrtTarget(Target):
    """onnxruntime on the ONNX file, graph optimizations on (``ORT_ENABLE_ALL``).

    ``cuda=False``: the CPU provider. ``cuda=True``: the CUDA provider (on GPU ``device_id``), with
    the CPU provider for what it does not run; the session is refused if onnxruntime did not
    actually put the CUDA provider in it (it falls back to the CPU silently otherwise).

    Host-timed either way (``gpu_timed=False``): onnxruntime runs on its own CUDA streams, which torch's
    events cannot see, so ``compute`` is one synchronous ``session.run`` on the numpy feeds. On the
    CUDA provider that run includes onnxruntime's own copies of the inputs to the GPU and of the
    outputs back: ``h2d`` and ``d2h`` do nothing. What it allocates is onnxruntime's memory, not torch's.
    """

    def __init__(self, onnx_path: str | os.PathLike[str], *, cuda: bool = False, device_id: int = 0,
                 name: str | None = None) -> None:
        self.onnx_path = os.fspath(onnx_path)
        if not os.path.isfile(self.onnx_path):
            raise KilnError(f"{name or 'onnxruntime'}: {self.onnx_path}: no such file")
        self.cuda = cuda
        self.device_id = device_id
        self.name = name or ("onnxruntime-cuda" if cuda else "onnxruntime")
        self.device = torch.device("cuda", device_id) if cuda else torch.device("cpu")
        self.gpu_timed = False
        self.note = f"onnxruntime {'CUDA' if cuda else 'CPU'} provider, ORT_ENABLE_ALL"
        self.session: ort.InferenceSession | None = None
        self._feeds: dict[str, np.ndarray] = {}
        self._names: list[str] = []
        self._outputs: list[np.ndarray] = []

    def _session(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        providers: list[Any] = ["CPUExecutionProvider"]
        if self.cuda:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device_id}))
        try:
            session = ort.InferenceSession(self.onnx_path, options, providers=providers)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise KilnError(f"{self.name}: onnxruntime could not load {self.onnx_path}: {first_line(error)}") from error
        if self.cuda and "CUDAExecutionProvider" not in session.get_providers():
            raise KilnError(f"{self.name}: onnxruntime did not start its CUDA provider (CUDA or cuDNN libraries "
                            f"missing?); the session has only {session.get_providers()}")
        return session

    def setup(self, feeds: Mapping[str, np.ndarray]) -> None:
        if self.session is None:
            self.session = self._session()
        self._feeds = {name: np.require(array, requirements="C") for name, array in feeds.items()}
        self._names = [o.name for o in self.session.get_outputs()]
        self.compute()

    def compute(self) -> None:
        assert self.session is not None  # setup opens it
        try:
            self._outputs = self.session.run(self._names, self._feeds)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise KilnError(f"{self.name}: onnxruntime could not run the model: {first_line(error)}") from error

    def outputs(self) -> dict[str, np.ndarray]:
        return {name: value for name, value in zip(self._names, self._outputs) if isinstance(value, np.ndarray)}

    def close(self) -> None:
        self.session = None
        self._feeds, self._outputs = {}, []


def make_peers(
    names: Iterable[str],
    *,
    onnx_path: str | os.PathLike[str] | None = None,
    module: torch.nn.Module | None = None,
    device: str | torch.device,
    dtype: torch.dtype | None = None,
    output_names: Sequence[str] | None = None,
) -> tuple[list[Target], list[tuple[str, str]]]:
    """The peers in ``names`` (from ``PEERS``) that can run here, each named as asked, and
    ``(name, reason)`` for each that cannot. A torch module, when given, is what ``eager`` and
    ``compile*`` run (the ONNX file then only gives the input order and output names); otherwise they
    run the ONNX file on kiln's executor. ``onnxruntime*`` need the ONNX file. Unknown names raise."""
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise KilnError(f"unknown peer(s) {', '.join(unknown)}; the peers are {', '.join(PEERS)}")
    device = torch.device(device)
    targets: list[Target] = []
    skipped: list[tuple[str, str]] = []
    model: ir.Model | None = None  # loaded once, for eager and compile alike
    for name in names:
        reason = _why_not(name, onnx_path, module, device)
        if reason is not None:
            skipped.append((name, reason))
            continue
        try:
            if name.startswith("onnxruntime"):
                cuda = name == "onnxruntime-cuda"
                index = (device.index or 0) if device.type == "cuda" else 0
                assert onnx_path is not None  # _why_not said why not otherwise
                targets.append(OrtTarget(onnx_path, cuda=cuda, device_id=index, name=name))
                continue
            if model is None and onnx_path is not None:
                model = load_model(onnx_path)
            options: dict[str, Any] = dict(model=model, module=module, device=device, dtype=dtype,
                                           output_names=output_names)
            if name == "eager":
                targets.append(EagerTarget(name=name, **options))
            else:
                targets.append(CompileTarget(mode=COMPILE_MODES[name], name=name, **options))
        except KilnError as error:
            skipped.append((name, str(error).removeprefix(f"{name}: ")))
    return targets, skipped


def _why_not(name: str, onnx_path, module, device: torch.device) -> str | None:
    """Why peer ``name`` cannot run here, or None."""
    if name.startswith("onnxruntime"):
        if onnx_path is None:
            return "needs the ONNX file (onnxruntime does not run a torch module)"
        try:
            import onnxruntime as ort
        except ImportError:
            return "the onnxruntime package is not installed (pip install onnxruntime)"
        available = ort.get_available_providers()
        if name == "onnxruntime-cuda" and "CUDAExecutionProvider" not in available:
            return f"this onnxruntime build has no CUDAExecutionProvider (it has {', '.join(available)})"
        return None
    if onnx_path is None and module is None:
        return "needs the ONNX file or a torch module"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    if name == "compile-reduce-overhead" and device.type != "cuda":
        return f"CUDA graphs need a GPU (the bench runs on {device.type})"
    if name.startswith("compile"):
        import torch._dynamo as dynamo

        if not dynamo.is_dynamo_supported():
            return f"torch.compile is not supported on this Python/platform (torch {torch.__version__})"
    return None


def _graph_input_names(model: ir.Model) -> list[str]:
    """The model's inputs that are not initializers, in order (the order a module is called with)."""
    return [_name(v) for v in model.graph.inputs if v.name not in model.graph.initializers]


def _name(value: ir.Value) -> str:
    """A graph input's or output's name; an unnamed one (built in Python) is "", as in the ONNX file."""
    return value.name or ""


def _tensor_leaves(result: Any, name: str) -> list[torch.Tensor]:
    """The tensors of a module's result, depth first (a tuple, list or dict in order; None skipped)."""
    if isinstance(result, torch.Tensor):
        return [result]
    if result is None:
        return []
    if isinstance(result, Mapping):
        result = list(result.values())
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in _tensor_leaves(item, name)]
    raise KilnError(f"{name}: the module returned a {type(result).__name__}; it must return tensors "
                    "(a tensor, or tuples, lists and dicts of them)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
