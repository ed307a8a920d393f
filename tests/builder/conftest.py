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
