"""Shared test helpers: tiny ONNX models built with onnx.helper, and the cuda marker's skip."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def add_relu_model(shape=(2, 3), opset: int = 17, weight: np.ndarray | None = None) -> onnx.ModelProto:
    """y = relu(x + w): one initializer, two ops, static shape."""
    w = weight if weight is not None else np.arange(np.prod(shape), dtype=np.float32).reshape(shape) / 7 - 0.5
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["s"], name="add"), helper.make_node("Relu", ["s"], ["y"], name="relu")],
        "add_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
