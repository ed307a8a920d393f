"""The timing cache: keys, round trips, refusal of damaged or hostile files, concurrent saves."""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.synchronize
import os
import warnings

import pytest

from kiln.builder import timing_cache
from kiln.builder.timing_cache import TimingCache, TimingCacheWarning
from kiln.errors import KilnError

ENV = {"gpu": "NVIDIA H100 80GB HBM3", "kiln": "0.1.0", "torch": "2.11.0", "triton": "3.6.0"}
FIELDS = {
    "op": "MatMul",
    "attrs": {},
    "shapes": [[8, 64], [64, 32]],
    "dtypes": ["float16", "float16"],
    "layout": "row",
    "tactic": "triton_mm",
    "config": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4},
    "precision": "fp16",
}
ENTRY = {"ms": 0.12, "ok": True, "error": 3e-5}


def _fields(i: int) -> dict:
    return {**FIELDS, "config": {**FIELDS["config"], "BLOCK_K": i}}


def _load_quietly(path, environment: dict[str, str] = ENV) -> TimingCache:
    """Load a file that must be valid: any warning fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", TimingCacheWarning)
        cache = TimingCache(path, environment)
    assert cache.warnings == []
    return cache


def test_round_trip(tmp_path):
    path = tmp_path / "sub" / "dir" / "cache.json"
    cache = TimingCache(path, ENV)
    assert len(cache) == 0
    key = cache.key(FIELDS)
    assert cache.get(key) is None
    cache.put(key, ENTRY)
    cache.put(cache.key(_fields(1)), {"ms": None, "ok": False})
    assert cache.get(key) == ENTRY
    assert (cache.hits, cache.misses) == (1, 1)
    cache.save()

    document = json.loads(path.read_text())
    assert document["format"] == "kiln-timing-cache" and document["version"] == 1
    assert len(document["entries"]) == 2

    again = _load_quietly(path)
    assert len(again) == 2
    assert again.get(again.key(FIELDS)) == ENTRY
    assert again.get(again.key(_fields(1))) == {"ms": None, "ok": False}
    assert again.get(again.key(_fields(2))) is None
    assert (again.hits, again.misses) == (2, 1)


def test_in_memory_cache_never_writes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = TimingCache(None, ENV)
    cache.put(cache.key(FIELDS), ENTRY)
    cache.save()
    assert cache.get(cache.key(FIELDS)) == ENTRY
    assert list(tmp_path.iterdir()) == []


def test_entries_are_copies(tmp_path):
    cache = TimingCache(None, ENV)
    key = cache.key(FIELDS)
    entry = {"ms": 1.0, "ok": True, "notes": ["a"]}
    cache.put(key, entry)
    entry["notes"].append("b")
    cache.get(key)["notes"].append("c")
    assert cache.get(key) == {"ms": 1.0, "ok": True, "notes": ["a"]}


def test_key_changes_with_every_field_and_the_environment():
    cache = TimingCache(None, ENV)
    base = cache.key(FIELDS)
    assert len(base) == 64 and int(base, 16) >= 0
    assert cache.key(dict(reversed(list(FIELDS.items())))) == base, "field order must not matter"
    changed = {
        "op": "Gemm",
        "attrs": {"transB": 1},
        "shapes": [[8, 64], [64, 33]],
        "dtypes": ["float32", "float16"],
        "layout": "col",
        "tactic": "cublas",
        "config": {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4},
        "precision": "tf32",
    }
    keys = {base}
    for name, value in changed.items():
        keys.add(cache.key({**FIELDS, name: value}))
    for name, value in ENV.items():
        keys.add(TimingCache(None, {**ENV, name: value + "x"}).key(FIELDS))
    keys.add(TimingCache(None, {**ENV, "cuda": "12.8"}).key(FIELDS))
    assert len(keys) == 1 + len(changed) + len(ENV) + 1
    with pytest.raises(ValueError, match="env"):
        cache.key({**FIELDS, "env": {}})


def test_foreign_environment_never_hits(tmp_path):
    path = tmp_path / "cache.json"
    h100 = TimingCache(path, ENV)
    h100.put(h100.key(FIELDS), ENTRY)
    h100.save()

    other_env = {**ENV, "gpu": "NVIDIA H200"}
    h200 = _load_quietly(path, other_env)
    assert len(h200) == 1
    assert h200.get(h200.key(FIELDS)) is None
    h200.put(h200.key(FIELDS), {"ms": 0.08, "ok": True})
    h200.save()

    both = _load_quietly(path)
    assert len(both) == 2
    assert both.get(both.key(FIELDS)) == ENTRY
    assert TimingCache(path, other_env).get(h200.key(FIELDS)) == {"ms": 0.08, "ok": True}


def _valid_document(entries: dict | None = None) -> dict:
    return {"format": "kiln-timing-cache", "version": 1, "entries": entries or {"a" * 64: {"ms": 1, "ok": True}}}


def _json(document) -> bytes:
    return json.dumps(document).encode()


_CORRUPT = {
    "truncated": _json(_valid_document())[:-7],
    "random_bytes": bytes(range(256)) * 4,
    "not_utf8": b'{"format": "kiln-timing-cache", "version": 1, "entries": {}, "x": "\xff\xfe"}',
    "not_json": b"format = kiln",
    "empty": b"",
    "a_list": b"[]",
    "wrong_format": _json({**_valid_document(), "format": "trt-timing-cache"}),
    "no_format": _json({"version": 1, "entries": {}}),
    "newer_version": _json({**_valid_document(), "version": 2}),
    "version_true": _json({**_valid_document(), "version": True}),
    "version_string": _json({**_valid_document(), "version": "1"}),
    "entries_list": _json({**_valid_document(), "entries": []}),
    "entries_missing": _json({"format": "kiln-timing-cache", "version": 1}),
    "key_short": _json(_valid_document({"abc": {"ms": 1, "ok": True}})),
    "key_upper": _json(_valid_document({"A" * 64: {"ms": 1, "ok": True}})),
    "entry_not_dict": _json(_valid_document({"a" * 64: [1, True]})),
    "ms_missing": _json(_valid_document({"a" * 64: {"ok": True}})),
    "ms_string": _json(_valid_document({"a" * 64: {"ms": "1", "ok": True}})),
    "ms_negative": _json(_valid_document({"a" * 64: {"ms": -1.0, "ok": True}})),
    "ms_bool": _json(_valid_document({"a" * 64: {"ms": True, "ok": True}})),
    "ms_nan": _json(_valid_document({"a" * 64: {"ms": float("nan"), "ok": True}})),
    "ms_infinite_literal": b'{"format": "kiln-timing-cache", "version": 1, "entries": {"'
    + b"a" * 64
    + b'": {"ms": 1e999, "ok": true}}}',
    "other_field_infinite": b'{"format": "kiln-timing-cache", "version": 1, "entries": {"'
    + b"a" * 64
    + b'": {"ms": 1, "ok": true, "error": -1e999}}}',
    "ok_missing": _json(_valid_document({"a" * 64: {"ms": 1}})),
    "ok_int": _json(_valid_document({"a" * 64: {"ms": 1, "ok": 1}})),
    "entry_deep": _json(_valid_document({"a" * 64: {"ms": 1, "ok": True, "x": json.loads("[" * 200 + "]" * 200)}})),
    "huge_int": b'{"format": "kiln-timing-cache", "version": 1, "entries": {}, "n": ' + b"9" * 10000 + b"}",
    # 400 digits parse as a Python int, and float() of it overflows (an OverflowError once escaped)
    "ms_400_digits": b'{"format": "kiln-timing-cache", "version": 1, "entries": {"' + b"a" * 64
    + b'": {"ms": 1' + b"0" * 400 + b', "ok": true}}}',
    "other_field_400_digits": b'{"format": "kiln-timing-cache", "version": 1, "entries": {"' + b"a" * 64
    + b'": {"ms": 1, "ok": true, "error": -1' + b"0" * 400 + b"}}}",
    "hostile_nesting": b"[" * 100_000,
    "hostile_nesting_object": b'{"entries": ' * 100_000,
    "hostile_nesting_closed": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("name", sorted(_CORRUPT))
def test_corrupt_file_gives_one_warning_and_an_empty_cache(tmp_path, name):
    path = tmp_path / "cache.json"
    path.write_bytes(_CORRUPT[name])
    with pytest.warns(TimingCacheWarning) as record:
        cache = TimingCache(path, ENV)
    assert len(record) == 1
    message = str(record[0].message)
    assert str(path) in message and "rewritten" in message and "\n" not in message
    assert cache.warnings == [message]
    assert len(cache) == 0
    assert record[0].filename == __file__, "the warning should point at the code that opened the cache"

    cache.put(cache.key(FIELDS), ENTRY)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TimingCacheWarning)  # saving over the same refused file says nothing more
        cache.save()
    assert cache.warnings == [message]
    again = _load_quietly(path)
    assert len(again) == 1 and again.get(again.key(FIELDS)) == ENTRY


def test_a_file_refused_for_another_reason_at_save_is_reported_again(tmp_path):
    path = tmp_path / "cache.json"
    path.write_bytes(b"not json")
    with pytest.warns(TimingCacheWarning):
        cache = TimingCache(path, ENV)
    path.write_bytes(b"[]")
    cache.put(cache.key(FIELDS), ENTRY)
    with pytest.warns(TimingCacheWarning, match="overwritten") as record:
        cache.save()
    assert len(record) == 1 and len(cache.warnings) == 2


def test_refusals_go_to_on_refusal_instead_of_warnings(tmp_path):
    path = tmp_path / "cache.json"
    path.write_bytes(_CORRUPT["ms_400_digits"])
    said = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", TimingCacheWarning)
        cache = TimingCache(path, ENV, on_refusal=said.append)
        cache.put(cache.key(FIELDS), ENTRY)
        cache.save()
    assert said == cache.warnings and len(said) == 1 and "integer" in said[0]


def test_lock_file_symlink_is_not_followed(tmp_path):
    path = tmp_path / "cache.json"
    target = tmp_path / "elsewhere" / "created-by-kiln"
    target.parent.mkdir()
    os.symlink(target, tmp_path / "cache.json.lock")
    cache = TimingCache(path, ENV)
    cache.put(cache.key(FIELDS), ENTRY)
    with pytest.raises(KilnError, match="symlink"):
        cache.save()
    assert not target.exists(), "the lock was opened through the symlink"
    assert not path.exists()


def test_oversized_file_is_refused_unread(tmp_path, monkeypatch):
    path = tmp_path / "cache.json"
    path.write_bytes(_json(_valid_document()))
    monkeypatch.setattr(timing_cache, "MAX_FILE_BYTES", 10)
    monkeypatch.setattr(timing_cache, "_parse", lambda data: pytest.fail("an oversized file was parsed"))
    with pytest.warns(TimingCacheWarning, match="over the 10-byte limit") as record:
        cache = TimingCache(path, ENV)
    assert len(record) == 1 and len(cache) == 0


def test_directory_or_fifo_in_place_of_the_file_is_refused(tmp_path):
    directory = tmp_path / "dir.json"
    directory.mkdir()
    with pytest.warns(TimingCacheWarning) as record:
        assert len(TimingCache(directory, ENV)) == 0
    assert len(record) == 1
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.warns(TimingCacheWarning, match="not a regular file") as record:
        assert len(TimingCache(fifo, ENV)) == 0
    assert len(record) == 1


def test_missing_file_is_an_empty_cache_without_warning(tmp_path):
    cache = _load_quietly(tmp_path / "nope" / "cache.json")
    assert len(cache) == 0


def test_save_merges_with_entries_written_since_load(tmp_path):
    path = tmp_path / "cache.json"
    first = TimingCache(path, ENV)
    second = TimingCache(path, ENV)
    first.put(first.key(_fields(1)), {"ms": 1.0, "ok": True})
    second.put(second.key(_fields(2)), {"ms": 2.0, "ok": True})
    second.put(second.key(_fields(3)), {"ms": 3.0, "ok": True})
    first.save()
    second.save()
    assert len(second) == 3, "save also brings in what other builds wrote"
    first.put(first.key(_fields(3)), {"ms": 3.5, "ok": True})
    first.save()
    final = _load_quietly(path)
    assert len(final) == 3
    assert final.get(final.key(_fields(2))) == {"ms": 2.0, "ok": True}
    assert final.get(final.key(_fields(3))) == {"ms": 3.5, "ok": True}, "the newest measurement wins"


def test_save_without_puts_writes_nothing(tmp_path):
    path = tmp_path / "cache.json"
    TimingCache(path, ENV).save()
    assert not path.exists()

    path.write_bytes(b"garbage")
    with pytest.warns(TimingCacheWarning):
        cache = TimingCache(path, ENV)
    cache.save()
    assert path.read_bytes() == b"garbage"


def test_equal_contents_give_identical_bytes(tmp_path):
    entries = [(_fields(i), {"ms": i / 7, "ok": i % 3 != 0, "error": i * 1e-6}) for i in range(50)]
    one = TimingCache(tmp_path / "one.json", ENV)
    for fields, entry in entries:
        one.put(one.key(fields), entry)
    one.save()
    two = TimingCache(tmp_path / "two.json", dict(reversed(list(ENV.items()))))
    for fields, entry in reversed(entries):
        two.put(two.key(dict(reversed(list(fields.items())))), dict(reversed(list(entry.items()))))
    two.save()
    assert (tmp_path / "one.json").read_bytes() == (tmp_path / "two.json").read_bytes()

    # Loading and saving again changes nothing.
    three = _load_quietly(tmp_path / "one.json")
    three.put(three.key(_fields(0)), entries[0][1])
    three.save()
    assert (tmp_path / "one.json").read_bytes() == (tmp_path / "two.json").read_bytes()


def test_put_rejects_what_loading_would_refuse():
    cache = TimingCache(None, ENV)
    key = cache.key(FIELDS)
    for entry in (
        {"ok": True},
        {"ms": -1, "ok": True},
        {"ms": float("inf"), "ok": True},
        {"ms": 1, "ok": "yes"},
        {"ms": 1, "ok": True, "error": float("nan")},
        [1, True],
    ):
        with pytest.raises(ValueError):
            cache.put(key, entry)
    with pytest.raises(ValueError):
        cache.put("not-a-key", ENTRY)
    with pytest.raises(TypeError):
        cache.put(key, {"ms": 1, "ok": True, "x": object()})
    assert len(cache) == 0


def test_environment_must_be_strings():
    with pytest.raises(TypeError):
        TimingCache(None, {"gpu": None})


def test_unwritable_location_raises_kiln_error(tmp_path):
    (tmp_path / "afile").write_text("I am a file")
    path = tmp_path / "afile" / "cache.json"
    cache = TimingCache(path, ENV)
    cache.put(cache.key(FIELDS), ENTRY)
    with pytest.raises(KilnError) as raised:
        cache.save()
    assert str(path) in str(raised.value)


def test_failed_write_leaves_the_old_file_and_can_be_retried(tmp_path, monkeypatch):
    path = tmp_path / "cache.json"
    cache = TimingCache(path, ENV)
    cache.put(cache.key(_fields(1)), ENTRY)
    cache.save()
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    cache.put(cache.key(_fields(2)), ENTRY)
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(KilnError, match="No space left on device") as raised:
        cache.save()
    assert str(path) in str(raised.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json", "cache.json.lock"]

    monkeypatch.undo()
    cache.save()
    assert len(_load_quietly(path)) == 2


def _build(path: str, worker: int, keys: int, saves: int, start: multiprocessing.synchronize.Barrier) -> None:
    """One concurrent build: put ``keys`` distinct entries, saving ``saves`` times along the way."""
    start.wait(60)  # all builds run at once, not one after another as their interpreters come up
    cache = TimingCache(path, ENV)
    for i in range(keys):
        cache.put(cache.key({**FIELDS, "worker": worker, "i": i}), {"ms": i / 10, "ok": True, "worker": worker})
        if (i + 1) % (keys // saves) == 0:
            cache.save()
    cache.save()


def test_concurrent_saves_lose_nothing(tmp_path):
    path = str(tmp_path / "shared" / "cache.json")
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(4)
    workers = [context.Process(target=_build, args=(path, worker, 200, 20, start)) for worker in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
        assert process.exitcode == 0

    with open(path, encoding="utf-8") as handle:
        document = json.load(handle)
    assert len(document["entries"]) == 800
    cache = _load_quietly(path)
    assert len(cache) == 800
    for worker in range(4):
        for i in range(200):
            assert cache.get(cache.key({**FIELDS, "worker": worker, "i": i})) == {"ms": i / 10, "ok": True,
                                                                                  "worker": worker}


def test_a_cache_saying_every_tactic_failed_does_not_fail_the_build(tmp_path):
    """A cache may only speed a build up: where it says every candidate of a layer failed, they are
    checked again, the build succeeds, and the fresh verdicts replace the cached ones."""
    import onnx

    import kiln
    from tests.builder.graphs import tiny_model

    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), model)
    path = tmp_path / "cache.json"
    config = kiln.BuildConfig(device="cpu", opt_level=1, timing_cache=str(path))
    kiln.build(model, config)
    document = json.loads(path.read_text())
    assert document["entries"]
    for entry in document["entries"].values():
        entry.update(ok=False, ms=None, reason="forged")
    path.write_text(json.dumps(document))

    engine = kiln.build(model, config)
    assert engine.report.timed > 0
    assert all(layer["choices"][0]["tactic"] for layer in engine.plan["layers"])
    assert any(entry["ok"] for entry in json.loads(path.read_text())["entries"].values())


def test_kiln_build_reports_a_refused_cache_once_in_one_line(tmp_path, capsys):
    import onnx

    from kiln.cli import main
    from tests.builder.graphs import tiny_model

    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), model)
    cache = tmp_path / "cache.json"
    cache.write_bytes(_CORRUPT["ms_400_digits"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", TimingCacheWarning)
        code = main(["build", str(model), "-o", str(tmp_path / "e.kiln"), "--device", "cpu", "--opt-level", "0",
                     "--timing-cache", str(cache), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0
    lines = [line for line in (out + err).splitlines() if "ignored" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: timing cache") and "integer" in lines[0]
    assert "Traceback" not in err and "warnings.warn" not in out + err
