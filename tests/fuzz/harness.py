"""The fuzzing runner: feeds generated cases to a target and counts how each one ends.

A target is a module of this package with

- ``NAME``: its name (``python -m tests.fuzz NAME``);
- ``prepare(folder) -> prepared``: seed files, made once (picklable: workers receive it);
- ``cases(prepared)``: a hypothesis strategy of cases (picklable values, usually file bytes);
- ``check(prepared, case, folder)``: feed one case to kiln the way a user would; raise what kiln raises.

Each case ends in one outcome: ``ok`` (accepted), ``KilnError`` (refused with kiln's one-line
error), ``other`` (any other exception: a bug), ``crash`` (the process died) or ``hang`` (over the
per-case time limit). The last three must stay at 0.

The short form runs in-process under pytest (``tests/fuzz/test_fuzz.py``: a few hundred cases per
target, derandomized; ``KILN_FUZZ_CASES=N`` for more). The long form, by hand::

    PYTHONPATH=src python -m tests.fuzz engine_reader --cases 20000 --time-limit 20 --save out/fuzz

runs each case in a worker process, so a crash or a hang is counted (the worker is replaced) rather
than ending the run, prints the counts, and saves every bad case for reproduction. Targets:
``engine_reader``, ``model_loader``, ``npz_inputs``; runs with different ``--seed`` values draw
different cases, so several can share the work.
"""

from __future__ import annotations

import importlib
import multiprocessing
import signal
import tempfile
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed

from kiln.errors import KilnError

OUTCOMES = ("ok", "KilnError", "other", "crash", "hang")
BAD = ("other", "crash", "hang")


def load_target(name: str):
    return importlib.import_module(f"tests.fuzz.{name}")


@dataclass
class Counts:
    """Outcomes so far, with the first few details and cases of each bad one."""

    counts: Counter = field(default_factory=Counter)
    details: dict[str, list[str]] = field(default_factory=dict)
    bad_cases: list[tuple[str, Any]] = field(default_factory=list)

    def add(self, outcome: str, detail: str, case: Any, keep: int = 20) -> None:
        self.counts[outcome] += 1
        if outcome in BAD:
            seen = self.details.setdefault(outcome, [])
            if detail not in seen and len(seen) < keep:
                seen.append(detail)
            if len(self.bad_cases) < keep:
                self.bad_cases.append((outcome, case))

    @property
    def bad(self) -> int:
        return sum(self.counts[o] for o in BAD)

    def report(self, name: str) -> str:
        lines = [f"{name}: {sum(self.counts.values())} cases: " + ", ".join(f"{o} {self.counts[o]}" for o in OUTCOMES)]
        for outcome, details in self.details.items():
            lines += [f"  {outcome}: {d}" for d in details]
        return "\n".join(lines)


class _Timeout(BaseException):
    """The case ran past its time limit (a BaseException, so kiln's ``except Exception`` cannot swallow it)."""


def _alarm(signum, frame):
    raise _Timeout


def classify(target, prepared: Any, case: Any, folder: Path, time_limit: float | None) -> tuple[str, str]:
    """Run one case in this process: (outcome, detail). The time limit needs the main thread."""
    if time_limit:
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, time_limit)
    try:
        target.check(prepared, case, folder)
        return "ok", ""
    except KilnError as error:
        return "KilnError", str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    except _Timeout:
        return "hang", f"over {time_limit} s"
    except Exception as error:  # noqa: BLE001 - anything else is what the fuzzer looks for
        where = traceback.extract_tb(error.__traceback__)[-1]
        return "other", f"{type(error).__name__}: {str(error)[:160]} (at {Path(where.filename).name}:{where.lineno})"
    finally:
        if time_limit:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _drive(strategy, cases: int, seed: int | None, each) -> None:
    """Call ``each(case)`` on ``cases`` generated cases (no shrinking: every case is counted)."""
    run = settings(max_examples=cases, database=None, deadline=None, derandomize=seed is None,
                   phases=[Phase.generate], suppress_health_check=list(HealthCheck))(given(strategy)(each))
    if seed is not None:
        run = hypothesis_seed(seed)(run)
    run()


def run_in_process(name: str, cases: int, folder: Path, *, seed: int | None = None, time_limit: float | None = 30,
                   prepared: Any = None) -> Counts:
    """The short form: every case in this process (a crash ends the run; a hang is cut by SIGALRM)."""
    target = load_target(name)
    prepared = target.prepare(folder) if prepared is None else prepared
    counts = Counts()
    work = folder / "cases"
    work.mkdir(exist_ok=True)

    def each(case):
        counts.add(*classify(target, prepared, case, work, time_limit), case)

    _drive(target.cases(prepared), cases, seed, each)
    return counts


def _worker(name: str, prepared: Any, folder: str, connection, memory_limit: int | None) -> None:
    if memory_limit:  # a case that allocates past it fails with MemoryError (an "other") instead of
        import resource  # taking the machine's memory

        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    target = load_target(name)
    while True:
        case = connection.recv()
        if case is None:
            return
        connection.send(classify(target, prepared, case, Path(folder), None))


class _Worker:
    """One worker process; replaced after a crash or a hang."""

    def __init__(self, name: str, prepared: Any, folder: Path, memory_limit: int | None) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(name, prepared, str(folder), child, memory_limit),
                                       daemon=True)
        self.process.start()
        child.close()

    def run(self, case: Any, time_limit: float, start_limit: float) -> tuple[str, str] | None:
        """The outcome, or None when the worker died or hung (it is then killed)."""
        self.connection.send(case)
        try:
            if self.connection.poll(time_limit + start_limit):
                return self.connection.recv()
        except (EOFError, OSError):
            pass
        return None

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()


def run_isolated(name: str, cases: int, folder: Path, *, seed: int | None = None, time_limit: float = 20,
                 memory_limit: int | None = 8 << 30) -> Counts:
    """The long form: each case in a worker process (its address space limited to ``memory_limit``
    bytes), so that crashes and hangs are counted."""
    target = load_target(name)
    prepared = target.prepare(folder)
    counts = Counts()
    work = folder / "cases"
    work.mkdir(exist_ok=True)
    worker = [_Worker(name, prepared, work, memory_limit), 120.0]  # the first case also waits for the worker's imports

    def each(case):
        process, start_limit = worker
        result = process.run(case, time_limit, start_limit)
        worker[1] = 0.0
        if result is None:
            process.process.join(0.5)
            died = not process.process.is_alive()
            code = process.process.exitcode
            process.stop()
            result = ("crash", f"worker exit code {code}") if died else ("hang", f"over {time_limit} s")
            worker[:] = [_Worker(name, prepared, work, memory_limit), 120.0]
        counts.add(*result, case)
        done = sum(counts.counts.values())
        if done % 500 == 0:
            print(counts.report(name).splitlines()[0], flush=True)

    try:
        _drive(target.cases(prepared), cases, seed, each)
    finally:
        worker[0].connection.send(None)
        worker[0].stop()
    return counts


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="a module of tests/fuzz, e.g. engine_reader")
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: derandomized)")
    parser.add_argument("--time-limit", type=float, default=20.0, help="seconds per case before it counts as a hang")
    parser.add_argument("--memory-limit", type=int, default=8 << 30,
                        help="bytes of address space per worker (default 8 GiB)")
    parser.add_argument("--in-process", action="store_true", help="no worker process (faster; a crash ends the run)")
    parser.add_argument("--save", type=Path, help="folder to write the bad cases to")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kiln-fuzz-") as folder:
        if args.in_process:
            counts = run_in_process(args.target, args.cases, Path(folder), seed=args.seed, time_limit=args.time_limit)
        else:
            counts = run_isolated(args.target, args.cases, Path(folder), seed=args.seed, time_limit=args.time_limit,
                                  memory_limit=args.memory_limit)
    print(counts.report(args.target))
    if args.save and counts.bad_cases:
        args.save.mkdir(parents=True, exist_ok=True)
        for i, (outcome, case) in enumerate(counts.bad_cases):
            data = case if isinstance(case, bytes) else repr(case).encode()
            (args.save / f"{args.target}-{outcome}-{i:03d}.bin").write_bytes(data)
        print(f"{len(counts.bad_cases)} bad case(s) written to {args.save}")
    return 1 if counts.bad else 0
