"""kiln: an inference optimizer for ONNX models, in Python on PyTorch and Triton."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import onnx
import onnx_ir as ir

from kiln import builder
from kiln.builder import BuildConfig, Profile
from kiln.engine import Engine, load_engine
from kiln.errors import (
    EngineLoadError,
    InputError,
    KilnError,
    ModelLoadError,
    OpError,
    ResourceLimitError,
    UnsupportedModelError,
)
from kiln.executor import Executor
from kiln.onnx_io import load_model, load_model_proto
from kiln.versions import __version__


def build(
    model: ir.Model | onnx.ModelProto | str | os.PathLike[str],
    config: BuildConfig | None = None,
    *,
    calibration: Mapping[str, Any] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    name: str | None = None,
) -> Engine:
    """Build an engine: the builder's plan (``kiln.builder.build``, which documents the arguments)
    made runnable. ``engine.report`` says what the build did."""
    return Engine.from_plan(builder.build(model, config, calibration=calibration, progress=progress, name=name))


__all__ = [
    "BuildConfig",
    "Engine",
    "EngineLoadError",
    "Executor",
    "Profile",
    "build",
    "load_engine",
    "InputError",
    "KilnError",
    "ModelLoadError",
    "OpError",
    "ResourceLimitError",
    "UnsupportedModelError",
    "__version__",
    "load_model",
    "load_model_proto",
]
