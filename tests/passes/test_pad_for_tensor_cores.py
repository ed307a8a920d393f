"""pad_for_tensor_cores: misaligned GEMM K/N and conv channels are padded with zero weights (exactly),
the padding folds into constants where it can, and a measured rewrite is kept only when faster."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kiln.passes.framework import PassContext, get_pass
from tests.passes.checks import assert_same, finding_cost, load, ops, run_pass

F = TensorProto.FLOAT


def _array(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _init(name, shape, seed=0):
    return numpy_helper.from_array(_array(shape, seed), name)


def _graph(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, F, s) for n, s in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _matmul(k=50, n=30, x_shape=None, opset=17):
    x_shape = x_shape or ["N", k]
    return _graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [("x", x_shape)],
                  [("y", [*x_shape[:-1], n])], [_init("w", [k, n])], opset)


def _pad(proto, precision="fp16", **ctx):
    return run_pass(proto, "pad_for_tensor_cores", precision=precision, **ctx)


def _weight(model, op="MatMul"):
    node = next(n for n in model.graph if n.op_type == op)
    return node.inputs[1].const_value.numpy()


@pytest.mark.parametrize("precision,k,n", [("fp16", 56, 32), ("bf16", 56, 32), ("int8", 64, 32), ("fp8", 64, 32),
                                           ("tf32", 52, 32)])
def test_matmul_k_and_n_are_padded_to_the_precision_alignment(precision, k, n):
    proto = _matmul()
    model, count, context = _pad(proto, precision)
    assert count == 1 and ops(model) == ["Pad", "MatMul", "Slice"]
    w = _weight(model)
    assert w.shape == (k, n)
    np.testing.assert_array_equal(w[:50, :30], _array([50, 30]))
    assert not w[50:].any() and not w[:, 30:].any()
    assert model.graph.outputs[0].name == "y" and list(model.graph.outputs[0].shape) == ["N", 30]
    assert "not measured" in context.log[0]
    assert_same(proto, model, dims={"N": 3})


def test_only_the_misaligned_dimension_is_padded():
    model, count, _ = _pad(_matmul(k=64, n=30))
    assert count == 1 and ops(model) == ["MatMul", "Slice"] and _weight(model).shape == (64, 32)
    model, count, _ = _pad(_matmul(k=50, n=32))
    assert count == 1 and ops(model) == ["Pad", "MatMul"] and _weight(model).shape == (56, 32)


def test_batched_activations_are_padded_on_their_last_axis():
    proto = _matmul(x_shape=["B", 5, 50])
    model, count, _ = _pad(proto)
    assert count == 1 and ops(model) == ["Pad", "MatMul", "Slice"]
    pad = next(iter(model.graph))
    assert list(pad.outputs[0].shape) == ["B", 5, 56]
    assert_same(proto, model, dims={"B": 2})


@pytest.mark.parametrize("proto", [_matmul(k=64, n=32), _matmul()], ids=["aligned", "fp32"])
def test_nothing_to_do_when_aligned_or_at_fp32(proto):
    precision = "fp16" if proto.graph.initializer[0].dims[0] == 64 else "fp32"
    model, count, context = _pad(proto, precision)
    assert count == 0 and ops(model) == ["MatMul"] and context.log == []
    assert get_pass("pad_for_tensor_cores").find(load(proto), PassContext(precision=precision)) == []


def _mlp():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["y"], name="mm2")]
    return _graph(nodes, [("x", ["N", 50])], [("y", ["N", 20])],
                  [_init("w1", [50, 30], 1), _init("b1", [30], 2), _init("w2", [30, 20], 3)])


def test_padding_between_two_matmuls_folds_into_the_constants():
    proto = _mlp()
    model, count, _ = _pad(proto)
    # N of mm1 and K of mm2 (both 30 -> 32) meet: no Slice or Pad between them, the bias is padded
    assert count == 2 and ops(model) == ["Pad", "MatMul", "Add", "Relu", "MatMul", "Slice"]
    add = next(n for n in model.graph if n.op_type == "Add")
    bias = add.inputs[1].const_value.numpy()
    assert bias.shape == (32,) and not bias[30:].any()
    assert list(add.outputs[0].shape) == ["N", 32]
    assert _weight(model).shape == (56, 32)
    assert_same(proto, model, dims={"N": 3})


def test_a_slice_with_another_reader_stays_for_it():
    proto = _mlp()
    proto.graph.output.append(helper.make_tensor_value_info("m1", F, ["N", 30]))
    model, count, _ = _pad(proto)
    assert count == 2 and ops(model) == ["Pad", "MatMul", "Slice", "Add", "Relu", "MatMul", "Slice"]
    assert [v.name for v in model.graph.outputs] == ["y", "m1"]
    assert_same(proto, model, dims={"N": 3})


def test_before_opset_10_slice_and_pad_take_attributes():
    proto = _matmul(opset=9)
    model, count, _ = _pad(proto)
    assert count == 1 and ops(model) == ["Pad", "MatMul", "Slice"]
    pad, _, cut = list(model.graph)
    assert len(pad.inputs) == 1 and "pads" in pad.attributes
    assert len(cut.inputs) == 1 and list(cut.attributes["ends"].value) == [30]
    assert_same(proto, model, dims={"N": 3})


@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("c_shape", [None, [30], [1, 30], [1]], ids=["no-C", "C-N", "C-1N", "C-scalar"])
def test_gemm_honours_transposes_and_pads_a_constant_c(trans_a, trans_b, c_shape):
    a_shape = [50, 4] if trans_a else [4, 50]
    b_shape = [30, 50] if trans_b else [50, 30]
    inits = [_init("b", b_shape, 1)] + ([_init("c", c_shape, 2)] if c_shape else [])
    node = helper.make_node("Gemm", ["a", "b", "c"] if c_shape else ["a", "b"], ["y"], name="gemm",
                            transA=trans_a, transB=trans_b, alpha=0.5, beta=2.0)
    proto = _graph([node], [("a", a_shape)], [("y", [4, 30])], inits)
    model, count, _ = _pad(proto)
    assert count == 1 and ops(model) == ["Pad", "Gemm", "Slice"]
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    assert gemm.inputs[1].const_value.numpy().shape == ((32, 56) if trans_b else (56, 32))
    if c_shape and c_shape[-1] == 30:
        assert gemm.inputs[2].const_value.numpy().shape[-1] == 32
    assert_same(proto, model)


def test_gemm_with_a_computed_c_pads_it_with_a_pad_node():
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], name="gemm")
    proto = _graph([node], [("a", [4, 64]), ("c", [4, 30])], [("y", [4, 30])], [_init("b", [64, 30], 1)])
    model, count, _ = _pad(proto)
    assert count == 1 and ops(model) == ["Pad", "Gemm", "Slice"]
    assert next(iter(model.graph)).inputs[0].name == "c"
    assert_same(proto, model)


def _conv(c_in=8, c_out=6, bias=True, opset=17, first=False):
    """r = Relu(x) [N, c_in, 6, 6] (not a first layer, unless ``first``) -> Conv -> y."""
    nodes = [] if first else [helper.make_node("Relu", ["x"], ["r"], name="relu0")]
    nodes.append(helper.make_node("Conv", ["x" if first else "r", "w", "b"] if bias else ["x" if first else "r", "w"],
                                  ["y"], name="conv", pads=[1, 1, 1, 1]))
    inits = [_init("w", [c_out, c_in, 3, 3], 1)] + ([_init("b", [c_out], 2)] if bias else [])
    return _graph(nodes, [("x", ["N", c_in, 6, 6])], [("y", ["N", c_out, 6, 6])], inits, opset)


def test_conv_output_channels_get_zero_filters_and_zero_bias():
    proto = _conv(c_out=6)
    model, count, _ = _pad(proto)
    assert count == 1 and ops(model) == ["Relu", "Conv", "Slice"]
    conv = next(n for n in model.graph if n.op_type == "Conv")
    w, b = conv.inputs[1].const_value.numpy(), conv.inputs[2].const_value.numpy()
    assert w.shape == (8, 8, 3, 3) and not w[6:].any() and b.shape == (8,) and not b[6:].any()
    assert list(conv.outputs[0].shape) == ["N", 8, 6, 6]
    assert_same(proto, model, dims={"N": 2})


@pytest.mark.parametrize("precision,padded", [("fp16", 8), ("int8", 16), ("tf32", 8)])
def test_conv_input_channels_are_padded_with_a_pad_node(precision, padded):
    proto = _conv(c_in=5, c_out=16, bias=False)
    model, count, _ = _pad(proto, precision)
    assert count == 1 and ops(model) == ["Relu", "Pad", "Conv"]
    assert _weight(model, "Conv").shape == (16, padded, 3, 3)
    assert_same(proto, model, dims={"N": 2})


def test_a_first_layer_with_four_channels_is_left_for_the_c4_kernels():
    proto = _conv(c_in=4, c_out=16, first=True)
    model, count, _ = _pad(proto)
    assert count == 0 and ops(model) == ["Conv"]
    model, count, _ = _pad(_conv(c_in=4, c_out=16))  # not a first layer: padded
    assert count == 1 and ops(model) == ["Relu", "Pad", "Conv"]


def test_conv_chain_padding_folds_through_batchnorm_and_relu():
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "s", "bb", "mean", "var"], ["n1"], name="bn1"),
             helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    inits = [_init("w1", [6, 8, 3, 3], 1), _init("s", [6], 2), _init("bb", [6], 3), _init("mean", [6], 4),
             numpy_helper.from_array(np.abs(_array([6], 5)) + 0.5, "var"), _init("w2", [16, 6, 3, 3], 6)]
    proto = _graph(nodes, [("x", ["N", 8, 6, 6])], [("y", ["N", 16, 6, 6])], inits)
    model, count, _ = _pad(proto)
    assert count == 2 and ops(model) == ["Conv", "BatchNormalization", "Relu", "Conv"]
    bn = next(n for n in model.graph if n.op_type == "BatchNormalization")
    assert [v.const_value.numpy()[6:].tolist() for v in bn.inputs[1:]] == [[0, 0]] * 3 + [[1, 1]]
    assert_same(proto, model, dims={"N": 2})


def test_a_fused_conv_residual_is_padded_with_its_output():
    nodes = [helper.make_node("Conv", ["r0", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "z"], ["a"]), helper.make_node("Relu", ["a"], ["y"]),
             helper.make_node("Relu", ["x"], ["r0"])]
    nodes = nodes[3:] + nodes[:3]
    proto = _graph(nodes, [("x", ["N", 8, 6, 6]), ("z", ["N", 6, 6, 6])], [("y", ["N", 6, 6, 6])],
                   [_init("w", [6, 8, 3, 3], 1), _init("b", [6], 2)])
    model, _, _ = run_pass(proto, "fuse_conv_activation", kiln_ops=True)
    count = get_pass("pad_for_tensor_cores").apply(model, PassContext(precision="fp16", kiln_ops=True))
    assert count == 1 and ops(model) == ["Relu", "Pad", "ai.kiln::FusedConv", "Slice"]
    pad = next(n for n in model.graph if n.op_type == "Pad")
    assert pad.inputs[0].name == "z"
    assert_same(proto, model, dims={"N": 2})


def _unfixable():
    """A MatMul of two computed operands (K=12), a grouped conv (6 channels per group), a depthwise conv."""
    nodes = [helper.make_node("MatMul", ["q", "k"], ["s"], name="qk"),
             helper.make_node("Conv", ["x", "wg"], ["g"], name="grouped", group=2, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["g", "wd"], ["d"], name="depthwise", group=12, pads=[1, 1, 1, 1])]
    return _graph(nodes, [("q", [2, 4, 8, 12]), ("k", [2, 4, 12, 8]), ("x", [1, 12, 6, 6])],
                  [("s", [2, 4, 8, 8]), ("d", [1, 12, 6, 6])], [_init("wg", [12, 6, 3, 3]), _init("wd", [12, 1, 3, 3])])


def test_what_cannot_be_fixed_is_reported_with_what_to_change():
    proto = _unfixable()
    findings = get_pass("pad_for_tensor_cores").find(load(proto), PassContext(precision="fp16"))
    assert [f.nodes for f in findings] == [["qk"], ["grouped"]]
    assert all(f.rule == "misaligned-dims" and f.pass_name is None for f in findings)
    assert "multiples of 8" in findings[0].fix and "hidden size" in findings[0].fix
    assert "per group" in findings[1].fix
    assert finding_cost(load(proto), findings[0]).flops == 2 * (2 * 4 * 8) * 12 * 8
    model, count, _ = _pad(proto)
    assert count == 0 and ops(model) == ["MatMul", "Conv", "Conv"]


def test_find_reports_exactly_what_apply_pads():
    nodes = [*_mlp().graph.node, helper.make_node("MatMul", ["q", "k"], ["s"], name="qk")]
    proto = _graph(nodes, [("x", ["N", 50]), ("q", [4, 12]), ("k", [12, 8])], [("y", ["N", 20]), ("s", [4, 8])],
                   list(_mlp().graph.initializer))
    ctx = PassContext(precision="fp16", dims={"N": 3})
    findings = get_pass("pad_for_tensor_cores").find(load(proto), ctx)
    assert [(f.nodes, f.pass_name) for f in findings] == [(["mm1"], "pad_for_tensor_cores"),
                                                          (["mm2"], "pad_for_tensor_cores"), (["qk"], None)]
    mm1 = findings[0]
    assert mm1.shapes == {"x": ["N", 50], "w1": [50, 30], "m1": ["N", 30]}
    cost = finding_cost(load(proto), mm1, ctx.dims)
    assert cost.flops == 2 * 3 * 50 * 30 and cost.bytes == (3 * 50 + 50 * 30 + 3 * 30) * 4
    assert mm1.details["k"] == 50 and mm1.details["n"] == 30
    model, count, context = run_pass(proto, "pad_for_tensor_cores", precision="fp16", dims={"N": 3})
    assert count == 2 and [line.split(":")[0] for line in context.log] == ["mm1", "mm2"]
    assert [f.nodes[0] for f in get_pass("pad_for_tensor_cores").find(model, ctx)] == ["qk"]


class FakeMeasure:
    """Stands in for the builder's timer: runs both callables, keeps their results, answers with set times."""

    def __init__(self, original_ms: float, padded_ms: float) -> None:
        self.times = (original_ms, padded_ms)
        self.results: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, original, padded):
        self.results.append((original(), padded()))
        return self.times


@pytest.mark.parametrize("faster,expected", [(True, ["Pad", "MatMul", "Slice"]), (False, ["MatMul"])],
                         ids=["padded-faster", "padded-slower"])
def test_measured_matmul_is_kept_only_when_faster(faster, expected):
    proto = _matmul()
    measure = FakeMeasure(1.0, 0.5) if faster else FakeMeasure(0.5, 1.0)
    model, count, context = _pad(proto, "fp16", measure=measure, dims={"N": 16})
    assert ops(model) == expected and count == (1 if faster else 0)
    assert "measured 1.0000 ms -> 0.5000 ms padded: kept" in context.log[0] if faster else "dropped" in context.log[0]
    ((original, padded),) = measure.results
    assert original.dtype == padded.dtype == torch.float16 and original.shape == padded.shape == (16, 30)
    torch.testing.assert_close(original.float(), padded.float(), rtol=1e-2, atol=1e-2)
    assert_same(proto, model, dims={"N": 3})


@pytest.mark.parametrize("faster", [True, False])
def test_measured_conv_in_bf16_runs_both_variants(faster):
    proto = _conv(c_in=5, c_out=6)
    measure = FakeMeasure(2.0, 1.0) if faster else FakeMeasure(1.0, 2.0)
    model, count, context = _pad(proto, "bf16", measure=measure, dims={"N": 2})
    assert count == (1 if faster else 0)
    assert ops(model) == (["Relu", "Pad", "Conv", "Slice"] if faster else ["Relu", "Conv"])
    ((original, padded),) = measure.results
    assert original.dtype == torch.bfloat16 and original.shape == padded.shape == (2, 6, 6, 6)
    torch.testing.assert_close(original.float(), padded.float(), rtol=5e-2, atol=5e-2)
    assert_same(proto, model, dims={"N": 2})


def test_a_folded_input_is_timed_without_its_pad_copy():
    measure = FakeMeasure(1.0, 0.5)
    model, count, _ = _pad(_mlp(), "fp16", measure=measure, dims={"N": 4})
    assert count == 2 and ops(model) == ["Pad", "MatMul", "Add", "Relu", "MatMul", "Slice"]
    for original, padded in measure.results:
        torch.testing.assert_close(original.float(), padded.float(), rtol=1e-2, atol=1e-2)


def test_not_measured_without_concrete_shapes_or_for_int8():
    measure = FakeMeasure(0.5, 1.0)  # would drop the rewrite if asked
    model, count, context = _pad(_matmul(), "fp16", measure=measure)  # N unknown
    assert count == 1 and "not measured (input x has no concrete shape" in context.log[0]
    model, count, context = _pad(_matmul(), "int8", measure=measure, dims={"N": 4})
    assert count == 1 and "not measured" in context.log[0] and "int8" in context.log[0]
    assert measure.results == []


def test_a_first_layer_with_four_channels_still_gets_its_output_channels_padded():
    model, count, context = _pad(_conv(c_in=4, c_out=6, first=True))
    assert count == 1 and ops(model) == ["Conv", "Slice"] and _weight(model, "Conv").shape == (8, 4, 3, 3)
    assert "C_out 6->8" in context.log[0] and "C_in" not in context.log[0]


def _matmul_op_matmul(op, const_shape=(30,)):
    const = np.abs(_array(list(const_shape), 7)) + 0.5  # nonzero: a divisor too
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node(op, ["m1", "k"], ["t"]),
             helper.make_node("MatMul", ["t", "w2"], ["y"])]
    return _graph(nodes, [("x", ["N", 64])], [("y", ["N", 32])],
                  [_init("w1", [64, 30], 1), numpy_helper.from_array(const, "k"), _init("w2", [30, 32], 3)])


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Max", "Min"])
@pytest.mark.parametrize("const_shape", [(30,), (1, 30), (1,)], ids=["N", "1N", "scalar"])
def test_padding_folds_through_binary_ops_with_constants(op, const_shape):
    proto = _matmul_op_matmul(op, const_shape)
    model, count, _ = _pad(proto)
    assert count == 2 and ops(model) == ["MatMul", op, "MatMul"]
    assert_same(proto, model, dims={"N": 3})


def test_no_fold_through_an_op_that_could_make_the_padding_infinite():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Log", ["m1"], ["t"]),
             helper.make_node("MatMul", ["t", "w2"], ["y"])]
    proto = _graph(nodes, [("x", ["N", 64])], [("y", ["N", 32])], [_init("w1", [64, 30], 1), _init("w2", [30, 32], 3)])
    model, count, _ = _pad(proto)  # Log(0) = -inf would meet the zero rows: a Slice and a Pad stay
    assert count == 2 and ops(model) == ["MatMul", "Slice", "Log", "Pad", "MatMul"]


def _conv_with_minus_one_batch():
    """``_conv`` as paddle2onnx writes it: the batch dim is ``-1`` on the input, a value_info and the output."""
    proto = _conv(c_in=5, c_out=6)
    for value in (proto.graph.input[0], proto.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = -1
    proto.graph.value_info.append(helper.make_tensor_value_info("r", F, [-1, 5, 6, 6]))
    return proto


def test_a_minus_one_batch_from_a_file_is_dynamic_and_never_timed_as_a_size():
    measure = FakeMeasure(2.0, 1.0)
    model, count, context = _pad(_conv_with_minus_one_batch(), "fp16", measure=measure)
    assert count == 1 and ops(model) == ["Relu", "Pad", "Conv", "Slice"]
    assert "not measured (input r has no concrete shape" in context.log[0] and measure.results == []
    assert not isinstance(model.graph.inputs[0].shape[0], int)
    assert_same(_conv(c_in=5, c_out=6), model, dims={"N": 2})


def test_a_minus_one_dim_in_an_in_memory_model_is_no_size():
    """An ir.Model built without kiln's loader keeps its ``-1``: the pass must not pad to it, time
    at it, nor build a tensor of it."""
    import onnx_ir as ir

    proto = _matmul(k=50, n=30, x_shape=[-1, 50])
    proto.graph.value_info.append(helper.make_tensor_value_info("y", F, [-1, 30]))
    model = ir.serde.deserialize_model(proto)
    assert model.graph.inputs[0].shape[0] == -1
    measure = FakeMeasure(0.5, 1.0)  # would drop the rewrite if asked
    context = PassContext(precision="fp16", measure=measure)
    findings = get_pass("pad_for_tensor_cores").find(model, context)
    assert len(findings) == 1 and finding_cost(model, findings[0]).flops >= 0
    assert get_pass("pad_for_tensor_cores").apply(model, context) == 1
    assert "not measured (input x has no concrete shape" in context.log[0] and measure.results == []
