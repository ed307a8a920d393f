"""Tiny ONNX models for tests, built with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


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
    # IR 10, not onnx 1.23's default 14: onnxruntime before 1.32 refuses IR 14.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
