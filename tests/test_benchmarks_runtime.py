"""``python3 -m benchmarks.runtime --smoke``, in-process: the runtime benchmark runs to the end on the CPU
with a tiny stand-in model and writes its JSON and markdown (no torchvision or transformers needed)."""

from __future__ import annotations

import json

import pytest

from benchmarks import runtime


@pytest.mark.slow
def test_bench_runtime_smoke(tmp_path):
    code = runtime.main(["--smoke", "--no-compile", "--models", "tiny_encoder", "--out", str(tmp_path),
                         "--budget-s", "300"])
    results = json.loads((tmp_path / "bench_runtime.json").read_text())
    state = results["models"]["tiny_encoder"]
    assert code == 0, state.get("tracebacks")
    assert results["meta"]["all_within_tolerance"] and "UTC" in results["meta"]["date"]
    assert not state.get("errors") and set(state["skipped"]) == {"compile_reduce_overhead", "compile_default"}

    latency = state["latency_b1"]
    assert latency["kiln, no CUDA graph"]["wait"]["ms"] > 0 and latency["torch eager"]["wait"]["ms"] > 0
    assert latency["kiln, no CUDA graph"]["vs_ort"]["ok"]
    assert latency["kiln, CUDA graph"]["skipped"] == "CPU: no CUDA graphs"

    rows = state["throughput"]["rows"]
    assert {(r["driver"], r["contexts"]) for r in rows} == {(d, n) for d in ("threads", "round-robin")
                                                            for n in (1, 2, 4)}
    assert all(r["samples_per_s"] > 0 and r["identical_to_single"] and r["max_rel_vs_ort"] <= 1e-2 for r in rows)

    events = state["shape_change"]["no_graph"]["events_ms"]
    assert "batch 1: first call after set_profile(0)" in events and all(v >= 0 for v in events.values())
    aux = state["aux_streams"]
    assert aux["plan_aux_streams"] >= 0 and all(r["identical"] for r in aux["rows"])

    markdown = (tmp_path / "bench_runtime.md").read_text()
    for title in ("## tiny_encoder", "### Batch-1 latency", "### Throughput at batch 4", "### New batch size",
                  "### Auxiliary streams", "Command: `"):
        assert title in markdown
    assert not (tmp_path / "tmp").exists()  # the ONNX file is removed without --keep-artifacts
