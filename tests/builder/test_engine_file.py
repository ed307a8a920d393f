"""Engine files: save/load round trips, the safetensors format with no pickle, deterministic rebuilds
with a warm timing cache, refusal of damaged, truncated and forged files (always EngineLoadError),
input validation with optimization profiles, and atomic writes."""

from __future__ import annotations

import copy
import errno
import json
import os
import pickle

import numpy as np
import onnx
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import kiln
from kiln import BuildConfig, EngineLoadError, InputError, KilnError, Profile, load_engine
from kiln.compare import diff, run_onnxruntime
from kiln.engine import _digest
from tests.builder.graphs import tiny_model

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 1e-2}


# -- models and helpers ---------------------------------------------------------------------------

def feeds_for(batch: int = 2, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, 3, 6, 8)).astype(np.float32),
            "r": rng.standard_normal((batch, 4, 6, 8)).astype(np.float32)}


def cpu_config(**kwargs) -> BuildConfig:
    kwargs.setdefault("opt_level", 1)
    return BuildConfig(device="cpu", **kwargs)


def assert_matches_ort(outputs, model_path, feeds, tolerance):
    reference = run_onnxruntime(model_path, feeds)
    assert set(outputs) == set(reference)
    for name, ref in reference.items():
        got = outputs[name].cpu().numpy()
        d = diff(name, got, ref, tolerance)
        assert d.ok, f"{name}: max rel diff {d.max_rel:.3g} over {tolerance:g}"


def read_engine(path) -> tuple[dict, dict[str, torch.Tensor]]:
    data = open(path, "rb").read()
    with safe_open(path, "pt") as handle:
        header = json.loads(handle.metadata()["kiln"])
    return header, st_load(data)


def write_forged(path, header: dict, stored: dict[str, torch.Tensor]) -> None:
    """Write an engine with a valid, recomputed checksum (what a careful forger would do)."""
    header = {k: v for k, v in header.items() if k != "sha256"}
    header["sha256"] = _digest(header, stored)
    path.write_bytes(st_save(stored, metadata={"kiln": json.dumps(header, sort_keys=True, separators=(",", ":"))}))


def header_span(data: bytes) -> tuple[int, int]:
    length = int.from_bytes(data[:8], "little")
    return 8, 8 + length


@pytest.fixture(scope="module")
def engine_path(model_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("engine") / "tiny.kiln"
    kiln.build(model_path, cpu_config()).save(path)
    return path


@pytest.fixture
def forged(engine_path, tmp_path):
    """``forged(mutate)``: the module's engine, with ``mutate(header, stored)`` applied and a valid checksum."""
    def make(mutate):
        header, stored = read_engine(engine_path)
        header = copy.deepcopy(header)
        mutate(header, stored)
        path = tmp_path / "forged.kiln"
        write_forged(path, header, stored)
        return path
    return make


# -- round trip -----------------------------------------------------------------------------------

@pytest.mark.parametrize("precision,extra", [
    ("fp32", {}),
    # channels_last conv weights (the CPU's conv layout): stored with a layout permutation
    ("fp32", {"deny_tactics": ["conv.nchw"], "opt_level": 4}),
    ("fp16", {"fp16": True}),
    ("bf16", {"bf16": True}),
], ids=["fp32", "fp32-nhwc", "fp16", "bf16"])
def test_saved_engine_runs_identically_and_matches_onnxruntime(model_path, tmp_path, precision, extra):
    engine = kiln.build(model_path, cpu_config(**extra))
    feeds = feeds_for()
    expected = engine.run(feeds)
    path = tmp_path / "e.kiln"
    engine.save(path)
    loaded = load_engine(path)
    got = loaded.run(feeds)
    assert set(got) == set(expected) == {"y"}
    for name in expected:
        assert got[name].dtype == torch.float32 and got[name].shape == (2, 4, 5, 6)
        assert torch.equal(got[name], expected[name]), name
    assert_matches_ort(got, model_path, feeds, TOLERANCE[precision])
    assert loaded.plan == json.loads(json.dumps(engine.plan))
    if precision != "fp32":
        assert precision in {layer["precision"] for layer in loaded.plan["layers"]}
    if "deny_tactics" in extra:
        header, _ = read_engine(path)
        assert header["layouts"], "a channels_last weight should be stored with its permutation"
        assert any(row["layout"] == "NHWC" for row in loaded.describe())


def test_engine_file_is_plain_safetensors_with_a_json_plan(engine_path):
    data = engine_path.read_bytes()
    start, end = header_span(data)
    assert data[start:start + 1] == b"{" and end <= len(data)
    json.loads(data[start:end])  # the safetensors header itself is JSON
    with safe_open(engine_path, "pt") as handle:
        metadata = handle.metadata()
        assert set(metadata) == {"kiln"}
        names = list(handle.keys())
        tensors = {name: handle.get_tensor(name) for name in names}
    assert "__graph__" in names and tensors["__graph__"].dtype == torch.uint8
    onnx.load_from_string(tensors["__graph__"].numpy().tobytes())  # the weights-stripped graph parses as ONNX
    header = json.loads(metadata["kiln"])
    for key in ("format", "version", "kiln", "torch", "device", "plan", "layouts", "aliases", "sha256"):
        assert key in header, key
    assert header["format"] == "kiln-engine" and header["version"] == 1
    assert header["kiln"] == kiln.__version__ and header["torch"] == torch.__version__ and header["device"] == "cpu"
    assert len(header["sha256"]) == 64 and int(header["sha256"], 16) >= 0
    assert header["sha256"] == _digest({k: v for k, v in header.items() if k != "sha256"}, tensors)
    assert [layer["name"] for layer in header["plan"]["layers"]]


def test_loading_never_unpickles(engine_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("load_engine must not unpickle anything")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    engine = load_engine(engine_path)
    outputs = engine.run(feeds_for())
    assert outputs["y"].shape == (2, 4, 5, 6)


# -- determinism --------------------------------------------------------------------------------

def test_rebuilds_with_a_warm_timing_cache_are_byte_identical(model_path, tmp_path):
    cache = tmp_path / "timing.json"
    config = dict(fp16=True, timing_cache=str(cache))
    cold = kiln.build(model_path, cpu_config(**config))
    assert cache.exists() and cold.report.timed > 0
    first = kiln.build(model_path, cpu_config(**config))
    second = kiln.build(model_path, cpu_config(**config))
    first.save(tmp_path / "a.kiln")
    second.save(tmp_path / "b.kiln")
    assert (tmp_path / "a.kiln").read_bytes() == (tmp_path / "b.kiln").read_bytes()
    assert second.report.cache_hits > 0 and second.report.timed == 0
    assert first.report.timed == 0
    feeds = feeds_for()
    assert torch.equal(load_engine(tmp_path / "a.kiln").run(feeds)["y"], second.run(feeds)["y"])


# -- damaged files --------------------------------------------------------------------------------

def _tensor_offsets(data: bytes, name: str) -> tuple[int, int]:
    start, end = header_span(data)
    begin, stop = json.loads(data[start:end])[name]["data_offsets"]
    return end + begin, end + stop


@pytest.mark.parametrize("which", ["weight", "graph"])
def test_flipped_tensor_byte_is_a_checksum_error(engine_path, tmp_path, which):
    data = bytearray(engine_path.read_bytes())
    header, stored = read_engine(engine_path)
    name = "__graph__" if which == "graph" else max((n for n in stored if n != "__graph__"), key=lambda n: stored[n].numel())
    lo, hi = _tensor_offsets(bytes(data), name)
    assert hi > lo
    data[(lo + hi) // 2] ^= 0x01
    path = tmp_path / "flipped.kiln"
    path.write_bytes(bytes(data))
    with pytest.raises(EngineLoadError, match="checksum"):
        load_engine(path)


@pytest.mark.parametrize("old,new,match", [
    (b"matmul", b"matmuL", "checksum"),           # a layer/node name
    (b"gemm.torch", b"gemm.torcH", "checksum"),   # a tactic name
    (b"softmax.torch", b"softmax.torci", "checksum"),
    (b"kiln-engine", b"kiln-enginf", "not a kiln engine"),
    (b'\\"version\\":1', b'\\"version\\":2', "version"),
    (b'\\"layouts\\":{', b'\\"layouts\\":[', "JSON|truncated"),  # breaks the plan's JSON
])
def test_edited_header_text_is_refused(engine_path, tmp_path, old, new, match):
    data = engine_path.read_bytes()
    start, end = header_span(data)
    at = data.find(old, start, end)
    assert at >= 0, f"{old!r} not in the header"
    edited = data[:at] + new + data[at + len(old):]
    assert len(edited) == len(data)
    path = tmp_path / "edited.kiln"
    path.write_bytes(edited)
    with pytest.raises(EngineLoadError, match=match):
        load_engine(path)


def test_flipped_checksum_digit_is_refused(engine_path, tmp_path):
    data = engine_path.read_bytes()
    header, _ = read_engine(engine_path)
    digest = header["sha256"].encode()
    at = data.find(digest)
    assert at >= 0
    replacement = b"0" if digest[:1] != b"0" else b"1"
    path = tmp_path / "digest.kiln"
    path.write_bytes(data[:at] + replacement + data[at + 1:])
    with pytest.raises(EngineLoadError, match="checksum"):
        load_engine(path)


@pytest.mark.parametrize("cut", ["empty", "7", "8", "header", "half", "last"])
def test_truncated_file_is_refused(engine_path, tmp_path, cut):
    data = engine_path.read_bytes()
    _, end = header_span(data)
    keep = {"empty": 0, "7": 7, "8": 8, "header": end, "half": len(data) // 2, "last": len(data) - 1}[cut]
    path = tmp_path / "cut.kiln"
    path.write_bytes(data[:keep])
    with pytest.raises(EngineLoadError):
        load_engine(path)


def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "noise.kiln"
    for seed in range(5):
        path.write_bytes(np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes())
        with pytest.raises(EngineLoadError):
            load_engine(path)
    # a plausible header length followed by garbage
    path.write_bytes((100).to_bytes(8, "little") + b"\xff" * 200)
    with pytest.raises(EngineLoadError):
        load_engine(path)


def test_empty_and_missing_files_are_refused(tmp_path):
    empty = tmp_path / "empty.kiln"
    empty.write_bytes(b"")
    with pytest.raises(EngineLoadError):
        load_engine(empty)
    with pytest.raises(EngineLoadError, match="cannot read"):
        load_engine(tmp_path / "missing.kiln")


def test_directory_is_refused(tmp_path):
    folder = tmp_path / "folder.kiln"
    folder.mkdir()
    with pytest.raises(EngineLoadError):
        load_engine(folder)


def test_safetensors_without_a_kiln_plan_is_refused(tmp_path):
    path = tmp_path / "plain.kiln"
    path.write_bytes(st_save({"w": torch.randn(3)}))
    with pytest.raises(EngineLoadError, match="not a kiln engine"):
        load_engine(path)
    path.write_bytes(st_save({"w": torch.randn(3)}, metadata={"kiln": "{not json"}))
    with pytest.raises(EngineLoadError, match="JSON"):
        load_engine(path)
    path.write_bytes(st_save({"w": torch.randn(3)}, metadata={"kiln": "[1, 2]"}))
    with pytest.raises(EngineLoadError, match="not a kiln engine"):
        load_engine(path)


# -- forged headers with a valid checksum ----------------------------------------------------------

def _set(key, value):
    def mutate(header, stored):
        header[key] = value
    return mutate


def _first_layer(mutate_layer):
    def mutate(header, stored):
        mutate_layer(header["plan"]["layers"][0])
    return mutate


def _matrix_name(stored) -> str:
    return next(n for n in sorted(stored) if n != "__graph__" and stored[n].dim() >= 2)


def test_forged_untouched_copy_still_loads(forged):
    """The forging helper itself produces a loadable engine (so the refusals below are about the edit)."""
    path = forged(lambda header, stored: None)
    assert load_engine(path).run(feeds_for())["y"].shape == (2, 4, 5, 6)


def test_forged_format_version_is_refused(forged):
    with pytest.raises(EngineLoadError, match=r"version 99.*version 1"):
        load_engine(forged(_set("version", 99)))


def test_forged_kiln_version_names_both_versions(forged):
    with pytest.raises(EngineLoadError) as info:
        load_engine(forged(_set("kiln", "0.0.0")))
    assert "0.0.0" in str(info.value) and kiln.__version__ in str(info.value)
    assert isinstance(info.value, KilnError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_forged_cuda_engine_on_a_cpu_machine_is_refused(forged):
    def cuda(header, stored):
        header.update(device="cuda", gpu="NVIDIA H100 80GB HBM3", capability="9.0", triton="3.4.0")

    with pytest.raises(EngineLoadError, match="no CUDA GPU"):
        load_engine(forged(cuda))


def test_loading_for_another_device_is_refused(engine_path):
    with pytest.raises(EngineLoadError, match="built for cpu"):
        load_engine(engine_path, device="cuda")


@pytest.mark.parametrize("tactic", ["nosuch.tactic", "gemm.nosuch", "softmax.torch", ""])
def test_forged_unknown_tactic_is_refused(forged, tactic):
    def mutate(header, stored):
        layer = next(layer for layer in header["plan"]["layers"] if layer["kind"] == "Conv")
        for choice in layer["choices"]:
            choice["tactic"] = tactic

    with pytest.raises(EngineLoadError, match="unknown tactic"):
        load_engine(forged(mutate))


def test_forged_plan_reading_an_unwritten_value_is_refused(forged):
    def mutate(header, stored):
        header["plan"]["layers"][-1]["inputs"] = ["ghost"]

    with pytest.raises(EngineLoadError, match="ghost"):
        load_engine(forged(mutate))


def test_forged_plan_without_the_output_producer_is_refused(forged):
    def mutate(header, stored):
        header["plan"]["layers"].pop()

    with pytest.raises(EngineLoadError, match="output"):
        load_engine(forged(mutate))


@pytest.mark.parametrize("mutate", [
    _set("plan", None), _set("plan", []), _set("plan", {}),
    _first_layer(lambda layer: layer.pop("choices")),
    _first_layer(lambda layer: layer.update(inputs=None)),
    lambda header, stored: header["plan"].update(profiles=[{"x": 5}]),
    lambda header, stored: header["plan"]["outputs"][0].update(dtype="nosuch"),
    lambda header, stored: stored.update(__graph__=torch.tensor([1, 2, 3], dtype=torch.uint8)),
    lambda header, stored: stored.pop(next(n for n in sorted(stored) if n.endswith(".w"))),
], ids=["plan-none", "plan-list", "plan-empty", "no-choices", "inputs-none", "bad-profile", "bad-output-dtype",
        "bad-graph", "missing-weight"])
def test_forged_inconsistent_plan_is_refused(forged, mutate):
    with pytest.raises(EngineLoadError):
        load_engine(forged(mutate))


def test_forged_engine_missing_an_optional_weight_is_refused(forged):
    def mutate(header, stored):
        stored.pop(next(n for n in sorted(stored) if n.startswith("0.") and n.endswith(".b")))

    with pytest.raises(EngineLoadError):
        load_engine(forged(mutate))


@pytest.mark.parametrize("perm", ["duplicate", "too-long", "too-short", "out-of-range", "negative", "string"])
def test_forged_bad_layout_permutation_is_refused(forged, perm):
    def mutate(header, stored):
        name = _matrix_name(stored)
        rank = stored[name].dim()
        header["layouts"][name] = {
            "duplicate": [0] * rank, "too-long": list(range(rank + 1)), "too-short": list(range(rank - 1)),
            "out-of-range": list(range(1, rank + 1)), "negative": [-1] + list(range(1, rank)), "string": "ab",
        }[perm]

    with pytest.raises(EngineLoadError, match="permutation"):
        load_engine(forged(mutate))


@pytest.mark.parametrize("layouts", ["int-perm", "str-items", "float-items", "layouts-list", "layouts-null"])
def test_forged_malformed_layouts_are_refused(forged, layouts):
    def mutate(header, stored):
        name = _matrix_name(stored)
        rank = stored[name].dim()
        header["layouts"] = {
            "int-perm": {name: 7}, "str-items": {name: [0] + ["a"] * (rank - 1)}, "float-items": {name: [float(i) for i in range(rank)]},
            "layouts-list": [name], "layouts-null": None,
        }[layouts]

    with pytest.raises(EngineLoadError):
        load_engine(forged(mutate))


@pytest.mark.parametrize("aliases", [{"extra.w": "no.such.tensor"}, {"extra.w": 3}, ["a"], "x"],
                         ids=["missing-target", "non-string", "list", "string"])
def test_forged_aliases_to_missing_tensors_are_refused(forged, aliases):
    with pytest.raises(EngineLoadError, match="alias"):
        load_engine(forged(_set("aliases", aliases)))


@pytest.mark.parametrize("device", ["tpu", "CPU", None, 5])
def test_forged_unknown_device_is_refused(forged, device):
    with pytest.raises(EngineLoadError):
        load_engine(forged(_set("device", device)))


def test_forged_meta_device_is_refused(forged):
    with pytest.raises(EngineLoadError):
        load_engine(forged(_set("device", "meta")))


# -- engine inputs and profiles ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def static_engine(engine_path):
    return load_engine(engine_path)


@pytest.mark.parametrize("change,match", [
    (lambda f: f.update(x=f["x"].astype(np.float64)), "dtype"),
    (lambda f: f.update(x=torch.from_numpy(f["x"]).half()), "dtype"),
    (lambda f: f.update(x=np.ones((2, 3), dtype=np.int64)), "dtype"),
    (lambda f: f.update(x=f["x"][0]), "rank"),
    (lambda f: f.update(x=np.random.default_rng(2).standard_normal((2, 3, 6, 9)).astype(np.float32)), "axis 3 must be 8"),
    (lambda f: f.update(r=np.random.default_rng(2).standard_normal((3, 4, 6, 8)).astype(np.float32)), "axis 0 must be 2"),
    (lambda f: f.update(extra=f["x"]), "unknown input"),
    (lambda f: f.pop("r"), "missing input"),
], ids=["float64", "torch-fp16", "int64", "rank", "static-dim", "static-batch", "unknown", "missing"])
def test_engine_refuses_bad_inputs(static_engine, change, match):
    feeds = feeds_for()
    change(feeds)
    with pytest.raises(InputError, match=match):
        static_engine.run(feeds)


def test_two_profiles_cover_their_batches_and_nothing_else(tmp_path):
    path = tmp_path / "dyn.onnx"
    onnx.save(tiny_model("batch"), path)

    def profile(lo, opt, hi):
        shapes = lambda n: {"x": (n, 3, 6, 8), "r": (n, 4, 6, 8)}  # noqa: E731
        return Profile.from_lists(shapes(lo), shapes(opt), shapes(hi))

    engine = kiln.build(path, cpu_config(profiles=[profile(1, 2, 2), profile(3, 4, 8)]))
    assert len(engine.profiles) == 2
    engine.save(tmp_path / "dyn.kiln")
    loaded = load_engine(tmp_path / "dyn.kiln")
    assert len(loaded.profiles) == 2
    for batch, index in [(1, 0), (2, 0), (5, 1), (8, 1)]:
        feeds = feeds_for(batch, seed=batch)
        assert loaded.profile_for({n: v.shape for n, v in feeds.items()}) == index
        got = loaded.run(feeds)
        assert got["y"].shape == (batch, 4, 5, 6)
        assert torch.equal(got["y"], engine.run(feeds)["y"])
        assert_matches_ort(got, path, feeds, TOLERANCE["fp32"])
    with pytest.raises(InputError, match="profile"):
        loaded.run(feeds_for(9))
    with pytest.raises(InputError, match="profile"):
        loaded.run({"x": feeds_for(2)["x"], "r": feeds_for(5)["r"]})  # each input fits a different profile


# -- writing --------------------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_save_into_a_read_only_directory_fails_cleanly(static_engine, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(KilnError):
            static_engine.save(folder / "e.kiln")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


def test_save_into_a_missing_directory_raises_kiln_error(static_engine, tmp_path):
    with pytest.raises(KilnError, match="cannot write"):
        static_engine.save(tmp_path / "no" / "such" / "e.kiln")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_files(static_engine, tmp_path, monkeypatch):
    target = tmp_path / "e.kiln"
    target.write_bytes(b"previous engine")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(KilnError, match="No space left"):
        static_engine.save(target)
    assert target.read_bytes() == b"previous engine"
    assert [p.name for p in tmp_path.iterdir()] == ["e.kiln"]


def test_save_over_an_existing_file_replaces_it(static_engine, engine_path, tmp_path):
    target = tmp_path / "e.kiln"
    target.write_bytes(b"x" * 100_000)
    target.chmod(0o640)
    static_engine.save(target)
    assert target.read_bytes() == engine_path.read_bytes()
    assert (target.stat().st_mode & 0o777) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["e.kiln"]
    assert load_engine(target).run(feeds_for())["y"].shape == (2, 4, 5, 6)
