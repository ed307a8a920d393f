"""Mutated model files (bit flips, truncations, insertions, overwritten runs of bytes): each one
either loads and runs, or is refused with a KilnError. Never another exception, never a crash."""

from __future__ import annotations

import numpy as np
import pytest

import kiln
from kiln.demo import make_demo_model
from kiln.inputs import random_inputs

_BASE = make_demo_model().SerializeToString()


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    data = bytearray(data)
    kind = rng.integers(0, 4)
    if kind == 0:
        for _ in range(rng.integers(1, 6)):
            data[rng.integers(0, len(data))] ^= 1 << int(rng.integers(0, 8))
    elif kind == 1:
        data = data[: rng.integers(1, len(data))]
    elif kind == 2:
        at = rng.integers(0, len(data))
        data[at:at] = rng.integers(0, 256, rng.integers(1, 20), dtype=np.uint8).tobytes()
    else:
        at = rng.integers(0, len(data) - 8)
        data[at:at + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
    return bytes(data)


@pytest.mark.parametrize("seed", range(40))
def test_mutated_model_runs_or_is_refused(tmp_path, seed):
    path = tmp_path / "mutated.onnx"
    path.write_bytes(_mutate(_BASE, np.random.default_rng(seed)))
    try:
        executor = kiln.Executor(kiln.load_model(path), name=str(path))
        executor.run(random_inputs(executor.inputs, seed=seed, model=str(path)))
    except kiln.KilnError as error:
        assert "mutated.onnx" in str(error), f"the error does not name the file: {error}"
