"""The model in float64: the referee when two fp32 computations of it disagree.

Two correct fp32 computations of a deep network (other kernels, another summation order, NHWC
against NCHW) can differ by more than fp32's per-element tolerance where the network amplifies
rounding. Run in float64, the model's own answer is known to ~1e-16, and the side nearer to it is
the more exact one. The builder's fp32 contract asks this referee before it fails an engine that
has no reduced-precision layer left; ``benchmarks/third_party.py`` reports kiln's and
onnxruntime's distances from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

FLOAT, DOUBLE = ir.DataType.FLOAT, ir.DataType.DOUBLE
_TYPE_ATTRIBUTES = ("to", "dtype")  # Cast, CastLike's target, EyeLike, the Random ops, ...


def float64_model(model: ir.Model) -> ir.Model:
    """A copy of ``model`` with every float32 value, initializer, constant and cast target made
    float64, in every graph, subgraph and model-local function. Inputs declared float32 become
    float64 too: feed them widened (``widen``)."""
    copy = model.clone()
    for graph in (copy.graph, *(function.graph for function in copy.functions.values())):
        for sub in (graph, *graph.subgraphs()):
            for value in (*sub.inputs, *sub.outputs, *sub.initializers.values()):
                _widen_value(value)
            for node in sub:
                _widen_node(node)
    return copy


def widen(feeds: Mapping[str, Any]) -> dict[str, Any]:
    """``feeds`` with float32 arrays and tensors made float64 (other dtypes unchanged)."""
    out: dict[str, Any] = {}
    for name, value in feeds.items():
        if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
            value = value.to(torch.float64)
        elif isinstance(value, np.ndarray) and value.dtype == np.float32:
            value = value.astype(np.float64)
        out[name] = value
    return out


def distance(value: Any, exact: Any) -> float:
    """max |value - exact| / max |exact| (``exact``'s scale, 1 when it is all zeros)."""
    got = torch.as_tensor(value).detach().to("cpu", torch.float64)
    truth = torch.as_tensor(exact).detach().to("cpu", torch.float64)
    if truth.numel() == 0:
        return 0.0
    scale = float(truth.abs().max()) or 1.0
    return float((got - truth).abs().max()) / scale


def _wide_type(kind: ir.TypeProtocol) -> ir.TypeProtocol:
    """A new type with float32 made float64 (types may be shared with the original model)."""
    if isinstance(kind, ir.TensorType):
        return ir.TensorType(DOUBLE) if kind.dtype == FLOAT else kind
    if isinstance(kind, (ir.SequenceType, ir.OptionalType)):
        return type(kind)(_wide_type(kind.elem_type))
    return kind


def _widen_value(value: ir.Value) -> None:
    if value.type is not None:
        value.type = _wide_type(value.type)
    tensor = value.const_value
    if tensor is not None and tensor.dtype == FLOAT:
        value.const_value = ir.tensor(tensor.numpy().astype(np.float64), name=tensor.name)


def _widen_node(node: ir.Node) -> None:
    for value in node.outputs:
        _widen_value(value)
    for name, attr in list(node.attributes.items()):
        if name in _TYPE_ATTRIBUTES and attr.type == ir.AttributeType.INT and attr.value == FLOAT:
            node.attributes[name] = ir.AttrInt64(name, DOUBLE)
        elif attr.type == ir.AttributeType.TENSOR and attr.value.dtype == FLOAT:
            node.attributes[name] = ir.AttrTensor(name, ir.tensor(attr.value.numpy().astype(np.float64)))
    if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and "value_float" in node.attributes:
        number = node.attributes.pop("value_float").value
        node.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.array(number, np.float64)))
    if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and "value_floats" in node.attributes:
        numbers = node.attributes.pop("value_floats").value
        node.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.array(numbers, np.float64)))
