"""Checking kiln's outputs against a reference (onnxruntime, or an unoptimized run).

Each output is judged per element, as numpy's ``allclose`` and Polygraphy do, by
``kiln.precision.judge``: ``|kiln - ref| <= atol + rtol * |ref|``, with ``(atol, rtol)`` from the one
tolerance table (``kiln.precision.TOLERANCES``) for the output's dtype and the precision that
computed it. A tiny output (a sigmoid map peaking at 1e-3) is then judged by ``atol`` rather than
failing on a relative error of noise. The max absolute difference and the max relative difference
(``max|kiln - ref| / max|ref|``: the worst error against the output's own scale) are reported beside
the verdict. Integer, bool and string outputs must match exactly.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln import deadline as deadlines
from kiln.errors import KilnError
from kiln.precision import Tolerance, judge, output_tolerance


@dataclass(frozen=True)
class OutputDiff:
    """One output against its reference: the tolerance it was judged at, the max abs and max rel
    differences, and how many of its ``size`` elements are over ``atol + rtol * |ref|`` (``bad``)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    tolerance: Tolerance
    max_abs: float
    max_rel: float
    bad: int
    size: int

    @property
    def ok(self) -> bool:
        return self.bad == 0

    @property
    def verdict(self) -> str:
        return "ok" if self.ok else "OVER"


def diff(name: str, got: np.ndarray, ref: np.ndarray, tolerance: Tolerance | None = None, *,
         computed_in: str | None = None, atol: float | None = None, rtol: float | None = None) -> OutputDiff:
    """Compare one output. ``tolerance`` given is used as is; otherwise it comes from the table for
    ``got``'s dtype and ``computed_in`` (see ``kiln.precision.output_tolerance``), with ``atol`` and
    ``rtol`` overriding it. A shape mismatch, or a dtype of another kind, fails every element."""
    got, ref = np.asarray(got), np.asarray(ref)
    tol = tolerance or output_tolerance(got.dtype, computed_in, atol, rtol)
    size = max(got.size, ref.size, 1)
    if got.shape != ref.shape or (got.dtype != ref.dtype and got.dtype.kind != ref.dtype.kind):
        return OutputDiff(name, tuple(got.shape), str(got.dtype), tol, float("inf"), float("inf"), size, size)
    j = judge(got, ref, tol)
    return OutputDiff(name, tuple(got.shape), str(got.dtype), tol, j.max_abs, j.max_rel, j.bad, got.size)


def run_onnxruntime(model_path: str | os.PathLike[str], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the model with onnxruntime on CPU, with its graph optimizations off (the plain reference)."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise KilnError("--compare onnxruntime needs the onnxruntime package: pip install onnxruntime") from error
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    deadline = deadlines.current()
    run_options = ort.RunOptions()
    try:
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        with _terminate_at(deadline, run_options):
            results = session.run(names, dict(feeds), run_options)
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
        if deadline is not None and deadline.expired():
            raise deadlines.RunStopped(f"{model_path}: {deadline.stopped('onnxruntime (--compare)')}") from error
        raise KilnError(f"{model_path}: onnxruntime could not run the model: "
                        f"{str(error).splitlines()[0][:300]}") from error
    return dict(zip(names, results))


@contextlib.contextmanager
def _terminate_at(deadline: deadlines.Deadline | None, run_options) -> Iterator[None]:
    """onnxruntime's run stopped (``RunOptions.terminate``) once ``deadline`` expires or is cancelled:
    the time limit in effect (``kiln.deadline``) bounds the reference run too."""
    if deadline is None:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            if deadline.expired():
                run_options.terminate = True
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def compare_outputs(outputs: Mapping[str, Any], reference: Mapping[str, np.ndarray], tolerance: Tolerance | None = None,
                    *, computed_in: str | None = None, atol: float | None = None,
                    rtol: float | None = None) -> list[OutputDiff]:
    """``diff`` for every output of ``reference`` (``outputs`` may hold torch tensors)."""
    from kiln.dtypes import tensor_to_numpy

    return [diff(name, tensor_to_numpy(outputs[name]), np.asarray(ref), tolerance, computed_in=computed_in,
                 atol=atol, rtol=rtol) for name, ref in reference.items()]
