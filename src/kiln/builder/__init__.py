"""The builder: lowers an ONNX model to layers and picks the fastest correct tactic for each."""

from kiln.builder.build import BuildReport, PrecisionError, build
from kiln.builder.config import BuildConfig, Profile

__all__ = ["BuildConfig", "BuildReport", "PrecisionError", "Profile", "build"]
