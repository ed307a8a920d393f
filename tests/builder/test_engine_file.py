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
from kiln.engine import digest
from tests.builder.graphs import tiny_model

# -- models and helpers ---------------------------------------------------------------------------

def feeds_for(batch: int = 2, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, 3, 6, 8)).astype(np.float32),
            "r": rng.standard_normal((batch, 4, 6, 8)).astype(np.float32)}


def cpu_config(**kwargs) -> BuildConfig:
    kwargs.setdefault("opt_level", 1)
    return BuildConfig(device="cpu", **kwargs)


def assert_matches_ort(outputs, model_path, feeds, precision):
    """Every output within the tolerance table's bound for ``precision``, element by element."""
    reference = run_onnxruntime(model_path, feeds)
    assert set(outputs) == set(reference)
    for name, ref in reference.items():
        got = outputs[name].cpu().numpy()
        d = diff(name, got, ref, computed_in=precision)
        assert d.ok, f"{name}: {d.bad} of {d.size} elements over {d.tolerance} (max abs diff {d.max_abs:.3g})"


def read_engine(path) -> tuple[dict, dict[str, torch.Tensor]]:
    data = open(path, "rb").read()
    with safe_open(path, "pt") as handle:
        header = json.loads(handle.metadata()["kiln"])
    return header, st_load(data)


def write_forged(path, header: dict, stored: dict[str, torch.Tensor]) -> None:
    """Write an engine with a valid, recomputed checksum (what a careful forger would do)."""
    header = {k: v for k, v in header.items() if k != "sha256"}
    header["sha256"] = digest(header, stored)
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
    assert_matches_ort(got, model_path, feeds, precision)
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
    assert header["sha256"] == digest({k: v for k, v in header.items() if k != "sha256"}, tensors)
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
    name = ("__graph__" if which == "graph"
            else max((n for n in stored if n != "__graph__"), key=lambda n: stored[n].numel()))
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
            "int-perm": {name: 7}, "str-items": {name: [0] + ["a"] * (rank - 1)},
            "float-items": {name: [float(i) for i in range(rank)]},
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


# -- hostile engines: the schema ---------------------------------------------------------------------

def _layer(kind):
    def pick(header):
        return next(layer for layer in header["plan"]["layers"] if layer["kind"] == kind)
    return pick


def _edit(get, **changes):
    """A mutation setting fields of the object ``get(header)`` returns."""
    def mutate(header, stored):
        get(header).update(changes)
    return mutate


_conv, _gemm, _node = _layer("Conv"), _layer("Gemm"), _layer("Node")


def _attrs(pick):
    return lambda header: pick(header)["attrs"]


def _first_choice(pick):
    return lambda header: pick(header)["choices"][0]


def _weight_as(dtype):
    def mutate(header, stored):
        name = next(n for n in sorted(stored) if n.startswith("1.") and n.endswith(".w"))
        stored[name] = stored[name].to(dtype)
    return mutate


def _drop_layouts_and_transpose_gemm(header, stored):
    name = next(n for n in sorted(stored) if n.startswith("1.") and n.endswith(".w"))
    stored[name] = stored[name].t().contiguous()


@pytest.mark.parametrize("mutate,field", [
    (_edit(_attrs(_conv), strides=[10**400, 1]), r"plan\.layers\[0\]\.attrs\.strides\[0\] must be an integer"),
    (_edit(_attrs(_conv), group=0), r"plan\.layers\[0\]\.attrs\.group"),
    (_edit(_attrs(_conv), pads=[1, 1, 1]), r"plan\.layers\[0\]\.attrs\.pads must have 4 items"),
    (_edit(_attrs(_conv), activation={"op": "exec"}), r"attrs\.activation\.op must be one of"),
    (_edit(_attrs(_conv), residual="yes"), r"attrs\.residual must be true or false"),
    (_edit(_attrs(_gemm), k="8"), r"plan\.layers\[1\]\.attrs\.k"),
    (_edit(_attrs(_gemm), k=9), r"plan\.layers\[1\]\.choices\[0\]\.roles .*GEMM weights"),
    (_edit(_attrs(_gemm), alpha=[1]), r"attrs\.alpha must be a number"),
    (_edit(_attrs(_gemm), evil=1), r"attrs has unknown field"),
    (_edit(_layer("Softmax"), precision="fp8"), r"plan\.layers\[2\]\.precision must be one of"),
    (_edit(_layer("Softmax"), cast_inputs=[0, 3]), r"cast_inputs\[1\]"),
    (_edit(_layer("Softmax"), stream=5), r"plan\.layers\[2\]\.stream must be an integer in \[0, 0\]"),
    (_edit(_layer("Softmax"), outputs=["a"]),
     r"plan\.layers\[2\]\.outputs\[0\] writes \"a\", which is written elsewhere"),
    (_edit(_layer("Softmax"), extra=[]), r"plan\.layers\[2\] has unknown field"),
    (_edit(_first_choice(_layer("Softmax")), time_ms="fast"), r"choices\[0\]\.time_ms must be a number"),
    (_edit(_first_choice(_layer("Softmax")), time_ms=-1), r"choices\[0\]\.time_ms"),
    (_edit(_first_choice(_layer("Softmax")), config={"block": 10**9}), r"choices\[0\]\.config is not a configuration"),
    (_edit(_first_choice(_conv), tactic="conv.cudnn_fused"),
     r"choices\[0\]\.tactic conv\.cudnn_fused does not run on cpu"),
    (_edit(_first_choice(_node), tactic="gemm.torch"), r"plan\.layers\[3\]\.choices\[0\]\.tactic names unknown tactic"),
    (_edit(_node, nodes=["conv"]), r"plan\.layers\[3\]\.nodes must name one Transpose node"),
    (_edit(_attrs(_node), args=[{"input": 0}, {"input": 0}]), r"plan\.layers\[3\]\.attrs\.args"),
    (_edit(_attrs(_node), args=[{"input": 7}]), r"attrs\.args\[0\]\.input must be an integer in \[0, 0\]"),
    (_weight_as(torch.float16), r"plan\.layers\[1\]\.choices\[0\]\.roles weight 'w' is torch\.float16"),
    (_drop_layouts_and_transpose_gemm, r"GEMM weights must be \[n, k\]"),
    (lambda h, s: h["plan"]["inputs"][0].update(dtype="nosuch"), r"plan\.inputs\[0\]\.dtype"),
    (lambda h, s: h["plan"]["inputs"][0].update(shape=[2, 3, -6, 8]), r"plan\.inputs\[0\]\.shape\[2\]"),
    (lambda h, s: h["plan"]["inputs"][0].update(shape=[1] * 65), r"plan\.inputs\[0\]\.shape has rank 65"),
    (lambda h, s: h["plan"]["profiles"][0]["x"].__setitem__(0, [3, 3, 6, 8]), r"min <= opt <= max"),
    (lambda h, s: h["plan"]["profiles"][0]["x"].__setitem__(2, [2**40, 3, 6, 8]),
     r"plan\.profiles\[0\]\[\"x\"\]\[2\]\[0\]"),
    (lambda h, s: h["plan"]["profiles"][0].update(ghost=[[1], [1], [1]]), r"names no input"),
    (lambda h, s: h["plan"].update(aux_streams=10**6), r"plan\.aux_streams"),
    (lambda h, s: h["plan"].update(name=7), r"plan\.name"),
    (lambda h, s: h["plan"]["outputs"].append({"name": "y", "dtype": "float"}), r"plan\.outputs names an output twice"),
    (lambda h, s: h.update(triton="x" * 1000), r"header's 'triton'"),
    (lambda h, s: h.update(backdoor=True), r"the header has unknown field"),
], ids=lambda value: None if callable(value) else "")
def test_forged_plan_fields_are_refused_by_path(forged, mutate, field):
    """Every plan field is type- and range-checked before anything is built; the error names the field."""
    with pytest.raises(EngineLoadError, match=field) as info:
        load_engine(forged(mutate))
    assert "\n" not in str(info.value)


def test_forged_plans_are_one_line_exit_2_in_kiln_inspect_and_run(forged, capsys):
    from kiln.cli import main

    path = forged(_edit(_attrs(_conv), strides=[10**400, 1]))
    for command in (["inspect", str(path)], ["inspect", str(path), "--json"], ["run", str(path)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "strides" in err and "Traceback" not in err


# -- hostile engines: the embedded graph ------------------------------------------------------------

def _loop_model() -> onnx.ModelProto:
    """y = Loop(1 iteration) { v + c }(x): the body holds an initializer c."""
    from onnx import TensorProto, helper, numpy_helper

    body = helper.make_graph(
        [helper.make_node("Add", ["v_in", "c"], ["v_out"], name="body_add"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.zeros(4, np.float32), "c")])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["M", "cond", "x"], ["y"], name="loop", body=body)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.array(1, np.int64), "M"), numpy_helper.from_array(np.array(True), "cond")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.fixture(scope="module")
def loop_engine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loop")
    onnx.save(_loop_model(), folder / "loop.onnx")
    kiln.build(folder / "loop.onnx", cpu_config(opt_level=0)).save(folder / "loop.kiln")
    return folder / "loop.kiln"


@pytest.mark.parametrize("where", ["absolute", "parent"])
def test_engine_graph_with_external_data_is_refused_and_reads_nothing(loop_engine, tmp_path, where):
    """A Loop body's initializer pointing at a file outside the engine's folder was read when the
    body ran, and its values came back as the engine's output. Now the engine is refused."""
    from onnx import TensorProto

    secret = np.arange(4, dtype=np.float32) + 1000
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(secret.tobytes())
    folder = tmp_path / "engines"
    folder.mkdir()
    header, stored = read_engine(loop_engine)
    graph = onnx.load_from_string(stored["__graph__"].numpy().tobytes())
    body = next(n for n in graph.graph.node if n.op_type == "Loop").attribute[0].g
    c = body.initializer[0]
    c.ClearField("raw_data")
    c.ClearField("float_data")
    c.data_location = TensorProto.EXTERNAL
    location = str(outside / "secret.bin") if where == "absolute" else "../outside/secret.bin"
    for k, v in (("location", location), ("offset", "0"), ("length", "16")):
        entry = c.external_data.add()
        entry.key, entry.value = k, v
    stored["__graph__"] = torch.frombuffer(bytearray(graph.SerializeToString()), dtype=torch.uint8)
    path = folder / "evil.kiln"
    write_forged(path, header, stored)
    with pytest.raises(EngineLoadError, match="external data") as info:
        load_engine(path).run({"x": np.zeros(4, np.float32)})
    assert "1000" not in str(info.value)
    # the untouched engine loads and runs (so the refusal is about the external data)
    assert load_engine(loop_engine).run({"x": np.zeros(4, np.float32)})["y"].tolist() == [0.0] * 4


# -- hostile engines: the safetensors header ---------------------------------------------------------

def _with_header(data: bytes, edit) -> bytes:
    start, end = header_span(data)
    header = json.loads(data[start:end])
    text = edit(header)
    body = data[end:]
    return len(text).to_bytes(8, "little") + text + body


def _tensor_entry(header) -> dict:
    return next(v for k, v in sorted(header.items()) if k != "__metadata__" and k != "__graph__")


def _serialized(mutate):
    def edit(header) -> bytes:
        mutate(header)
        return json.dumps(header).encode()
    return edit


@pytest.mark.parametrize("edit,match", [
    (_serialized(lambda h: _tensor_entry(h).update(shape=[0, 2**40])), r"shape\[1\] must be an integer"),
    (_serialized(lambda h: _tensor_entry(h).update(dtype="F4")), "dtype must be one of"),
    (_serialized(lambda h: _tensor_entry(h).update(data_offsets=[0, 2**62])), r"data_offsets\[1\]"),
    (_serialized(lambda h: _tensor_entry(h).update(shape=[1] * 100)), "rank 100"),
    (_serialized(lambda h: h["__metadata__"].update(extra="1")), "unknown field"),
    (lambda h: json.dumps(h).encode()[:-1] + b', "__graph__": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}',
     "twice"),
], ids=["zero-by-huge", "dtype-f4", "offset-past-end", "rank-100", "extra-metadata", "duplicate-key"])
def test_hostile_safetensors_header_is_one_line_refusal(engine_path, tmp_path, edit, match):
    """What safetensors leaves unchecked (or checks only after allocating) is refused before it runs."""
    path = tmp_path / "hostile.kiln"
    path.write_bytes(_with_header(engine_path.read_bytes(), edit))
    with pytest.raises(EngineLoadError, match=match) as info:
        load_engine(path)
    assert "\n" not in str(info.value)


def test_header_length_larger_than_the_file_is_refused(engine_path, tmp_path):
    data = engine_path.read_bytes()
    for length in (len(data), 2**63, 2**64 - 1):
        path = tmp_path / "long.kiln"
        path.write_bytes(length.to_bytes(8, "little") + data[8:])
        with pytest.raises(EngineLoadError, match="header length"):
            load_engine(path)


def test_fifo_in_place_of_the_engine_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "fifo.kiln"
    os.mkfifo(fifo)
    with pytest.raises(EngineLoadError, match="not a regular file"):
        load_engine(fifo)


# -- signatures -------------------------------------------------------------------------------------

KEY = b"0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def signed_path(engine_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("signed") / "signed.kiln"
    load_engine(engine_path).save(path, key=KEY)
    return path


def test_signed_engine_loads_with_its_key_and_without_one(signed_path, engine_path):
    assert load_engine(signed_path, key=KEY).run(feeds_for())["y"].shape == (2, 4, 5, 6)
    assert load_engine(signed_path).run(feeds_for())["y"].shape == (2, 4, 5, 6), "no key: the signature is not checked"
    with safe_open(signed_path, "pt") as handle:
        signature = handle.metadata()["kiln-hmac-sha256"]
    assert len(signature) == 64 and KEY.decode() not in signed_path.read_bytes().decode("latin-1")


def test_wrong_key_unsigned_and_resigned_engines_are_refused(signed_path, engine_path, tmp_path):
    with pytest.raises(EngineLoadError, match="signature mismatch"):
        load_engine(signed_path, key=b"another key, 32 bytes long......")
    with pytest.raises(EngineLoadError, match="not signed"):
        load_engine(engine_path, key=KEY)
    # an edit with a recomputed checksum (what a forger can do) no longer passes with a key
    header, stored = read_engine(signed_path)
    header["plan"]["layers"][0]["notes"] = ["edited"]
    header = {k: v for k, v in header.items() if k != "sha256"}
    header["sha256"] = digest(header, stored)
    data = st_save(stored, metadata={"kiln": json.dumps(header, sort_keys=True, separators=(",", ":")),
                                     "kiln-hmac-sha256": safe_open(signed_path, "pt").metadata()["kiln-hmac-sha256"]})
    forged_path = tmp_path / "resigned.kiln"
    forged_path.write_bytes(data)
    assert load_engine(forged_path).plan["layers"][0]["notes"] == ["edited"]  # the checksum alone is fooled
    with pytest.raises(EngineLoadError, match="signature mismatch"):
        load_engine(forged_path, key=KEY)
    flipped = bytearray(signed_path.read_bytes())
    flipped[-1] ^= 1
    forged_path.write_bytes(bytes(flipped))
    with pytest.raises(EngineLoadError, match="signature mismatch"):
        load_engine(forged_path, key=KEY)


def test_key_from_the_environment_signs_and_verifies(static_engine, engine_path, tmp_path, monkeypatch):
    key_file = tmp_path / "engine.key"
    key_file.write_text(KEY.decode() + "\n")
    monkeypatch.setenv("KILN_ENGINE_KEY", str(key_file))
    static_engine.save(tmp_path / "e.kiln")
    assert load_engine(tmp_path / "e.kiln").run(feeds_for())["y"].shape == (2, 4, 5, 6)
    with pytest.raises(EngineLoadError, match="not signed"):
        load_engine(engine_path)
    key_file.write_text("short")
    with pytest.raises(KilnError, match="16 to 4096 bytes"):
        load_engine(tmp_path / "e.kiln")


def test_cli_build_sign_key_and_inspect_with_the_wrong_key(model_path, tmp_path, monkeypatch, capsys):
    from kiln.cli import main

    key_file = tmp_path / "engine.key"
    key_file.write_bytes(KEY)
    out = tmp_path / "signed.kiln"
    assert main(["build", str(model_path), "-o", str(out), "--device", "cpu", "--opt-level", "0", "--quiet",
                 "--sign-key", str(key_file)]) == 0
    capsys.readouterr()
    monkeypatch.setenv("KILN_ENGINE_KEY", str(key_file))
    assert main(["inspect", str(out)]) == 0
    capsys.readouterr()
    key_file.write_bytes(b"a different key of some length")
    assert main(["inspect", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "signature mismatch" in err


# -- engine inputs and profiles ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def static_engine(engine_path):
    return load_engine(engine_path)


@pytest.mark.parametrize("change,match", [
    (lambda f: f.update(x=f["x"].astype(np.float64)), "dtype"),
    (lambda f: f.update(x=torch.from_numpy(f["x"]).half()), "dtype"),
    (lambda f: f.update(x=np.ones((2, 3), dtype=np.int64)), "dtype"),
    (lambda f: f.update(x=f["x"][0]), "rank"),
    (lambda f: f.update(x=np.random.default_rng(2).standard_normal((2, 3, 6, 9)).astype(np.float32)),
     "axis 3 must be 8"),
    (lambda f: f.update(r=np.random.default_rng(2).standard_normal((3, 4, 6, 8)).astype(np.float32)),
     "axis 0 must be 2"),
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
        assert loaded.program.profile_for({n: v.shape for n, v in feeds.items()}) == index
        got = loaded.run(feeds)
        assert got["y"].shape == (batch, 4, 5, 6)
        assert torch.equal(got["y"], engine.run(feeds)["y"])
        assert_matches_ort(got, path, feeds, "fp32")
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
