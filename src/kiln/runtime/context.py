"""Execution contexts: what runs an engine's plan, many at once over one engine's weights.

TensorRT's ``IExecutionContext`` for kiln engines. The engine's ``Program`` (``kiln.runtime.program``)
holds the runnable steps over the prepared weights, and nothing in it changes while it runs; a
context reads it through its public fields and holds the rest:

- **its own CUDA stream**, never the default stream (playbook: one stream per execution context,
  and the default stream's implicit synchronization avoided), plus the auxiliary streams and events
  of a plan built with ``max_aux_streams`` (playbook: auxiliary streams inside one context;
  ``kiln.builder.schedule`` says which layer runs where). ``aux_streams=k`` uses at most k of them
  (``0``: every layer on the context's stream);
- **its caches**: the values of the shape arithmetic per input shape (computed on the first run at
  a shape, reused after), and with ``cuda_graph=True`` one CUDA graph per input-shape key (playbook:
  CUDA graphs for launch-bound work, one per shape), captured on the first run at that key and
  replayed after, in an LRU cache of ``graph_cache_size`` graphs; a key outside it is captured anew
  and the least recently used graph is dropped. The graphs of one context share one private memory
  pool, so their activation memory is allocated once and reused across shapes;
- **its optimization profile**: ``profile=k`` (or ``set_profile(k)``) runs profile k's tactics and
  refuses, before anything runs, an input outside its min..max shapes; ``None`` takes the first
  profile that fits each call;
- **its bindings** (``bind``): device tensors the plan reads its inputs from and writes its outputs
  to, so that a CUDA-graph replay (``execute``) copies nothing in or out on the host side.

- **its profiler** (``profiler = fn(layer, ms)``): while set, each run after the first at a shape
  runs layer by layer (no CUDA graph) and reports every layer's time (TensorRT's ``IProfiler``).

Limits: every run takes ``timeout_s`` (and runs under the time limit in effect,
``kiln.deadline``), checked between layers and before each CUDA-graph replay (a replay, once
launched, runs to its end); ``cancel()`` from another thread stops the run in progress at its next
check (onnxruntime's ``RunOptions.terminate``). Either raises ``kiln.deadline.RunStopped``. Errors
name the engine first, then the layer and its ops.

``run(inputs)`` returns when the outputs are ready; ``run_async(inputs, stream)`` only queues the
work behind what ``stream`` (default: the current stream) already holds and makes ``stream`` wait
for it, with no host synchronization. Inputs are numpy arrays or torch tensors on the CPU or the
engine's device; a wrong name, dtype, rank, shape, device or profile is refused before anything
runs. Contexts in different threads run in parallel; threads sharing one context take turns (a lock).

Example::

    engine = kiln.load_engine("bert.kiln")
    contexts = [engine.create_context(cuda_graph=True) for _ in range(4)]   # one per thread
    outputs = contexts[0].run({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kiln import deadline as deadlines
from kiln import dtypes
from kiln.errors import InputError, KilnError, OpError, named
from kiln.limits import check_tensor_bytes
from kiln.precision import set_tf32, tf32_for

if TYPE_CHECKING:
    from kiln.runtime.program import Program, Step

SHAPE_CACHE_SIZE = 32  # input shapes whose shape-arithmetic values a context keeps
DEFAULT_GRAPH_CACHE_SIZE = 8

# torch's TF32 and cuDNN switches are process-wide: eager CUDA runs (and captures) of engines whose
# layers read them (Program.reads_torch_flags) set them under this lock, so a context in one thread
# never runs its fp32 layers with another's TF32 setting.
_TORCH_FLAGS = threading.RLock()
# One CUDA-graph capture at a time in the process (captures are rare: once per context and shape).
_CAPTURE = threading.Lock()


@dataclass
class _Graph:
    """One captured CUDA graph: the buffers it reads and writes, and the cached shape values it
    reads (kept alive with it)."""

    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    outputs: dict[str, Any]
    cached: dict[int, Any]


@dataclass
class ContextStats:
    """What a context did: first runs at a shape (shape arithmetic computed), eager runs of the
    plan, CUDA graphs captured, replayed and dropped from the LRU cache, captures that failed."""

    first_runs: int = 0
    eager_runs: int = 0
    captures: int = 0
    replays: int = 0
    evictions: int = 0
    failed_captures: int = 0


class ExecutionContext:
    """Runs one engine's program on its own stream; see the module docstring. Made by
    ``Engine.create_context``."""

    def __init__(self, program: Program, *, profile: int | None = None, cuda_graph: bool = False,
                 graph_cache_size: int = DEFAULT_GRAPH_CACHE_SIZE, aux_streams: int | None = None) -> None:
        self.program = program
        self.device = program.device
        self.name = program.name
        on_cuda = self.device.type == "cuda"
        if cuda_graph and not on_cuda:
            raise KilnError(
                f"{self.name}: CUDA graphs need an engine built for CUDA; this one runs on {self.device.type}"
            )
        if not isinstance(graph_cache_size, int) or graph_cache_size < 1:
            raise KilnError(
                f"{self.name}: graph_cache_size must be a positive number of graphs, got {graph_cache_size!r}"
            )
        if aux_streams is not None and (not isinstance(aux_streams, int) or aux_streams < 0):
            raise KilnError(f"{self.name}: aux_streams must be a number >= 0, got {aux_streams!r}")
        self.profile = self._valid_profile(profile)
        self.cuda_graph = cuda_graph
        self.graph_cache_size = graph_cache_size
        self.graph_errors: list[str] = []
        self.stats = ContextStats()
        # profiler(layer_name, ms) for every layer of every run after the first at a shape; while it
        # is set, runs are eager (no CUDA graph) and wait for the GPU (TensorRT's IProfiler)
        self.profiler: Callable[[str, float], None] | None = None
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._running: deadlines.Deadline | None = None
        self._shapes: OrderedDict[tuple, dict[int, Any]] = OrderedDict()
        self._graphs: OrderedDict[tuple, _Graph | None] = OrderedDict()
        self._bound_inputs: list[torch.Tensor] | None = None
        self._bound_outputs: dict[str, torch.Tensor] = {}
        self._bound_profile = 0
        planned = program.aux_streams
        used = planned if aux_streams is None else min(aux_streams, planned)
        self.aux_streams = used if on_cuda else 0
        if on_cuda:
            self.stream: torch.cuda.Stream | None = torch.cuda.Stream(self.device)
            self._aux = [torch.cuda.Stream(self.device) for _ in range(self.aux_streams)]
            self._streams = [self.stream, *self._aux]
            # the plan's stream i -> one of this context's streams (several may share one)
            self._stream_of = [0] + [1 + (i - 1) % used if used else 0 for i in range(1, planned + 1)]
            self._events = [torch.cuda.Event() for _ in range(program.event_count)]
            self._fork = torch.cuda.Event()
            self._joins = [torch.cuda.Event() for _ in self._aux]
            self._pool = torch.cuda.graph_pool_handle() if cuda_graph else None
        else:
            self.stream = None
            self._aux, self._streams, self._stream_of, self._events, self._joins = [], [], [0] * (planned + 1), [], []
            self._pool = None

    @property
    def cached_shapes(self) -> int:
        """Input shapes (per profile) whose shape arithmetic this context holds (SHAPE_CACHE_SIZE at most)."""
        return len(self._shapes)

    @property
    def cached_graphs(self) -> int:
        """CUDA graphs this context holds (``graph_cache_size`` at most), failed captures included."""
        return len(self._graphs)

    # -- configuration ---------------------------------------------------------------------------
    def _valid_profile(self, profile: int | None) -> int | None:
        count = len(self.program.profiles)
        if profile is not None and (
            not isinstance(profile, int) or isinstance(profile, bool) or not 0 <= profile < count
        ):
            raise KilnError(
                f"{self.name}: no optimization profile {profile!r}; the engine has {count} (0..{count - 1})"
            )
        return profile

    def set_profile(self, profile: int | None) -> None:
        """Run later calls with optimization profile ``profile`` (None: the first that fits each call).
        The first run at each (profile, shape) computes its shape arithmetic and, with CUDA graphs,
        captures its graph: that is the cost of a profile switch."""
        with self._entered():
            profile = self._valid_profile(profile)
            if self._bound_inputs is not None:  # the bound inputs must fit the new profile
                names = [spec["name"] for spec in self.program.inputs]
                _, self._bound_profile = self.program.check_inputs(dict(zip(names, self._bound_inputs)), profile)
            self.profile = profile

    def bind(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor] | None = None) -> None:
        """Tensors on the engine's device that ``execute`` reads every input from and writes the given
        outputs into. Fill the input tensors in place between calls; with CUDA graphs, a replay then
        reads and writes them directly. Outputs not given are returned as new tensors."""
        with self._entered():
            values, profile = self.program.check_inputs(inputs, self.profile)
            for spec, value in zip(self.program.inputs, values):
                if value.device.type != self.device.type:
                    raise InputError(f"{self.name}: bound input {spec['name']!r} is on {value.device}; bound tensors "
                                     f"must be on the engine's device ({self.device})")
            known = {spec["name"]: spec for spec in self.program.outputs}
            bound: dict[str, torch.Tensor] = {}
            for name, tensor in (outputs or {}).items():
                if name not in known:
                    raise InputError(f"{self.name}: unknown output {name!r}; the engine's outputs are {sorted(known)}")
                if not isinstance(tensor, torch.Tensor) or tensor.device.type != self.device.type:
                    raise InputError(f"{self.name}: bound output {name!r} must be a tensor on {self.device}")
                want = dtypes.to_torch_dtype(getattr(dtypes.DT, known[name]["dtype"].upper()))
                if tensor.dtype != want:
                    raise InputError(
                        f"{self.name}: bound output {name!r} has dtype {tensor.dtype}, the engine writes {want}"
                    )
                if not tensor.is_contiguous():
                    raise InputError(f"{self.name}: bound output {name!r} must be contiguous")
                bound[name] = tensor
            self._bound_inputs = values
            self._bound_outputs = bound
            self._bound_profile = profile

    def warm_up(self, shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
        """One run at these input shapes (inputs not named: their declared static shape) on
        stand-in inputs (floats random, integers and booleans zero), so that the shape arithmetic
        is cached and, with ``cuda_graph``, the graph captured before the first real call: a
        context warmed for each shape or profile in advance hides the cost of switching."""
        shapes = dict(shapes or {})
        generator = torch.Generator().manual_seed(0)
        inputs = {}
        for spec in self.program.inputs:
            shape = shapes.pop(spec["name"], None)
            if shape is None:
                if spec["shape"] is None or any(d is None for d in spec["shape"]):
                    raise InputError(f"{self.name}: input {spec['name']!r} has dynamic dimensions ({spec['shape']}); "
                                     "give its shape to warm_up")
                shape = spec["shape"]
            dtype = dtypes.to_torch_dtype(getattr(dtypes.DT, spec["dtype"].upper()))
            if dtype.is_floating_point:
                inputs[spec["name"]] = torch.randn(tuple(shape), generator=generator).to(dtype)
            else:
                inputs[spec["name"]] = torch.zeros(tuple(shape), dtype=dtype)
        if shapes:
            raise InputError(f"{self.name}: unknown input(s) {sorted(shapes)} given to warm_up")
        self.run(inputs)

    # -- running ---------------------------------------------------------------------------------
    def run(self, inputs: Mapping[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
        """Run the plan on ``inputs`` (name -> numpy array or torch tensor) and return the outputs
        (name -> tensor on the engine's device) once they are ready. ``timeout_s``: stop with
        ``kiln.deadline.RunStopped`` after that many seconds."""
        with self._entered(timeout_s):
            values, profile = self.program.check_inputs(inputs, self.profile)
            if self.stream is None:
                return self._enqueue(values, profile)
            return self._sync(lambda: self._enqueue([self._on_device(v, pinned=False) for v in values], profile),
                              any(v.device.type == "cuda" for v in values))

    def run_async(self, inputs: Mapping[str, Any], stream: torch.cuda.Stream | None = None,
                  timeout_s: float | None = None) -> dict[str, Any]:
        """Queue the plan on ``inputs`` behind the work already on ``stream`` (default: the current
        stream), make ``stream`` wait for it, and return the outputs without waiting: they are
        ready in ``stream``'s order. Host inputs are copied through pinned memory. On the CPU
        there are no streams and this is ``run``."""
        if self.stream is None:
            if stream is not None:
                raise KilnError(
                    f"{self.name}: this engine runs on the CPU, which has no streams; call run_async without one"
                )
            return self.run(inputs, timeout_s)
        with self._entered(timeout_s):
            values, profile = self.program.check_inputs(inputs, self.profile)
            return self._async(
                lambda: self._enqueue([self._on_device(v, pinned=True) for v in values], profile), stream
            )

    def execute(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Run the plan on the bound tensors (``bind``) and wait for it."""
        with self._entered(timeout_s):
            values, profile = self._bound()
            if self.stream is None:
                return self._enqueue(values, profile, self._bound_outputs, bound=True)
            return self._sync(lambda: self._enqueue(values, profile, self._bound_outputs, bound=True), True)

    def execute_async(self, stream: torch.cuda.Stream | None = None, timeout_s: float | None = None) -> dict[str, Any]:
        """``execute`` queued behind ``stream``'s work (default: the current stream), without waiting."""
        if self.stream is None:
            if stream is not None:
                raise KilnError(
                    f"{self.name}: this engine runs on the CPU, which has no streams; call execute_async without one"
                )
            return self.execute(timeout_s)
        with self._entered(timeout_s):
            values, profile = self._bound()
            return self._async(lambda: self._enqueue(values, profile, self._bound_outputs, bound=True), stream)

    def cancel(self) -> bool:
        """Stop the run in progress (from another thread) at its next check between layers or loop
        iterations, with ``kiln.deadline.RunStopped``; False when no run is in progress."""
        running = self._running
        if running is None:
            return False
        running.cancel()
        return True

    # -- internals -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _entered(self, timeout_s: float | None = None):
        """The context's lock: threads sharing the context take turns; a call from inside a call
        on the same thread (which would deadlock) is refused. Inside, a deadline of ``timeout_s``
        (nested in the one in effect) is the run's, and ``cancel()`` stops it."""
        me = threading.get_ident()
        if self._owner == me:
            raise KilnError(f"{self.name}: the execution context is already running on this thread; "
                            "a call from inside it needs a context of its own")
        deadline = deadlines.begin(timeout_s)
        with self._lock:
            self._owner = me
            self._running = deadline
            try:
                with deadlines.running(deadline):
                    yield
            finally:
                self._owner = None
                self._running = None

    def _bound(self) -> tuple[list[torch.Tensor], int]:
        if self._bound_inputs is None:
            raise KilnError(f"{self.name}: execute() runs on bound tensors; call bind(inputs, outputs) first")
        return self._bound_inputs, self._bound_profile

    def _cuda_stream(self) -> torch.cuda.Stream:
        """The context's stream, on the CUDA paths (it is None only on the CPU)."""
        assert self.stream is not None, "a CUDA path ran in a CPU context"
        return self.stream

    def _sync(self, enqueue, device_inputs: bool) -> dict[str, Any]:
        """Run ``enqueue`` on the context's stream and wait for it on the host. The context's stream
        waits for the caller's only where the inputs are GPU tensors the caller's stream may still
        be writing, and the caller's stream is never made to wait: contexts driven by ``run`` from
        several threads (whose current stream is the default one) stay independent."""
        own = self._cuda_stream()
        if device_inputs:
            own.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(own):
            outputs = enqueue()
        own.synchronize()
        caller = torch.cuda.current_stream(self.device)
        for value in outputs.values():
            if isinstance(value, torch.Tensor) and value.device.type == "cuda":
                value.record_stream(caller)  # freed while the caller's stream still reads it: not reused early
        return outputs

    def _async(self, enqueue, stream: torch.cuda.Stream | None) -> dict[str, Any]:
        caller = stream if stream is not None else torch.cuda.current_stream(self.device)
        own = self._cuda_stream()
        own.wait_stream(caller)
        with torch.cuda.stream(own):
            outputs = enqueue()
        for value in outputs.values():
            if isinstance(value, torch.Tensor) and value.device.type == "cuda":
                value.record_stream(caller)  # the caller may free it while its stream still reads it
        caller.wait_stream(own)
        return outputs

    def _on_device(self, value: torch.Tensor, pinned: bool) -> torch.Tensor:
        """An input on the engine's device, copied on the context's stream; a device tensor given by
        the caller is marked as used by that stream, so freeing it early is safe."""
        if value.device.type == "cuda":
            value.record_stream(self._cuda_stream())
            return value
        if pinned:
            return value.pin_memory().to(self.device, non_blocking=True)
        return value.to(self.device)

    def _enqueue(self, values: list[torch.Tensor], profile: int, into: Mapping[str, torch.Tensor] | None = None,
                 bound: bool = False) -> dict[str, Any]:
        program = self.program
        shape_key = (profile, *(tuple(v.shape) for v in values))
        cached = self._shapes.get(shape_key)
        if cached is None:
            results, cached = self._execute(program.steps[profile], values, None, first=True)
            self.stats.first_runs += 1
            self.stats.eager_runs += 1
            self._shapes[shape_key] = cached
            if len(self._shapes) > SHAPE_CACHE_SIZE:
                self._shapes.popitem(last=False)
            if self.cuda_graph:  # capture now, so the next run at this key replays
                self._graph(shape_key, profile, values, cached, into, bound)
            return self._deliver(results, into)
        self._shapes.move_to_end(shape_key)
        if self.cuda_graph and self.profiler is None:
            entry = self._graph(shape_key, profile, values, cached, into, bound)
            if entry is not None:
                self._check_time("a CUDA-graph replay")
                if not bound:
                    for buffer, value in zip(entry.inputs, values):
                        buffer.copy_(value)
                entry.graph.replay()
                self.stats.replays += 1
                return {name: value if name in (into or {}) or not isinstance(value, torch.Tensor) else value.clone()
                        for name, value in entry.outputs.items()}
        if self.profiler is not None:
            return self._deliver(self._profiled(program.lean[profile], values, cached, self.profiler), into)
        results, _ = self._execute(program.lean[profile], values, cached)
        self.stats.eager_runs += 1
        return self._deliver(results, into)

    def _check_time(self, where: str) -> None:
        deadline = deadlines.current()
        if deadline is not None and deadline.expired():
            raise named(deadline.stopped(where), self.name)

    def _profiled(self, steps: list[Step], values: list[torch.Tensor], cached: dict[int, Any],
                  profiler: Callable[[str, float], None]) -> dict[str, Any]:
        """One eager run that reports each layer's time to ``profiler`` (CUDA events on the layer's
        stream, or the host clock on the CPU); waits for the GPU to read the events."""
        timings: list[tuple] = []
        results, _ = self._execute(steps, values, cached, timings=timings)
        self.stats.eager_runs += 1
        if self.stream is not None:
            self.stream.synchronize()
        for name, start, end in timings:
            profiler(name, start.elapsed_time(end) if self.stream is not None else (end - start) * 1e3)
        return results

    def _deliver(self, results: dict[str, Any], into: Mapping[str, torch.Tensor] | None) -> dict[str, Any]:
        for name, buffer in (into or {}).items():
            value = results[name]
            if tuple(buffer.shape) != tuple(value.shape):
                raise InputError(f"{self.name}: bound output {name!r} has shape {list(buffer.shape)}, this run writes "
                                 f"{list(value.shape)}; bind a tensor of that shape")
            buffer.copy_(value)
            results[name] = buffer
        return results

    def _graph(self, shape_key: tuple, profile: int, values: list[torch.Tensor], cached: dict[int, Any],
               into: Mapping[str, torch.Tensor] | None, bound: bool) -> _Graph | None:
        """The CUDA graph for this key from the LRU cache, captured if it is not there (None when the
        plan cannot be captured: an op that waits for the GPU; the reason is in ``graph_errors``)."""
        key = shape_key
        if bound:
            key += (
                "bound",
                *(v.data_ptr() for v in values),
                *sorted((n, t.data_ptr(), tuple(t.shape)) for n, t in (into or {}).items()),
            )
        if key in self._graphs:
            self._graphs.move_to_end(key)
            return self._graphs[key]
        entry = self._capture(profile, values, cached, into, bound)
        self._graphs[key] = entry
        if len(self._graphs) > self.graph_cache_size:
            self._graphs.popitem(last=False)
            self.stats.evictions += 1
        return entry

    def _capture(self, profile: int, values: list[torch.Tensor], cached: dict[int, Any],
                 into: Mapping[str, torch.Tensor] | None, bound: bool) -> _Graph | None:
        inputs = list(values) if bound else [v.clone() for v in values]
        graph = torch.cuda.CUDAGraph()
        try:
            # Captured on the context's own stream, which alone is synchronized first: unlike
            # torch.cuda.graph(), nothing here waits for the whole device or empties torch's cache,
            # so contexts in other threads go on running (their streams are not captured).
            own = self._cuda_stream()
            with _CAPTURE, torch.cuda.stream(own):
                own.synchronize()
                graph.capture_begin(self._pool, capture_error_mode="thread_local")
                try:
                    results, _ = self._execute(self.program.lean[profile], inputs, cached)
                    outputs = self._deliver(results, into)
                finally:
                    graph.capture_end()
        except KilnError:
            raise
        except Exception as error:  # noqa: BLE001 - an op that syncs or reads the host: run uncaptured
            notes = " ".join(getattr(error, "__notes__", []))
            first = str(error).splitlines()[0][:200] if str(error) else ""
            self.graph_errors.append(f"{type(error).__name__}: {first} {notes}".strip())
            self.stats.failed_captures += 1
            torch.cuda.synchronize(self.device)
            return None
        self.stats.captures += 1
        return _Graph(graph, inputs, outputs, cached)

    def _execute(self, steps: list[Step], values: list[torch.Tensor], cached: dict[int, Any] | None,
                 first: bool = False, timings: list | None = None) -> tuple[dict[str, Any], dict[int, Any]]:
        """Run ``steps`` eagerly (or under capture). ``first``: the first run at a shape, which runs
        the shape arithmetic too, on the context's stream alone, and returns its values to cache.
        ``timings`` collects (layer, start, end) per step: CUDA events, or host clock readings."""
        if self.device.type != "cuda":
            return self._run_steps(steps, values, cached, first, several=False, timings=timings)
        several = not first and len(self._streams) > 1
        if not first and not self.program.reads_torch_flags:
            return self._run_steps(steps, values, cached, first, several=several, timings=timings)
        with _TORCH_FLAGS:
            benchmark = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = True
            try:
                with tf32_for("fp32"):
                    return self._run_steps(steps, values, cached, first, several=several, timings=timings)
            finally:
                torch.backends.cudnn.benchmark = benchmark

    def _run_steps(self, steps: list[Step], values: list[torch.Tensor], cached: dict[int, Any] | None, first: bool,
                   several: bool, timings: list | None = None) -> tuple[dict[str, Any], dict[int, Any]]:
        program = self.program
        env: list[Any] = [None] * program.slot_count
        for slot, value in zip(program.input_slots, values):
            env[slot] = value
        for slot, value in program.constant_slots.items():
            env[slot] = value
        if cached is not None:
            for slot, value in cached.items():
                env[slot] = value
        captured: dict[int, Any] = {}
        wanted = program.cached_slots
        on_cuda = self.device.type == "cuda"
        main = self.stream
        if several:
            self._fork.record(main)
            for aux in self._aux:
                aux.wait_event(self._fork)
        step = None
        deadline = deadlines.current()
        try:
            with torch.inference_mode():
                for step in steps:
                    if deadline is not None and deadline.expired():
                        raise deadline.stopped(step.where)
                    if first and step.broadcast is not None:
                        self._check_broadcast(step, step.broadcast, env)
                    if several:
                        stream = self._streams[self._stream_of[step.stream]]
                        for event in step.waits:
                            stream.wait_event(self._events[event])
                        with torch.cuda.stream(stream):
                            self._timed_step(step, env, on_cuda, timings, stream)
                        if step.record is not None:
                            self._events[step.record].record(stream)
                        frees = step.free_lean
                    else:
                        self._timed_step(step, env, on_cuda, timings, main)
                        frees = step.free
                    if first and step.static:
                        for s in step.out_slots:
                            if s in wanted:
                                value = env[s]
                                device_slot, host_slot = wanted[s]
                                if device_slot is not None:
                                    captured[device_slot] = value
                                if host_slot is not None:
                                    captured[host_slot] = value.cpu() if isinstance(value, torch.Tensor) else value
                                    if host_slot != s:
                                        env[host_slot] = captured[host_slot]
                    for s in frees:
                        env[s] = None
                if several:
                    assert main is not None  # several streams run on CUDA only
                    for aux, join in zip(self._aux, self._joins):
                        join.record(aux)
                        main.wait_event(join)
                results = {}
                for spec, slot, dtype in zip(program.outputs, program.output_slots, program.output_dtypes):
                    value = env[slot]
                    if isinstance(value, torch.Tensor):
                        # an input or a constant handed straight out is a copy: the caller may write to it
                        value = value.to(dtype, copy=slot in program.held_slots).contiguous()
                    results[spec["name"]] = value
        except KilnError as error:
            if str(error).startswith(f"{self.name}: "):
                raise
            raise named(error, self.name) from error
        except Exception as error:  # noqa: BLE001 - any layer failure is reported with its layer
            if on_cuda and torch.cuda.is_current_stream_capturing():
                error.add_note(f"while capturing layer {step.name!r}" if step is not None else "while capturing")
                raise
            where = step.where if step is not None else "the engine"
            raise OpError(f"{self.name}: {where} failed: {type(error).__name__}: {error}") from error
        return results, captured

    def _check_broadcast(self, step: Step, broadcast: list[tuple[int, ...]], env: list[Any]) -> None:
        """A Pointwise layer's output (the broadcast of its inputs and weights) against the tensor-size
        ceiling, before it is computed: on the first run at a shape, which later runs repeat."""
        inputs = [env[s] for s in step.in_slots]
        shape = torch.broadcast_shapes(*(tuple(v.shape) for v in inputs), *broadcast)
        check_tensor_bytes(shape, step.cast_dtype or inputs[0].dtype, f"{step.where}: its output", device=self.device)

    def _timed_step(self, step: Step, env: list[Any], on_cuda: bool, timings: list | None, stream) -> None:
        if timings is None:
            self._step(step, env, on_cuda)
        elif on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            self._step(step, env, on_cuda)
            end.record(stream)
            timings.append((step.name, start, end))
        else:
            began = time.perf_counter()
            self._step(step, env, on_cuda)
            timings.append((step.name, began, time.perf_counter()))

    @staticmethod
    def _step(step: Step, env: list[Any], on_cuda: bool) -> None:
        ins = [env[s] for s in step.in_slots]
        dtype = step.cast_dtype
        for i in step.cast:
            if ins[i].dtype != dtype:
                ins[i] = ins[i].to(dtype)
        if step.tf32 and on_cuda:  # a tf32 step reads the switches: its engine runs under _TORCH_FLAGS
            set_tf32(True)
            try:
                outs = step.run(ins)
            finally:
                set_tf32(False)
        else:
            outs = step.run(ins)
        for s, value in zip(step.out_slots, outs):
            if s is not None:
                env[s] = value
