"""The engine: a built plan and its prepared weights, runnable, and saved as ONE file.

The file is safetensors: every prepared weight is a tensor, and the plan (layers, chosen tactics,
precisions, profiles) is JSON in the safetensors metadata, with the kiln, torch and triton versions,
the GPU name and compute capability, and a SHA-256 over the plan and every tensor byte. Loading
refuses an engine from another kiln version or GPU architecture and a truncated or damaged file,
each with one clear message. Nothing is ever unpickled: the plan names registered tactics, and the
weights-stripped ONNX graph (for layers that run kiln's reference ops) is parsed by onnx.

An engine file is untrusted input, and three things stand between it and the process:

- the **checksum** (SHA-256) catches damage; anyone can recompute it, so it proves nothing more;
- a **key** proves authenticity: with one (``save(key=...)``, ``kiln build --sign-key FILE``, or a
  key file named by ``KILN_ENGINE_KEY``), the file carries an HMAC-SHA256 over all its bytes, and
  ``load_engine`` with a key refuses an unsigned or mis-signed file before it parses anything;
- the **schema** (``kiln.engine_schema``) contains what any file can do, signed or not: every
  header and plan field is checked for type and range before anything is built from it, and the
  embedded graph is checked as a model file is (``kiln.onnx_io.load_embedded_model``), with no
  external data anywhere, so an engine cannot make kiln read a file or run code of its choosing.

Example::

    engine = kiln.build("resnet50.onnx", BuildConfig(fp16=True))
    engine.save("resnet50.kiln")
    engine = kiln.load_engine("resnet50.kiln")
    outputs = engine.run({"input": images})
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import stat
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from kiln import engine_schema
from kiln.atomic_file import write_atomically
from kiln.errors import EngineLoadError, KilnError
from kiln.regular_file import UnreadableFile, read_regular_file
from kiln.runtime import ExecutionContext, Program
from kiln.versions import environment

FORMAT = "kiln-engine"
VERSION = 1
_GRAPH_TENSOR = "__graph__"
MAX_ENGINE_BYTES = 64 * 1024**3
KEY_ENVIRONMENT = "KILN_ENGINE_KEY"
"""The environment variable naming a key file: engines kiln writes are signed with it, and engines
it loads must carry a valid signature."""
SIGNATURE_KEY = "kiln-hmac-sha256"
"""The safetensors metadata entry holding the HMAC-SHA256 (hex) of the file with this entry zeroed."""
_UNSIGNED = "0" * 64
_SIGNATURE = re.compile(rb'"kiln-hmac-sha256":"([0-9a-f]{64})"')
MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 4096


if TYPE_CHECKING:
    from kiln.builder.plan import BuildReport, BuiltPlan


class Engine:
    """A built model: the plan, its prepared weights and its ``program`` (the runnable steps,
    ``kiln.runtime.Program``), shared by every execution context. ``run`` takes inputs by name (numpy arrays or
    tensors) and returns outputs by name as tensors on the engine's device, in one default context;
    ``create_context`` gives more (one per thread or stream)."""

    def __init__(self, plan: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], graph: bytes, device: str = "cuda",
                 name: str | None = None) -> None:
        self.plan = dict(plan)
        self.tensors = {name: t.to(device) for name, t in tensors.items()}
        self.graph = graph
        self.device = torch.device(device)
        self.report: BuildReport | None = None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EngineLoadError("this engine runs on CUDA, but torch sees no CUDA GPU here")
        self.name = name or self.plan["name"]  # the engine file once loaded; errors start with it
        self.inputs = self.plan["inputs"]
        self.outputs = self.plan["outputs"]
        self._context: ExecutionContext | None = None
        self.program = Program(self.plan, self.tensors, self.graph, self.device, self.name)
        self.profiles = self.program.profiles

    @classmethod
    def from_plan(cls, built: BuiltPlan) -> Engine:
        """The engine of a finished build, carrying the build's report."""
        engine = cls(built.plan, built.tensors, built.graph, device=built.device)
        engine.report = built.report
        return engine

    @property
    def aux_streams(self) -> int:
        """The auxiliary streams the plan uses (BuildConfig.max_aux_streams at most)."""
        return self.program.aux_streams

    @property
    def weights_bytes(self) -> int:
        """Bytes of prepared weights, held once however many execution contexts run the engine."""
        seen: set[tuple[int, int]] = set()
        total = 0
        for tensor in self.tensors.values():
            key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += key[1]
        return total

    def create_context(self, **options) -> ExecutionContext:
        """A new execution context (its own stream, shape and CUDA-graph caches) sharing this
        engine's weights; see ``kiln.runtime.ExecutionContext`` for the options."""
        return ExecutionContext(self.program, **options)

    def default_context(self) -> ExecutionContext:
        """The execution context ``run`` uses (with CUDA graphs on CUDA), made on first use."""
        if self._context is None:
            self._context = self.create_context(cuda_graph=self.device.type == "cuda")
        return self._context

    @property
    def graph_errors(self) -> list[str]:
        """Why ``run``'s context could not capture a CUDA graph (empty when every shape was captured)."""
        return self.default_context().graph_errors

    def run(self, feeds: Mapping[str, Any], timeout_s: float | None = None) -> dict[str, torch.Tensor]:
        """Run the engine on ``feeds`` (name -> numpy array or torch tensor) in one default execution
        context: the first run at an input shape runs every layer, keeps the shape arithmetic's
        results, and on CUDA captures a CUDA graph of the other layers that later runs at that shape
        replay. As with a torch op, the outputs are ready in the current stream's order (the work
        runs on the context's own stream; no host synchronization). For several threads or
        streams, give each its own ``create_context()``. ``timeout_s``: stop with
        ``kiln.deadline.RunStopped`` after that many seconds (``ExecutionContext.run``)."""
        return self.default_context().run_async(feeds, timeout_s=timeout_s)

    # -- description --------------------------------------------------------------------------
    def describe(self) -> list[dict[str, Any]]:
        """One row per layer (for ``kiln inspect``): nodes, tactic, precision, layout, shapes, share of timed cost."""
        layers = self.plan["layers"]
        total = sum(layer["choices"][0]["time_ms"] or 0.0 for layer in layers)
        rows = []
        for index, layer in enumerate(layers):
            choice = layer["choices"][0]
            ms = choice["time_ms"]
            origins = layer.get("origins") or [[n, t] for n, t in zip(layer["nodes"], layer["op_types"])]
            rows.append({
                "index": index, "name": layer["name"], "kind": layer["kind"], "nodes": [n for n, _ in origins],
                "op_types": [t for _, t in origins], "graph_nodes": layer["nodes"], "tactic": choice["tactic"],
                "config": choice["config"],
                "tactics_per_profile": [c["tactic"] for c in layer["choices"]],
                "precision": layer["precision"], "layout": _layout(choice),
                "inputs": {n: layer["shapes"].get(n) for n in layer["inputs"]},
                "outputs": {n: layer["shapes"].get(n) for n in layer["outputs"] if n},
                "time_ms": ms, "share": (ms / total) if ms is not None and total > 0 else None,
                "notes": layer.get("notes", []), "stream": layer.get("stream", 0),
            })
        return rows

    def summary(self) -> dict[str, Any]:
        layers = self.plan["layers"]
        tactics: dict[str, int] = {}
        for layer in layers:
            tactics[layer["choices"][0]["tactic"]] = tactics.get(layer["choices"][0]["tactic"], 0) + 1
        precisions: dict[str, int] = {}
        for layer in layers:
            precisions[layer["precision"]] = precisions.get(layer["precision"], 0) + 1
        sizes = [len(layer.get("origins") or layer["nodes"]) for layer in layers]
        return {
            "layers": len(layers), "fused_layers": sum(1 for n in sizes if n > 1),
            "nodes": sum(sizes), "tactics": dict(sorted(tactics.items())),
            "precisions": dict(sorted(precisions.items())), "profiles": len(self.profiles),
            "weights_bytes": self.weights_bytes, "aux_streams": self.aux_streams,
        }

    # -- files --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], key: bytes | None = None) -> None:
        """Write the engine as one safetensors file, atomically; signed with ``key`` (bytes; by
        default the key file named by ``KILN_ENGINE_KEY``, if set)."""
        from safetensors.torch import save

        stored, layouts, aliases = {}, {}, {}
        seen: dict[tuple, str] = {}
        storages: set[int] = set()
        for name, tensor in sorted(self.tensors.items()):
            identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                        tuple(tensor.stride()), tensor.dtype, tensor.device)
            if identity in seen:  # one weight prepared identically for two layers: stored once
                aliases[name] = seen[identity]
                continue
            seen[identity] = name
            flat, perm = _storable(tensor)
            if (flat.untyped_storage().data_ptr() in storages
                    or flat.numel() != flat.untyped_storage().nbytes() // max(flat.element_size(), 1)):
                flat = flat.clone()
            storages.add(flat.untyped_storage().data_ptr())
            stored[name] = flat
            if perm is not None:
                layouts[name] = perm
        stored[_GRAPH_TENSOR] = (torch.frombuffer(bytearray(self.graph), dtype=torch.uint8) if self.graph
                                 else torch.zeros(0, dtype=torch.uint8))
        header = {"format": FORMAT, "version": VERSION, **environment(self.device), "plan": self.plan,
                  "layouts": layouts, "aliases": aliases}
        header["sha256"] = digest(header, stored)
        key = configured_key(key)
        metadata = {"kiln": json.dumps(header, sort_keys=True, separators=(",", ":"))}
        if key is not None:
            metadata[SIGNATURE_KEY] = _UNSIGNED
        data = save(stored, metadata=metadata)
        if key is not None:
            data = sign(data, key)
        write_atomically(path, lambda handle: handle.write(data))


def load_engine(path: str | os.PathLike[str], device: str | None = None, *, key: bytes | None = None) -> Engine:
    """Read an engine file, refusing (with ``EngineLoadError``) anything it cannot trust or run here.

    With a key (``key``, or the key file named by ``KILN_ENGINE_KEY``) the file must carry a valid
    signature made with it; without one, a signature is not checked. Either way every field is
    checked against ``kiln.engine_schema`` before anything is built from it."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = os.fspath(path)
    key = configured_key(key)
    data = _read_engine(path)
    if key is not None:
        verify(data, key, path)
    try:
        metadata = engine_schema.tensor_table(data, (SIGNATURE_KEY,))
        stored = load(data)
    except engine_schema.SchemaError as error:
        raise EngineLoadError(f"{path}: not a kiln engine, or truncated: {error}") from error
    except (SafetensorError, ValueError, RuntimeError, KeyError, OverflowError) as error:
        raise EngineLoadError(
            f"{path}: not a kiln engine, or truncated ({str(error).splitlines()[0][:200]})"
        ) from error
    header_text = metadata.get("kiln")
    if header_text is None:
        raise EngineLoadError(f"{path}: a safetensors file without kiln's plan; not a kiln engine")
    try:
        header = json.loads(header_text)
    except (ValueError, RecursionError) as error:
        raise EngineLoadError(f"{path}: the engine's plan is not valid JSON; the file is corrupt") from error
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise EngineLoadError(f"{path}: not a kiln engine")
    if header.get("version") != VERSION:
        raise EngineLoadError(f"{path}: engine format version {engine_schema.show(header.get('version'))}; "
                              f"this kiln reads version {VERSION}. Rebuild it")
    if header.get("sha256") != digest({k: v for k, v in header.items() if k != "sha256"}, stored):
        raise EngineLoadError(
            f"{path}: checksum mismatch: the engine file was modified or damaged after it was written; rebuild it"
        )
    try:
        engine_schema.check_header(header)
    except engine_schema.SchemaError as error:
        raise EngineLoadError(f"{path}: {error}; the engine file is corrupt or was edited") from error
    built_on = header["device"]
    if device not in (None, "cpu", "cuda"):
        raise EngineLoadError(f"{path}: device must be 'cpu' or 'cuda', got {device!r}")
    here = environment(torch.device(device or built_on))
    if header.get("kiln") != here["kiln"]:
        raise EngineLoadError(
            f"{path}: built by kiln {header.get('kiln')}, this is kiln {here['kiln']}; "
            "rebuild the engine with this version"
        )
    if device is not None and device != built_on:
        raise EngineLoadError(
            f"{path}: the engine was built for {built_on}, not {device}; rebuild it with --device {device}"
        )
    if built_on == "cuda":
        if not torch.cuda.is_available():
            raise EngineLoadError(
                f"{path}: the engine was built for CUDA ({header.get('gpu')}), and torch sees no CUDA GPU here"
            )
        if header.get("capability") != here.get("capability"):
            raise EngineLoadError(
                f"{path}: built for {header.get('gpu')} (compute capability {header.get('capability')}); this GPU is "
                f"{here.get('gpu')} ({here.get('capability')}). Rebuild the engine on this GPU"
            )
    graph_tensor = stored.pop(_GRAPH_TENSOR, torch.zeros(0, dtype=torch.uint8))
    if graph_tensor.dtype != torch.uint8 or graph_tensor.dim() != 1:
        raise EngineLoadError(f"{path}: the engine's graph is not a byte string; the file is corrupt")
    graph = graph_tensor.numpy().tobytes()
    nodes = _graph_nodes(graph, path)
    try:
        engine_schema.check_tensor_tables(header, stored, _GRAPH_TENSOR)
        tensors = {name: _restore(t, header.get("layouts", {}).get(name)) for name, t in stored.items()}
        tensors.update({name: tensors[target] for name, target in header.get("aliases", {}).items()})
        engine_schema.check_plan(header["plan"], tensors, built_on, nodes)
    except engine_schema.SchemaError as error:
        raise EngineLoadError(f"{path}: {error}; the engine file is corrupt or was edited") from error
    try:
        return Engine(header["plan"], tensors, graph, device=built_on, name=path)
    except KilnError:
        raise
    except Exception as error:  # noqa: BLE001 - a plan that does not fit together is a corrupt engine
        raise EngineLoadError(
            f"{path}: the engine's plan is inconsistent ({type(error).__name__}: {error}); rebuild it"
        ) from error


def _read_engine(path: str) -> bytes:
    """The file's bytes: a regular file (a FIFO in its place must not hang the load) within the size limit."""
    try:
        return read_regular_file(path, MAX_ENGINE_BYTES)
    except FileNotFoundError:
        raise EngineLoadError(f"{path}: cannot read the engine: no such file") from None
    except UnreadableFile as error:
        raise EngineLoadError(f"{path}: {error.reason}; cannot read it as an engine") from None


# sha256 of an embedded graph -> its checked main-graph nodes (a graph is checked once per process)
_CHECKED_GRAPHS: OrderedDict[str, dict[str, engine_schema.GraphNode]] = OrderedDict()


def _graph_nodes(graph: bytes, path: str) -> dict[str, engine_schema.GraphNode]:
    """The embedded graph's main-graph nodes by name, after the checks a model file gets."""
    from kiln.onnx_io import load_embedded_model

    graph_sha = hashlib.sha256(graph).hexdigest()
    nodes = _CHECKED_GRAPHS.get(graph_sha)
    if nodes is None:
        try:
            proto = load_embedded_model(graph, f"{path}: the engine's graph")
        except KilnError as error:
            raise EngineLoadError(str(error)) from error
        nodes = {
            node.name: engine_schema.GraphNode(node.op_type, len(node.input), len(node.output))
            for node in proto.graph.node
        }
        _CHECKED_GRAPHS[graph_sha] = nodes
        while len(_CHECKED_GRAPHS) > 16:
            _CHECKED_GRAPHS.popitem(last=False)
    return nodes


# -- signatures ---------------------------------------------------------------------------------

def read_key(path: str | os.PathLike[str]) -> bytes:
    """A signing key from a file: its bytes, surrounding whitespace ignored (so ``openssl rand -hex
    32 > engine.key`` makes one), at least ``MIN_KEY_BYTES`` long. Raises ``KilnError``."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise KilnError(f"engine key {path}: not a regular file")
            key = handle.read(MAX_KEY_BYTES + 1).strip()
    except OSError as error:
        raise KilnError(f"engine key {path}: cannot read it ({error.strerror or error})") from error
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise KilnError(
            f"engine key {path}: a key is {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes, this file holds {len(key)}; "
            "make one with: openssl rand -hex 32 > engine.key"
        )
    return key


def configured_key(key: bytes | None = None) -> bytes | None:
    """``key`` if given, else the key file named by ``KILN_ENGINE_KEY`` if that is set, else None."""
    if key is not None:
        if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
            raise KilnError(f"an engine key is at least {MIN_KEY_BYTES} bytes")
        return key
    named = os.environ.get(KEY_ENVIRONMENT)
    return read_key(named) if named else None


def sign(data: bytes, key: bytes) -> bytes:
    """An engine file's bytes, written with the unsigned placeholder, with its signature filled in."""
    mac = hmac.new(key, data, hashlib.sha256).hexdigest().encode()
    match = _signature_at(data)
    if match is None or match.group(1) != _UNSIGNED.encode():
        raise KilnError("internal error: the engine was written without a signature placeholder")
    return data[:match.start(1)] + mac + data[match.end(1):]


def verify(data: bytes, key: bytes, path: str) -> None:
    """Refuse a file that is unsigned, or whose HMAC-SHA256 over its bytes (the signature zeroed)
    is not the one it carries; nothing of the file is parsed before this."""
    match = _signature_at(data)
    if match is None:
        raise EngineLoadError(f"{path}: the engine is not signed, and a key is configured ({KEY_ENVIRONMENT} or key=); "
                              "rebuild it with --sign-key, or load it without a key")
    unsigned = data[:match.start(1)] + _UNSIGNED.encode() + data[match.end(1):]
    expected = hmac.new(key, unsigned, hashlib.sha256).hexdigest().encode()
    if not hmac.compare_digest(expected, match.group(1)):
        raise EngineLoadError(f"{path}: signature mismatch: the engine was modified after it was signed, or signed "
                              "with another key; refused")


def _signature_at(data: bytes) -> re.Match | None:
    """The one signature entry in the file's safetensors header, or None (none, or more than one)."""
    if len(data) < 8:
        return None
    length = int.from_bytes(data[:8], "little")
    if length > min(len(data) - 8, engine_schema.MAX_HEADER_BYTES):
        return None
    found = list(_SIGNATURE.finditer(data, 8, 8 + length))
    return found[0] if len(found) == 1 else None


def _layout(choice: Mapping) -> str:
    tactic = choice["tactic"]
    if tactic == "conv.nhwc" or choice["config"].get("layout") == "nhwc":
        return "NHWC"
    if tactic.startswith("conv."):
        return "NCHW"
    return "-"


def _storable(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int] | None]:
    """A contiguous CPU tensor to store, and the permutation that restores the original strides
    (channels_last weights are stored as their NHWC bytes, not converted)."""
    tensor = tensor.detach()
    if tensor.is_contiguous():
        return tensor.cpu(), None
    strides = tensor.stride()
    perm = sorted(range(tensor.dim()), key=lambda d: (-strides[d], d))
    return tensor.permute(perm).contiguous().cpu(), perm


def _restore(tensor: torch.Tensor, perm: list[int] | None) -> torch.Tensor:
    if perm is None:
        return tensor
    if not isinstance(perm, list) or not all(type(p) is int for p in perm) or sorted(perm) != list(range(tensor.dim())):
        raise EngineLoadError("a stored tensor's layout permutation does not fit its rank; the file is corrupt")
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return tensor.permute(inverse)


def digest(header: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> str:
    """The SHA-256 (hex) an engine file carries: over its header (without the digest) and every
    stored tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
