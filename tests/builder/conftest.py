"""Fixtures shared by the builder tests."""

from __future__ import annotations

import onnx
import pytest

from tests.builder.graphs import tiny_model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """tests.builder.graphs.tiny_model saved as an .onnx file, once per test module."""
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    onnx.save(tiny_model(), path)
    return path


@pytest.fixture
def reduced_precision_kept(monkeypatch):
    """Layers allowed fp16/bf16 keep it even where the CPU runs them slower than fp32 (the builder
    would choose fp32 for speed): for tests about the precision check and its fallbacks."""
    from kiln.builder import choose_tactic

    monkeypatch.setattr(choose_tactic, "WIDE_MARGIN", 0.0)
