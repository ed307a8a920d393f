"""The fuzz targets' short form: a few hundred derandomized cases each, in-process; nothing may end
in an exception other than ``KilnError``. ``KILN_FUZZ_CASES=N`` runs N cases (the long form, with
crash and hang detection, is ``python -m tests.fuzz TARGET``: see ``tests/fuzz/harness.py``)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("hypothesis")

from tests.fuzz.harness import run_in_process  # noqa: E402

TARGETS = {"engine_reader": 200, "model_loader": 300, "npz_inputs": 300}


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_target(name, tmp_path):
    cases = int(os.environ.get("KILN_FUZZ_CASES", TARGETS[name]))
    counts = run_in_process(name, cases, tmp_path)
    print(counts.report(name))
    assert counts.bad == 0, counts.report(name)
    assert counts.counts["ok"] + counts.counts["KilnError"] == cases


def test_runner_counts_every_outcome(tmp_path):
    """The runner's own check: a worker that raises, dies or hangs is counted as such, and replaced."""
    from tests.fuzz.harness import run_isolated

    counts = run_isolated("outcomes", 5, tmp_path, time_limit=2)  # hypothesis draws each of the five once
    expected = dict.fromkeys(("ok", "KilnError", "other", "crash", "hang"), 1)
    assert dict(counts.counts) == expected, counts.report("outcomes")
    assert counts.bad == 3 and "ValueError: a bug" in counts.details["other"][0]
