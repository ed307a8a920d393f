"""What every benchmark run records about itself: the command as typed, the versions, the GPU, and a
log with the seconds since the start.

The versions are ``kiln.versions.versions()`` plus what the tables also name (CUDA, cuDNN, numpy,
onnx-ir, transformers, torchvision), each None where it is missing.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from typing import Any

import numpy as np
import torch

import kiln.versions

START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", flush=True)


def elapsed() -> float:
    return time.perf_counter() - START


def command_line(module: str, argv: list[str] | None = None) -> str:
    """The command as typed (``python3 -m MODULE ARGS``, PYTHONPATH too where it was set), with $OUT
    where an argument is the folder $OUT names."""
    argv = sys.argv[1:] if argv is None else argv
    prefix = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} " if os.environ.get("PYTHONPATH") else ""
    words = [shlex.quote(a) for a in argv]
    out = os.environ.get("OUT")
    if out:
        words = ["$OUT" if a == shlex.quote(out) else a for a in words]
    return prefix + " ".join(["python3", "-m", module, *words])


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"triton": None, "onnx": None, "onnxruntime": None}
    found.update(kiln.versions.versions())
    found.update(cuda=torch.version.cuda, numpy=np.__version__)
    for name in ("onnx_ir", "transformers", "torchvision"):
        try:
            found[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing package is a None, not a crash
            found[name] = None
    found["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    return found


def gpu_info() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"name": None}
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}", "memory_gb": props.total_memory / 1e9,
            "count": torch.cuda.device_count()}
