"""What an engine file may hold: the schema every engine is checked against before anything is built from it.

An engine file is untrusted input. Its SHA-256 catches damage, and a key (``kiln.engine``'s HMAC)
proves who wrote it; this schema is what contains a file that is neither damaged nor signed by
someone you trust. Every field that the engine, the runtime, ``kiln inspect`` and the tactics read
is checked here for its type and range, and against the rest of the file:

1. the safetensors header, before safetensors parses it (``tensor_table``): its length fits the
   file, no key appears twice, every dtype is one torch holds, every shape has at most ``MAX_RANK``
   dims of at most ``MAX_DIM``, and offsets lie inside the file;
2. the tensor layout and alias tables (``check_tensor_tables``);
3. the plan (``check_plan``): inputs and outputs (names, dtypes kiln holds, shapes within limits;
   an output that is a constant names a stored tensor of its dtype, and nothing else writes it),
   profiles (one per input at most, ``0 <= min <= opt <= max``), and per layer its kind, its
   attributes (one table per kind), its precision (``kiln.precision.PRECISIONS`` or "native"), a
   registered tactic of its kind for the engine's device and precision per profile, with one of
   that tactic's own configs, value names written exactly once and read only after they are
   written, streams within ``aux_streams``, and prepared weights present under every role with the
   dtype and shape the tactic prepares; Node layers must name a node of the embedded graph with as
   many inputs and outputs.

A file that passes can at worst compute wrong numbers. Errors name the field
(``plan.layers[3].choices[0].tactic``). A field the builder adds to the plan must be added here:
unknown fields are refused, so nothing reads a field this module has not checked.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

MAX_RANK = 64
MAX_DIM = 2**31 - 1
MAX_NAME = 4096
MAX_PROFILES = 1024
MAX_AUX_STREAMS = 1024
MAX_HEADER_BYTES = 100_000_000
"""safetensors' own limit on its JSON header."""

# safetensors dtype names torch can load, and their sizes in bytes
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "C64": 8, "I64": 8, "U64": 8, "F64": 8,
}

KINDS = ("Conv", "Gemm", "LayerNorm", "Softmax", "Attention", "Pointwise", "Node")


class SchemaError(Exception):
    """A field of an engine file that is missing, of the wrong type or out of range (``where`` names it)."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where} {problem}")
        self.where = where


@dataclass(frozen=True)
class GraphNode:
    """What a Node layer needs of its node in the engine's embedded graph."""

    op_type: str
    inputs: int
    outputs: int


# -- field checks ---------------------------------------------------------------------------------

def show(value: Any) -> str:
    """A value, short, for a message (a huge integer by its size, a long string cut)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**18:
        return f"a {value.bit_length()}-bit integer"
    text = json.dumps(value) if isinstance(value, str | bool | int | float) or value is None else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _int(value: Any, where: str, lo: int = 0, hi: int = MAX_DIM) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise SchemaError(where, f"must be an integer in [{lo}, {hi}], not {show(value)}")
    return value


def _bool(value: Any, where: str) -> bool:
    if type(value) is not bool:
        raise SchemaError(where, f"must be true or false, not {show(value)}")
    return value


def _number(value: Any, where: str, *, finite: bool = True, lo: float = -math.inf) -> float:
    """A JSON number (an int small enough to be a float, or a float), finite unless told otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or (isinstance(value, int) and abs(value) > 2**63):
        raise SchemaError(where, f"must be a number, not {show(value)}")
    value = float(value)
    if (finite and not math.isfinite(value)) or value < lo or (math.isnan(value) and lo > -math.inf):
        raise SchemaError(where, f"must be a {'finite ' if finite else ''}number >= {lo}, not {show(value)}")
    return value


def _str(value: Any, where: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or len(value) > MAX_NAME or (not empty and not value):
        raise SchemaError(
            where,
            f"must be a {'' if empty else 'non-empty '}string of at most {MAX_NAME} characters, not {show(value)}",
        )
    return value


def _list(value: Any, where: str, length: int | None = None, *, at_least: int = 0) -> list:
    if not isinstance(value, list):
        raise SchemaError(where, f"must be a list, not {show(value)}")
    if length is not None and len(value) != length:
        raise SchemaError(where, f"must have {length} items, not {len(value)}")
    if len(value) < at_least:
        raise SchemaError(where, f"must have at least {at_least} item(s)")
    return value


def _strs(value: Any, where: str, *, empty: bool = False, unique: bool = False) -> list[str]:
    items = [_str(v, f"{where}[{i}]", empty=empty) for i, v in enumerate(_list(value, where))]
    if unique and len(set(items)) != len(items):
        raise SchemaError(where, "names a value twice")
    return items


def _dict(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise SchemaError(where, f"must be an object, not {show(value)}")
    return value


def _object(value: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    """An object with these fields (and no others)."""
    _dict(value, where)
    missing = [k for k in required if k not in value]
    if missing:
        raise SchemaError(where, f"lacks {missing}")
    unknown = sorted(set(value) - set(required) - set(optional))
    if unknown:
        raise SchemaError(where, f"has unknown field(s) {[show(k) for k in unknown[:5]]}")
    return value


def _choice(value: Any, where: str, choices) -> Any:
    if not isinstance(value, str) or value not in choices:
        raise SchemaError(where, f"must be one of {sorted(choices)}, not {show(value)}")
    return value


def _shape(value: Any, where: str, *, dynamic: bool = False) -> list:
    """A list of at most MAX_RANK dims in [0, MAX_DIM] (None for a dynamic one where allowed)."""
    _list(value, where)
    if len(value) > MAX_RANK:
        raise SchemaError(where, f"has rank {len(value)}, more than {MAX_RANK}")
    for axis, dim in enumerate(value):
        if not (dynamic and dim is None):
            _int(dim, f"{where}[{axis}]")
    return value


# -- the safetensors header -------------------------------------------------------------------------

def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise SchemaError("the safetensors header", f"names {show(next(k for k in keys if keys.count(k) > 1))} twice")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise SchemaError("the safetensors header", f"holds {name}, which is not JSON")


def tensor_table(data: bytes, metadata_keys: tuple[str, ...]) -> dict[str, str]:
    """Check a safetensors file's header (what safetensors itself leaves unchecked, and what must be
    refused before it allocates anything) and return its ``__metadata__`` block."""
    if len(data) < 8:
        raise SchemaError("the file", f"is {len(data)} bytes, too short for a safetensors header")
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8 or length > MAX_HEADER_BYTES:
        raise SchemaError("the safetensors header length", f"({length}) runs past the end of the {len(data)}-byte file")
    try:
        header = json.loads(
            data[8:8 + length].decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise SchemaError("the safetensors header", f"is not valid JSON ({type(error).__name__})") from None
    _dict(header, "the safetensors header")
    size = len(data) - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            meta = _object(entry, "the safetensors metadata", ("kiln",), tuple(metadata_keys))
            for key, text in meta.items():
                if not isinstance(text, str):  # safetensors refuses it too, less clearly
                    raise SchemaError(f"the safetensors metadata {key!r}", "must be a string")
            continue
        where = f"tensor {show(name)}"
        _str(name, where)
        _object(entry, where, ("dtype", "shape", "data_offsets"))
        itemsize = SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if itemsize is None:
            raise SchemaError(
                f"{where}.dtype", f"must be one of {sorted(SAFETENSORS_DTYPES)}, not {show(entry['dtype'])}"
            )
        count = math.prod(_shape(entry["shape"], f"{where}.shape"))
        begin, end = (
            _int(o, f"{where}.data_offsets[{i}]", 0, size)
            for i, o in enumerate(_list(entry["data_offsets"], f"{where}.data_offsets", 2))
        )
        if end - begin != count * itemsize:
            raise SchemaError(
                where, f"has shape {entry['shape']} ({count * itemsize} bytes) but offsets {begin}..{end}"
            )
    return header.get("__metadata__", {})


# -- the header ------------------------------------------------------------------------------------

_HEADER_FIELDS = ("format", "version", "kiln", "torch", "device", "plan", "layouts", "aliases", "sha256")
_ENVIRONMENT_FIELDS = ("kiln", "torch", "gpu", "capability", "triton")


def check_header(header: Mapping[str, Any]) -> None:
    """The fields around the plan: versions and GPU as short strings, the device kiln engines run on."""
    _object(header, "the header", _HEADER_FIELDS, ("gpu", "capability", "triton"))
    _int(header["version"], "the header's 'version'")  # equal to kiln's already; not true, which == 1
    for field in _ENVIRONMENT_FIELDS:
        if field in header and (not isinstance(header[field], str) or len(header[field]) > 256):
            raise SchemaError(
                f"the header's {field!r}", f"must be a string of at most 256 characters, not {show(header[field])}"
            )
    _choice(header["device"], "the header's 'device'", ("cpu", "cuda"))


# -- layouts and aliases ----------------------------------------------------------------------------

def check_tensor_tables(header: Mapping[str, Any], stored: Mapping[str, torch.Tensor], graph_tensor: str) -> None:
    """The layout permutations (per stored tensor) and the aliases (a name for a stored tensor)."""
    weights = set(stored) - {graph_tensor}
    layouts = header.get("layouts", {})
    if not isinstance(layouts, dict):
        raise SchemaError("layouts", "must be an object of tensor name -> permutation")
    for name, perm in layouts.items():
        where = f"layouts[{show(name)}]"
        if name not in weights:
            raise SchemaError(where, "names no stored weight")
        if (not isinstance(perm, list)
                or sorted(p if type(p) is int else -1 for p in perm) != list(range(stored[name].dim()))):
            raise SchemaError(where, f"is not a permutation of the tensor's {stored[name].dim()} dims")
    aliases = header.get("aliases", {})
    if not isinstance(aliases, dict):
        raise SchemaError(
            "aliases", "must be an object of tensor name -> stored tensor name (the tensor aliases are inconsistent)"
        )
    for name, target in aliases.items():
        where = f"aliases[{show(name)}]"
        _str(name, where)
        if name in stored or name == graph_tensor:
            raise SchemaError(where, "names a stored tensor (the tensor aliases are inconsistent)")
        if not isinstance(target, str) or target not in weights:
            raise SchemaError(
                where, f"points at {show(target)}, not a stored weight (the tensor aliases are inconsistent)"
            )


# -- the plan ----------------------------------------------------------------------------------

def _activation(value: Any, where: str) -> None:
    if value is None:
        return
    op = _choice(_object(value, where, ("op",), ("alpha", "beta", "min", "max"))["op"], f"{where}.op", _ACTIVATIONS)
    _object(value, where, ("op", *_ACTIVATIONS[op]))
    for name in _ACTIVATIONS[op]:
        if op == "clip":
            if value[name] is not None:
                _number(value[name], f"{where}.{name}", finite=False)
        else:
            _number(value[name], f"{where}.{name}")


_ACTIVATIONS = {"relu": (), "sigmoid": (), "tanh": (), "silu": (), "hardswish": (), "gelu_erf": (), "gelu_tanh": (),
                "leaky_relu": ("alpha",), "hardsigmoid": ("alpha", "beta"), "clip": ("min", "max")}


def _conv_attrs(attrs: dict, where: str, layer: dict) -> int:
    _object(attrs, where, ("strides", "pads", "dilations", "group", "residual", "activation"), ("layout",))
    for name, count, lo in (("strides", 2, 1), ("pads", 4, 0), ("dilations", 2, 1)):
        for i, v in enumerate(_list(attrs[name], f"{where}.{name}", count)):
            _int(v, f"{where}.{name}[{i}]", lo)
    _int(attrs["group"], f"{where}.group", 1)
    _activation(attrs["activation"], f"{where}.activation")
    if "layout" in attrs:
        _choice(attrs["layout"], f"{where}.layout", ("nchw", "nhwc"))
    return 1 + _bool(attrs["residual"], f"{where}.residual")


def _gemm_attrs(attrs: dict, where: str, layer: dict) -> int:
    _object(attrs, where, ("alpha", "beta", "trans_b", "activation", "k", "n"))
    _number(attrs["alpha"], f"{where}.alpha", finite=False)
    _number(attrs["beta"], f"{where}.beta", finite=False)
    _bool(attrs["trans_b"], f"{where}.trans_b")
    _int(attrs["k"], f"{where}.k", 1)
    _int(attrs["n"], f"{where}.n", 1)
    _activation(attrs["activation"], f"{where}.activation")
    return 1


def _layernorm_attrs(attrs: dict, where: str, layer: dict) -> int:
    _object(attrs, where, ("axis", "epsilon", "residual"))
    _int(attrs["axis"], f"{where}.axis", 0, MAX_RANK - 1)
    _number(attrs["epsilon"], f"{where}.epsilon", lo=0.0)
    return 1 + _bool(attrs["residual"], f"{where}.residual")


def _softmax_attrs(attrs: dict, where: str, layer: dict) -> int:
    _bool(_object(attrs, where, ("log",))["log"], f"{where}.log")
    return 1


def _attention_attrs(attrs: dict, where: str, layer: dict) -> int:
    _object(attrs, where, ("scale", "mask", "nan_to_zero"))
    _number(attrs["scale"], f"{where}.scale", finite=False)
    _bool(attrs["nan_to_zero"], f"{where}.nan_to_zero")
    # a constant mask (a causal mask folded at static shapes) is the layer's weight, not an input
    return 3 + (_bool(attrs["mask"], f"{where}.mask") and "mask" not in layer.get("weights", {}))


def _pointwise_attrs(attrs: dict, where: str, layer: dict) -> int:
    from kiln.activations import BINARY, ELEMENTWISE, FLOAT_ATTRS, VARIADIC

    _object(attrs, where, ("program",))
    count = len(layer["inputs"]) + len(layer["weights"])
    program = _list(attrs["program"], f"{where}.program", at_least=1)
    for i, step in enumerate(program):
        at = f"{where}.program[{i}]"
        op = _object(step, at, ("op",), ("index", "value", "args", "attrs")).get("op")
        if op == "input":
            _int(_object(step, at, ("op", "index"))["index"], f"{at}.index", 0, count - 1)
            continue
        if op == "const":
            _number(_object(step, at, ("op", "value"))["value"], f"{at}.value", finite=False)
            continue
        op = _choice(op, f"{at}.op", ELEMENTWISE)
        _object(step, at, ("op", "args", "attrs"))
        for k, arg in enumerate(_list(step["args"], f"{at}.args", 2 if op in BINARY or op in VARIADIC else 1)):
            _int(arg, f"{at}.args[{k}]", 0, i - 1)
        if op == "Clip":
            for name, bound in _object(step["attrs"], f"{at}.attrs", ("min", "max")).items():
                if bound is not None:
                    _number(bound, f"{at}.attrs.{name}", finite=False)
        elif op == "Gelu":
            if "approximate" in _object(step["attrs"], f"{at}.attrs", (), ("approximate",)):
                _choice(step["attrs"]["approximate"], f"{at}.attrs.approximate", ("none", "tanh"))
        else:
            for name, v in _object(step["attrs"], f"{at}.attrs", (), tuple(FLOAT_ATTRS.get(op, ()))).items():
                _number(v, f"{at}.attrs.{name}", finite=False)
    if program[-1]["op"] in ("input", "const"):
        raise SchemaError(f"{where}.program", "must end with an op")
    if sorted(layer["weights"]) != sorted(f"c{i}" for i in range(len(layer["weights"]))):
        raise SchemaError(
            f"{where[:-len('.attrs')]}.weights", "must be the roles c0, c1, ... of the program's constant inputs"
        )
    return len(layer["inputs"])


def _node_attrs(attrs: dict, where: str, layer: dict) -> int:
    _object(attrs, where, ("args", "captured", "captured_weights"))
    captured = _strs(attrs["captured"], f"{where}.captured", unique=True)
    runtime = len(layer["inputs"]) - len(captured)
    if runtime < 0 or layer["inputs"][runtime:] != captured:
        raise SchemaError(f"{where}.captured", "must be the layer's last inputs")
    weights = set(_strs(attrs["captured_weights"], f"{where}.captured_weights", unique=True))
    for i, arg in enumerate(_list(attrs["args"], f"{where}.args")):
        at = f"{where}.args[{i}]"
        if arg is None:
            continue
        key = next(iter(arg), None) if isinstance(arg, dict) and len(arg) == 1 else None
        if key == "input":
            _int(arg["input"], f"{at}.input", 0, runtime - 1)
        elif key == "weight":
            weights.add(_str(arg["weight"], f"{at}.weight"))
        else:
            raise SchemaError(at, 'must be null, {"input": N} or {"weight": NAME}')
    if sorted(weights) != sorted(layer["weights"]):
        raise SchemaError(
            f"{where[:-len('.attrs')]}.weights", "must name exactly the weights the node's args and subgraphs read"
        )
    return len(layer["inputs"])


_KIND_ATTRS: dict[str, Callable[[dict, str, dict], int]] = {
    "Conv": _conv_attrs, "Gemm": _gemm_attrs, "LayerNorm": _layernorm_attrs, "Softmax": _softmax_attrs,
    "Attention": _attention_attrs, "Pointwise": _pointwise_attrs, "Node": _node_attrs,
}
# weight roles per kind: (required, optional); Pointwise and Node layers are checked with their attrs
_KIND_WEIGHTS = {"Conv": (("w",), ("b",)), "Gemm": (("w",), ("b",)), "LayerNorm": (("scale",), ("bias",)),
                 "Softmax": ((), ()), "Attention": ((), ("mask",))}
# roles whose dtype is the model's own (a boolean or additive mask), not the layer's precision
_ANY_DTYPE_ROLES = {("Attention", "mask")}

_LAYER_FIELDS = ("name", "kind", "nodes", "op_types", "inputs", "outputs", "attrs", "weights", "precision",
                 "cast_inputs", "shapes", "choices")
_LAYER_OPTIONAL = ("origins", "notes", "stream")


def _dtype_names() -> dict[str, Any]:
    from kiln import dtypes

    return {dtypes.onnx_name(dt): dt for dt in dtypes.TORCH_DTYPES}


def _check_io(plan: dict) -> tuple[list[str], dict[str, list | None]]:
    names = _dtype_names()
    inputs: dict[str, list | None] = {}
    for i, spec in enumerate(_list(plan["inputs"], "plan.inputs")):
        where = f"plan.inputs[{i}]"
        _object(spec, where, ("name", "dtype", "shape"))
        name = _str(spec["name"], f"{where}.name")
        if name in inputs:
            raise SchemaError(f"{where}.name", f"repeats input {show(name)}")
        _choice(spec["dtype"], f"{where}.dtype", names)
        inputs[name] = None if spec["shape"] is None else _shape(spec["shape"], f"{where}.shape", dynamic=True)
    outputs = []
    for i, spec in enumerate(_list(plan["outputs"], "plan.outputs", at_least=1)):
        where = f"plan.outputs[{i}]"
        _object(spec, where, ("name", "dtype"), ("constant",))
        outputs.append(_str(spec["name"], f"{where}.name"))
        _choice(spec["dtype"], f"{where}.dtype", names)
        if "constant" in spec:
            _str(spec["constant"], f"{where}.constant")
    if len(set(outputs)) != len(outputs):
        raise SchemaError("plan.outputs", "names an output twice")
    return outputs, inputs


def _check_profiles(plan: dict, inputs: dict[str, list | None]) -> int:
    profiles = _list(plan["profiles"], "plan.profiles", at_least=1)
    if len(profiles) > MAX_PROFILES:
        raise SchemaError("plan.profiles", f"has {len(profiles)} profiles, more than {MAX_PROFILES}")
    for k, profile in enumerate(profiles):
        if not isinstance(profile, dict):
            raise SchemaError(f"plan.profiles[{k}]", "must be an object of input name -> [min, opt, max]")
        for name, ranges in profile.items():
            where = f"plan.profiles[{k}][{show(name)}]"
            if name not in inputs:
                raise SchemaError(where, "names no input of the engine")
            lo, opt, hi = (_shape(s, f"{where}[{j}]") for j, s in enumerate(_list(ranges, where, 3)))
            declared = inputs[name]
            if not len(lo) == len(opt) == len(hi) or (declared is not None and len(lo) != len(declared)):
                raise SchemaError(where, "has shapes of different ranks (or not the input's rank)")
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise SchemaError(where, "must have min <= opt <= max on every axis")
    return len(profiles)


def _check_choices(layer: dict, where: str, profiles: int, device: str, tensors: _Tensors) -> None:
    from kiln.builder.layers import Layer
    from kiln.builder.tactics import registry

    kind, precision = layer["kind"], layer["precision"]
    as_layer = Layer(name=layer["name"], kind=kind, nodes=layer["nodes"], inputs=layer["inputs"],
                     outputs=layer["outputs"], attrs=layer["attrs"], weights=layer["weights"],
                     op_types=layer["op_types"], origins=layer.get("origins", []))
    for p, choice in enumerate(_list(layer["choices"], f"{where}.choices", profiles)):
        at = f"{where}.choices[{p}]"
        _object(choice, at, ("tactic", "config", "time_ms", "weights", "roles"))
        t = registry.get(choice["tactic"]) if isinstance(choice["tactic"], str) else None
        if t is None or t.kind != kind:
            raise SchemaError(f"{at}.tactic", f"names unknown tactic {show(choice['tactic'])} for a {kind} layer")
        if device not in t.devices or precision not in t.precisions:
            raise SchemaError(f"{at}.tactic", f"{t.name} does not run on {device} at {precision}")
        _dict(choice["config"], f"{at}.config")
        if not t.supports(as_layer, precision, device):
            raise SchemaError(f"{at}.tactic", f"{t.name} does not support this layer")
        if choice["config"] not in [c for level in range(6) for c in t.configs(as_layer, level, precision, device)]:
            raise SchemaError(f"{at}.config", f"is not a configuration of {t.name}")
        if choice["time_ms"] is not None:
            _number(choice["time_ms"], f"{at}.time_ms", lo=0.0)
        prefix = _str(choice["weights"], f"{at}.weights")
        roles = _strs(choice["roles"], f"{at}.roles", unique=True)
        held = tensors.under(prefix + ".")
        if sorted(held) != sorted(roles):
            raise SchemaError(
                f"{at}.roles", f"lists {sorted(roles)[:8]}, the engine holds {sorted(held)[:8]} under {show(prefix)}"
            )
        _check_weights(layer, at, held)


def _check_weights(layer: dict, where: str, held: dict[str, torch.Tensor]) -> None:
    """The prepared weights' dtypes and shapes, where the kind fixes them."""
    from kiln.precision import PRECISION_DTYPES

    kind, attrs = layer["kind"], layer["attrs"]
    if kind in _KIND_WEIGHTS:
        required, optional = _KIND_WEIGHTS[kind]
        if not set(required) <= set(held) or not set(held) <= set(required) | set(optional):
            raise SchemaError(f"{where}.roles", f"must be {list(required)} with optional {list(optional)}")
        want = PRECISION_DTYPES[layer["precision"]]
        for role, tensor in held.items():
            if tensor.dtype != want and (kind, role) not in _ANY_DTYPE_ROLES:
                raise SchemaError(f"{where}.roles", f"weight {role!r} is {tensor.dtype}, the layer computes in {want}")
    elif set(held) != set(layer["weights"]):  # Pointwise and Node layers prepare one tensor per weight
        raise SchemaError(f"{where}.roles", f"must be the layer's weights {sorted(layer['weights'])[:8]}")
    if kind == "Pointwise" and any(t.dtype != torch.float32 for t in held.values()):
        raise SchemaError(f"{where}.roles", "pointwise constants must be float32")
    shape = {role: list(t.shape) for role, t in held.items()}
    if kind == "Conv":
        w = shape["w"]
        if len(w) != 4 or w[0] % attrs["group"] or ("b" in shape and shape["b"] != w[:1]):
            raise SchemaError(f"{where}.roles", f"conv weights must be [O, C/group, kH, kW] and bias [O], not {shape}")
    elif kind == "Gemm":
        if shape["w"] != [attrs["n"], attrs["k"]] or ("b" in shape and shape["b"] != [attrs["n"]]):
            raise SchemaError(
                f"{where}.roles", f"GEMM weights must be [n, k] = {[attrs['n'], attrs['k']]} and bias [n], not {shape}"
            )


class _Tensors:
    """Tensor names sorted, to find those under a prefix without scanning them all."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.names = sorted(tensors)

    def under(self, prefix: str) -> dict[str, torch.Tensor]:
        found = {}
        for name in self.names[bisect.bisect_left(self.names, prefix):]:
            if not name.startswith(prefix):
                break
            found[name[len(prefix):]] = self.tensors[name]
        return found


def check_plan(plan: Any, tensors: Mapping[str, torch.Tensor], device: str, nodes: Mapping[str, GraphNode]) -> None:
    """Check an engine's plan against this module's schema (see the module docstring); ``tensors``
    are its weights (aliases resolved), ``nodes`` the main-graph nodes of its embedded graph."""
    from kiln.builder.schedule import static_layers
    from kiln.precision import PRECISIONS

    _object(
        plan, "plan", ("name", "inputs", "outputs", "profiles", "layers"), ("aux_streams", "opsets", "config", "passes")
    )
    _str(plan["name"], "plan.name")
    aux = _int(plan.get("aux_streams", 0), "plan.aux_streams", 0, MAX_AUX_STREAMS)
    for field in ("opsets", "passes"):
        for key, value in _dict(plan.get(field, {}), f"plan.{field}").items():
            _str(key, f"plan.{field} key", empty=True)
            _int(value, f"plan.{field}[{show(key)}]", 0, 2**31)
    _dict(plan.get("config", {}), "plan.config")
    outputs, inputs = _check_io(plan)
    profiles = _check_profiles(plan, inputs)
    written = set(inputs)
    indexed = _Tensors(tensors)
    layers = _list(plan["layers"], "plan.layers")
    for index, layer in enumerate(layers):
        where = f"plan.layers[{index}]"
        _object(layer, where, _LAYER_FIELDS, _LAYER_OPTIONAL)
        _str(layer["name"], f"{where}.name")
        kind = _choice(layer["kind"], f"{where}.kind", KINDS)
        names = _strs(layer["nodes"], f"{where}.nodes")
        if not names or len(_strs(layer["op_types"], f"{where}.op_types")) != len(names):
            raise SchemaError(f"{where}.op_types", "must name one op type per node, and a layer has at least one node")
        for i, origin in enumerate(_list(layer.get("origins", []), f"{where}.origins")):
            _strs(_list(origin, f"{where}.origins[{i}]", 2), f"{where}.origins[{i}]", empty=True)
        for i, note in enumerate(_list(layer.get("notes", []), f"{where}.notes")):
            if not isinstance(note, str):
                raise SchemaError(f"{where}.notes[{i}]", "must be a string")
        reads = _strs(layer["inputs"], f"{where}.inputs")
        for i, name in enumerate(reads):
            if name not in written:
                raise SchemaError(f"{where}.inputs[{i}]", f"reads {show(name)} before anything writes it")
        made = _strs(layer["outputs"], f"{where}.outputs", empty=kind == "Node")
        if not any(made):
            raise SchemaError(f"{where}.outputs", "must name at least one value")
        for i, name in enumerate(made):
            if name and name in written or name and made.count(name) > 1:
                raise SchemaError(f"{where}.outputs[{i}]", f"writes {show(name)}, which is written elsewhere too")
        if kind != "Node" and len(made) != 1:
            raise SchemaError(f"{where}.outputs", f"a {kind} layer writes one value")
        written.update(n for n in made if n)
        weights = _dict(layer["weights"], f"{where}.weights")
        for role, constant in weights.items():
            _str(role, f"{where}.weights key")
            _str(constant, f"{where}.weights[{show(role)}]")
        if kind in _KIND_WEIGHTS:
            required, optional = _KIND_WEIGHTS[kind]
            if not set(required) <= set(weights) <= set(required) | set(optional):
                raise SchemaError(
                    f"{where}.weights", f"a {kind} layer has roles {list(required)} and optionally {list(optional)}"
                )
        arity = _KIND_ATTRS[kind](_dict(layer["attrs"], f"{where}.attrs"), f"{where}.attrs", layer)
        if len(reads) != arity:
            raise SchemaError(
                f"{where}.inputs", f"a {kind} layer with these attributes reads {arity} value(s), not {len(reads)}"
            )
        _choice(layer["precision"], f"{where}.precision", (*PRECISIONS, "native"))
        casts = [
            _int(c, f"{where}.cast_inputs[{i}]", 0, len(reads) - 1)
            for i, c in enumerate(_list(layer["cast_inputs"], f"{where}.cast_inputs"))
        ]
        if len(set(casts)) != len(casts):
            raise SchemaError(f"{where}.cast_inputs", "lists an input twice")
        for name, shape in _dict(layer["shapes"], f"{where}.shapes").items():
            if shape is not None:
                _shape(shape, f"{where}.shapes[{show(name)}]", dynamic=True)
        _int(layer.get("stream", 0), f"{where}.stream", 0, aux)
        if kind == "Node":
            node = nodes.get(names[0])
            if len(names) != 1 or node is None or node.op_type != layer["op_types"][0]:
                raise SchemaError(f"{where}.nodes", f"must name one {layer['op_types'][0]} node of the engine's graph")
            if len(layer["attrs"]["args"]) != node.inputs or len(made) != node.outputs:
                raise SchemaError(
                    f"{where}.attrs.args",
                    f"node {show(names[0])} has {node.inputs} input(s) and {node.outputs} output(s)",
                )
        _check_choices(layer, where, profiles, device, indexed)
    from kiln import dtypes

    dtype_names = _dtype_names()
    for i, spec in enumerate(plan["outputs"]):  # constant outputs: a stored tensor of the output's dtype
        if "constant" not in spec:
            continue
        where = f"plan.outputs[{i}]"
        tensor = tensors.get(spec["constant"])
        if not isinstance(tensor, torch.Tensor):
            raise SchemaError(f"{where}.constant", f"names {show(spec['constant'])}, not a stored tensor")
        if tensor.dtype != dtypes.to_torch_dtype(dtype_names[spec["dtype"]]):
            raise SchemaError(f"{where}.constant", f"is {tensor.dtype}, the output's dtype is {spec['dtype']}")
        if spec["name"] in written:
            raise SchemaError(
                f"{where}.name", f"names {show(spec['name'])}, which is also an input or a layer's output"
            )
        written.add(spec["name"])
    for i, name in enumerate(outputs):
        if name not in written:
            raise SchemaError(f"plan.outputs[{i}].name", f"names {show(name)}, which nothing in the plan produces")
    for index, (layer, is_static) in enumerate(zip(layers, static_layers(layers))):
        if is_static and layer.get("stream", 0):
            raise SchemaError(f"plan.layers[{index}].stream", "must be 0 for a layer computed from input shapes alone")
