"""The runtime: execution contexts that run an engine's plan (``ExecutionContext``)."""

from kiln.runtime.context import ContextStats, ExecutionContext

__all__ = ["ContextStats", "ExecutionContext"]
