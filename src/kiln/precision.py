"""Precisions and the one tolerance table every check in kiln reads.

An output is judged per element the way numpy's ``allclose`` and Polygraphy do:

    |got - ref| <= atol + rtol * |ref|

with ``(atol, rtol)`` set by the precision the output was computed in. ``kiln run``, ``kiln bench``
and the builder's end-to-end check read :data:`TOLERANCES`; ``--atol``/``--rtol`` override it for
one command. NaN must sit where the reference has NaN, and an infinity where it has the same
infinity. Integer, bool and string outputs must match exactly.

The builder's per-layer checks (a tactic against the reference tactic, a reduced-precision layer
against fp32, on random inputs whose scale varies from layer to layer) use the same table's
``rtol`` against the layer output's own scale: see :func:`layer_rtol` and :func:`scaled_error`.

The same module is the one table of precisions (:data:`PRECISION_TABLE`: each one's torch dtype and
tensor-core alignment) and holds the one TF32 switch (:func:`tf32_for`, :func:`set_tf32`). INT8 and
FP8 are in the table for the passes (alignment, layout) before any layer runs at them; their tactics
extend it by marking them ``layers``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Precision:
    """One precision: the torch dtype its layers compute in (tf32 is float32 on TF32 tensor cores),
    the multiple tensor cores need K, N and channels to be (TF32 x4, FP16/BF16 x8, INT8/FP8 x16), whether
    it is *low* (narrower than 32 bits: NHWC convs, RGB padded to 4 channels) and whether a builder
    layer can run at it yet."""

    name: str
    dtype: torch.dtype
    alignment: int
    low: bool
    layers: bool


# The one table of precisions, tighter to looser.
PRECISION_TABLE: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", torch.float32, alignment=1, low=False, layers=True),
    Precision("tf32", torch.float32, alignment=4, low=False, layers=True),
    Precision("fp16", torch.float16, alignment=8, low=True, layers=True),
    Precision("bf16", torch.bfloat16, alignment=8, low=True, layers=True),
    Precision("int8", torch.int8, alignment=16, low=True, layers=False),
    Precision("fp8", torch.float8_e4m3fn, alignment=16, low=True, layers=False),
)}
# Every precision the passes and ``kiln doctor``/``kiln optimize`` plan for.
ALL_PRECISIONS = tuple(PRECISION_TABLE)
# Precisions a layer can run at; ``native`` is a strongly typed layer running in the model's own types.
PRECISIONS = tuple(name for name, p in PRECISION_TABLE.items() if p.layers)
LOW_PRECISIONS = tuple(name for name, p in PRECISION_TABLE.items() if p.low)
# Tensor-core alignment (elements) per precision.
ALIGNMENT = {name: p.alignment for name, p in PRECISION_TABLE.items()}
# The torch dtype a layer at each of :data:`PRECISIONS` computes in.
PRECISION_DTYPES = {name: PRECISION_TABLE[name].dtype for name in PRECISIONS}


def set_tf32(enabled: bool) -> None:
    """TF32 on or off for cuBLAS matmuls and cuDNN convolutions, the two switches torch reads."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


@contextlib.contextmanager
def tf32_for(precision: str) -> Iterator[None]:
    """TF32 on while a ``tf32`` layer runs, off for every other precision (an fp32 layer stays IEEE
    fp32); the switches come back as they were after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    set_tf32(precision == "tf32")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@dataclass(frozen=True)
class Tolerance:
    """Per-element bound ``atol + rtol * |ref|``."""

    atol: float
    rtol: float

    def __str__(self) -> str:
        return f"atol {self.atol:g}, rtol {self.rtol:g}"


# The one table. fp32 allows a reordered sum's rounding; tf32 keeps 10 mantissa bits, fp16 10 with
# less range, bf16 7.
TOLERANCES: dict[str, Tolerance] = {
    "fp64": Tolerance(1e-7, 1e-6),
    "fp32": Tolerance(1e-5, 1e-4),
    "tf32": Tolerance(1e-3, 1e-3),
    "fp16": Tolerance(1e-2, 1e-2),
    "bf16": Tolerance(2e-2, 2e-2),
    "exact": Tolerance(0.0, 0.0),
}
# Looser to tighter: an engine mixing precisions is judged at its loosest.
_ORDER = ("exact", "fp64", "fp32", "tf32", "fp16", "bf16")

_DTYPE_PRECISIONS = {"float64": "fp64", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def precision_of_dtype(dtype: object) -> str:
    """The precision an output of this dtype (numpy, torch or its name) is judged at: floats by
    their width, everything else exactly."""
    if isinstance(dtype, type):  # a numpy scalar type (np.float16, ml_dtypes.bfloat16)
        dtype = np.dtype(dtype)
    name = str(dtype).removeprefix("torch.")
    return _DTYPE_PRECISIONS.get(name, "exact")


def loosest(precisions) -> str:
    """The loosest of several precisions (``native`` counts as fp16: strongly typed layers run in
    the model's own reduced types). An empty set is fp32."""
    found = {"fp16" if p == "native" else p for p in precisions} & set(_ORDER)
    return max(found, key=_ORDER.index) if found else "fp32"


def layer_rtol(precision: str) -> float:
    """A layer's allowed error against its own output's scale (:func:`scaled_error`): the table's
    rtol for the precision it runs at (a strongly typed layer's own types count as fp16)."""
    return TOLERANCES[loosest([precision])].rtol


def tolerance(precision: str, atol: float | None = None, rtol: float | None = None) -> Tolerance:
    """The table's tolerance for ``precision``, with ``atol``/``rtol`` overriding it where given (a
    negative or NaN override is a KilnError: ``--atol``/``--rtol`` come from the command line)."""
    from kiln.errors import KilnError

    for flag, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and not float(value) >= 0:
            raise KilnError(f"--{flag} must be a number >= 0, got {value}")
    base = TOLERANCES[precision]
    return Tolerance(base.atol if atol is None else float(atol), base.rtol if rtol is None else float(rtol))


def output_tolerance(dtype: object, computed_in: str | None = None, atol: float | None = None,
                     rtol: float | None = None) -> Tolerance:
    """The tolerance one output is judged at: a non-float output exactly; a float output at the looser
    of its dtype's precision and ``computed_in`` (the precision that produced it: an fp32 output of
    an engine with fp16 layers carries fp16 error). ``atol``/``rtol`` override the table."""
    own = precision_of_dtype(dtype)
    if own != "exact" and computed_in is not None:
        own = loosest([own, computed_in])
    return tolerance(own, atol, rtol)


def engine_precision(engine) -> str:
    """The loosest precision among an engine's layers: what its outputs are judged at."""
    return loosest(layer["precision"] for layer in engine.plan["layers"])


@dataclass(frozen=True)
class Judgement:
    """How far ``got`` is from ``ref``: max abs diff, max rel diff (max abs / max |ref|, printed for
    the scale), the worst element's excess over the bound, and the verdict."""

    max_abs: float
    max_rel: float
    ok: bool
    bad: int  # elements over the bound (NaN/inf mismatches and shape mismatches count as all)


def judge(got: np.ndarray, ref: np.ndarray, tol: Tolerance) -> Judgement:
    """Compare one output per element with ``tol``; a shape mismatch fails outright."""
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape:
        return Judgement(float("inf"), float("inf"), False, max(got.size, ref.size, 1))
    if got.dtype == object or ref.dtype == object or got.dtype.kind in "USV" or ref.dtype.kind in "USV":
        same = got.dtype.kind == ref.dtype.kind and bool(np.array_equal(got, ref))
        return Judgement(0.0 if same else float("inf"), 0.0 if same else float("inf"), same, 0 if same else got.size)
    if got.size == 0:
        return Judgement(0.0, 0.0, True, 0)
    a, b = got.astype(np.float64), ref.astype(np.float64)
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    inf_b = np.isinf(b)
    special_bad = (nan_a != nan_b) | (inf_b & (a != b)) | (np.isinf(a) & ~inf_b & ~nan_b)
    both = np.isfinite(a) & np.isfinite(b)
    err = np.where(both, np.abs(a - b), 0.0)
    over = both & (err > tol.atol + tol.rtol * np.abs(np.where(both, b, 0.0)))
    bad = int(np.count_nonzero(over | special_bad))
    max_abs = float("inf") if special_bad.any() else float(err.max())
    finite_ref = np.abs(b[np.isfinite(b)])
    scale = float(finite_ref.max()) if finite_ref.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return Judgement(max_abs, max_rel, bad == 0, bad)


def scaled_error(got, ref) -> float:
    """``max|got - ref| / max|ref|`` over finite reference values (torch tensors or arrays): a layer's
    error against its own output's scale, for checks on random inputs. NaN and infinities must sit
    where the reference has them, else the error is infinite."""
    if not isinstance(got, torch.Tensor):
        got = torch.as_tensor(np.asarray(got))
    if not isinstance(ref, torch.Tensor):
        ref = torch.as_tensor(np.asarray(ref))
    if got.shape != ref.shape:
        return float("inf")
    a, b = got.detach().double(), ref.detach().double().to(got.device)
    if a.numel() == 0:
        return 0.0
    if bool((torch.isnan(a) != torch.isnan(b)).any()):
        return float("inf")
    both = torch.isfinite(a) & torch.isfinite(b)
    if bool((~both & ~torch.isnan(b) & (a != b)).any()):
        return float("inf")
    diff = (a - b).abs()[both]
    scale = b.abs()[torch.isfinite(b)]
    max_abs = float(diff.max()) if diff.numel() else 0.0
    max_ref = float(scale.max()) if scale.numel() else 0.0
    if max_ref == 0:
        return 0.0 if max_abs == 0 else float("inf")
    return max_abs / max_ref
