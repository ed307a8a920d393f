"""Checking kiln's outputs against a reference (onnxruntime, or an unoptimized run).

The relative difference of an output is ``max|kiln - ref| / max|ref|``: the worst error measured
against the output's own scale. An element-wise ratio would blow up wherever the reference crosses
zero, which every real activation does. Integer and bool outputs must match exactly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.errors import KilnError

# Relative tolerance by element type, as the project's standards set them.
TOLERANCES = {"float32": 1e-4, "float64": 1e-6, "float16": 1e-2, "bfloat16": 1e-2}


@dataclass
class OutputDiff:
    name: str
    shape: tuple[int, ...]
    dtype: str
    max_abs: float
    max_rel: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tolerance


def tolerance_for(dtype: str) -> float:
    return TOLERANCES.get(dtype, 0.0)


def diff(name: str, got: np.ndarray, ref: np.ndarray, tolerance: float | None = None) -> OutputDiff:
    """Compare one output; a shape or dtype mismatch is reported as an infinite difference."""
    dtype = str(got.dtype)
    tol = tolerance_for(dtype) if tolerance is None else tolerance
    if got.shape != ref.shape or (got.dtype != ref.dtype and got.dtype.kind != ref.dtype.kind):
        return OutputDiff(name, tuple(got.shape), dtype, float("inf"), float("inf"), tol)
    if got.dtype == object:
        same = bool(np.array_equal(got, ref))
        return OutputDiff(name, tuple(got.shape), dtype, 0.0 if same else float("inf"), 0.0 if same else float("inf"), tol)
    a = got.astype(np.float64)
    b = ref.astype(np.float64)
    if a.size == 0:
        return OutputDiff(name, tuple(got.shape), dtype, 0.0, 0.0, tol)
    nan_mismatch = np.isnan(a) != np.isnan(b)
    both = ~(np.isnan(a) | np.isnan(b))
    inf_equal = np.isinf(a) & (a == b)
    err = np.where(both & ~inf_equal, np.abs(a - b), 0.0)
    max_abs = float("inf") if nan_mismatch.any() else float(err.max())
    finite_ref = np.abs(b[np.isfinite(b)])
    scale = float(finite_ref.max()) if finite_ref.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return OutputDiff(name, tuple(got.shape), dtype, max_abs, max_rel, tol)


def run_onnxruntime(model_path: str | os.PathLike[str], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the model with onnxruntime on CPU, with its graph optimizations off (the plain reference)."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise KilnError("--compare onnxruntime needs the onnxruntime package: pip install onnxruntime") from error
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        results = session.run(names, dict(feeds))
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise KilnError(f"{model_path}: onnxruntime could not run the model: {str(error).splitlines()[0][:300]}") from error
    return dict(zip(names, results))


def compare_outputs(
    outputs: Mapping[str, Any], reference: Mapping[str, np.ndarray], tolerance: float | None = None
) -> list[OutputDiff]:
    from kiln.dtypes import tensor_to_numpy

    diffs = []
    for name, ref in reference.items():
        got = outputs[name]
        diffs.append(diff(name, tensor_to_numpy(got), np.asarray(ref), tolerance))
    return diffs
