"""The reference executor: input checks, value lifetimes, error messages, dtypes, devices."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from model_builders import add_relu_model
from onnx import TensorProto, helper

import kiln
import kiln.backend
from kiln import InputError, OpError
from kiln.demo import make_demo_model


def _executor(model: onnx.ModelProto, device: str = "cpu") -> kiln.Executor:
    return kiln.Executor(kiln.load_model_proto(model, name="test"), device=device)


def test_unknown_and_missing_inputs():
    ex = _executor(add_relu_model())
    x = np.ones((2, 3), np.float32)
    with pytest.raises(InputError, match=r"unknown input\(s\) \['z'\]"):
        ex.run({"x": x, "z": x})
    with pytest.raises(InputError, match=r"missing input\(s\) \['x'\]"):
        ex.run({})


@pytest.mark.parametrize(
    "value,match",
    [
        (np.ones((2, 3), np.float64), "dtype double, the model expects float"),
        (np.ones((2, 3, 1), np.float32), "rank 3"),
        (np.ones((3, 3), np.float32), "axis 0 must be 2"),
        (torch.ones(2, 3, dtype=torch.int64), "dtype int64"),
    ],
)
def test_wrong_inputs_are_rejected_before_running(value, match):
    with pytest.raises(InputError, match=match):
        _executor(add_relu_model()).run({"x": value})


def test_intermediate_values_are_freed_after_last_use():
    model = kiln.load_model_proto(make_demo_model(), name="demo")
    ex = kiln.Executor(model)
    plan = ex._main
    freed = [name for step in plan.steps for name in step.free_after]
    assert len(freed) == len(set(freed)), "a value is freed twice"
    produced = {name for step in plan.steps for name in step.outputs}
    outputs = set(plan.output_names)
    assert produced - outputs <= set(freed), "an intermediate value is never freed"
    assert not outputs & set(freed)


def test_op_failure_names_node_and_op():
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="bad_reshape")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])],
    )
    ex = _executor(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(OpError, match="bad_reshape.*Reshape"):
        ex.run({"x": np.ones((2, 3), np.float32), "shape": np.array([4, 4])})


def test_op_failure_inside_a_subgraph_names_the_node_that_holds_it():
    body = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"], name="bad_reshape")], "then", [],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["out"], name="branch", then_branch=body, else_branch=body)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, 4])],
    )
    ex = _executor(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(OpError) as raised:
        ex.run({"x": np.ones((2, 3), np.float32), "c": np.array(True), "shape": np.array([4, 4])})
    message = str(raised.value)
    assert message.startswith("g: node 'branch' (op If), in its subgraph: node 'bad_reshape' (op Reshape) failed")
    assert message.count("g: ") == 1


def _binary_model(op: str, elem: int, shape=(3, 4)) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["y"], name=op.lower())],
        "g",
        [helper.make_tensor_value_info("a", elem, list(shape)), helper.make_tensor_value_info("b", elem, list(shape))],
        [helper.make_tensor_value_info("y", elem, list(shape))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    "elem,np_dtype",
    [(TensorProto.FLOAT, np.float32), (TensorProto.FLOAT16, np.float16), (TensorProto.BFLOAT16, ml_dtypes.bfloat16),
     (TensorProto.INT64, np.int64), (TensorProto.INT32, np.int32)],
)
def test_dtypes_flow_through_unchanged(rng, elem, np_dtype):
    a = (rng.standard_normal((3, 4)) * 10).astype(np_dtype)
    b = (rng.standard_normal((3, 4)) * 10).astype(np_dtype)
    backend_out = kiln.backend.prepare(_binary_model("Mul", elem)).run([a, b])[0]
    assert backend_out.dtype == np.dtype(np_dtype)
    expected = (a.astype(np.float64) * b.astype(np.float64)).astype(np_dtype)
    np.testing.assert_allclose(backend_out.astype(np.float64), expected.astype(np.float64),
                               rtol=1e-2 if elem == TensorProto.BFLOAT16 else 1e-3)


def test_bool_ops(rng):
    a = rng.random((3, 4)) < 0.5
    b = rng.random((3, 4)) < 0.5
    out = kiln.backend.prepare(_binary_model("And", TensorProto.BOOL)).run([a, b])[0]
    assert out.dtype == np.bool_
    np.testing.assert_array_equal(out, a & b)


def test_torch_tensors_are_accepted_as_inputs(rng):
    ex = _executor(add_relu_model())
    x = torch.from_numpy(rng.standard_normal((2, 3)).astype(np.float32))
    assert ex.run({"x": x})["y"].shape == (2, 3)


@pytest.mark.cuda
def test_demo_model_on_cuda_matches_cpu(rng):
    model = kiln.load_model_proto(make_demo_model(), name="demo")
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    cpu = kiln.Executor(model, "cpu").run({"image": x})
    gpu = kiln.Executor(model, "cuda").run({"image": x})
    for name, value in cpu.items():
        assert gpu[name].device.type == "cuda"
        np.testing.assert_allclose(gpu[name].cpu().numpy(), value.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_tf32_is_off_while_running_and_settings_are_restored():
    seen = {}
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    model = kiln.load_model_proto(make_demo_model(), name="demo")
    executor = kiln.Executor(model, "cuda")
    step = executor._main.steps[0]
    inner = step.fn

    def spy(op, *args):
        seen["matmul_tf32"] = torch.backends.cuda.matmul.allow_tf32
        seen["cudnn_tf32"] = torch.backends.cudnn.allow_tf32
        seen["benchmark"] = torch.backends.cudnn.benchmark
        return inner(op, *args)

    step.fn = spy
    executor.run({"image": np.ones((2, 3, 32, 32), np.float32)})
    assert seen == {"matmul_tf32": False, "cudnn_tf32": False, "benchmark": True}
    assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True


def test_on_node_sees_every_main_graph_node_and_can_replace_its_outputs():
    ex = _executor(add_relu_model())
    x = np.full((2, 3), -10.0, np.float32)
    seen = []

    def on_node(step, outputs):
        seen.append((step.op.name, tuple(outputs[0].shape)))
        if step.op.name == "add":
            return (torch.ones(2, 3),)  # the relu then reads ones instead of x + w
        return None

    y = ex.run({"x": x}, on_node=on_node)["y"]
    assert seen == [("add", (2, 3)), ("relu", (2, 3))]
    assert torch.equal(y, torch.ones(2, 3))
    assert float(ex.run({"x": x})["y"].max()) == 0.0  # the hook was for that run only
    assert set(ex.constants) == {"w"} and list(ex.node_steps()) == ["add", "relu"]


def test_an_error_the_hook_raises_passes_through():
    def on_node(step, outputs):
        raise KeyError("from the hook")

    with pytest.raises(KeyError, match="from the hook"):
        _executor(add_relu_model()).run({"x": np.ones((2, 3), np.float32)}, on_node=on_node)
