"""One generated Triton kernel for a chain of ONNX elementwise ops.

A chain of pointwise ops run op by op reads and writes the whole tensor once per op; fused, it
reads each input once and writes the output once, whatever the chain's length. The chain is a
small JSON-able program (so an engine file can store it)::

    [{"op": "input", "index": 0},                       # step 0: kernel input 0
     {"op": "const", "value": 0.5},                     # step 1: a scalar
     {"op": "Mul", "args": [0, 1], "attrs": {}},        # step 2: an ONNX op on earlier steps
     {"op": "Gelu", "args": [2], "attrs": {"approximate": "tanh"}}]   # the last step is the output

Triton's ``@jit`` needs real source, so the kernel is generated as Python text, written to a cache
folder under its sha256 and imported from there. The text is specialized on what changes the
index arithmetic, not on values: the collapsed rank, and per input whether it is read at the
output's own offset (same shape and strides: no div/mod at all), is one broadcast scalar, or is
strided, and which of its strides are 0. Constants and float attributes are kernel arguments, so
programs differing only in numbers share one compiled kernel.

Everything is computed in fp32: inputs of any float dtype are widened on load and the result is
rounded once, to ``out_dtype``, on store.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import triton

from kiln.activations import BINARY, ELEMENTWISE, FLOAT_ATTRS, UNARY
from kiln.atomic_file import write_atomically

# The ops, their float attributes and defaults: the one table's (kiln.activations).
SUPPORTED_OPS: frozenset[str] = ELEMENTWISE

_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
_INT32_LIMIT = 2**31  # offsets at or past this need 64-bit index math

# Helpers every generated module carries; tl lacks tanh and log1p in some versions.
_PRELUDE = '''\
import triton
import triton.language as tl

from kiln.kernels.tanh import tanh as _tanh


@triton.jit
def _softplus(x):
    # log(1 + e^x) = max(x, 0) + log1p(e^-|x|); a short series stands in for log1p near 0.
    t = tl.exp(-tl.abs(x))
    series = t * (1.0 - t * (0.5 - t * (0.3333333333333333 - t * (0.25 - t * 0.2))))
    return tl.where(x < 0.0, 0.0, x) + tl.where(t < 0.01, series, tl.log(1.0 + t))


@triton.jit
def _pow(x, y):
    # numpy/ONNX rules: a negative base needs an integer exponent (odd ones keep the sign).
    r = tl.exp(y * tl.log(tl.abs(x)))
    whole = tl.floor(y) == y
    odd = whole & (tl.floor(y * 0.5) * 2.0 != y)
    r = tl.where(x < 0.0, tl.where(whole, tl.where(odd, -r, r), float("nan")), r)
    return tl.where((y == 0.0) | (x == 1.0), 1.0, r)
'''


# -- program validation ----------------------------------------------------------------------


def _index(value: Any, limit: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
        raise ValueError(f"pointwise: {what} must be an integer in [0, {limit}), got {value!r}")
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"pointwise: {what} must be a number, got {value!r}")
    return float(value)


def _validate(program: Any, num_inputs: int) -> list[dict[str, Any]]:
    """The program with args and attrs checked and filled in with defaults."""
    if isinstance(num_inputs, bool) or not isinstance(num_inputs, int) or num_inputs < 1:
        raise ValueError(f"pointwise: num_inputs must be a positive integer, got {num_inputs!r}")
    if not isinstance(program, list) or not program:
        raise ValueError("pointwise: the program must be a non-empty list of steps")
    steps: list[dict[str, Any]] = []
    for i, step in enumerate(program):
        where = f"step {i}"
        if not isinstance(step, dict) or not isinstance(step.get("op"), str):
            raise ValueError(f"pointwise: {where} must be a dict with an 'op' string, got {step!r}")
        op = step["op"]
        if op == "input":
            steps.append({"op": op, "index": _index(step.get("index"), num_inputs, f"{where}'s input index")})
            continue
        if op == "const":
            steps.append({"op": op, "value": _number(step.get("value"), f"{where}'s value")})
            continue
        if op not in SUPPORTED_OPS:
            raise ValueError(f"pointwise: {where}: op {op!r} is not supported")
        args = step.get("args", [])
        if not isinstance(args, list):
            raise ValueError(f"pointwise: {where} ({op}): args must be a list, got {args!r}")
        if op == "Clip":  # x[, min][, max]; None stands for an absent bound
            if not 1 <= len(args) <= 3:
                raise ValueError(f"pointwise: {where} (Clip) takes 1 to 3 args, got {len(args)}")
            args = [_index(args[0], i, f"{where}'s arg 0")] + [
                None if a is None else _index(a, i, f"{where}'s arg {k}") for k, a in enumerate(args[1:], 1)
            ]
        else:
            low, high = (1, 1) if op in UNARY else (2, 2) if op in BINARY else (1, None)
            if len(args) < low or (high is not None and len(args) > high):
                raise ValueError(
                    f"pointwise: {where} ({op}) takes {low}{'' if high == low else '+'} args, got {len(args)}"
                )
            args = [_index(a, i, f"{where}'s arg {k}") for k, a in enumerate(args)]
        steps.append({"op": op, "args": args, "attrs": _attrs(op, step.get("attrs") or {}, where)})
    return steps


def _attrs(op: str, attrs: Any, where: str) -> dict[str, Any]:
    if not isinstance(attrs, dict):
        raise ValueError(f"pointwise: {where} ({op}): attrs must be a dict, got {attrs!r}")
    if op == "Gelu":
        known: dict[str, Any] = {"approximate": "none"}
    else:
        known = dict(FLOAT_ATTRS.get(op, {}))
    unknown = set(attrs) - set(known)
    if unknown:
        raise ValueError(f"pointwise: {where} ({op}): unsupported attributes {sorted(unknown)}")
    for name, value in attrs.items():
        if op == "Gelu":
            if value not in ("none", "tanh"):
                raise ValueError(f"pointwise: {where} (Gelu): approximate must be 'none' or 'tanh', got {value!r}")
            known[name] = value
        elif value is not None or op != "Clip":
            known[name] = _number(value, f"{where}'s attribute {name}")
    return known


# -- code generation -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """How each input is indexed, for one collapsed rank: the part of a call the source depends on.

    ``kinds[k]`` is "flat" (read at the output's offset), "scalar" (one element for all) or
    "strided"; ``zero[k][d]`` says input k's stride along collapsed dim d is 0 (broadcast).
    """

    rank: int
    kinds: tuple[str, ...]
    zero: tuple[tuple[bool, ...], ...]
    int64: bool


class _Source:
    """Builds the kernel's text: one SSA line per program step, after the loads it needs."""

    def __init__(self, layout: _Layout) -> None:
        self.layout = layout
        self.lines: list[str] = []
        self.scalars: list[str] = []  # names of the kernel's float arguments, in order
        self.block: dict[str, bool] = {}  # name -> is a [BLOCK] tensor (else a scalar)

    def scalar(self) -> str:
        name = f"s{len(self.scalars)}"
        self.scalars.append(name)
        self.block[name] = False
        return name

    def emit(self, name: str, expr: str, *args: str) -> str:
        self.lines.append(f"{name} = {expr}")
        self.block[name] = any(self.block[a] for a in args)
        return name

    def text(self, out: str) -> str:
        layout, n_in = self.layout, len(self.layout.kinds)
        body: list[str] = []
        if layout.int64:
            body.append("idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)")
        else:
            body.append("idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)")
        body.append("mask = idx < n")
        sizes = [f"size{d}" for d in range(1, layout.rank)]
        strides: list[str] = []
        if "strided" in layout.kinds:
            # Coordinates of the output element along each collapsed dim, innermost last.
            body.append("rem = idx")
            for d in range(layout.rank - 1, 0, -1):
                body.append(f"c{d} = rem % size{d}")
                body.append(f"rem = rem // size{d}")
            body.append("c0 = rem")
        for k, kind in enumerate(layout.kinds):
            if kind != "strided":
                continue
            terms = []
            for d in range(layout.rank):
                if not layout.zero[k][d]:
                    strides.append(f"st{k}_{d}")
                    terms.append(f"c{d} * st{k}_{d}")
            body.append(f"off{k} = {' + '.join(terms)}")
        body.extend(self.lines)
        if not self.block[out]:
            body.append(f"{out} = {out} + tl.zeros([BLOCK], dtype=tl.float32)")
        body.append(f"tl.store(out_ptr + idx, {out}.to(out_ptr.dtype.element_ty), mask=mask)")
        params = ["out_ptr", *(f"in{k}_ptr" for k in range(n_in)), *self.scalars, "n", *sizes, *strides,
                  "BLOCK: tl.constexpr"]
        head = "@triton.jit\ndef pointwise_kernel(" + ", ".join(params) + "):\n"
        return _PRELUDE + "\n\n" + head + "".join(f"    {line}\n" for line in body)


def _generate(steps: list[dict[str, Any]], layout: _Layout) -> tuple[str, list[tuple[int, str | None]]]:
    """The kernel source, and where each float argument comes from: (step index, attribute name
    or None for a const step's value)."""
    src = _Source(layout)
    names: list[str] = []
    loaded: dict[int, str] = {}
    origins: list[tuple[int, str | None]] = []
    for i, step in enumerate(steps):
        op = step["op"]
        if op == "input":
            k = step["index"]
            if k not in loaded:
                kind = layout.kinds[k]
                if kind == "scalar":
                    loaded[k] = src.emit(f"x{k}", f"tl.load(in{k}_ptr).to(tl.float32)")
                else:
                    offset = "idx" if kind == "flat" else f"off{k}"
                    src.lines.append(f"x{k} = tl.load(in{k}_ptr + {offset}, mask=mask).to(tl.float32)")
                    src.block[f"x{k}"] = True
                    loaded[k] = f"x{k}"
            names.append(loaded[k])
        elif op == "const":
            origins.append((i, None))
            names.append(src.scalar())
        else:
            attrs: dict[str, Any] = {}
            for name, value in step["attrs"].items():
                if isinstance(value, float):
                    origins.append((i, name))
                    attrs[name] = src.scalar()
                else:
                    attrs[name] = value
            args = [None if a is None else names[a] for a in step["args"]]
            names.append(_EMITTERS[op](src, f"v{i}", args, attrs, steps, step["args"]))
    return src.text(names[-1]), origins


def _where_max(a: str, b: str) -> str:
    # NaN in either operand wins, as in torch.maximum.
    return f"tl.where(({a} > {b}) | ({a} != {a}), {a}, {b})"


def _where_min(a: str, b: str) -> str:
    return f"tl.where(({a} < {b}) | ({a} != {a}), {a}, {b})"


def _const_value(steps: list[dict[str, Any]], index: int) -> float | None:
    return steps[index]["value"] if steps[index]["op"] == "const" else None


def _emit_pow(src: _Source, out: str, args: list, attrs: dict, steps: list, arg_steps: list) -> str:
    x, y = args
    special = {2.0: f"{x} * {x}", 0.5: f"tl.sqrt({x})", 1.0: f"{x}", 3.0: f"{x} * {x} * {x}"}
    exponent = _const_value(steps, arg_steps[1])
    if exponent in special:
        return src.emit(out, special[exponent], x)
    return src.emit(out, f"_pow({x}, {y})", x, y)


def _emit_clip(src: _Source, out: str, args: list, attrs: dict, steps: list, arg_steps: list) -> str:
    x = args[0]
    lo = args[1] if len(args) > 1 and args[1] is not None else attrs.get("min")
    hi = args[2] if len(args) > 2 and args[2] is not None else attrs.get("max")
    # Comparisons are false for NaN, so a NaN input stays NaN; min > max gives max, as ONNX says.
    value = x
    if lo is not None:
        value = src.emit(f"{out}_lo", f"tl.where({value} < {lo}, {lo}, {value})", value, lo)
    if hi is not None:
        value = src.emit(f"{out}_hi", f"tl.where({value} > {hi}, {hi}, {value})", value, hi)
    return src.emit(out, value, value)


def _emit_variadic(pick: Callable[[str, str], str]) -> Callable[..., str]:
    def emit(src: _Source, out: str, args: list, attrs: dict, steps: list, arg_steps: list) -> str:
        value = args[0]
        for k, other in enumerate(args[1:]):
            value = src.emit(f"{out}_{k}", pick(value, other), value, other)
        return src.emit(out, value, value)

    return emit


def _unary(template: str, *attr_names: str) -> Callable[..., str]:
    """An op whose result is one expression of x (and of its float attributes)."""

    def emit(src: _Source, out: str, args: list, attrs: dict, steps: list, arg_steps: list) -> str:
        x = args[0]
        return src.emit(out, template.format(x=x, **{a: attrs[a] for a in attr_names}), x)

    return emit


def _binary(template: str) -> Callable[..., str]:
    def emit(src: _Source, out: str, args: list, attrs: dict, steps: list, arg_steps: list) -> str:
        a, b = args
        return src.emit(out, template.format(a=a, b=b), a, b)

    return emit


def _emit_gelu(src: _Source, out: str, args: list, attrs: dict, steps: list, arg_steps: list) -> str:
    x = args[0]
    if attrs["approximate"] == "tanh":
        expr = f"0.5 * {x} * (1.0 + _tanh(0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x})))"
    else:
        expr = f"0.5 * {x} * (1.0 + tl.erf({x} * 0.7071067811865476))"
    return src.emit(out, expr, x)


def _clamp01(v: str) -> str:
    return f"tl.where({v} < 0.0, 0.0, tl.where({v} > 1.0, 1.0, {v}))"


def _emit_hard_sigmoid(src: _Source, out: str, args: list, attrs: dict, steps: list, arg_steps: list) -> str:
    x = args[0]
    line = src.emit(f"{out}_lin", f"{attrs['alpha']} * {x} + {attrs['beta']}", x, attrs["alpha"], attrs["beta"])
    return src.emit(out, _clamp01(line), line)


def _emit_hard_swish(src: _Source, out: str, args: list, attrs: dict, steps: list, arg_steps: list) -> str:
    x = args[0]
    line = src.emit(f"{out}_lin", f"{x} * 0.16666666666666666 + 0.5", x)
    return src.emit(out, f"{x} * {_clamp01(line)}", x)


def _emit_celu(src: _Source, out: str, args: list, attrs: dict, steps: list, arg_steps: list) -> str:
    x, alpha = args[0], attrs["alpha"]
    neg = src.emit(f"{out}_neg", f"{alpha} * (tl.exp({x} / {alpha}) - 1.0)", x, alpha)
    # max(0, x) + min(0, alpha * (exp(x / alpha) - 1)), NaN-preserving
    return src.emit(out, f"tl.where({x} < 0.0, 0.0, {x}) + tl.where({neg} > 0.0, 0.0, {neg})", x, neg)


_EMITTERS: dict[str, Callable[..., str]] = {
    "Add": _binary("{a} + {b}"),
    "Sub": _binary("{a} - {b}"),
    "Mul": _binary("{a} * {b}"),
    "Div": _binary("{a} / {b}"),
    "Pow": _emit_pow,
    "Max": _emit_variadic(_where_max),
    "Min": _emit_variadic(_where_min),
    "Clip": _emit_clip,
    "Neg": _unary("-{x}"),
    "Abs": _unary("tl.abs({x})"),
    "Relu": _unary("tl.where({x} < 0.0, 0.0, {x})"),
    "LeakyRelu": _unary("tl.where({x} < 0.0, {alpha} * {x}, {x})", "alpha"),
    "Sigmoid": _unary("tl.sigmoid({x})"),
    "Tanh": _unary("_tanh({x})"),
    "Exp": _unary("tl.exp({x})"),
    "Log": _unary("tl.log({x})"),
    "Sqrt": _unary("tl.sqrt({x})"),
    "Reciprocal": _unary("1.0 / {x}"),
    "Erf": _unary("tl.erf({x})"),
    "HardSigmoid": _emit_hard_sigmoid,
    "HardSwish": _emit_hard_swish,
    "Gelu": _emit_gelu,
    "Elu": _unary("tl.where({x} < 0.0, {alpha} * (tl.exp({x}) - 1.0), {x})", "alpha"),
    "Selu": _unary(
        "tl.where({x} <= 0.0, {gamma} * ({alpha} * tl.exp({x}) - {alpha}), {gamma} * {x})", "alpha", "gamma"
    ),
    "Softplus": _unary("_softplus({x})"),
    "Softsign": _unary("{x} / (1.0 + tl.abs({x}))"),
    "Identity": _unary("{x}"),
    "Floor": _unary("tl.floor({x})"),
    "Ceil": _unary("tl.ceil({x})"),
    "Sin": _unary("tl.sin({x})"),
    "Cos": _unary("tl.cos({x})"),
    "Mish": _unary("{x} * _tanh(_softplus({x}))"),
    "ThresholdedRelu": _unary("tl.where({x} > {alpha}, {x}, 0.0)", "alpha"),
    "Celu": _emit_celu,
}
assert set(_EMITTERS) == SUPPORTED_OPS


# -- source files and compiled kernels -------------------------------------------------------

_KERNELS: dict[str, Any] = {}
_KERNELS_LOCK = threading.Lock()


def cache_dir() -> str:
    """Where generated sources live: ``$KILN_CACHE_DIR/triton_pointwise`` or ``~/.cache/kiln/triton_pointwise``."""
    root = os.environ.get("KILN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kiln")
    return os.path.join(root, "triton_pointwise")


def _load_kernel(source: str) -> Any:
    """The ``@triton.jit`` kernel defined by ``source``, written to the cache folder and imported once per process."""
    with _KERNELS_LOCK:
        kernel = _KERNELS.get(source)
        if kernel is not None:
            return kernel
        digest = hashlib.sha256(source.encode()).hexdigest()
        folder = cache_dir()
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{digest}.py")
        try:
            with open(path, encoding="utf-8") as handle:
                current = handle.read()
        except OSError:
            current = None
        if current != source:
            write_atomically(path, lambda handle: handle.write(source.encode()))
        spec = importlib.util.spec_from_file_location(f"kiln_pointwise_{digest[:16]}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _KERNELS[source] = kernel = module.pointwise_kernel
        return kernel


# -- layouts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Everything a call with given input shapes and strides needs besides the data pointers."""

    shape: tuple[int, ...]
    like: int | None  # the input whose layout the output copies (empty_like), or None: contiguous
    sizes: tuple[int, ...]  # collapsed sizes, outermost first
    strides: tuple[tuple[int, ...], ...]  # per strided input, its non-zero collapsed strides
    layout: _Layout


def _plan(inputs: list[torch.Tensor], out: torch.Tensor, like: int | None) -> _Plan:
    shape = tuple(out.shape)
    # Visit the output in memory order (size-1 dims do not matter), so the flat index is its offset.
    out_stride = out.stride()
    dims = sorted((d for d in range(len(shape)) if shape[d] != 1), key=lambda d: -out_stride[d])
    expanded = [t.expand(shape).stride() if t.dim() else (0,) * len(shape) for t in inputs]
    tensors = [[out_stride[d] for d in dims]] + [[s[d] for d in dims] for s in expanded]
    sizes: list[int] = []
    groups: list[list[int]] = [[] for _ in tensors]
    for j, d in enumerate(dims):
        size = shape[d]
        # Merge into the dim outside when every tensor steps over this dim exactly as that one's stride.
        if j and all(g[-1] == st[j] * size for g, st in zip(groups, tensors)):
            sizes[-1] *= size
            for g, st in zip(groups, tensors):
                g[-1] = st[j]
        else:
            sizes.append(size)
            for g, st in zip(groups, tensors):
                g.append(st[j])
    out_strides, in_strides = groups[0], groups[1:]
    kinds, zero, strides = [], [], []
    largest = out.numel() - 1
    for t, st in zip(inputs, in_strides):
        if st == out_strides:
            kinds.append("flat")
        elif t.numel() == 1 or all(s == 0 for s in st):
            kinds.append("scalar")
        else:
            kinds.append("strided")
            largest = max(largest, sum((n - 1) * s for n, s in zip(sizes, st)))
        zero.append(tuple(s == 0 for s in st) if kinds[-1] == "strided" else ())
        strides.append(tuple(s for s in st if s != 0) if kinds[-1] == "strided" else ())
    layout = _Layout(len(sizes), tuple(kinds), tuple(zero), largest + 1 >= _INT32_LIMIT)
    return _Plan(shape, like, tuple(sizes), tuple(strides), layout)


def _broadcast(inputs: list[torch.Tensor]) -> tuple[tuple[int, ...], int | None]:
    """The output shape, and the first input of exactly that shape (the output copies its layout)."""
    try:
        shape = tuple(torch.broadcast_shapes(*(t.shape for t in inputs)))
    except RuntimeError as error:
        raise ValueError(f"pointwise: input shapes {[tuple(t.shape) for t in inputs]} do not broadcast") from error
    return shape, next((k for k, t in enumerate(inputs) if tuple(t.shape) == shape), None)


class PointwiseKernel:
    """A validated program, compiled (lazily, per input layout) into fused Triton kernels."""

    def __init__(self, program: list[dict], num_inputs: int, *, block: int = 1024, num_warps: int = 4) -> None:
        if block < 16 or block & (block - 1):
            raise ValueError(f"pointwise: block must be a power of two >= 16, got {block}")
        if num_warps < 1 or num_warps & (num_warps - 1):
            raise ValueError(f"pointwise: num_warps must be a power of two, got {num_warps}")
        self.steps = _validate(program, num_inputs)
        self.num_inputs = num_inputs
        self.block, self.num_warps = block, num_warps
        self._plans: dict[tuple, _Plan] = {}
        self._compiled: dict[_Layout, tuple[Any, list[float]]] = {}

    def _kernel(self, layout: _Layout) -> tuple[Any, list[float]]:
        compiled = self._compiled.get(layout)
        if compiled is None:
            source, origins = _generate(self.steps, layout)
            values = [self.steps[i]["value"] if name is None else self.steps[i]["attrs"][name] for i, name in origins]
            compiled = self._compiled[layout] = (_load_kernel(source), values)
        return compiled

    def __call__(self, inputs: list[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
        """The program's value on ``inputs`` (float tensors whose shapes broadcast), as a new
        tensor of ``out_dtype`` with the broadcast shape."""
        self._check(inputs, out_dtype)
        key = (tuple((tuple(t.shape), t.stride()) for t in inputs), out_dtype)
        plan = self._plans.get(key)
        shape, like = (plan.shape, plan.like) if plan is not None else _broadcast(inputs)
        if like is not None:
            out = torch.empty_like(inputs[like], dtype=out_dtype)
        else:
            out = torch.empty(shape, dtype=out_dtype, device=inputs[0].device)
        numel = out.numel()
        if numel == 0:
            return out
        if plan is None:
            if len(self._plans) >= 64:
                self._plans.clear()
            plan = self._plans[key] = _plan(inputs, out, like)
        kernel, scalars = self._kernel(plan.layout)
        strides = [s for st in plan.strides for s in st]
        grid = (triton.cdiv(numel, self.block),)
        kernel[grid](
            out, *inputs, *scalars, numel, *plan.sizes[1:], *strides, BLOCK=self.block, num_warps=self.num_warps
        )
        return out

    def _check(self, inputs: list[torch.Tensor], out_dtype: torch.dtype) -> None:
        if len(inputs) != self.num_inputs:
            raise ValueError(f"pointwise: the program takes {self.num_inputs} inputs, got {len(inputs)}")
        if out_dtype not in _FLOAT:
            raise ValueError(f"pointwise: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
        for k, t in enumerate(inputs):
            if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT:
                raise ValueError(
                    f"pointwise: input {k} must be a float32/float16/bfloat16 tensor, "
                    f"got {getattr(t, 'dtype', type(t))}"
                )
            if t.device != inputs[0].device:
                raise ValueError(f"pointwise: input {k} is on {t.device}, input 0 on {inputs[0].device}")
