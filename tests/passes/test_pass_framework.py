"""The pass framework: registry and selection, unique names, fused-op choice, and `kiln optimize`."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.cli import main
from kiln.errors import KilnError
from kiln.passes import ORDER, PassContext, fused_op, registered_passes, select_passes, unique_node_names
from tests.passes.checks import load


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
    unique_node_names(model.graph)
    names = [n.name for n in model.graph]
    assert len(set(names)) == 3 and all(names) and names[1] == "same"


@pytest.mark.parametrize("opset,kiln_ops,expected", [(20, False, ("", "Gelu")), (17, True, ("ai.kiln", "Gelu")), (17, False, None)])
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
    from kiln.passes import get_pass, run_passes

    def broken(model, ctx):
        raise ValueError("boom")

    monkeypatch.setattr(get_pass("fuse_gelu"), "apply", broken)
    with pytest.raises(KilnError, match=r"graph pass fuse_gelu failed \(ValueError: boom\).*--skip-passes fuse_gelu"):
        run_passes(load(_model()), PassContext())


def test_connected_components_group_by_links_in_item_order():
    from kiln.passes import connected_components

    items = [[i] for i in range(6)]  # unhashable and equal-looking items are told apart by identity
    a, b, c, d, e, f = items
    assert connected_components(items, [(d, a), (e, c), (f, e)]) == [[a, d], [b], [c, e, f]]
    assert connected_components(items, []) == [[x] for x in items]
    assert connected_components([], []) == []
