"""onnx's backend node tests against kiln: running them, and the list of those kiln fails, by reason.

The list is ``tests/backend/node_failures.txt`` in the repository: ``tools/conformance.py --write``
runs every case and writes it (``write_failures``); ``tests/backend/test_onnx_node_tests.py`` reads it
(``read_failures``), runs every other case and requires it to pass. Reasons come from the failure
itself (``classify``: the KilnError or assertion, grouped by its first words), so the file says *why*
each case fails, not only that it does.
"""

from __future__ import annotations

import re
import unittest
from pathlib import Path

# Why whole families of ops are absent: said once here rather than per case.
_FAMILIES = {
    "training op (kiln is an inference engine)": {"Momentum", "Adagrad", "Adam", "Gradient"},
    "image decoding (needs an image codec, not a tensor op)": {"ImageDecoder"},
}


def _family(op: str) -> str | None:
    for family, ops in _FAMILIES.items():
        if op in ops:
            return family
    return None


# Cases whose failure was investigated and is not kiln's to fix, by name prefix.
_EXPLAINED = {
    "test_bernoulli": "random op: onnx's expected values come from numpy's unseeded generator (shapes and dtypes "
                      "match)",
    "test_dft_inverse": "numpy's float32 FFT leaves ~2e-7 noise where the exact answer (kiln's) is 0; atol is 1e-7",
    "test_attention_4d_causal_fp16_expanded": "fp16 Softmax: kiln accumulates in fp32, onnx's reference in fp16 (1 ulp "
                                              "apart)",
    "test_loop16_seq_none": "onnx's harness cannot compare a sequence whose first element is 0-d (values match)",
}


def classify(trace: str, name: str = "") -> str:
    """A short, stable reason for one failing case, from its name and traceback text."""
    for prefix, reason in _EXPLAINED.items():
        if name.startswith(prefix):
            return reason
    match = re.search(r"does not implement: (\S+?::(\w+))", trace)
    if match:
        return _family(match.group(2)) or f"op not implemented: {match.group(1)}"
    match = re.search(r"element type (\w+)(?:, which kiln| cannot be held)", trace)
    if match:
        return f"element type {match.group(1)} (torch has no such dtype)"
    match = re.search(r"\(op (?:[\w.]+::)?(\w+), opset \d+\): (.*)", trace)
    if match:
        return f"{match.group(1)}: {match.group(2)[:90]}"
    match = re.search(r"node '.*?' \(op (\w+)\) failed: (\w+)", trace)
    if match:
        return f"{match.group(1)} raises {match.group(2)}"
    if "Mismatched elements" in trace or "Not equal to tolerance" in trace:
        return "result differs from the reference beyond tolerance"
    if "incorrect shape" in trace:
        return "output shape differs from the reference"
    if "Items are not equal" in trace:
        return "output dtype or count differs from the reference"
    last = [line for line in trace.strip().splitlines() if line.strip()][-1]
    return last.strip()[:100]


def node_tests(device: str = "CPU") -> tuple[list[str], type[unittest.TestCase]]:
    """The names of onnx's node test cases for ``device`` ("CPU" or "CUDA"), and their TestCase class."""
    import onnx.backend.test

    import kiln.backend

    # onnx types the backend as type[Backend]; its runner takes a backend module too (as onnx's docs do)
    runner = onnx.backend.test.BackendTest(kiln.backend, __name__)  # type: ignore[arg-type]
    case = runner.test_cases["OnnxBackendNodeModelTest"]
    suffix = "_" + device.lower()
    return [name for name in dir(case) if name.startswith("test_") and name.endswith(suffix)], case


def write_failures(failures: dict[str, str], path: Path) -> None:
    """Write ``failures`` (case name -> reason) to ``path``, grouped by reason, largest group first."""
    groups: dict[str, list[str]] = {}
    for name, reason in failures.items():
        groups.setdefault(reason, []).append(name)
    lines = [
        "# onnx backend node tests (onnx 1.23) that kiln fails on CPU, grouped by reason.",
        "# Every case not listed here must pass: tests/backend/test_onnx_node_tests.py runs them.",
        "# Regenerate with: python tools/conformance.py --write",
        f"# {len(failures)} failing cases.",
        "",
    ]
    for reason, names in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        lines.append(f"## {reason} ({len(names)})")
        lines.extend(sorted(names))
        lines.append("")
    path.write_text("\n".join(lines))


def read_failures(path: Path) -> dict[str, str]:
    """The failures ``write_failures`` wrote to ``path`` (case name -> reason); empty if there is no file."""
    failures: dict[str, str] = {}
    reason = ""
    if not path.exists():
        return failures
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            reason = re.sub(r" \(\d+\)$", "", line[3:])
        elif line.startswith("test_"):
            failures[line.strip()] = reason
    return failures
