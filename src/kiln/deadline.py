"""Time limits and cancellation: how a run, a build or a benchmark is stopped from outside.

A model can ask for unbounded work in a few bytes: a Loop whose trip count is 2^62, or none at
all with a condition that stays true. Nothing in the model says how long is too long, so the
caller says it: a ``Deadline`` is a time limit and a cancel flag (``cancel()``, safe from any
thread, as onnxruntime's ``RunOptions.terminate``). kiln checks the deadline in effect between
the nodes of a model's main graph, at every iteration of Loop, Scan and SequenceMap (at any
depth), between the layers of an engine, before each CUDA-graph replay, and between the steps of
a build; a check is one ``time.monotonic()`` compare. Past the limit, or once cancelled, the work
stops with ``RunStopped`` (a ``KilnError``: exit code 2 on the command line), one line naming
where it stopped: ``model.onnx: stopped after 2.0 s at node 'loop' (op Loop, iteration 81234):
over the 2 s time limit (timeout_s, --timeout-s)``.

What is not interrupted: one op already running (a single MatMul or convolution runs to its end)
and work already queued on a GPU (an engine with CUDA graphs stops between replays; the host
stops queueing, the GPU finishes what it has). There is no default limit: legitimate runs take
milliseconds or hours, and exporters write 2^63-1 as the trip count of every while loop. Memory
is bounded by default (``kiln.limits``: a Loop's scan outputs count against the tensor ceiling as
they grow), time only when the caller asks.

Deadlines nest: ``time_limit(s)`` makes a deadline the one in effect for the block (in this thread
or asyncio task), and every run started inside it stops at the earlier of its own limit and the
enclosing one's, or when either is cancelled. A build bounded by ``BuildConfig.timeout_s`` bounds
every run of the model it makes that way::

    with kiln.deadline.time_limit(30) as limit:   # limit.cancel() from another thread stops it early
        outputs = engine.run(inputs)
    outputs = engine.run(inputs, timeout_s=30)    # the same, for one call
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import time
from collections.abc import Iterator

from kiln.errors import KilnError


class RunStopped(KilnError):
    """A run, build or benchmark stopped at its time limit or by ``cancel()``; the message says where."""


_CURRENT: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("kiln_deadline", default=None)


class Deadline:
    """A time limit (``timeout_s`` seconds from now; None: none of its own) and a cancel flag,
    nested in ``parent`` (it expires when its parent does). See the module docstring."""

    __slots__ = ("start", "timeout_s", "end", "parent", "_cancelled")

    def __init__(self, timeout_s: float | None = None, parent: Deadline | None = None) -> None:
        self.timeout_s = check_timeout(timeout_s)
        self.start = time.monotonic()
        self.end = math.inf if self.timeout_s is None else self.start + self.timeout_s
        self.parent = parent
        self._cancelled = False

    def cancel(self) -> None:
        """Stop the work under this deadline at its next check (safe from any thread)."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled or (self.parent is not None and self.parent.cancelled)

    def expired(self) -> bool:
        """True once cancelled (here or in an enclosing deadline) or past the earliest limit."""
        deadline: Deadline | None = self
        now = None
        while deadline is not None:
            if deadline._cancelled:
                return True
            if deadline.end != math.inf:
                now = time.monotonic() if now is None else now
                if now >= deadline.end:
                    return True
            deadline = deadline.parent
        return False

    def check(self, where: str) -> None:
        """Raise ``RunStopped`` naming ``where`` ("node 'x' (op Loop, iteration 3)") if expired."""
        if self.expired():
            raise self.stopped(where)

    def stopped(self, where: str) -> RunStopped:
        """The error for work stopped at ``where``: cancelled, or over the limit that ran out (its
        time counted from when that limit started: a build's, for a run inside a build)."""
        chain = []
        deadline: Deadline | None = self
        while deadline is not None:
            chain.append(deadline)
            deadline = deadline.parent
        if any(d._cancelled for d in chain):
            return RunStopped(f"cancelled after {time.monotonic() - self.start:.1f} s at {where}")
        limit = min(chain, key=lambda d: d.end)
        if limit.timeout_s is None:
            return RunStopped(f"stopped after {time.monotonic() - self.start:.1f} s at {where}")
        return RunStopped(f"stopped after {time.monotonic() - limit.start:.1f} s at {where}: over the "
                          f"{limit.timeout_s:g} s time limit (timeout_s, --timeout-s)")


def check_timeout(timeout_s: float | None) -> float | None:
    """``timeout_s`` if it is None or a positive finite number of seconds; else a ``KilnError``."""
    if timeout_s is None:
        return None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
        raise KilnError(f"a time limit (timeout_s, --timeout-s) is a positive number of seconds, got {timeout_s!r}")
    return float(timeout_s)


def current() -> Deadline | None:
    """The deadline in effect here (this thread or task), or None."""
    return _CURRENT.get()


def begin(timeout_s: float | None = None) -> Deadline:
    """A new deadline for one run: ``timeout_s`` of its own, nested in the one in effect (if any)."""
    return Deadline(timeout_s, _CURRENT.get())


@contextlib.contextmanager
def running(deadline: Deadline) -> Iterator[Deadline]:
    """Make ``deadline`` the one in effect for the block."""
    token = _CURRENT.set(deadline)
    try:
        yield deadline
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def time_limit(timeout_s: float | None = None) -> Iterator[Deadline]:
    """A deadline of ``timeout_s`` seconds (None: none of its own, but cancellable) for everything
    the block runs, nested in the one in effect; yields it (``cancel()`` it from another thread)."""
    with running(begin(timeout_s)) as deadline:
        yield deadline
