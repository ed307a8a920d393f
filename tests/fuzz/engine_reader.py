"""Fuzz target: reading an engine file, as ``kiln inspect`` and ``kiln run`` do.

Seeds are two small engines built on the CPU (conv + residual + relu, GEMM, softmax, a reference
op; GEMM + ReLU, LayerNorm, a pointwise chain, a Loop with a subgraph). Each case is one of them
with hostile edits:

- **plan**: a field of the header or plan (any depth) replaced by a hostile value (wrong type,
  huge or negative number, NaN, long string, nesting), deleted, or joined by an unknown field, with
  the checksum recomputed so the edit reaches the schema, as a forger's would;
- **tensors**: a weight's dtype, shape or presence changed, or a byte of the embedded graph, checksum recomputed;
- **header**: an entry of the safetensors header (dtype, shape, offsets) or its length field changed;
- **bytes**: bytes flipped, cut or appended anywhere.

``check`` loads the file, describes it (``kiln inspect``), and runs it on small random inputs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

NAME = "engine_reader"
MAX_RUN_ELEMENTS = 1 << 16
"""Inputs larger than this are not run (the run-time memory limits are not this target's subject)."""

_HOSTILE_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70),
    st.sampled_from([0, -1, 1, 2, 3, 7, 2**31 - 1, 2**31, 2**63, 2**64, 10**400, -10**400]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["", "fp8", "native", "conv.nchw", "conv.cudnn_fused", "gemm.triton", "node.reference",
                     "pointwise.torch", "Node", "Gemm", "float", "int64", "nhwc", "relu", "clip", "input", "const",
                     "Add", "Loop", "../../etc/passwd", "/etc/passwd", "x" * 5000]),
    st.lists(st.integers(-3, 2**33), max_size=5), st.just([]), st.just({}),
    st.dictionaries(st.text(max_size=4), st.integers(-2, 5), max_size=3),
    st.recursive(st.integers(0, 3), lambda inner: st.lists(inner, max_size=2), max_leaves=40),
)


# -- seeds -----------------------------------------------------------------------------------------

def _second_model() -> onnx.ModelProto:
    """GEMM + ReLU -> LayerNorm -> x * 0.5 + c -> tanh (pointwise chain) -> Loop(+ d) -> y."""
    rng = np.random.default_rng(0)
    body = helper.make_graph(
        [helper.make_node("Add", ["v_in", "d"], ["v_out"], name="body_add"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(np.full(8, 0.25, np.float32), "d")])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="matmul"),
        helper.make_node("Add", ["m", "b"], ["mb"], name="bias"),
        helper.make_node("Relu", ["mb"], ["r"], name="relu"),
        helper.make_node("LayerNormalization", ["r", "scale", "shift"], ["n"], name="norm", axis=-1),
        helper.make_node("Mul", ["n", "half"], ["h"], name="half_mul"),
        helper.make_node("Add", ["h", "c"], ["hc"], name="add_c"),
        helper.make_node("Tanh", ["hc"], ["t"], name="tanh"),
        helper.make_node("Loop", ["M", "cond", "t"], ["y"], name="loop", body=body),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w", (rng.standard_normal((8, 8)) * 0.3).astype(np.float32)), ("b", np.zeros(8, np.float32)),
        ("scale", np.ones(8, np.float32)), ("shift", np.zeros(8, np.float32)), ("half", np.array(0.5, np.float32)),
        ("c", (rng.standard_normal(8) * 0.1).astype(np.float32)), ("M", np.array(2, np.int64)),
        ("cond", np.array(True))]]
    graph = helper.make_graph(nodes, "second", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def prepare(folder: Path) -> list[bytes]:
    """The seed engines' bytes."""
    import kiln
    from kiln.builder.config import Profile
    from tests.builder.graphs import tiny_model

    seeds = []
    for name, model, profiles in (
        ("tiny", tiny_model(), []),
        ("second", _second_model(), [Profile.from_lists({"x": (1, 8)}, {"x": (2, 8)}, {"x": (4, 8)})]),
    ):
        onnx.save(model, folder / f"{name}.onnx")
        engine = kiln.build(folder / f"{name}.onnx", kiln.BuildConfig(device="cpu", opt_level=0, profiles=profiles))
        engine.save(folder / f"{name}.kiln")
        seeds.append((folder / f"{name}.kiln").read_bytes())
    return seeds


# -- mutations -------------------------------------------------------------------------------------

def _split(data: bytes) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    from safetensors.torch import load

    length = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8:8 + length])["__metadata__"]
    return json.loads(metadata["kiln"]), load(data), metadata


def _join(header: dict, stored: dict[str, torch.Tensor]) -> bytes:
    """An engine file with a recomputed (valid) checksum."""
    from safetensors.torch import save

    from kiln.engine import digest

    header = {k: v for k, v in header.items() if k != "sha256"}
    header["sha256"] = digest(header, stored)
    return save(stored, metadata={"kiln": json.dumps(header, sort_keys=True, separators=(",", ":"))})


def _paths(value: Any, path: tuple = ()) -> list[tuple]:
    """Every place in a JSON value (dict keys and list indices), depth first."""
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*path, index))
    return found


def _at(value: Any, path: tuple) -> Any:
    for step in path:
        value = value[step]
    return value


@st.composite
def _plan_edit(draw, seed: bytes) -> bytes:
    header, stored, _ = _split(seed)
    places = [p for p in _paths(header) if p]
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(places))
        try:
            parent = _at(header, path[:-1])
            parent[path[-1]]  # an earlier edit may have replaced this place
        except (KeyError, IndexError, TypeError):
            continue
        if not isinstance(parent, (dict, list)):  # a string an earlier edit put here indexes too
            continue
        action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add", "copy"]))
        key = path[-1]
        if action == "replace" or (action == "delete" and isinstance(parent, list)):
            parent[key] = draw(_HOSTILE_VALUES)
        elif action == "delete":
            parent.pop(key, None)
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=6))] = draw(_HOSTILE_VALUES)
        elif action == "copy":  # another place's value here: right types, wrong place
            try:
                parent[key] = json.loads(json.dumps(_at(header, draw(st.sampled_from(places)))))
            except (KeyError, IndexError, TypeError):
                pass
    return _join(header, stored)


@st.composite
def _tensor_edit(draw, seed: bytes) -> bytes:
    header, stored, _ = _split(seed)
    names = sorted(stored)
    name = draw(st.sampled_from(names))
    action = draw(st.sampled_from(["dtype", "reshape", "drop", "add", "graph"]))
    if action == "dtype":
        dtype = draw(st.sampled_from([torch.float16, torch.int64, torch.uint8, torch.bool, torch.float64]))
        stored[name] = stored[name].to(dtype)
    elif action == "reshape":
        stored[name] = stored[name].reshape(-1) if stored[name].dim() != 1 else stored[name].reshape(1, -1)
    elif action == "drop":
        stored.pop(name)
    elif action == "add":
        key = draw(st.sampled_from(["x", f"{name}.extra", "0.conv.nchw.z", "__graph__2"]))
        stored[key] = torch.zeros(draw(st.integers(0, 4)))
    else:
        graph = bytearray(stored["__graph__"].numpy().tobytes())
        if graph:
            graph[draw(st.integers(0, len(graph) - 1))] ^= 1 << draw(st.integers(0, 7))
        stored["__graph__"] = torch.frombuffer(graph, dtype=torch.uint8) if graph else torch.zeros(0, dtype=torch.uint8)
    return _join(header, stored)


@st.composite
def _header_edit(draw, seed: bytes) -> bytes:
    length = int.from_bytes(seed[:8], "little")
    table = json.loads(seed[8:8 + length])
    body = seed[8 + length:]
    action = draw(st.sampled_from(["entry", "entry", "length", "duplicate", "metadata"]))
    if action == "length":
        value = draw(st.one_of(st.integers(0, 2**64 - 1),
                               st.sampled_from([0, 1, length - 1, length + 1, len(seed), 2**63])))
        return value.to_bytes(8, "little") + seed[8:]
    if action == "entry":
        name = draw(st.sampled_from(sorted(k for k in table if k != "__metadata__")))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        table[name][field] = draw(st.one_of(_HOSTILE_VALUES,
                                            st.sampled_from(["F4", "F8_E8M0", "U8", "BOOL", "C64", "F64"]),
                                            st.lists(st.integers(0, 2**64), max_size=3)))
        text = json.dumps(table).encode()
    elif action == "duplicate":
        name = draw(st.sampled_from(sorted(table)))
        text = json.dumps(table).encode()[:-1] + b"," + json.dumps({name: table[name]}).encode()[1:]
    else:
        table["__metadata__"][draw(st.sampled_from(["kiln", "extra", "kiln-hmac-sha256"]))] = draw(_HOSTILE_VALUES)
        text = json.dumps(table).encode()
    return len(text).to_bytes(8, "little") + text + body


@st.composite
def _byte_edit(draw, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "cut", "append"]))
        if action == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del data[draw(st.integers(0, len(data))):]
        else:
            data += draw(st.binary(max_size=64))
    return bytes(data)


def cases(seeds: list[bytes]):
    seed = st.sampled_from(seeds)
    return st.one_of(
        seed.flatmap(_plan_edit), seed.flatmap(_plan_edit), seed.flatmap(_plan_edit),
        seed.flatmap(_tensor_edit), seed.flatmap(_header_edit), seed.flatmap(_byte_edit),
    )


# -- the check -------------------------------------------------------------------------------------

def check(seeds: list[bytes], case: bytes, folder: Path) -> None:
    """Load the case, describe it as ``kiln inspect --json`` does, and run it on small random inputs."""
    from kiln import inputs
    from kiln.engine import load_engine

    path = folder / "case.kiln"
    path.write_bytes(case)
    engine = load_engine(path)
    json.dumps({"summary": engine.summary(), "profiles": engine.plan["profiles"], "layers": engine.describe()})
    opt = {name: ranges[1] for name, ranges in engine.plan["profiles"][0].items()}
    values = inputs.engine_input_values(engine)
    shapes = {v.name: opt.get(v.name) or [d if isinstance(d, int) else 1 for d in (v.shape or [])] for v in values}
    if any(math.prod(s) > MAX_RUN_ELEMENTS for s in shapes.values()):
        return
    engine.run(inputs.random_inputs(values, shapes), timeout_s=5.0)  # as --timeout-s: a plan can ask for a long loop
