"""``benchmarks/third_party.py`` on the CPU without a download: its input recipes make the shapes the
corpus lists (the ones that need no espeak-ng), magika's featurization matches the package's rules,
and ``run`` takes tiny onnx.helper models through every step, recording a failing step without
stopping the others, the budget's skips, the JSON, and the markdown splice that keeps the other
device's table."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks import third_party


@pytest.fixture(scope="module")
def tp():
    return third_party


def model_named(tp, name):
    return next(m for m in tp.MODELS if m.name == name)


@pytest.mark.parametrize("name", ["ppocr_v4_det", "ppocr_v4_rec", "ppocr_mobile_v2_cls", "magika_standard_v3_3",
                                  "nudenet_320n", "ddddocr_common", "ddddocr_common_det"])
def test_recipes_make_the_listed_shapes(tp, name):
    model = model_named(tp, name)
    feeds = tp.make_inputs(model)
    assert {n: a.shape for n, a in feeds.items()} == {n: tuple(s) for n, s in model.shapes.items()}
    for array in feeds.values():
        assert np.isfinite(array).all() and array.std() > 0  # an image or bytes with content, not a constant
    x = next(iter(feeds.values()))
    if name.startswith("ppocr"):
        assert x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1  # (x/255 - 0.5)/0.5
    if name == "ppocr_v4_rec":
        assert (x[:, :, :, -8:] == 0).all()  # short lines are zero-padded on the right to 320
    if name == "magika_standard_v3_3":
        assert x.dtype == np.int32 and x.min() >= 0 and x.max() <= 256
    if name == "ddddocr_common_det":
        assert x.max() > 1 and (x[0, :, -1, -1] == 114).all()  # 0..255, letterboxed with 114
    if name in ("nudenet_320n", "ddddocr_common"):
        assert x.min() >= 0 and x.max() <= 1


def test_magika_features_follow_the_package(tp):
    data = b"  \n hello  \n"
    features = tp.magika_features(data, beg_size=10, end_size=10, block=64)
    assert features == [*b"hello  \n", 256, 256] + [256, *b"  \n hello"]  # lstrip, pad after; rstrip, pad before
    big = bytes(range(256)) * 40  # 10,240 bytes: only the first and the last block are read
    features = tp.magika_features(big)
    assert features[:1024] == list(big[:1024]) and features[1024:] == list(big[-1024:])


def test_vad_frames_follow_silero_sequence_layout(tp):
    audio = np.arange(1, 1100, dtype=np.float32)  # 1,099 samples: 3 frames, the last zero-padded
    frames = tp.vad_frames(audio)
    assert frames.shape == (3, 576)
    assert (frames[0, :64] == 0).all() and (frames[0, 64:] == audio[:512]).all()
    assert (frames[1, :64] == audio[448:512]).all() and (frames[1, 64:] == audio[512:1024]).all()
    assert (frames[2, 64:139] == audio[1024:]).all() and (frames[2, 139:] == 0).all()


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_speech_recipes(tp):
    chunk = tp.make_inputs(model_named(tp, "silero_vad"))
    assert chunk["input"].shape == (1, 576) and np.abs(chunk["input"]).max() > 0.05
    assert chunk["sr"] == 16000 and chunk["sr"].dtype == np.int64 and not chunk["state"].any()
    frames = tp.make_inputs(model_named(tp, "silero_vad_16k_sequence"))
    assert frames["input"].shape == (64, 576)


def tiny_dense(path):
    """x [N, 4] -> MatMul -> Add -> Relu -> y [N, 3]."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["a"]),
         helper.make_node("Relu", ["a"], ["y"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def tiny_contrib(path):
    """com.microsoft::Gelu, which onnxruntime runs and kiln's reference executor does not."""
    graph = helper.make_graph([helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")], "contrib",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), path)


@pytest.fixture
def tiny_corpus(tp, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    (corpus / "tiny").mkdir(parents=True)
    tiny_dense(corpus / "tiny" / "dense.onnx")
    tiny_contrib(corpus / "tiny" / "contrib.onnx")
    rng = np.random.default_rng(1)
    recipes = {"dense_rows": lambda m: {"x": rng.standard_normal((2, 4)).astype(np.float32)},
               "contrib_rows": lambda m: {"x": rng.standard_normal((2, 3)).astype(np.float32)}}
    models = (tp.Model("tiny_dense", "nudenet", "tiny/dense.onnx", "onnx.helper", "17", "a dense layer", "dense_rows",
                       {"x": (2, 4)}),
              tp.Model("tiny_contrib", "nudenet", "tiny/contrib.onnx", "onnx.helper", "17, com.microsoft 1",
                       "a contrib op", "contrib_rows", {"x": (2, 3)}))
    monkeypatch.setattr(tp, "MODELS", models)
    monkeypatch.setattr(tp, "RECIPES", recipes)
    monkeypatch.setitem(tp.KNOWN, ("tiny_contrib", "*", "*"), "com.microsoft::Gelu is a contrib op (test)")
    return corpus


def test_run_every_step_on_tiny_models(tp, tiny_corpus, tmp_path):
    doc = tmp_path / "model_zoo.md"
    doc.write_text("# Model zoo\n\nbefore\n")
    out = tmp_path / "out"
    code = tp.main(["run", "--corpus", str(tiny_corpus), "--out", str(out), "--opt-level", "1", "--update", str(doc)])
    assert code == 1  # the contrib model's reference and builds fail
    results = json.loads((out / "results-cpu.json").read_text())
    assert results["meta"]["device"] == "cpu" and results["meta"]["versions"]["onnxruntime"]
    assert results["meta"]["command"].endswith(f"run --corpus {tiny_corpus} --out {out} --opt-level 1 --update {doc}")
    dense = results["models"]["tiny_dense"]["steps"]
    assert list(dense) == list(tp.STEPS)
    for step in tp.STEPS:
        assert dense[step]["status"] == "ok", dense[step]
        assert dense[step]["outputs"]["y"]["shape"] == [2, 3]
        assert dense[step]["max_rel"] < (1e-2 if step == "build-fp16" else 1e-4)
    assert dense["build-fp32"]["build_s"] > 0 and dense["build-fp16"]["precision"] == "fp16"
    assert (tiny_corpus / "tiny" / "dense.npz").exists()  # the inputs were made beside the model

    contrib = results["models"]["tiny_contrib"]["steps"]
    assert list(contrib) == list(tp.STEPS)  # each step is tried and recorded; a failure stops nothing
    for step in tp.STEPS:
        assert contrib[step]["status"] == "error" and "com.microsoft::Gelu" in contrib[step]["error"]
        assert contrib[step]["known"] == "com.microsoft::Gelu is a contrib op (test)"

    text = doc.read_text()
    assert text.startswith("# Model zoo\n\nbefore\n\n" + tp.BEGIN) and text.rstrip().endswith(tp.END)
    for piece in ("## " + tp.TITLE, "| tiny_dense | nudenet==3.4.2 | `tiny/dense.onnx` |", "### CPU: CPU",
                  "| tiny_dense | onnx.helper | 17 | build-fp32 | ok |",
                  "| tiny_contrib | onnx.helper | 17, com.microsoft 1 | reference | error: UnsupportedModelError: ",
                  "- tiny_contrib, reference, build-fp32, build-fp16, optimize: com.microsoft::Gelu is a contrib op",
                  "### CUDA\n\nNot run yet"):
        assert piece in text, piece
    assert (out / "results-cpu.md").read_text().startswith("### CPU: CPU")

    # a CUDA run's results (here: the CPU JSON relabelled) replace only the CUDA table; the CPU one stays
    cuda = dict(results, meta=dict(results["meta"], device="cuda", device_name="NVIDIA H200", command="cuda run"))
    cuda["models"] = {"tiny_dense": results["models"]["tiny_dense"]}
    (tmp_path / "results-cuda.json").write_text(json.dumps(cuda))
    assert tp.main(["render", str(tmp_path / "results-cuda.json"), "--update", str(doc)]) == 0
    second = doc.read_text()
    cpu_begin, cpu_end = tp.device_markers("cpu")
    assert tp.between(second, cpu_begin, cpu_end) == tp.between(text, cpu_begin, cpu_end)
    assert "### CUDA: NVIDIA H200" in second and "Not run yet" not in second and second.count(tp.BEGIN) == 1

    # two CUDA runs of different models merge into one table
    other = dict(cuda, meta=dict(cuda["meta"], command="second cuda run"),
                 models={"tiny_contrib": results["models"]["tiny_contrib"]})
    (tmp_path / "results-cuda-2.json").write_text(json.dumps(other))
    assert tp.main(["render", str(tmp_path / "results-cuda.json"), str(tmp_path / "results-cuda-2.json"),
                    "--update", str(doc)]) == 0
    cuda_table = tp.between(doc.read_text(), *tp.device_markers("cuda"))
    assert "| tiny_dense |" in cuda_table and "| tiny_contrib |" in cuda_table
    assert "Merged from 2 runs: `cuda run`" in cuda_table


def test_budget_skips_and_says_so(tp, tiny_corpus, tmp_path):
    out = tmp_path / "out"
    code = tp.main(["run", "--corpus", str(tiny_corpus), "--out", str(out), "--models", "tiny_d*", "--budget-s", "1"])
    assert code == 0  # skips are no failures; the table says why
    steps = json.loads((out / "results-cpu.json").read_text())["models"]["tiny_dense"]["steps"]
    assert all(s["status"] == "skipped" and s["error"].startswith("time budget") for s in steps.values())
    assert "skipped: time budget" in (out / "results-cpu.md").read_text()


def test_select_models_by_pattern(tp):
    assert [m.name for m in tp.select_models("ddddocr_*,magika_standard_v3_3")] == [
        "magika_standard_v3_3", "ddddocr_common", "ddddocr_common_det", "ddddocr_common_old"]
    with pytest.raises(SystemExit, match="no model matches nope"):
        tp.select_models("nope")


def test_splice_keeps_everything_outside_the_markers(tp):
    text = f"head\n\n{tp.BEGIN}\nold\n{tp.END}\n\ntail\n"
    assert tp.splice(text, "new\n") == f"head\n\n{tp.BEGIN}\nnew\n{tp.END}\n\ntail\n"
    assert tp.splice("", "s") == f"{tp.BEGIN}\ns\n{tp.END}\n"
    with pytest.raises(ValueError, match="markers"):
        tp.splice(f"{tp.END}\n{tp.BEGIN}\n", "s")
