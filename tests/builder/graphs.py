"""Small ONNX graphs for builder tests: each holds one pattern the builder fuses (or must not)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

import kiln


def model(nodes, inputs, outputs, initializers=(), opset: int = 17, elem=TensorProto.FLOAT) -> ir.Model:
    """An ir.Model from nodes; inputs/outputs are (name, shape) pairs, or (name, shape, element type)."""
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(i[0], i[2] if len(i) > 2 else elem, i[1]) for i in inputs],
        [helper.make_tensor_value_info(n, elem, s) for n, s in outputs],
        [numpy_helper.from_array(a, n) for n, a in initializers],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(proto, full_check=True)
    return kiln.load_model_proto(proto, name="g")  # checked, shapes inferred: what kiln.load_model gives


def weights(rng: np.random.Generator, *shape: int, dtype=np.float32) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(shape[-1] if len(shape) > 1 else 1)).astype(dtype)


def node(op: str, inputs, outputs, name: str | None = None, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, outputs, name=name or outputs[0], **attrs)


def tiny_model(batch: int | str = 2) -> onnx.ModelProto:
    """Conv(+bias) -> Add(residual) -> Relu -> MatMul(const) -> Add(const bias) -> Softmax -> Transpose:
    four layers (conv+add+relu, matmul+add, softmax, transpose), as an onnx ModelProto."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
        numpy_helper.from_array((rng.standard_normal(4) * 0.1).astype(np.float32), "b"),
        numpy_helper.from_array((rng.standard_normal((8, 5)) * 0.3).astype(np.float32), "m"),
        numpy_helper.from_array((rng.standard_normal(5) * 0.1).astype(np.float32), "mb"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "r"], ["s"], name="residual"),
        helper.make_node("Relu", ["s"], ["a"], name="relu"),
        helper.make_node("MatMul", ["a", "m"], ["mm"], name="matmul"),
        helper.make_node("Add", ["mm", "mb"], ["z"], name="bias"),
        helper.make_node("Softmax", ["z"], ["p"], name="softmax", axis=-1),
        helper.make_node("Transpose", ["p"], ["y"], name="transpose", perm=[0, 1, 3, 2]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 6, 8]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, [batch, 4, 6, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, 5, 6])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def outer_scope_if_model() -> onnx.ModelProto:
    """An If whose branches read values from outside it, as torch's exporter writes ``torch.cond``:

        h = Relu(x) * k; xs = Shape(x); eq = Equal(sr, 16000)
        y = If(eq, then: t = MatMul(h, w); If(c, then: t + x, else: h * k),
                   else: Reshape(Reshape(x, [-1, 3]), xs))

    The branches read a top-level value (h), a shape-arithmetic value (xs), graph inputs (x, c),
    initializers (w, frames, and k, which the top level reads too) and, in the nested If, a value of the enclosing
    branch (t). The else branch (the "8 kHz" one) fails unless 4 * N is a multiple of 3: at N=2 the model needs
    sr == 16000, which random integers in [0, 2) never are."""
    rng = np.random.default_rng(3)
    f = TensorProto.FLOAT
    inner_then = helper.make_graph([helper.make_node("Add", ["t", "x"], ["a"])], "inner_then", [],
                                   [helper.make_tensor_value_info("a", f, ["N", 4])])
    inner_else = helper.make_graph([helper.make_node("Mul", ["h", "k"], ["b"])], "inner_else", [],
                                   [helper.make_tensor_value_info("b", f, ["N", 4])])
    then = helper.make_graph([helper.make_node("MatMul", ["h", "w"], ["t"]),
                              helper.make_node("If", ["c"], ["z"], then_branch=inner_then, else_branch=inner_else)],
                             "then", [], [helper.make_tensor_value_info("z", f, ["N", 4])])
    other = helper.make_graph([helper.make_node("Reshape", ["x", "frames"], ["framed"]),
                               helper.make_node("Reshape", ["framed", "xs"], ["e"])],
                              "else", [], [helper.make_tensor_value_info("e", f, ["N", 4])])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "k"], ["h"], name="scale"),
             helper.make_node("Shape", ["x"], ["xs"], name="shape"),
             helper.make_node("Equal", ["sr", "sixteen"], ["eq"], name="is_16k"),
             helper.make_node("If", ["eq"], ["y"], name="branch", then_branch=then, else_branch=other)]
    inits = [numpy_helper.from_array((rng.standard_normal((4, 4)) / 2).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(0.5, np.float32), "k"),
             numpy_helper.from_array(np.array(16000, np.int64), "sixteen"),
             numpy_helper.from_array(np.array([-1, 3], np.int64), "frames")]
    graph = helper.make_graph(nodes, "outer_scope_if",
                              [helper.make_tensor_value_info("x", f, ["N", 4]),
                               helper.make_tensor_value_info("sr", TensorProto.INT64, []),
                               helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", f, ["N", 4])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(proto, full_check=True)
    return proto
