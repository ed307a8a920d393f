"""Checking kiln's outputs in the benchmarks: against onnxruntime at the tolerance of the engine's
precision (``kiln.precision``), and one run against another (identical, or by how much not)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def to_numpy(outputs: dict[str, Any]) -> dict[str, np.ndarray]:
    return {name: value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            for name, value in outputs.items()}


def compare_with_ort(outputs: dict[str, Any], reference: dict[str, np.ndarray], engine,
                     atol: float | None = None) -> dict[str, Any]:
    """kiln against onnxruntime per output, judged per element at the tolerance of the engine's loosest
    precision (kiln.precision; ``atol`` overrides its absolute part, as the build was given it), with
    the relative difference max|kiln - ort| / max|ort| beside it."""
    from kiln.compare import diff
    from kiln.precision import engine_precision

    precision = engine_precision(engine)
    got = to_numpy(outputs)
    per_output = {}
    for name, ref in reference.items():
        d = diff(name, got[name], np.asarray(ref, dtype=np.float32) if ref.dtype.kind == "f" else ref,
                 computed_in=precision, atol=atol)
        per_output[name] = {"shape": list(d.shape), "max_abs": d.max_abs, "rel": d.max_rel, "over": d.bad, "ok": d.ok,
                            "atol": d.tolerance.atol, "rtol": d.tolerance.rtol}
    return {"precision": precision, "max_rel": max(v["rel"] for v in per_output.values()),
            "ok": all(v["ok"] for v in per_output.values()), "outputs": per_output}


def same_outputs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    result = {}
    for name in a:
        x, y = a[name], b[name]
        identical = bool(x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y))
        max_abs = 0.0 if identical else (float((x.double() - y.double()).abs().max()) if x.shape == y.shape
                                         else float("inf"))
        result[name] = {"identical": identical, "max_abs_diff": max_abs}
    return {"identical": all(v["identical"] for v in result.values()), "outputs": result}

