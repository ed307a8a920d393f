"""kiln doctor: each finding type on a model built to contain it, shares and order, text and JSON, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.builder import Profile
from kiln.cli import main
from kiln.doctor import DYNAMIC_INPUT, SLOW_PATH, diagnose, render_text

F = TensorProto.FLOAT


def _vi(name, shape, dtype=F):
    return helper.make_tensor_value_info(name, dtype, shape)


def _w(name, shape, seed=0):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def _c(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _proto(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "doctor_test", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _diagnose(proto, precision="fp32", **kwargs):
    return diagnose(kiln.load_model_proto(proto, name="test"), precision=precision, **kwargs)


def _entries(report, rule=None, pass_name=None):
    return [e for e in report.entries if (rule is None or e.finding.rule == rule)
            and (pass_name is None or e.finding.pass_name == pass_name)]


def _assert_reported(report, pass_name, node, rule=None):
    """A finding of ``pass_name`` (and ``rule``) that names ``node``, with a share and a fix naming the pass."""
    assert not report.errors, report.errors
    found = [e for e in _entries(report, rule, pass_name) if node in e.finding.nodes]
    assert found, (f"no {rule or pass_name} finding on {node}: "
                   f"{[(e.finding.rule, e.finding.nodes) for e in report.entries]}")
    entry = found[0]
    assert entry.share > 0
    assert pass_name in entry.finding.fix
    return entry


# -- models, one per finding type -------------------------------------------------------------------


def reduce_model(inner=2):
    return _proto([helper.make_node("ReduceMean", ["x"], ["y"], name="reduce", axes=[1], keepdims=1)],
                  [_vi("x", [2, 64, inner])], [_vi("y", [2, 1, inner])])


def matmul_model(k=30, n=50, m=4, name="mm"):
    return _proto([helper.make_node("MatMul", ["x", "w"], ["y"], name=name)], [_vi("x", [m, k])], [_vi("y", [m, n])],
                  [_w("w", (k, n))])


def nd_matmul_model():
    return _proto([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm4d")], [_vi("x", [2, 3, 16, 32])],
                  [_vi("y", [2, 3, 16, 64])], [_w("w", (32, 64))])


def conv_model(cin=16, cout=32, name="conv"):
    return _proto([helper.make_node("Conv", ["x", "w"], ["y"], name=name, pads=[1, 1, 1, 1])],
                  [_vi("x", [1, cin, 32, 32])], [_vi("y", [1, cout, 32, 32])], [_w("w", (cout, cin, 3, 3))])


def conv_relu_model():
    return _proto([helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                   helper.make_node("Relu", ["c"], ["y"], name="relu")],
                  [_vi("x", [1, 16, 16, 16])], [_vi("y", [1, 16, 16, 16])],
                  [_w("w", (16, 16, 3, 3)), _w("b", (16,), 1)])


def layernorm_model():
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], name="ln_mean", axes=[-1], keepdims=1),
        helper.make_node("Sub", ["x", "mean"], ["d"], name="ln_sub"),
        helper.make_node("Pow", ["d", "two"], ["sq"], name="ln_pow"),
        helper.make_node("ReduceMean", ["sq"], ["var"], name="ln_var", axes=[-1], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["ve"], name="ln_add_eps"),
        helper.make_node("Sqrt", ["ve"], ["std"], name="ln_sqrt"),
        helper.make_node("Div", ["d", "std"], ["norm"], name="ln_div"),
        helper.make_node("Mul", ["norm", "gamma"], ["scaled"], name="ln_mul"),
        helper.make_node("Add", ["scaled", "beta"], ["y"], name="ln_add"),
    ]
    return _proto(nodes, [_vi("x", [4, 16, 64])], [_vi("y", [4, 16, 64])],
                  [_c("two", 2.0), _c("eps", 1e-5), _w("gamma", (64,)), _w("beta", (64,), 1)])


def gelu_model():
    nodes = [
        helper.make_node("Div", ["x", "sqrt2"], ["s"], name="gelu_div"),
        helper.make_node("Erf", ["s"], ["e"], name="gelu_erf"),
        helper.make_node("Add", ["e", "one"], ["a"], name="gelu_add"),
        helper.make_node("Mul", ["x", "a"], ["m"], name="gelu_mul"),
        helper.make_node("Mul", ["m", "half"], ["y"], name="gelu_half"),
    ]
    return _proto(nodes, [_vi("x", [4, 64])], [_vi("y", [4, 64])],
                  [_c("sqrt2", math.sqrt(2.0)), _c("one", 1.0), _c("half", 0.5)])


def attention_model():
    nodes = [
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="att_qk"),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"], name="att_scale"),
        helper.make_node("Softmax", ["scaled"], ["p"], name="att_softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["y"], name="att_pv"),
    ]
    return _proto(nodes, [_vi("q", [2, 4, 16, 32]), _vi("kt", [2, 4, 32, 16]), _vi("v", [2, 4, 16, 32])],
                  [_vi("y", [2, 4, 16, 32])], [_c("scale", 32 ** -0.5)])


def shuffle_model():
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], name="noop_transpose", perm=[0, 1, 2]),
        helper.make_node("Reshape", ["t", "shape"], ["r"], name="noop_reshape"),
        helper.make_node("Relu", ["r"], ["y"], name="relu"),
    ]
    return _proto(nodes, [_vi("x", [2, 8, 16])], [_vi("y", [2, 8, 16])], [_c("shape", [2, 8, 16], np.int64)])


def dynamic_model():
    return _proto([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                   helper.make_node("Relu", ["h"], ["y"], name="relu")],
                  [_vi("x", ["batch", 64])], [_vi("y", ["batch", 64])], [_w("w", (64, 64))])


# -- pass-provided finding types ---------------------------------------------------------------------


def test_reduce_not_last_axis():
    # kept axis of 2 fp32 after the reduced one: 8-byte runs, rewritten by rule
    _assert_reported(_diagnose(reduce_model()), "reduce_to_last_axis", "reduce", "reduce-not-last-axis")
    # 8 fp32 (32-byte runs): reported, left as is by the pass (its decision is in the fix text)
    report = _diagnose(reduce_model(inner=8))
    [entry] = _entries(report, "reduce-not-last-axis")
    assert entry.finding.pass_name is None and "left as is by pass reduce_to_last_axis" in entry.finding.fix
    assert entry.share > 0 and "not fixed automatically" in render_text(report)


def test_misaligned_dims_for_fp16():
    entry = _assert_reported(_diagnose(matmul_model(), "fp16"), "pad_for_tensor_cores", "mm", "misaligned-dims")
    assert entry.finding.shapes
    # a batch given with --shapes sizes the finding's shapes
    dynamic = _proto([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [_vi("x", ["batch", 30])],
                     [_vi("y", ["batch", 50])], [_w("w", (30, 50))])
    [entry] = _entries(_diagnose(dynamic, "fp16", shapes={"x": (8, 30)}), "misaligned-dims")
    assert entry.finding.shapes["x"] == [8, 30]
    # aligned for fp16 (K, N multiples of 8): nothing to pad
    assert not _entries(_diagnose(matmul_model(k=32, n=64), "fp16"), "misaligned-dims")


def test_nd_matmul():
    _assert_reported(_diagnose(nd_matmul_model()), "flatten_matmul", "mm4d", "matmul-nd")


def test_first_conv_with_three_channels():
    _assert_reported(_diagnose(conv_model(cin=3, cout=16, name="stem"), "fp16"), "pad_input_channels", "stem",
                     "first-conv-c3")


def test_nchw_conv_in_low_precision():
    _assert_reported(_diagnose(conv_model(), "fp16"), "choose_layout", "conv", "nchw-conv-low-precision")


def test_conv_without_fused_epilogue():
    _assert_reported(_diagnose(conv_relu_model()), "fuse_conv_activation", "conv", "conv-without-fused-epilogue")


def test_decomposed_layernorm():
    _assert_reported(_diagnose(layernorm_model(), "fp16"), "fuse_layernorm", "ln_mean", "unfused-layernorm")


def test_decomposed_gelu():
    _assert_reported(_diagnose(gelu_model(), "fp16"), "fuse_gelu", "gelu_erf", "unfused-gelu")


def test_unfused_attention():
    entry = _assert_reported(_diagnose(attention_model(), "fp16"), "fuse_attention", "att_softmax", "unfused-attention")
    assert entry.flops_share > 0.5  # the two batched MatMuls are nearly all of this model's work


def test_every_finding_is_sized_by_kiln_cost_alone():
    report = _diagnose(attention_model(), "fp16")
    assert report.entries
    for entry in report.entries:
        estimate = report.cost.of(entry.finding.nodes)
        assert (entry.flops, entry.bytes) == (estimate.flops, estimate.bytes)
        assert entry.flops_share == estimate.flops / report.cost.flops
        assert entry.to_json()["flops"] == estimate.flops and entry.to_json()["bytes"] == estimate.bytes


def test_noop_shuffles():
    report = _diagnose(shuffle_model())
    _assert_reported(report, "drop_noop_shuffles", "noop_transpose", "noop-shuffle")
    _assert_reported(report, "drop_noop_shuffles", "noop_reshape", "noop-shuffle")


def test_unfolded_batchnorm():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn")]
    proto = _proto(nodes, [_vi("x", [1, 16, 8, 8])], [_vi("y", [1, 16, 8, 8])],
                   [_w("w", (16, 16, 3, 3)), _w("g", (16,), 1), _w("b", (16,), 2), _w("m", (16,), 3),
                    _c("v", np.full(16, 0.5))])
    _assert_reported(_diagnose(proto), "fold_batchnorm", "bn", "unfolded-batchnorm")


# -- doctor-only rules -------------------------------------------------------------------------------


def test_dynamic_input_without_profile():
    report = _diagnose(dynamic_model())
    [entry] = _entries(report, DYNAMIC_INPUT)
    f = entry.finding
    assert f.nodes == ["mm"] and f.pass_name is None and f.details["input"] == "x" and f.details["dynamic_axes"] == [0]
    assert f.shapes == {"x": ["batch", 64]}
    assert "--min-shapes x:batchx64" in f.fix and "--opt-shapes" in f.fix and "--max-shapes" in f.fix
    assert entry.share == pytest.approx(1.0)  # everything downstream of the input
    assert report.cost.assumed == ["batch"]
    # --shapes sizes the estimate and the suggested flags, but a build still needs a profile
    sized = _diagnose(dynamic_model(), shapes={"x": (8, 64)})
    [entry] = _entries(sized, DYNAMIC_INPUT)
    assert "--opt-shapes x:8x64" in entry.finding.fix and sized.dims == {"batch": 8} and sized.cost.assumed == []
    assert sized.cost.flops == 8 * report.cost.flops
    # a profile that covers the input: no finding
    profile = Profile.from_lists(min_shapes={"x": (1, 64)}, opt_shapes={"x": (4, 64)}, max_shapes={"x": (16, 64)})
    covered = _diagnose(dynamic_model(), profiles=[profile])
    assert not _entries(covered, DYNAMIC_INPUT) and covered.dims == {"batch": 4}


def test_input_without_a_declared_shape():
    # onnx's checker wants a shape field on graph inputs; an IR built in memory may still lack one
    model = kiln.load_model_proto(_proto([helper.make_node("Relu", ["x"], ["y"], name="relu")], [_vi("x", [2])],
                                         [_vi("y", [2])]))
    model.graph.inputs[0].shape = None
    [entry] = _entries(diagnose(model), DYNAMIC_INPUT)
    assert entry.finding.nodes == ["relu"] and entry.finding.details["dynamic_axes"] is None
    assert "x:?" in entry.finding.fix and "the whole shape" in entry.finding.fix


def test_shapes_that_contradict_the_model_are_refused():
    with pytest.raises(kiln.KilnError, match="fixes it at 64"):
        _diagnose(dynamic_model(), shapes={"x": (8, 32)})
    with pytest.raises(kiln.KilnError, match="unknown input"):
        _diagnose(dynamic_model(), shapes={"nope": (8, 64)})
    with pytest.raises(kiln.KilnError, match="min <= opt <= max"):
        _diagnose(dynamic_model(), profiles=[Profile.from_lists({"x": (8, 64)}, {"x": (4, 64)}, {"x": (16, 64)})])
    with pytest.raises(kiln.KilnError, match="fixes it at 64"):
        _diagnose(dynamic_model(), profiles=[Profile.from_lists({"x": (1, 64)}, {"x": (4, 64)}, {"x": (16, 65)})])


def _slow(report):
    return {e.finding.nodes[0]: e.finding.details["kind"] for e in _entries(report, SLOW_PATH)}


def test_slow_path_ops():
    body = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "one"], ["acc_out"], name="body_add"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")],
        "body", [_vi("i", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL), _vi("acc_in", [4])],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("acc_out", [4])])
    nodes = [
        helper.make_node("NonZero", ["x"], ["nz"], name="nonzero"),
        helper.make_node("TopK", ["x1", "k"], ["vals", "idx"], name="topk_dynamic_k"),
        helper.make_node("Reshape", ["x", "target"], ["reshaped"], name="reshape_from_data"),
        helper.make_node("Shape", ["x"], ["xs"], name="shape"),
        helper.make_node("Reshape", ["x", "xs"], ["same"], name="reshape_from_shape"),
        helper.make_node("NonZero", ["const"], ["nz_const"], name="nonzero_of_constant"),
        helper.make_node("Loop", ["trips", "cond", "acc0"], ["acc"], name="loop", body=body),
        helper.make_node("LSTM", ["seq", "lw", "lr"], ["lstm_y"], name="lstm", hidden_size=4),
        helper.make_node("StringNormalizer", ["text"], ["norm"], name="lower", case_change_action="LOWER"),
    ]
    inputs = [_vi("x", [4, 4]), _vi("x1", [10]), _vi("k", [1], TensorProto.INT64),
              _vi("target", [2], TensorProto.INT64),
              _vi("acc0", [4]), _vi("seq", [5, 2, 3]), _vi("text", [3], TensorProto.STRING)]
    outputs = [_vi("nz", [2, None], TensorProto.INT64), _vi("vals", [None]), _vi("idx", [None], TensorProto.INT64),
               _vi("reshaped", [None, None]), _vi("same", [4, 4]), _vi("nz_const", [2, None], TensorProto.INT64),
               _vi("acc", [4]), _vi("lstm_y", [5, 1, 2, 4]), _vi("norm", [3], TensorProto.STRING)]
    inits = [_c("const", [[1.0, 0.0], [0.0, 1.0]]), _c("trips", 3, np.int64), _c("cond", True, np.bool_),
             _c("one", 1.0),
             _w("lw", (1, 16, 3)), _w("lr", (1, 16, 4))]
    report = _diagnose(_proto(nodes, inputs, outputs, inits))
    assert _slow(report) == {
        "nonzero": "data-dependent-shape", "topk_dynamic_k": "host-read", "reshape_from_data": "host-read",
        "loop": "control-flow", "lstm": "no-fast-tactic", "lower": "strings",
    }
    for entry in _entries(report, SLOW_PATH):
        assert entry.finding.pass_name is None and entry.finding.fix and entry.finding.why
    lstm = next(e for e in _entries(report, SLOW_PATH) if e.finding.nodes == ["lstm"])
    assert lstm.flops_share > 0.5  # the LSTM is nearly all of this model's FLOPs



def computed_reshape_model():
    """x [batch, 64] reshaped to [batch, 8, 8] through Shape -> Gather -> Concat: shape inference cannot
    name the output dims (unk__N), so the estimate needs a reference run."""
    nodes = [
        helper.make_node("Shape", ["x"], ["xs"], name="shape"),
        helper.make_node("Gather", ["xs", "zero"], ["b"], name="batch_of", axis=0),
        helper.make_node("Concat", ["b", "eight_eight"], ["target"], name="target", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["r"], name="reshape"),
        helper.make_node("MatMul", ["r", "w"], ["y"], name="mm"),
    ]
    return _proto(nodes, [_vi("x", ["batch", 64])], [_vi("y", ["batch", 8, 16])],
                  [_c("zero", [0], np.int64), _c("eight_eight", [8, 8], np.int64), _w("w", (8, 16))])


def test_reference_run_sizes_what_inference_cannot():
    exact = 2 * 8 * (4 * 8 * 16)  # MatMul: 2*K*numel(Y) at batch 4
    report = _diagnose(computed_reshape_model(), shapes={"x": (4, 64)})
    assert report.cost.nodes["mm"].flops == exact and report.cost.assumed == []
    # findings show the recorded sizes, not unk__N (the dynamic input itself keeps its symbolic dims)
    [nd] = _entries(report, "matmul-nd")
    assert nd.finding.shapes["r"] == [4, 8, 8] and nd.finding.shapes["y"] == [4, 8, 16]
    assert _entries(report, DYNAMIC_INPUT)[0].finding.shapes == {"x": ["batch", 64]}
    assert any("reference run" in note for note in report.notes)
    assert "reference run" in render_text(report)
    # not given a batch: run at batch 1, and say the batch was taken as 1
    unsized = _diagnose(computed_reshape_model())
    assert unsized.cost.nodes["mm"].flops == exact / 4 and unsized.cost.assumed == ["batch"]
    # without the run, the unnamed dims count as 1 and are listed
    static = _diagnose(computed_reshape_model(), shapes={"x": (4, 64)}, run_reference=False)
    assert static.notes == [] and static.cost.nodes["mm"].flops < exact
    assert any(d.startswith("unk") for d in static.cost.assumed)


def test_shapes_size_unnamed_input_dims():
    """An input dim without a name (paddle2onnx writes them) is sized by --shapes for the reference run;
    without it, the report says which dim of which input it took as 1 and the --shapes to give."""
    proto = computed_reshape_model()
    proto.graph.input[0].type.tensor_type.shape.dim[0].Clear()  # x [?, 64]
    exact = 2 * 8 * (4 * 8 * 16)
    sized = _diagnose(proto, shapes={"x": (4, 64)})
    assert sized.cost.nodes["mm"].flops == exact and sized.cost.assumed == [] and sized.assumed == {}
    assert any("reference run on the CPU at x:4x64" in note for note in sized.notes)
    unsized = _diagnose(proto)
    assert unsized.assumed == {"x": ["? (axis 0)"]} and unsized.cost.nodes["mm"].flops == exact / 4
    text = render_text(unsized)
    assert "taken as 1: x ? (axis 0) (size them with --shapes x:Nx64" in text
    assert "unk__" not in text.split("findings")[0]  # dims shape inference could not name are not listed one by one


def test_failed_reference_run_is_quoted_whole():
    """A reference run that fails at the assumed sizes says where it ran, what it assumed and the whole
    error (no cut), and how to size the input; the report still stands."""
    long_name = "encoder/" * 30 + "pool"  # the error names the node: far past the 200 characters once kept
    nodes = [helper.make_node("AveragePool", ["x"], ["p"], name=long_name, kernel_shape=[3, 3]),
             helper.make_node("Shape", ["p"], ["ps"], name="shape"),
             helper.make_node("Reshape", ["p", "ps"], ["y"], name="reshape")]
    report = _diagnose(_proto(nodes, [_vi("x", ["batch", 3, "height", "width"])], [_vi("y", ["batch", 3, "oh", "ow"])]))
    [note] = report.notes
    assert note.startswith("no reference run at x:1x3x1x1 (x batch, height, width taken as 1): ")
    assert f"node '{long_name}'" in note
    assert "is larger than the padded input (1); give --shapes x:batchx3xheightxwidth" in note


# -- the report --------------------------------------------------------------------------------------


def test_clean_model_reports_nothing():
    report = _diagnose(matmul_model(k=32, n=64, m=16))
    assert report.entries == [] and report.errors == []
    assert report.cost.flops == 2 * 16 * 32 * 64
    assert "no findings" in render_text(report)


def test_findings_sorted_by_impact():
    # two misaligned MatMuls, one 16x larger than the other, and a small no-op Transpose
    nodes = [helper.make_node("MatMul", ["x", "w_small"], ["h"], name="small"),
             helper.make_node("MatMul", ["x2", "w_big"], ["h2"], name="big")]
    proto = _proto(nodes, [_vi("x", [4, 30]), _vi("x2", [64, 30])], [_vi("h", [4, 50]), _vi("h2", [64, 50])],
                   [_w("w_small", (30, 50)), _w("w_big", (30, 50), 1)])
    report = _diagnose(proto, "fp16")
    shares = [e.share for e in report.entries]
    assert shares == sorted(shares, reverse=True)
    misaligned = [e.finding.nodes[0] for e in _entries(report, "misaligned-dims")]
    assert misaligned == ["big", "small"]
    text = render_text(report)
    assert text.index("big") < text.index("small")


def test_text_report_summary_first():
    report = _diagnose(attention_model(), "fp16")
    text = render_text(report)
    head = text.split("\n\n")[0]
    assert "precision fp16" in head and f"{report.nodes} nodes" in head and "FLOPs" in head and "top" in head
    assert "fixed by fuse_attention" in head
    for entry in report.entries:
        assert entry.finding.title in text and entry.finding.fix in text
    assert len(head.splitlines()) <= 25


def test_json_report_shape():
    report = _diagnose(attention_model(), "fp16")
    data = json.loads(json.dumps(report.to_json()))
    assert set(data) == {"summary", "findings"}
    summary = data["summary"]
    for key in ("model", "precision", "nodes", "gflops", "mbytes", "findings", "by_rule", "fixed_by",
                "fixed_automatically", "need_model_change", "assumed_dims", "errors"):
        assert key in summary
    assert summary["findings"] == len(data["findings"]) and summary["precision"] == "fp16"
    for item in data["findings"]:
        for key in ("rule", "title", "nodes", "why", "fix", "pass", "shapes", "flops", "bytes", "share",
                    "flops_share", "bytes_share"):
            assert key in item
    assert [f["share"] for f in data["findings"]] == sorted((f["share"] for f in data["findings"]), reverse=True)


# -- the command line --------------------------------------------------------------------------------


def test_cli_text_and_json(tmp_path, capsys):
    path = tmp_path / "dyn.onnx"
    onnx.save(dynamic_model(), path)
    assert main(["doctor", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"kiln doctor: {path}") and DYNAMIC_INPUT in out and "--min-shapes x:batchx64" in out
    assert main(["doctor", str(path), "--json", "--precision", "fp16", "--shapes", "x:8x64"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["precision"] == "fp16" and data["summary"]["dims"] == {"batch": 8}
    assert any(f["rule"] == DYNAMIC_INPUT for f in data["findings"])
    assert main(["doctor", str(path), "--json", "--min-shapes", "x:1x64", "--opt-shapes", "x:4x64",
                 "--max-shapes", "x:16x64"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert not any(f["rule"] == DYNAMIC_INPUT for f in data["findings"]) and data["summary"]["profiles"] == 1
    reshape = tmp_path / "reshape.onnx"
    onnx.save(computed_reshape_model(), reshape)
    assert main(["doctor", str(reshape), "--json", "--shapes", "x:4x64"]) == 0
    assert any("reference run" in note for note in json.loads(capsys.readouterr().out)["summary"]["notes"])
    assert main(["doctor", str(reshape), "--json", "--shapes", "x:4x64", "--no-run"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["notes"] == []


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["doctor", str(tmp_path / "missing.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kiln: error:") and "no such file" in err and len(err.strip().splitlines()) == 1
    path = tmp_path / "dyn.onnx"
    onnx.save(dynamic_model(), path)
    assert main(["doctor", str(path), "--shapes", "x:8x32"]) == 2
    assert "fixes it at 64" in capsys.readouterr().err


# -- an exported model -------------------------------------------------------------------------------


def test_bert_torchscript(tmp_path):
    from families import export_family

    path = export_family(tmp_path, "bert", "torchscript")
    report = diagnose(kiln.load_model(path), precision="fp16", name=str(path))
    assert not report.errors, report.errors
    dynamic = {e.finding.details["input"] for e in _entries(report, DYNAMIC_INPUT)}
    assert dynamic == {"input_ids", "attention_mask", "token_type_ids"}
    assert _entries(report, "unfused-attention", "fuse_attention")
    assert _entries(report, "unfused-gelu", "fuse_gelu")
    assert {"batch", "sequence"} <= set(report.cost.assumed)
    sized = diagnose(kiln.load_model(path), precision="fp16", shapes={n: (2, 8) for n in dynamic})
    assert sized.cost.flops > report.cost.flops
