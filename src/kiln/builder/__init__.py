"""The builder: lowering, precision, tactic selection; it returns a plan (``BuiltPlan``)."""

from kiln.builder.build import build
from kiln.builder.config import BuildConfig, Profile
from kiln.builder.plan import BuildReport, BuiltPlan
from kiln.errors import PrecisionError

__all__ = ["BuildConfig", "BuildReport", "BuiltPlan", "PrecisionError", "Profile", "build"]
