"""A target whose cases name how they end: the runner's own test (each outcome must be counted as such)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from hypothesis import strategies as st

from kiln.errors import KilnError

NAME = "outcomes"
CASES = ("ok", "KilnError", "other", "crash", "hang")


def prepare(folder: Path) -> None:
    return None


def cases(prepared: None):
    return st.sampled_from(CASES)


def check(prepared: None, case: str, folder: Path) -> None:
    if case == "KilnError":
        raise KilnError("refused")
    if case == "other":
        raise ValueError("a bug")
    if case == "crash":
        os.abort()
    if case == "hang":
        time.sleep(3600)
