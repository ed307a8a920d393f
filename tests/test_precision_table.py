"""kiln.precision is the one table of precisions: dtypes, tensor-core alignment, tolerances, the TF32 switch."""

import torch

from kiln.precision import (
    ALIGNMENT,
    ALL_PRECISIONS,
    LOW_PRECISIONS,
    PRECISION_DTYPES,
    PRECISIONS,
    TOLERANCES,
    layer_rtol,
    set_tf32,
    tf32_for,
)


def test_alignment_per_precision():
    assert ALIGNMENT == {"fp32": 1, "tf32": 4, "fp16": 8, "bf16": 8, "int8": 16, "fp8": 16}


def test_precision_sets():
    assert ALL_PRECISIONS == ("fp32", "tf32", "fp16", "bf16", "int8", "fp8")
    assert PRECISIONS == ("fp32", "tf32", "fp16", "bf16")  # what a layer runs at today
    assert LOW_PRECISIONS == ("fp16", "bf16", "int8", "fp8")
    assert PRECISION_DTYPES == {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16,
                                "bf16": torch.bfloat16}


def test_layer_rtol_reads_the_tolerance_table():
    assert layer_rtol("fp32") == TOLERANCES["fp32"].rtol == 1e-4
    assert layer_rtol("tf32") == TOLERANCES["tf32"].rtol
    assert layer_rtol("native") == TOLERANCES["fp16"].rtol  # a strongly typed layer counts as fp16
    assert layer_rtol("bf16") == TOLERANCES["bf16"].rtol


def _flags():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_tf32_switch_sets_both_flags_and_restores_them():
    before = _flags()
    try:
        set_tf32(False)
        with tf32_for("tf32"):
            assert _flags() == (True, True)
            with tf32_for("fp32"):
                assert _flags() == (False, False)
            assert _flags() == (True, True)
        assert _flags() == (False, False)
        set_tf32(True)
        with tf32_for("fp16"):
            assert _flags() == (False, False)
        assert _flags() == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
