"""fold_constants: constant subgraphs and static shape arithmetic become initializers, no-op nodes and
dead nodes go, graph outputs keep their names, and the size limit keeps a large constant from being
held twice."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from families import build, example_inputs, export_family
from onnx import TensorProto, helper, numpy_helper

import kiln.passes.fold_constants as fold_constants
from kiln.passes.framework import PassContext, get_pass
from tests.passes.checks import assert_same, finding_cost, load, ops, run_pass

F = TensorProto.FLOAT
node = helper.make_node


def _arr(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _model(nodes, x_shape, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, x_shape)],
                              [helper.make_tensor_value_info(name, F, shape) for name, shape in outputs], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(proto, dims=None):
    """find() on one copy, apply() on another; both must agree, and the result must compute the same."""
    findings = get_pass("fold_constants").find(load(proto), PassContext(dims=dims or {}))
    model, count, ctx = run_pass(proto, "fold_constants")
    assert count == len(findings) == len(ctx.log)
    assert [f"{f.rule}: {', '.join(f.nodes)}" for f in findings] == ctx.log
    assert all(f.pass_name == "fold_constants" and f.fix == "fixed automatically by pass fold_constants"
               for f in findings)
    assert [v.name for v in model.graph.outputs] == [v.name for v in proto.graph.output]
    assert_same(proto, model, dims=dims or {"B": 3})
    return model, findings


def test_constant_subgraph_becomes_one_initializer():
    nodes = [node("Transpose", ["w"], ["wt"], perm=[1, 0], name="tw"),
             node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, np.float32)), name="two"),
             node("Mul", ["wt", "two"], ["w2"], name="scale"),
             node("MatMul", ["x", "w2"], ["y"], name="mm")]
    proto = _model(nodes, ["B", 3], [("y", ["B", 4])], [numpy_helper.from_array(_arr([4, 3]), "w")])
    model, (finding,) = _run(proto)
    assert ops(model) == ["MatMul"]
    assert list(model.graph.initializers) == ["w2"]  # the folded weight, under its own name; "w" is gone
    assert finding.rule == "constant-subgraph" and finding.nodes == ["tw", "two", "scale"]
    assert finding.shapes == {"wt": [3, 4], "two": [], "w2": [3, 4]}
    # Transpose, Constant, Mul
    assert finding_cost(load(proto), finding).bytes == 4 * (12 + 12) + 4 * 1 + 4 * (12 + 1 + 12)


def test_static_shape_arithmetic_folds():
    nodes = [node("Shape", ["x"], ["sh"], name="shape"), node("Gather", ["sh", "zero"], ["n"], axis=0, name="gather"),
             node("Unsqueeze", ["n", "ax"], ["n1"], name="unsq"),
             node("Concat", ["n1", "m1"], ["target"], axis=0, name="cat"),
             node("Reshape", ["x", "target"], ["y"], name="reshape")]
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "ax"),
             numpy_helper.from_array(np.array([-1], np.int64), "m1")]
    model, (finding,) = _run(_model(nodes, [2, 3, 4], [("y", [2, 12])], inits))
    assert ops(model) == ["Reshape"]
    reshape = next(iter(model.graph))
    assert reshape.inputs[1].is_initializer() and reshape.inputs[1].const_value.numpy().tolist() == [2, -1]
    assert finding.rule == "static-shape" and finding.nodes == ["shape", "gather", "unsq", "cat"]


def test_dynamic_shape_arithmetic_stays():
    nodes = [node("Shape", ["x"], ["sh"], name="shape"), node("Gather", ["sh", "zero"], ["n"], axis=0, name="gather"),
             node("Unsqueeze", ["n", "ax"], ["n1"], name="unsq"),
             node("Concat", ["n1", "m1"], ["target"], axis=0, name="cat"),
             node("Reshape", ["x", "target"], ["y"], name="reshape")]
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "ax"),
             numpy_helper.from_array(np.array([-1], np.int64), "m1")]
    model, findings = _run(_model(nodes, ["B", 3, 4], [("y", ["B", 12])], inits))
    assert findings == [] and ops(model) == ["Shape", "Gather", "Unsqueeze", "Concat", "Reshape"]


def test_dead_nodes_go_and_everything_an_output_needs_stays():
    nodes = [node("Relu", ["x"], ["r"], name="relu"), node("Exp", ["r"], ["dead1"], name="exp"),
             node("Neg", ["dead1"], ["dead2"], name="neg"), node("Sigmoid", ["r"], ["y"], name="sigmoid")]
    model, findings = _run(proto := _model(nodes, ["B", 3], [("y", ["B", 3])]))
    assert ops(model) == ["Relu", "Sigmoid"]
    assert [(f.rule, f.nodes) for f in findings] == [("dead-node", ["exp"]), ("dead-node", ["neg"])]
    assert findings[0].shapes == {"dead1": ["B", 3]}
    assert finding_cost(load(proto), findings[0]).bytes == 4 * (3 + 3)  # B unknown counts 1


def test_no_op_nodes_are_simplified_and_outputs_keep_their_names():
    nodes = [node("Identity", ["x"], ["a"], name="id"), node("Cast", ["a"], ["b"], to=F, name="cast"),
             node("Dropout", ["b"], ["c"], name="dropout"), node("Relu", ["c"], ["r"], name="relu"),
             node("Identity", ["r"], ["y"], name="id_out")]
    model, findings = _run(_model(nodes, ["B", 3], [("y", ["B", 3])]))
    assert ops(model) == ["Relu"]
    assert next(iter(model.graph)).outputs[0].name == "y"
    assert {f.rule for f in findings} == {"simplified-node"}
    assert sorted(n for f in findings for n in f.nodes) == ["cast", "dropout", "id", "id_out"]


def test_unused_optional_outputs_are_dropped():
    nodes = [node("MaxPool", ["x"], ["y", "indices"], kernel_shape=[2], name="pool")]
    model, (finding,) = _run(_model(nodes, [2, 3, 4], [("y", [2, 3, 3])]))
    assert ops(model) == ["MaxPool"] and len(next(iter(model.graph)).outputs) == 1
    assert finding.rule == "dead-output" and finding.nodes == ["pool"] and "indices" in finding.shapes


def test_constant_graph_output_keeps_its_name():
    nodes = [node("Add", ["c1", "c2"], ["k"], name="add"), node("Relu", ["x"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2, 3])],
                              [helper.make_tensor_value_info("y", F, [2, 3]),
                               helper.make_tensor_value_info("k", F, [3])],
                              [numpy_helper.from_array(_arr([3], 1), "c1"),
                               numpy_helper.from_array(_arr([3], 2), "c2")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model, (finding,) = _run(proto)
    assert ops(model) == ["Relu"] and "k" in model.graph.initializers and finding.nodes == ["add"]


def test_graph_input_is_never_folded():
    nodes = [node("Mul", ["x", "c"], ["y"], name="mul")]
    proto = _model(nodes, [3], [("y", [3])], [numpy_helper.from_array(_arr([3]), "c")])
    model, findings = _run(proto)
    assert findings == [] and ops(model) == ["Mul"]


def test_size_limit_keeps_a_shared_large_constant_from_being_held_twice(monkeypatch):
    monkeypatch.setattr(fold_constants, "OUTPUT_SIZE_LIMIT", 100)
    weight = numpy_helper.from_array(_arr([20, 10]), "w")  # 200 elements, over the (patched) limit
    shared = [node("Gemm", ["x", "w"], ["g"], transB=1, name="gemm"),  # w read here too, at run time
              node("Transpose", ["w"], ["wt"], perm=[1, 0], name="tw"),
              node("MatMul", ["x", "wt"], ["m"], name="mm"), node("Add", ["m", "g"], ["y"], name="add")]
    proto = _model(shared, ["B", 10], [("y", ["B", 20])], [weight])
    model, findings = _run(proto)
    assert "Transpose" in ops(model)  # folding it would keep w and w^T: 400 elements for 200
    assert all("tw" not in f.nodes for f in findings)

    alone = [node("Transpose", ["w"], ["wt"], perm=[1, 0], name="tw"), node("MatMul", ["x", "wt"], ["y"], name="mm")]
    model, (finding,) = _run(_model(alone, ["B", 10], [("y", ["B", 20])], [weight]))
    assert ops(model) == ["MatMul"] and finding.nodes == ["tw"]  # the only reader: w is replaced, not doubled


def test_torch_export_without_optimization_is_cleaned_up(tmp_path):
    """The dynamo exporter without its optimizer leaves CastLike/Expand/Shape arithmetic on static shapes."""
    path = tmp_path / "resnet_raw.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(build("resnet"), tuple(example_inputs("resnet").values()), str(path),
                          input_names=["pixel_values"], opset_version=18, dynamo=True, optimize=False, verbose=False)
    proto = onnx.load(path)
    model, findings = _run(proto)
    assert len(list(model.graph)) < len(proto.graph.node) and findings
    assert "CastLike" not in ops(model)


@pytest.mark.parametrize("family,exporter", [("bert", "torchscript"), ("gpt2", "torchscript"), ("resnet", "dynamo")])
def test_exported_families_stay_correct(tmp_path, family, exporter):
    proto = onnx.load(export_family(tmp_path, family, exporter))
    _run(proto, dims={"batch": 2, "sequence": 8})


def test_sequence_ops_are_left_to_the_executor():
    """onnxscript's folder raises on SplitToSequence; the pass leaves sequence ops alone (they gain
    nothing from folding) and the model still computes the same."""
    split = numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "split")
    graph = helper.make_graph(
        [helper.make_node("SplitToSequence", ["x", "split"], ["seq"], axis=0, name="to_seq"),
         helper.make_node("SequenceAt", ["seq", "one"], ["y"], name="at")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [split, numpy_helper.from_array(np.array(1, dtype=np.int64), "one")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model, _, _ = run_pass(proto, "fold_constants")
    assert [n.op_type for n in model.graph] == ["SplitToSequence", "SequenceAt"]
    assert all(n.domain == "" for n in model.graph)
    assert_same(proto, model)
