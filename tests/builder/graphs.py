"""Small ONNX graphs for builder tests: each holds one pattern the builder fuses (or must not)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper


def model(nodes, inputs, outputs, initializers=(), opset: int = 17, elem=TensorProto.FLOAT) -> ir.Model:
    """An ir.Model from nodes; inputs/outputs are (name, shape) pairs."""
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, elem, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, elem, s) for n, s in outputs],
        [numpy_helper.from_array(a, n) for n, a in initializers],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def weights(rng: np.random.Generator, *shape: int, dtype=np.float32) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(shape[-1] if len(shape) > 1 else 1)).astype(dtype)


def node(op: str, inputs, outputs, name: str | None = None, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, outputs, name=name or outputs[0], **attrs)
