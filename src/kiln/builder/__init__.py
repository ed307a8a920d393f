"""The builder: lowering, precision, tactic selection; it returns a plan (``BuiltPlan``)."""

from kiln.builder.build import PrecisionError, build
from kiln.builder.config import BuildConfig, Profile
from kiln.builder.plan import BuildReport, BuiltPlan

__all__ = ["BuildConfig", "BuildReport", "BuiltPlan", "PrecisionError", "Profile", "build"]
