"""Lowering: each fusion fires on the graph it is for, leaves alone the graph where it must not,
and the fused engine computes what the unfused graph computes (fresh random inputs, fp32 1e-4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kiln
from kiln.builder import BuildConfig
from kiln.precision import scaled_error
from tests.builder.graphs import model, node, weights


def build_and_check(m, rng, **config):
    """Build on CPU, run engine and reference executor on the same random inputs; return the layers,
    each as (kind, the model's op types it covers, before the passes fused some into one node)."""
    engine = kiln.build(m, BuildConfig(device="cpu", opt_level=1, **config))
    feeds = {v.name: rng.standard_normal([d for d in v.shape]).astype(np.float32) for v in m.graph.inputs
             if v.name not in m.graph.initializers}
    got = engine.run(feeds)
    ref = kiln.Executor(m).run(feeds)
    for name in ref:
        assert scaled_error(got[name].float(), ref[name].float()) <= 1e-4, name
    return [(layer["kind"], [op for _, op in layer["origins"]]) for layer in engine.plan["layers"]]


def conv_inits(rng, cin=4, cout=8):
    return [("w", weights(rng, cout, cin, 3, 3)), ("b", weights(rng, cout))]


def test_conv_bias_residual_relu_is_one_layer(rng):
    m = model([node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), node("Add", ["c", "z"], ["s"]),
               node("Relu", ["s"], ["y"])],
              [("x", [2, 4, 6, 6]), ("z", [2, 8, 6, 6])], [("y", [2, 8, 6, 6])], conv_inits(rng))
    assert build_and_check(m, rng) == [("Conv", ["Conv", "Add", "Relu"])]


def test_residual_first_operand_and_asymmetric_pads(rng):
    m = model([node("Conv", ["x", "w", "b"], ["c"], pads=[0, 1, 1, 0], strides=[2, 1]), node("Add", ["z", "c"], ["s"]),
               node("Relu", ["s"], ["y"])],
              [("x", [1, 4, 7, 6]), ("z", [1, 8, 3, 5])], [("y", [1, 8, 3, 5])], conv_inits(rng))
    assert build_and_check(m, rng) == [("Conv", ["Conv", "Add", "Relu"])]


@pytest.mark.parametrize("act, nodes", [
    ("clip", [node("Clip", ["c", "lo", "hi"], ["y"])]),
    ("silu", [node("Sigmoid", ["c"], ["s"]), node("Mul", ["c", "s"], ["y"])]),
    ("leaky", [node("LeakyRelu", ["c"], ["y"], alpha=0.2)]),
    ("hardswish", [node("HardSwish", ["c"], ["y"])]),
    ("hardsigmoid", [node("HardSigmoid", ["c"], ["y"], alpha=0.3, beta=0.4)]),
])
def test_conv_activations_fuse(rng, act, nodes):
    inits = conv_inits(rng) + [("lo", np.array(0.0, np.float32)), ("hi", np.array(6.0, np.float32))]
    m = model([node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1])] + nodes,
              [("x", [2, 4, 5, 5])], [("y", [2, 8, 5, 5])], inits)
    layers = build_and_check(m, rng)
    assert len(layers) == 1 and layers[0][0] == "Conv" and len(layers[0][1]) == 1 + len(nodes)


def test_conv_output_read_twice_keeps_its_activation_apart(rng):
    m = model([node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), node("Relu", ["c"], ["y"])],
              [("x", [1, 4, 5, 5])], [("y", [1, 8, 5, 5]), ("c", [1, 8, 5, 5])], conv_inits(rng))
    assert build_and_check(m, rng) == [("Conv", ["Conv"]), ("Node", ["Relu"])]


def test_same_upper_conv_stays_a_node(rng):
    m = model([node("Conv", ["x", "w", "b"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])],
              [("x", [1, 4, 5, 5])], [("y", [1, 8, 3, 3])], conv_inits(rng))
    assert build_and_check(m, rng) == [("Node", ["Conv"])]


def test_matmul_bias_gelu_flattens_leading_dims(rng):
    m = model([node("MatMul", ["x", "w"], ["m"]), node("Add", ["m", "b"], ["a"]), node("Gelu", ["a"], ["y"])],
              [("x", [2, 3, 8])], [("y", [2, 3, 16])], [("w", weights(rng, 8, 16)), ("b", weights(rng, 16))], opset=20)
    assert build_and_check(m, rng) == [("Gemm", ["MatMul", "Add", "Gelu"])]


def test_matmul_with_a_full_tensor_add_keeps_the_add(rng):
    m = model([node("MatMul", ["x", "w"], ["m"]), node("Add", ["m", "b"], ["y"])],
              [("x", [2, 3, 8])], [("y", [2, 3, 16])], [("w", weights(rng, 8, 16)), ("b", weights(rng, 2, 3, 16))])
    assert build_and_check(m, rng) == [("Gemm", ["MatMul"]), ("Node", ["Add"])]


@pytest.mark.parametrize("trans_b, alpha, beta", [(0, 1.0, 1.0), (1, 0.5, 2.0)])
def test_gemm_folds_alpha_beta_and_transpose(rng, trans_b, alpha, beta):
    w = weights(rng, 16, 8) if trans_b else weights(rng, 8, 16)
    m = model(
        [node("Gemm", ["x", "w", "c"], ["g"], transB=trans_b, alpha=alpha, beta=beta), node("Relu", ["g"], ["y"])],
        [("x", [4, 8])],
        [("y", [4, 16])],
        [("w", w), ("c", weights(rng, 1, 16))],
    )
    assert build_and_check(m, rng) == [("Gemm", ["Gemm", "Relu"])]


def test_gemm_trans_a_stays_a_node(rng):
    m = model(
        [node("Gemm", ["x", "w"], ["y"], transA=1)], [("x", [8, 4])], [("y", [4, 16])], [("w", weights(rng, 8, 16))]
    )
    assert build_and_check(m, rng) == [("Node", ["Gemm"])]


def test_layernorm_takes_its_residual_add(rng):
    m = model([node("Add", ["x", "r"], ["s"]), node("LayerNormalization", ["s", "g", "b"], ["y"], epsilon=1e-3)],
              [("x", [2, 5, 16]), ("r", [2, 5, 16])], [("y", [2, 5, 16])],
              [("g", weights(rng, 16) + 1), ("b", weights(rng, 16))])
    assert build_and_check(m, rng) == [("LayerNorm", ["Add", "LayerNormalization"])]


def test_layernorm_over_two_axes_and_shared_add(rng):
    m = model([node("Add", ["x", "r"], ["s"]), node("LayerNormalization", ["s", "g"], ["n"], axis=-2),
               node("Add", ["n", "s"], ["y"])],
              [("x", [2, 5, 16]), ("r", [2, 5, 16])], [("y", [2, 5, 16])], [("g", weights(rng, 5, 16) + 1)])
    assert build_and_check(m, rng) == [("Node", ["Add"]), ("LayerNorm", ["LayerNormalization"]), ("Node", ["Add"])]


@pytest.mark.parametrize("axis, kind", [(-1, "Softmax"), (2, "Softmax"), (1, "Node")])
def test_softmax_only_over_the_last_axis(rng, axis, kind):
    m = model([node("Softmax", ["x"], ["y"], axis=axis)], [("x", [2, 3, 7])], [("y", [2, 3, 7])])
    assert build_and_check(m, rng) == [(kind, ["Softmax"])]


def test_decomposed_gelu_is_one_pointwise_layer(rng):
    inits = [
        ("sq", np.array(1.4142135, np.float32)),
        ("one", np.array(1.0, np.float32)),
        ("half", np.array(0.5, np.float32)),
        ("bias", weights(rng, 16)),
    ]
    m = model([node("Add", ["x", "bias"], ["xb"]), node("Div", ["xb", "sq"], ["d"]), node("Erf", ["d"], ["e"]),
               node("Add", ["e", "one"], ["a"]), node("Mul", ["xb", "a"], ["m"]), node("Mul", ["m", "half"], ["y"])],
              [("x", [3, 16])], [("y", [3, 16])], inits)
    # fuse_gelu makes the five GELU nodes one Gelu, and lowering chains it with the bias Add
    [(kind, ops)] = build_and_check(m, rng)
    assert kind == "Pointwise" and sorted(ops) == sorted(["Add", "Div", "Erf", "Add", "Mul", "Mul"])


def test_pointwise_chain_splits_at_a_graph_output(rng):
    m = model([node("Mul", ["x", "x"], ["a"]), node("Exp", ["a"], ["b"]), node("Neg", ["b"], ["y"])],
              [("x", [3, 4])], [("y", [3, 4]), ("b", [3, 4])])
    assert build_and_check(m, rng) == [("Pointwise", ["Mul", "Exp"]), ("Node", ["Neg"])]


BINARY = ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"]
UNARY = ["Neg", "Abs", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "HardSigmoid",
         "HardSwish", "Elu", "Selu", "Softplus", "Softsign", "Identity", "Floor", "Ceil", "Sin", "Cos", "Mish",
         "ThresholdedRelu", "Celu"]


@pytest.mark.parametrize("op", BINARY + UNARY)
def test_every_pointwise_op_matches_its_reference(rng, op):
    """Each op the pointwise layer holds, in a chain with a broadcast input, equals the reference ops."""
    first = node(op, ["x", "r"] if op in BINARY else ["x"], ["a"], name="op")
    m = model([first, node("Add", ["a", "r"], ["y"])], [("x", [3, 4, 5]), ("r", [4, 5])], [("y", [3, 4, 5])], opset=18)
    # fold_constants drops an Identity before lowering sees it
    assert build_and_check(m, rng) == ([("Node", ["Add"])] if op == "Identity" else [("Pointwise", [op, "Add"])])


def test_constant_subgraphs_fold_into_weights(rng):
    """A weight reached through Identity/Transpose of an initializer (as exporters write) still fuses."""
    m = model(
        [node("Transpose", ["wt"], ["w"], perm=[1, 0]), node("MatMul", ["x", "w"], ["m"]), node("Relu", ["m"], ["y"])],
        [("x", [4, 8])],
        [("y", [4, 16])],
        [("wt", weights(rng, 16, 8))],
    )
    assert build_and_check(m, rng) == [("Gemm", ["MatMul", "Relu"])]


def test_fused_layer_runs_where_its_last_node_stood(rng):
    """The residual comes from a node listed after the conv: the fused layer must run after it."""
    m = model([node("Relu", ["x"], ["a"]), node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
               node("Identity", ["a"], ["a2"]), node("Add", ["c", "a2"], ["s"]), node("Relu", ["s"], ["y"])],
              [("x", [1, 8, 4, 4])], [("y", [1, 8, 4, 4])], [("w", weights(rng, 8, 8, 3, 3)), ("b", weights(rng, 8))])
    assert build_and_check(m, rng)[-1] == ("Conv", ["Conv", "Add", "Relu"])


def _attention_nodes(cleanup: bool, post_scale: bool):
    """scaled_dot_product_attention as the TorchScript exporter writes it (q and k each scaled by
    sqrt(scale), a boolean mask turned into 0/-inf, NaN rows cleaned), or with one scale after the
    MatMul and no clean-up."""
    if post_scale:
        nodes = [node("MatMul", ["q", "k"], ["t"]), node("Div", ["t", "d"], ["s"])]
    else:
        nodes = [node("Mul", ["q", "r"], ["qs"]), node("Mul", ["k", "r"], ["ks"]), node("MatMul", ["qs", "ks"], ["s"])]
    nodes += [node("Where", ["m", "zero", "ninf"], ["bias"]), node("Add", ["s", "bias"], ["x"]),
              node("Softmax", ["x"], ["p"], axis=-1)]
    if cleanup:
        nodes += [
            node("IsNaN", ["p"], ["nan"]),
            node("Where", ["nan", "zero", "p"], ["pc"]),
            node("MatMul", ["pc", "v"], ["y"]),
        ]
    else:
        nodes += [node("MatMul", ["p", "v"], ["y"])]
    return nodes


@pytest.mark.parametrize("cleanup,post_scale", [(True, False), (False, True)])
def test_attention_becomes_one_layer(rng, cleanup, post_scale):
    from onnx import TensorProto

    inits = [("r", np.array(8 ** -0.25, np.float32)), ("d", np.array(8 ** 0.5, np.float32)),
             ("zero", np.array(0.0, np.float32)), ("ninf", np.array(-np.inf, np.float32))]
    m = model(_attention_nodes(cleanup, post_scale),
              [("q", [2, 3, 5, 8]), ("k", [2, 3, 8, 6]), ("v", [2, 3, 6, 4]), ("m", [2, 1, 1, 6], TensorProto.BOOL)],
              [("y", [2, 3, 5, 4])], inits)
    engine = kiln.build(m, BuildConfig(device="cpu", opt_level=1))
    kinds = [(layer["kind"], layer["op_types"]) for layer in engine.plan["layers"]]
    assert ("Node", ["Where"]) in kinds and sum(k == "Attention" for k, _ in kinds) == 1
    feeds = {
        n: rng.standard_normal(s).astype(np.float32)
        for n, s in (("q", (2, 3, 5, 8)), ("k", (2, 3, 8, 6)), ("v", (2, 3, 6, 4)))
    }
    mask = rng.random((2, 1, 1, 6)) < 0.7
    mask[1] = False  # every key masked for the second batch: NaN rows, cleaned to zeros (or NaN without the clean-up)
    feeds["m"] = mask
    for tactic in ("attention.torch", "attention.sdpa"):
        engine = kiln.build(m, BuildConfig(device="cpu", opt_level=1, allow_tactics=[tactic],
                                           deny_tactics=[] if tactic == "attention.torch" else ["attention.torch"]))
        got, ref = engine.run(feeds)["y"], kiln.Executor(m).run(feeds)["y"]
        assert scaled_error(got, ref) <= 1e-4, tactic
        assert bool(torch.isnan(got[1]).all()) == (not cleanup)


@pytest.mark.parametrize("tactic", ["attention.torch", "attention.sdpa"])
def test_attention_with_a_constant_mask_reads_it_as_a_weight(rng, tmp_path, tactic):
    """A causal mask of constants (what a dynamo export at static shapes holds: Where(tril, 0, min),
    folded into an initializer by fold_constants) is a weight of the attention layer. It was listed
    as a runtime input that no layer writes: "layer '.../FusedAttention' reads 'where' before
    anything writes it" (kiln issue 12, item 2)."""
    lowest = np.array(np.finfo(np.float32).min, np.float32)
    inits = [("d", np.array(8 ** 0.5, np.float32)), ("zero", np.array(0.0, np.float32)), ("lowest", lowest),
             ("causal", np.tril(np.ones((5, 5), bool)))]
    nodes = [node("MatMul", ["q", "k"], ["t"]), node("Div", ["t", "d"], ["s"]),
             node("Where", ["causal", "zero", "lowest"], ["where"]), node("Add", ["s", "where"], ["x"]),
             node("Softmax", ["x"], ["p"], axis=-1), node("MatMul", ["p", "v"], ["y"])]
    m = model(nodes, [("q", [2, 3, 5, 8]), ("k", [2, 3, 8, 5]), ("v", [2, 3, 5, 4])], [("y", [2, 3, 5, 4])], inits)
    engine = kiln.build(m, BuildConfig(device="cpu", opt_level=1, allow_tactics=[tactic],
                                       deny_tactics=[] if tactic == "attention.torch" else ["attention.torch"]))
    (layer,) = engine.plan["layers"]
    assert layer["kind"] == "Attention" and layer["inputs"] == ["q", "k", "v"] and layer["weights"] == {"mask": "where"}
    feeds = {
        n: rng.standard_normal(s).astype(np.float32)
        for n, s in (("q", (2, 3, 5, 8)), ("k", (2, 3, 8, 5)), ("v", (2, 3, 5, 4)))
    }
    ref = kiln.Executor(m).run(feeds)["y"]
    engine.save(tmp_path / "causal.kiln")
    for e in (engine, kiln.load_engine(tmp_path / "causal.kiln")):
        assert scaled_error(e.run(feeds)["y"], ref) <= 1e-4


def test_attention_probabilities_read_elsewhere_stay_unfused(rng):
    inits = [
        ("r", np.array(0.5, np.float32)),
        ("zero", np.array(0.0, np.float32)),
        ("ninf", np.array(-1e9, np.float32)),
    ]
    nodes = [
        node("MatMul", ["q", "k"], ["s"]),
        node("Softmax", ["s"], ["p"], axis=-1),
        node("MatMul", ["p", "v"], ["y"]),
    ]
    m = model(
        nodes,
        [("q", [1, 2, 4, 8]), ("k", [1, 2, 8, 4]), ("v", [1, 2, 4, 8])],
        [("y", [1, 2, 4, 8]), ("p", [1, 2, 4, 4])],
        inits,
    )
    assert build_and_check(m, rng) == [("Node", ["MatMul"]), ("Softmax", ["Softmax"]), ("Node", ["MatMul"])]


@pytest.mark.parametrize("form", ["torchscript", "half_first"])
def test_erf_gelu_after_a_gemm_is_its_activation(rng, form):
    inits = [("w", weights(rng, 8, 16)), ("b", weights(rng, 16)), ("sq", np.array(2 ** 0.5, np.float32)),
             ("one", np.array(1.0, np.float32)), ("half", np.array(0.5, np.float32))]
    head = [node("MatMul", ["x", "w"], ["m"]), node("Add", ["m", "b"], ["h"]), node("Div", ["h", "sq"], ["d"]),
            node("Erf", ["d"], ["e"]), node("Add", ["e", "one"], ["a"])]
    if form == "torchscript":
        tail = [node("Mul", ["h", "a"], ["g"]), node("Mul", ["g", "half"], ["y"])]
    else:
        tail = [node("Mul", ["h", "half"], ["g"]), node("Mul", ["g", "a"], ["y"])]
    m = model(head + tail, [("x", [2, 3, 8])], [("y", [2, 3, 16])], inits)
    layers = build_and_check(m, rng)
    assert len(layers) == 1 and layers[0][0] == "Gemm" and len(layers[0][1]) == 7


def test_layout_pass_marks_reach_the_conv_layers(rng):
    """choose_layout's NHWC marks (fp16 build) arrive in the conv layers' attributes, where the conv
    tactics read them (conv_runs_nhwc); an fp32 build has none."""
    from kiln.builder.tactics.conv import conv_runs_nhwc

    m = model(
        [
            node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            node("Relu", ["c"], ["r"]),
            node("Conv", ["r", "w2", "b2"], ["y"], pads=[1, 1, 1, 1]),
        ],
        [("x", [1, 8, 6, 6])],
        [("y", [1, 8, 6, 6])],
        [
            ("w", weights(rng, 8, 8, 3, 3)),
            ("b", weights(rng, 8)),
            ("w2", weights(rng, 8, 8, 3, 3)),
            ("b2", weights(rng, 8)),
        ],
    )
    fp16 = kiln.build(m, BuildConfig(device="cpu", opt_level=1, fp16=True))
    convs = [layer for layer in fp16.plan["layers"] if layer["kind"] == "Conv"]
    assert len(convs) == 2 and all(layer["attrs"].get("layout") == "nhwc" for layer in convs)
    assert conv_runs_nhwc(_Layer(convs[0]), "fp32", "cuda") and not conv_runs_nhwc(
        _Layer({"attrs": {}}), "fp32", "cuda"
    )
    fp32 = kiln.build(m, BuildConfig(device="cpu", opt_level=1))
    assert not any("layout" in layer["attrs"] for layer in fp32.plan["layers"])


class _Layer:
    """What conv_runs_nhwc reads of a layer: its attributes."""

    def __init__(self, record):
        self.attrs = record["attrs"]


@pytest.mark.slow
def test_dynamo_export_at_static_shapes_with_a_causal_mask_builds(tmp_path):
    """transformers' eager masks at a static sequence length, exported by the dynamo exporter:
    ``torch.where(causal, 0, finfo.min)`` is all constants, so fold_constants makes it an initializer
    the fused attention reads (the GPT-2 / DistilBERT build failure of kiln issue 12, item 2)."""
    import warnings

    from kiln.compare import run_onnxruntime

    class Causal(torch.nn.Module):
        def __init__(self, d=16, heads=2, seq=6):
            super().__init__()
            self.heads, self.qkv, self.o = heads, torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
            self.register_buffer("tril", torch.tril(torch.ones(seq, seq, dtype=torch.bool)))

        def forward(self, x):
            n, s, d = x.shape
            q, k, v = self.qkv(x).view(n, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            mask = torch.where(self.tril[:s, :s], 0.0, torch.finfo(x.dtype).min)
            scores = torch.matmul(q, k.transpose(2, 3)) * (d // self.heads) ** -0.5 + mask
            return self.o(torch.matmul(scores.softmax(-1), v).transpose(1, 2).reshape(n, s, d))

    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    path = tmp_path / "causal.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Causal().eval(), (x,), str(path), input_names=["x"], opset_version=18, dynamo=True, verbose=False
        )
    engine = kiln.build(kiln.load_model(path), BuildConfig(device="cpu"))
    assert [layer["kind"] for layer in engine.plan["layers"]].count("Attention") == 1
    feeds = {"x": x.numpy()}
    got, ref = engine.run(feeds), run_onnxruntime(path, feeds)
    for name in ref:
        assert scaled_error(got[name].float(), torch.from_numpy(ref[name])) <= 1e-4, name


def test_a_layer_fused_by_a_pass_is_described_by_the_ops_it_fused(rng):
    """Errors and logs name what a fused layer computes (MatMul+Add+Gelu), not only its first op; a
    FusedConv layer keeps its own name, an unfused layer its op."""
    m = model([node("MatMul", ["x", "w"], ["m"]), node("Add", ["m", "b"], ["a"]), node("Gelu", ["a"], ["g"]),
               node("Neg", ["g"], ["y"])],
              [("x", [2, 3, 8])], [("y", [2, 3, 16])], [("w", weights(rng, 8, 16)), ("b", weights(rng, 16))], opset=20)
    engine = kiln.build(m, BuildConfig(device="cpu", opt_level=1))
    wheres = [step.where for step in engine.program.steps[0]]
    assert any(w.endswith("(op MatMul+Add+Gelu)") for w in wheres), wheres
    assert any(w.endswith("(op Neg)") for w in wheres), wheres
