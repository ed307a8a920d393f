"""``python3 -m benchmarks.zoo --smoke``, in-process: the model-zoo benchmark runs its stages on the CPU
with benchmarks.models' tiny models, writes zoo.json, zoo.md and the plots, splices BENCHMARKS.md
between its markers (and again, replacing the section), and ``--render`` rebuilds the same markdown
from zoo.json alone (no torchvision or transformers needed)."""

from __future__ import annotations

import json

import pytest

from benchmarks import zoo

BENCHMARKS = """# kiln benchmarks

Every table here comes from one run of one script.

## Builder: ResNet-50 and BERT-base, fp16 (issue 3)

| model | batch | kiln ms |
|---|---:|---:|
| resnet50 | 1 | 0.389 |
"""


def test_splice_keeps_everything_outside_the_markers():
    text = f"head\n\n{zoo.BEGIN}\nold section\n{zoo.END}\n\ntail\n"
    assert zoo.splice(text, "new section\n") == f"head\n\n{zoo.BEGIN}\nnew section\n{zoo.END}\n\ntail\n"
    assert zoo.splice("head\n", "s") == f"head\n\n{zoo.BEGIN}\ns\n{zoo.END}\n"
    assert zoo.splice("", "s") == f"{zoo.BEGIN}\ns\n{zoo.END}\n"
    for broken in (f"{zoo.BEGIN}\nno end\n", f"{zoo.END}\n{zoo.BEGIN}\n", f"{zoo.BEGIN}{zoo.END}{zoo.BEGIN}{zoo.END}"):
        with pytest.raises(ValueError, match="markers"):
            zoo.splice(broken, "s")


@pytest.mark.slow
def test_zoo_smoke(tmp_path):
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text(BENCHMARKS)
    plots = tmp_path / "docs" / "bench"
    out = tmp_path / "run1"

    # 1. every stage for the tiny encoder (torch.compile too): the section is appended with its markers
    code = zoo.main(["--smoke", "--models", "tiny_encoder", "--out", str(out), "--plots-dir", str(plots),
                     "--update", str(bench)])
    data = json.loads((out / "zoo.json").read_text())
    record = data["models"]["tiny_encoder"]
    assert code == 0, [s.get("traceback") for s in record["stages"]]
    assert data["meta"]["command"].endswith(f"python3 -m benchmarks.zoo --smoke --models tiny_encoder --out {out} "
                                            f"--plots-dir {plots} --update {bench}")
    assert "UTC" in data["meta"]["date"] and data["meta"]["versions"]["kiln"]
    assert [s["round"] for s in record["stages"]] == list(zoo.ROUNDS)
    assert all(s["status"] == "ok" for s in record["stages"]), record["stages"]
    assert record["export"]["onnx_mb"] > 0
    compile_stage = next(s for s in record["stages"] if s["round"] == "compile-fp16")
    assert [c["batch"] for c in compile_stage["compile"]] == [1, 4] and compile_stage["dynamo"]["graph_breaks"] == 0

    fp16, fp32 = (zoo.BenchResult.from_json(record["results"][p]) for p in ("fp16", "fp32"))
    assert {(r.target, r.batch) for r in fp16.rows} == {(t, b) for t in ("kiln", "eager", "compile") for b in (1, 4)}
    assert {(r.target, r.batch) for r in fp32.rows} == {(t, b) for t in ("kiln", "eager", "compile", "onnxruntime")
                                                        for b in (1, 4)}
    for row in fp16.rows + fp32.rows:
        assert row.error is None and row.best.samples_per_s > 0
        if row.target != "kiln":
            assert row.max_rel_diff < (2e-2 if row in fp16.rows else 1e-4), (row.target, row.max_rel_diff)
        assert row.ref_rel_diff < (2e-2 if row in fp16.rows else 1e-4), (row.target, row.ref_rel_diff)  # vs fp32 ONNX
    assert any(n.startswith("onnxruntime-cuda: not run") for n in fp32.notes)

    markdown = (out / "zoo.md").read_text()
    for text in ("## Model zoo: kiln bench (issue 6) — ", "Device: CPU", "Versions: torch ", "Command: `",
                 "### tiny encoder", "| target | precision | batch | median ms | p99 ms | e2e ms | samples/s | vs kiln "
                                     "| rel diff | vs fp32 ref |",
                 "| onnxruntime | fp32 | 4 |", "torch.compile fp16: batch 1: ", "](plots/tiny_encoder.png)",
                 "### How this run went"):
        assert text in markdown, text
    assert (out / "plots" / "tiny_encoder.png").stat().st_size > 0 and (plots / "tiny_encoder.png").exists()
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["tiny_encoder.png", "zoo.json", "zoo.md"]

    first = bench.read_text()
    assert first.startswith(BENCHMARKS + "\n" + zoo.BEGIN + "\n## Model zoo") and first.endswith(zoo.END + "\n")
    assert "](docs/bench/tiny_encoder.png)" in first

    # 2. the tiny CNN's fp16 sweep with its layer profile; torch.compile does not fit the budget: a note, no row
    out2 = tmp_path / "run2"
    code = zoo.main(["--smoke", "--models", "tiny_cnn", "--stages", "core-fp16,compile-fp16", "--compile-estimate-s",
                     "100000", "--out", str(out2), "--plots-dir", str(plots), "--update", str(bench)])
    assert code == 0
    record = json.loads((out2 / "zoo.json").read_text())["models"]["tiny_cnn"]
    skipped = record["stages"][1]
    assert skipped["round"] == "compile-fp16" and skipped["status"] == "skipped" and "time budget" in skipped["reason"]
    result = zoo.BenchResult.from_json(record["results"]["fp16"])
    assert result.batches == [1, 2, 4] and result.saturation is not None and result.layers
    markdown = (out2 / "zoo.md").read_text()
    for text in ("### tiny CNN", "Saturation (kiln fp16): ", "| batch | batch x | throughput x | efficiency |",
                 "layers, kiln fp16 at batch 4", "compile-fp16 (torch.compile fp16 at batch 4): not run: time budget"):
        assert text in markdown, text
    second = bench.read_text()
    assert second.startswith(BENCHMARKS + "\n" + zoo.BEGIN + "\n## Model zoo") and second.endswith(zoo.END + "\n")
    assert second.count(zoo.BEGIN) == 1 and "### tiny CNN" in second and "### tiny encoder" not in second

    # 3. --render: the same markdown from zoo.json alone; --details writes each result as report.write_json does
    out3 = tmp_path / "render"
    assert zoo.main(["--render", str(out / "zoo.json"), "--out", str(out3), "--details"]) == 0
    assert (out3 / "zoo.md").read_text() == (out / "zoo.md").read_text()
    details = json.loads((out3 / "details" / "tiny_encoder_fp32.json").read_text())
    assert details == data["models"]["tiny_encoder"]["results"]["fp32"]
    assert (out3 / "details" / "tiny_encoder_fp16.png").exists() and (out3 / "plots" / "tiny_encoder.png").exists()
    assert (plots / "tiny_cnn.png").exists()  # run 2's plot, copied to --plots-dir; a smoke render copies none

    # 4. --render of both runs merges them: one section with both models
    assert zoo.main(["--render", str(out / "zoo.json"), str(out2 / "zoo.json"), "--out", str(out3)]) == 0
    merged = (out3 / "zoo.md").read_text()
    assert "### tiny encoder" in merged and "### tiny CNN" in merged and "### How the 2 runs went" in merged
    assert "Commands: 2 runs of this script" in merged and "Rendered with `" in merged
    for i, meta in enumerate((data["meta"], json.loads((out2 / "zoo.json").read_text())["meta"]), 1):
        assert f"{i}. `{meta['command']}` ({meta['date']})" in merged
        assert f"- run {i}: stages in this order, each round over the models: {', '.join(meta['stages'])};" in merged


def test_stage_notes_leave_out_what_a_later_run_did():
    """Merged runs: a stage skipped in one run and done in another is no note; one skipped twice is one."""
    skip = {"round": "compile-fp16", "status": "skipped", "reason": "time budget: 3 s left", "batches": [4]}
    done = {"round": "compile-fp16", "status": "ok", "batches": [4]}
    later = dict(skip, reason="time budget: 9 s left")
    assert zoo.stage_notes({"stages": [skip, done]}) == []
    assert zoo.stage_notes({"stages": [skip, later]}) == ["compile-fp16 (torch.compile fp16 at batch 4): not run: "
                                                          "time budget: 9 s left"]
