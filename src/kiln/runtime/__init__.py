"""The runtime: an engine's plan made runnable (``Program``) and the execution contexts that run it
(``ExecutionContext``)."""

from kiln.runtime.context import ContextStats, ExecutionContext
from kiln.runtime.program import Program, Step

__all__ = ["ContextStats", "ExecutionContext", "Program", "Step"]
