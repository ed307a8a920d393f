"""TfIdfVectorizer against onnxruntime on random pools and inputs (skips, batches, weights, strings)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

from kiln.backend import run_model

_VOCAB = 6  # a small vocabulary so that random inputs hit the pool often


def _pool(rng: np.random.Generator, per_length: list[int]) -> tuple[list[int], list[int]]:
    """Distinct random n-grams of length 1, 2, ... (``per_length[k]`` of length k+1), and ngram_counts."""
    pool: list[int] = []
    counts: list[int] = []
    for size, wanted in enumerate(per_length, start=1):
        counts.append(len(pool))
        grams: set[tuple[int, ...]] = set()
        while len(grams) < min(wanted, _VOCAB**size):
            grams.add(tuple(int(v) for v in rng.integers(0, _VOCAB, size)))
        pool.extend(v for gram in sorted(grams) for v in gram)
    return pool, counts


def _model(x_type: int, shape: list[int], n_out: int, **attrs) -> onnx.ModelProto:
    node = helper.make_node("TfIdfVectorizer", ["X"], ["Y"], **attrs)
    out_shape = [shape[0], n_out] if len(shape) == 2 else [n_out]
    graph = helper.make_graph(
        [node],
        "tfidf",
        [helper.make_tensor_value_info("X", x_type, shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, out_shape)],
    )
    # onnxruntime < 1.32 refuses IR 14
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


CASES = {
    "int64_skips": dict(shape=[12], dtype=np.int64, per_length=[4, 8, 6], lo=1, hi=3, skips=2, mode="TF"),
    "int32_batch_idf": dict(shape=[3, 9], dtype=np.int32, per_length=[3, 10, 8], lo=2, hi=3, skips=1, mode="IDF"),
    "int64_batch_tfidf": dict(shape=[4, 10], dtype=np.int64, per_length=[5, 12], lo=1, hi=2, skips=3, mode="TFIDF"),
    "string_batch": dict(shape=[2, 11], dtype=object, per_length=[4, 9, 5], lo=1, hi=3, skips=1, mode="TFIDF"),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_tfidfvectorizer_matches_onnxruntime(name, seed):
    case = CASES[name]
    rng = np.random.default_rng(seed)
    pool, counts = _pool(rng, case["per_length"])
    n_grams = sum(min(w, _VOCAB ** (k + 1)) for k, w in enumerate(case["per_length"]))
    indexes = rng.permutation(n_grams).tolist()
    attrs = dict(
        min_gram_length=case["lo"], max_gram_length=case["hi"], max_skip_count=case["skips"],
        mode=case["mode"], ngram_counts=counts, ngram_indexes=indexes,
    )
    if case["mode"] != "TF":
        attrs["weights"] = rng.uniform(0.5, 2.0, n_grams).astype(np.float32).tolist()
    ids = rng.integers(0, _VOCAB, case["shape"])
    if case["dtype"] is object:
        words = np.array([f"w{i}" for i in range(_VOCAB)], dtype=object)
        attrs["pool_strings"] = [str(words[v]) for v in pool]
        x, x_type = words[ids], TensorProto.STRING
    else:
        attrs["pool_int64s"] = pool
        x = ids.astype(case["dtype"])
        x_type = helper.np_dtype_to_tensor_dtype(x.dtype)
    model = _model(x_type, case["shape"], n_grams, **attrs)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"X": x})[0]
    (actual,) = run_model(model, [x])
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    assert expected.any(), "the random case should hit the pool"
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


@pytest.mark.parametrize("mode", ["TF", "IDF", "TFIDF"])
def test_tfidfvectorizer_shared_coordinates(mode):
    """Several n-grams on one output coordinate: IDF keeps the weight of the last hit in scan order."""
    rng = np.random.default_rng(7)
    attrs = dict(
        min_gram_length=1, max_gram_length=2, max_skip_count=1, mode=mode, ngram_counts=[0, 3],
        ngram_indexes=[1, 0, 1, 2, 0], pool_int64s=[10, 20, 30, 10, 20, 30, 10], weights=[10.0, 1.0, 100.0, 0.5, 3.0],
    )
    x = rng.choice([10, 20, 30, 40], size=(6, 7)).astype(np.int64)
    model = _model(TensorProto.INT64, [6, 7], 3, **attrs)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"X": x})[0]
    (actual,) = run_model(model, [x])
    np.testing.assert_allclose(actual, expected, rtol=1e-6)
