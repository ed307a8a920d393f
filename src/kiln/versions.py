"""kiln's version and the environment that engines, timing caches and benchmarks depend on.

One home for "what software and hardware made this": an engine file records :func:`environment`
and refuses to run where it differs; a timing cache keys its entries by it; benchmark tables print
:func:`versions`.
"""

from __future__ import annotations

import platform

import torch

__version__ = "0.1.0"


def environment(device: torch.device) -> dict[str, str]:
    """What engines and timings depend on: kiln and torch versions, and on CUDA the GPU, its compute
    capability and the triton version."""
    env = {"kiln": __version__, "torch": torch.__version__, "device": device.type}
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = f"{major}.{minor}"
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = "none"
    return env


def versions() -> dict[str, str]:
    """The versions a benchmark table names: kiln, torch, Python, and triton, onnx and onnxruntime
    where installed."""
    found = {"kiln": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "onnx", "onnxruntime"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            continue
    return found
