"""kiln.compare: outputs judged per element, |got - ref| <= atol + rtol * |ref|, at kiln.precision's table."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from kiln.compare import compare_outputs, diff
from kiln.errors import KilnError
from kiln.precision import TOLERANCES, Tolerance, output_tolerance, tolerance


def test_a_tiny_output_is_judged_by_atol_not_by_its_scale():
    """Issue 12, item 8: a sigmoid map peaking at 1.2e-3, 1.35e-7 from onnxruntime: 1.1e-4 relative to
    its scale (over the old purely relative 1e-4), far within atol."""
    ref = np.linspace(0, 1.2e-3, 64, dtype=np.float32)
    got = ref + np.float32(1.35e-7)
    d = diff("scores", got, ref)
    assert d.max_rel > 1e-4 and d.max_abs == pytest.approx(1.35e-7, rel=1e-2)
    assert d.ok and d.bad == 0 and d.verdict == "ok" and d.tolerance == TOLERANCES["fp32"]


def test_elements_over_the_bound_are_counted():
    ref = np.array([0.0, 1.0, 100.0, -3.0], dtype=np.float32)
    got = ref + np.array([2e-5, 2e-5, 5e-3, 0.0], dtype=np.float32)  # 2e-5 > 1e-5 at 0; 1e-5 + 1e-4 covers it at 1
    d = diff("y", got, ref)
    assert d.bad == 1 and not d.ok and d.verdict == "OVER" and d.size == 4
    assert diff("y", got, ref, atol=0, rtol=0).bad == 3
    assert diff("y", got, ref, atol=1e-4).ok


def test_tolerance_by_dtype_and_by_the_precision_that_computed_it():
    assert output_tolerance(np.float16) == TOLERANCES["fp16"]
    assert output_tolerance(ml_dtypes.bfloat16) == TOLERANCES["bf16"]
    assert output_tolerance("float32", "fp16") == TOLERANCES["fp16"]  # an fp16 engine's fp32 output
    assert output_tolerance("float32", "tf32") == TOLERANCES["tf32"]
    assert output_tolerance("float16", "fp32") == TOLERANCES["fp16"]  # never tighter than the dtype itself
    assert output_tolerance("int64", "fp16") == TOLERANCES["exact"]  # integers match exactly, whatever computed them
    assert output_tolerance("float32", None, atol=0.5) == Tolerance(0.5, TOLERANCES["fp32"].rtol)
    with pytest.raises(KilnError, match="atol"):
        tolerance("fp32", atol=-1.0)


def test_integers_exactly_and_mismatches_fail_every_element():
    ints = np.array([1, 2, 3], dtype=np.int64)
    assert diff("i", ints, ints).ok
    assert diff("i", ints + np.array([0, 0, 1]), ints).bad == 1
    wrong_shape = diff("y", np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32))
    assert wrong_shape.bad == wrong_shape.size == 6 and wrong_shape.max_abs == float("inf")
    nan = np.array([np.nan, 1.0], np.float32)
    assert diff("y", nan, nan).ok and not diff("y", np.array([0.0, 1.0], np.float32), nan).ok


def test_compare_outputs_takes_torch_tensors_and_the_engine_precision():
    import torch

    ref = {"y": np.ones((4,), np.float32)}
    got = {"y": torch.full((4,), 1.005)}
    assert not compare_outputs(got, ref)[0].ok
    [d] = compare_outputs(got, ref, computed_in="fp16")
    assert d.ok and d.tolerance == TOLERANCES["fp16"]
