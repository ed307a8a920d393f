"""The pass framework: registry and selection, unique names, fused-op choice, and `kiln optimize`."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.cli import main
from kiln.errors import KilnError
from kiln.passes.framework import ORDER, PassContext, fused_op, registered_passes, run_passes, select_passes
from kiln.passes.rewriting import unique_node_names
from tests.passes.checks import counts, load


def _model(opset: int = 17) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Identity", ["r"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_every_pass_in_the_order_is_registered_once_with_a_rule():
    passes = registered_passes()
    assert list(passes) == [name for name in ORDER if name in passes]
    for name, p in passes.items():
        assert p.name == name and p.rule, name
        assert type(p).__module__ == f"kiln.passes.{name}"


def test_unknown_pass_names_fail_before_any_work():
    with pytest.raises(KilnError, match="no pass named 'fuse_everything'"):
        select_passes(["fuse_everything"])
    with pytest.raises(KilnError, match="no pass named"):
        kiln.BuildConfig(device="cpu", skip_passes=["nope"]).validate()


def test_unique_node_names_fills_empty_and_repeated_names():
    model = load(_model())
    nodes = list(model.graph)
    nodes[0].name, nodes[1].name, nodes[2].name = "", "same", "same"
    unique_node_names(model)
    names = [n.name for n in model.graph]
    assert len(set(names)) == 3 and all(names) and names[1] == "same"


@pytest.mark.parametrize("opset,kiln_ops,expected",
                         [(20, False, ("", "Gelu")), (17, True, ("ai.kiln", "Gelu")), (17, False, None)])
def test_fused_op_prefers_the_standard_op(opset, kiln_ops, expected):
    assert fused_op(load(_model(opset)), PassContext(kiln_ops=kiln_ops), "Gelu", 20) == expected


def test_context_resolves_symbolic_dims():
    ctx = PassContext(dims={"batch": 4})
    model = load(_model())
    assert ctx.concrete(model.graph.inputs[0].shape) == [4, 8]
    with pytest.raises(KilnError, match="precision must be one of"):
        PassContext(precision="fp64").validate()


def test_optimize_cli_writes_checked_onnx_that_matches(tmp_path, capsys):
    source, target = tmp_path / "m.onnx", tmp_path / "m.opt.onnx"
    onnx.save(_model(), source)
    assert main(["optimize", str(source), "-o", str(target)]) == 0
    printed = capsys.readouterr().out
    assert "nodes per op" in printed and "total" in printed
    onnx.checker.check_model(str(target), full_check=True)
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    want = kiln.Executor(kiln.load_model(source)).run({"x": x})["y"].numpy()
    got = kiln.Executor(kiln.load_model(target)).run({"x": x})["y"].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    import onnxruntime as ort

    ort_out = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(ort_out, want, rtol=1e-5, atol=1e-6)


def test_optimize_cli_refuses_an_unknown_pass_and_writes_nothing(tmp_path, capsys):
    source, target = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(_model(), source)
    assert main(["optimize", str(source), "-o", str(target), "--skip", "no_such_pass"]) == 2
    assert "no pass named 'no_such_pass'" in capsys.readouterr().err
    assert not target.exists()


def test_build_records_the_passes_it_ran(tmp_path):
    engine = kiln.build(load(_model()), kiln.BuildConfig(device="cpu", opt_level=1))
    assert set(engine.plan["passes"]) == {name for name, p in registered_passes().items() if p.in_builds}
    assert "flatten_matmul" not in engine.plan["passes"]  # the GEMM layers view N-D inputs as 2-D themselves
    named = kiln.build(load(_model()), kiln.BuildConfig(device="cpu", opt_level=1, passes=["flatten_matmul"]))
    assert list(named.plan["passes"]) == ["flatten_matmul"]
    assert engine.plan["config"]["skip_passes"] == []
    skipped = kiln.build(load(_model()), kiln.BuildConfig(device="cpu", opt_level=1, passes=[]))
    assert skipped.plan["passes"] == {}


def test_a_failing_pass_is_a_kiln_error_naming_it(monkeypatch):
    from kiln.passes.framework import get_pass, run_passes

    def broken(model, ctx):
        raise ValueError("boom")

    monkeypatch.setattr(get_pass("fuse_gelu"), "apply", broken)
    with pytest.raises(KilnError, match=r"graph pass fuse_gelu failed \(ValueError: boom\).*--skip-passes fuse_gelu"):
        run_passes(load(_model()), PassContext())


def test_connected_components_group_by_links_in_item_order():
    from kiln.passes.rewriting import connected_components

    items = [[i] for i in range(6)]  # unhashable and equal-looking items are told apart by identity
    a, b, c, d, e, f = items
    assert connected_components(items, [(d, a), (e, c), (f, e)]) == [[a, d], [b], [c, e, f]]
    assert connected_components(items, []) == [[x] for x in items]
    assert connected_components([], []) == []


# -- every pass leaves a valid, topologically sorted graph -------------------------------------------

def _sorted_graphs() -> dict[str, onnx.ModelProto]:
    """Graphs that exercise the rewriting passes: attention as the dynamo exporter orders it (the
    mask's Where after the first MatMul and its scale), a decomposed LayerNorm and GELU, a conv
    with BatchNorm and ReLU, and an If whose branch holds constant work."""
    from tests.passes.test_fuse_attention import LOWEST, attention, n, tail

    dynamo = attention([n("MatMul", ["q", "kt"], "s"), n("Mul", ["s", "c"], "sd"),
                        n("Where", ["keep", "zero", "fill"], "where"), n("Add", ["sd", "where"], "sm")] + tail("sm"),
                       {"c": 0.25, "zero": 0.0, "fill": LOWEST})
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((16, 16)), "g": rng.standard_normal(16), "b": rng.standard_normal(16),
             "eps": 1e-5, "two": 2.0, "half": 0.5, "one": 1.0, "sq2": np.sqrt(2)}
    tensors = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()]
    text = helper.make_graph([
        helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1]), helper.make_node("Sub", ["x", "mu"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["d2"]), helper.make_node("ReduceMean", ["d2"], ["var"], axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["d", "sd"], ["nrm"]), helper.make_node("Mul", ["nrm", "g"], ["sc"]),
        helper.make_node("Add", ["sc", "b"], ["ln"]), helper.make_node("MatMul", ["ln", "w"], ["h"]),
        helper.make_node("Div", ["h", "sq2"], ["hd"]), helper.make_node("Erf", ["hd"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["h", "e1"], ["he"]),
        helper.make_node("Mul", ["he", "half"], ["y"]),
    ], "text", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 16])], tensors)
    conv = helper.make_graph([
        helper.make_node("Conv", ["x", "cw"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["y"]),
    ], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
        [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "cw")]
        + [numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), k) for k in ("s", "bb", "m", "v")])
    return {"attention-dynamo-order": dynamo,
            "layernorm-gelu": helper.make_model(text, opset_imports=[helper.make_opsetid("", 17)]),
            "conv-bn-relu": helper.make_model(conv, opset_imports=[helper.make_opsetid("", 17)]),
            "if-with-constant-work": _if_model()}


def _if_model() -> onnx.ModelProto:
    """y = If(c) then x @ Transpose(W1) (W1 a Constant node), or, through an inner If on a constant
    True, x @ W2 (W3 read only by the inner If's untaken branch); else -x."""
    rng = np.random.default_rng(1)
    const = lambda name, array: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))  # noqa: E731
    w = {k: rng.standard_normal((32, 32)).astype(np.float32) for k in ("w1", "w2", "w3")}
    out = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [4, 32])  # noqa: E731
    inner_then = helper.make_graph([helper.make_node("MatMul", ["x", "w2"], ["a2"])], "inner_then", [], [out("a2")])
    inner_else = helper.make_graph([helper.make_node("MatMul", ["x", "w3"], ["a3"])], "inner_else", [], [out("a3")])
    then = helper.make_graph([
        const("w1", w["w1"]), const("w2", w["w2"]), const("w3", w["w3"]), const("yes", np.array(True)),
        helper.make_node("Transpose", ["w1"], ["w1t"]), helper.make_node("MatMul", ["x", "w1t"], ["a1"]),
        helper.make_node("If", ["yes"], ["inner"], then_branch=inner_then, else_branch=inner_else),
        helper.make_node("Add", ["a1", "inner"], ["t"]),
    ], "then", [], [out("t")])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [out("e")])
    graph = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32]),
                               helper.make_tensor_value_info("c", TensorProto.BOOL, [])], [out("y")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("graph", ["attention-dynamo-order", "layernorm-gelu", "conv-bn-relu", "if-with-constant-work"])
@pytest.mark.parametrize("kiln_ops", [False, True])
def test_every_pass_leaves_a_valid_sorted_graph(graph, kiln_ops):
    from kiln.passes._cleanup import order_error

    proto = _sorted_graphs()[graph]
    for name, p in registered_passes().items():
        if p.needs_kiln_ops and not kiln_ops:
            continue
        model = load(proto)
        p.apply(model, PassContext(kiln_ops=kiln_ops, precision="fp16"))
        assert order_error(model.graph) is None, name
    model = load(proto)
    run_passes(model, PassContext(kiln_ops=kiln_ops))  # checks after each pass itself
    assert order_error(model.graph) is None


def test_a_pass_that_breaks_the_order_is_named_with_the_node_and_how_to_skip_it(monkeypatch):
    from kiln.passes.framework import get_pass

    def reorder(model, ctx):  # the Relu first: it reads h before the MatMul writes it
        relu = next(node for node in model.graph if node.op_type == "Relu")
        model.graph.remove(relu)
        model.graph.insert_before(next(iter(model.graph)), relu)
        return 1

    monkeypatch.setattr(get_pass("fuse_gelu"), "apply", reorder)
    with pytest.raises(KilnError, match=r"graph pass fuse_gelu left an invalid graph: node '.*' \(Relu\) reads 'h' "
                                         r"before anything writes it; .*--skip-passes fuse_gelu"):
        run_passes(load(_model()), PassContext())


def test_order_error_looks_into_subgraphs_and_at_outputs():
    from kiln.passes._cleanup import order_error

    model = load(_if_model())
    assert order_error(model.graph) is None
    then = model.graph.node(0).attributes["then_branch"].as_graph()
    add = then.node(len(then) - 1)
    then.remove(add)
    then.insert_before(then.node(0), add)
    assert "reads 'a1' before anything writes it (in a subgraph of node" in order_error(model.graph)
    then.remove(add)
    assert order_error(model.graph).startswith("graph output 't' is written by no node")


def test_a_graph_built_out_of_order_is_sorted_before_the_passes():
    from kiln.passes._cleanup import order_error

    model = load(_model())
    relu = next(node for node in model.graph if node.op_type == "Relu")
    model.graph.remove(relu)
    model.graph.insert_before(model.graph.node(0), relu)
    assert order_error(model.graph) is not None
    run_passes(model, PassContext())
    assert order_error(model.graph) is None and counts(model) == {"MatMul": 1, "Relu": 1}


# -- dead code: what the rewrites left unused goes, subgraphs included -----------------------------------

def _unused(proto: onnx.ModelProto) -> list[str]:
    """Initializers and Constant outputs of any graph that no node (of it or a nested graph) reads."""
    def reads(graph):
        names = {o.name for o in graph.output}
        for node in graph.node:
            names.update(node.input)
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    names |= reads(sub)
        return names

    def walk(graph):
        used = reads(graph)
        found = [t.name for t in graph.initializer if t.name not in used]
        found += [node.output[0] for node in graph.node if node.op_type == "Constant" and node.output[0] not in used]
        for node in graph.node:
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    found += walk(sub)
        return found

    return walk(proto.graph)


def test_optimize_removes_what_folding_an_if_left_unused_and_does_not_grow(tmp_path, capfd):
    """fold_constants turns Transpose(W1) into an initializer (W1 unused) and resolves the inner
    If on a constant True (W3, read only by its other branch, unused): both weights must go."""
    import onnxruntime as ort

    source, target = tmp_path / "if.onnx", tmp_path / "if.opt.onnx"
    onnx.save(_if_model(), source)
    assert main(["optimize", str(source), "-o", str(target)]) == 0
    capfd.readouterr()
    optimized = onnx.load(target)
    assert _unused(optimized) == []
    assert target.stat().st_size < source.stat().st_size * 0.8  # W1 once (folded), W2 once, W3 gone
    options = ort.SessionOptions()
    options.log_severity_level = 1  # warnings and up: "Removing initializer ... not used by any node"
    session = ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
    assert "not used by any node" not in capfd.readouterr().err
    x = np.random.default_rng(2).standard_normal((4, 32)).astype(np.float32)
    reference = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    for c in (True, False):
        feeds = {"x": x, "c": np.array(c)}
        np.testing.assert_allclose(session.run(None, feeds)[0], reference.run(None, feeds)[0], rtol=1e-5, atol=1e-5)


def test_optimize_does_not_grow_a_model_it_does_not_rewrite(tmp_path):
    """No pass fires: the file must not grow by inferred value_info, nor by names given to the
    tensors of Constant nodes the matchers read."""
    graph = helper.make_graph([
        helper.make_node("Constant", [], ["half"], "c", value=numpy_helper.from_array(np.array(0.5, np.float32))),
        helper.make_node("MatMul", ["x", "w"], ["h"], "mm"), helper.make_node("Mul", ["h", "half"], ["m"], "mul"),
        helper.make_node("Tanh", ["m"], ["y"], "tanh"),
    ], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        [numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32), "w")])
    source, target = tmp_path / "m.onnx", tmp_path / "m.opt.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    assert main(["optimize", str(source), "-o", str(target)]) == 0
    assert target.stat().st_size <= source.stat().st_size
    assert len(onnx.load(target).graph.value_info) == 0


# -- kiln optimize --target-opset --------------------------------------------------------------------------

def _opset14_layernorm() -> onnx.ModelProto:
    """A decomposed LayerNorm at opset 14 (TorchScript's spelling) and a MatMul whose 2 KB weight is
    large enough to travel around the version converter."""
    from tests.passes.test_fuse_layernorm import layernorm

    proto = layernorm(opset=14, extra_nodes=[helper.make_node("MatMul", ["y", "w"], ["z"], name="z")],
                      outputs=("y", "z"))
    weight = np.random.default_rng(3).standard_normal((16, 32)).astype(np.float32)
    proto.graph.initializer.append(numpy_helper.from_array(weight, "w"))
    del proto.graph.output[1].type.tensor_type.shape.dim[:]
    return proto


@pytest.mark.parametrize("flags, opset, expected", [
    ([], 14, None), (["--kiln-ops"], 14, "ai.kiln::LayerNormalization"),
    (["--target-opset", "17"], 17, "LayerNormalization"),
])
def test_target_opset_lets_an_old_export_fuse_layernorm(tmp_path, capsys, flags, opset, expected):
    import onnxruntime as ort

    source, target = tmp_path / "ln14.onnx", tmp_path / "ln.opt.onnx"
    onnx.save(_opset14_layernorm(), source)
    assert main(["optimize", str(source), "-o", str(target), *flags]) == 0
    assert ("converted from opset 14 to 17" in capsys.readouterr().out) == (opset == 17)
    model = kiln.load_model(target)
    assert model.opset_imports[""] == opset
    fused = [op for op in counts(model) if op.endswith("LayerNormalization")]
    assert fused == ([expected] if expected else [])
    assert ("ReduceMean" in counts(model)) == (expected is None)
    x = np.random.default_rng(4).standard_normal((2, 3, 16)).astype(np.float32)
    want = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = kiln.Executor(model).run({"x": x})
    for name, ref in zip(("y", "z"), want):
        np.testing.assert_allclose(got[name].numpy(), ref, rtol=1e-4, atol=1e-5)
    if expected != "ai.kiln::LayerNormalization":  # a standard file: onnxruntime runs it too
        again = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        for out, ref in zip(again, want):
            np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("opset, match", [
    ("16", r"cannot convert opset 17 to 16: No Previous Version of LayerNormalization exists"),
    ("99", r"--target-opset must be between 1 and \d+"),
])
def test_target_opset_the_converter_cannot_reach_is_refused_by_name(tmp_path, capsys, opset, match):
    import re

    graph = helper.make_graph([helper.make_node("LayerNormalization", ["x", "s"], ["y"], name="ln")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(np.ones(4, np.float32), "s")])
    source, target = tmp_path / "ln17.onnx", tmp_path / "out.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    assert main(["optimize", str(source), "-o", str(target), "--target-opset", opset]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not target.exists()
