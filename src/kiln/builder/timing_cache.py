"""kiln's persistent tactic timing cache, so a rebuild does not re-time every kernel choice.

Timing tactics is the slow part of a build, and a timing is only true for the GPU and the software
versions it was taken with. So the environment (GPU name, kiln, torch, triton versions) is hashed
into every key: a cache file carried to another machine or kept across an upgrade simply misses.

The file is shared by builds that may run at the same time and may have been damaged or replaced by
anyone, so loading trusts nothing: any file that is not exactly what ``save`` writes is refused with
one ``TimingCacheWarning`` (or one line in the build log) and the cache starts empty (a cache is
only ever a speed-up). ``save`` takes an exclusive lock on ``<path>.lock`` (never through a
symlink), merges with what other builds wrote since, and replaces the file atomically, so
concurrent builds neither corrupt the file nor lose each other's entries.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import math
import os
import re
import stat
import warnings
from collections.abc import Callable
from typing import Any

from kiln.atomic_file import write_atomically
from kiln.errors import KilnError
from kiln.regular_file import UnreadableFile, read_regular_file

FORMAT = "kiln-timing-cache"
VERSION = 1
MAX_FILE_BYTES = 256 * 1024 * 1024
"""Files larger than this are refused unread (a real cache is a few MiB)."""

_KEY = re.compile(r"[0-9a-f]{64}")
_MAX_ENTRY_DEPTH = 16
"""Entries are small flat records; deeper nesting is refused so nothing later recurses too deep."""
_MAX_INT = 2**63
"""Integers in entries are counts and sizes; larger ones are refused (float() of a 400-digit one overflows)."""


class TimingCacheWarning(UserWarning):
    """A timing cache file was refused; the cache starts empty and is rebuilt."""


class _Refused(Exception):
    """Why a cache file's content cannot be used (internal; becomes a warning)."""


def _reject_constant(name: str) -> Any:
    raise _Refused(f"it contains {name}, which is not valid JSON")


def _entry_problem(entry: Any) -> str | None:
    """Why ``entry`` is not a valid cache entry, or None if it is."""
    if not isinstance(entry, dict):
        return f"an entry is a {type(entry).__name__}, not an object"
    if "ms" not in entry:
        return "an entry has no 'ms'"
    stack: list[tuple[Any, int]] = [(entry, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return f"an entry holds {value!r}, which JSON cannot represent"
        if isinstance(value, int) and not -_MAX_INT < value < _MAX_INT:
            return f"an entry holds a {value.bit_length()}-bit integer, larger than any timing or count"
        if isinstance(value, dict | list):
            if depth > _MAX_ENTRY_DEPTH:
                return f"an entry is nested more than {_MAX_ENTRY_DEPTH} levels deep"
            stack.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))
    ms = entry["ms"]
    if ms is not None and (isinstance(ms, bool) or not isinstance(ms, int | float) or not math.isfinite(ms) or ms < 0):
        return f"an entry has 'ms' = {ms!r}, not a finite non-negative number or null"
    if not isinstance(entry.get("ok"), bool):
        return f"an entry has 'ok' = {entry.get('ok')!r}, not true or false"
    return None


def _parse(data: bytes) -> dict[str, dict[str, Any]]:
    """The entries of a cache file's bytes; raises ``_Refused`` saying what is wrong."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _Refused(f"it is not UTF-8 text ({error.reason} at byte {error.start})") from None
    try:
        document = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as error:
        raise _Refused(f"it is not valid JSON ({error.msg} at line {error.lineno} column {error.colno})") from None
    except RecursionError:
        raise _Refused("it is not valid JSON (nested too deeply)") from None
    except ValueError as error:  # e.g. an integer with more digits than Python converts
        raise _Refused(f"it is not valid JSON ({error})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise _Refused(f"it is not a kiln timing cache (no \"format\": \"{FORMAT}\")")
    version = document.get("version")
    if type(version) is not int or version != VERSION:
        raise _Refused(f"it has version {version!r}, but this kiln reads version {VERSION}")
    entries = document.get("entries")
    if not isinstance(entries, dict):
        raise _Refused("its \"entries\" is not an object")
    for key, entry in entries.items():
        if not _KEY.fullmatch(key):
            raise _Refused(f"it has a key {key[:80]!r} that is not 64 lowercase hex digits")
        problem = _entry_problem(entry)
        if problem is not None:
            raise _Refused(f"{problem} (key {key})")
    return entries


def _read(path: str) -> dict[str, dict[str, Any]] | None:
    """The entries in the cache file at ``path``, or None if there is no file; raises ``_Refused``."""
    try:
        data = read_regular_file(path, MAX_FILE_BYTES)
    except FileNotFoundError:
        return None
    except UnreadableFile as error:
        raise _Refused(error.reason) from None
    return _parse(data)


def _dumps(value: Any, **options: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=True, allow_nan=False, **options)


class TimingCache:
    """Tactic timings keyed by what was timed and where, kept in memory and (with a path) in a file.

    ``key(fields)`` makes a key; ``get`` counts ``hits`` and ``misses``; ``put`` records an entry
    such as ``{"ms": 0.12, "ok": True, "error": 3e-5}``; ``save`` writes it all out. A refused file
    is reported once (``save`` finding it refused for the same reason says nothing more), to
    ``on_refusal`` if given (the builder passes its build log) or else as a ``TimingCacheWarning``,
    and listed in ``warnings``.
    """

    def __init__(self, path: str | os.PathLike[str] | None, environment: dict[str, str], *,
                 on_refusal: Callable[[str], None] | None = None) -> None:
        if not isinstance(environment, dict) or not all(
            isinstance(name, str) and isinstance(value, str) for name, value in environment.items()
        ):
            raise TypeError(f"environment must map str to str, got {environment!r}")
        self.path: str | None = None if path is None else os.fspath(path)
        self.environment: dict[str, str] = dict(environment)
        self.hits = 0
        self.misses = 0
        self.warnings: list[str] = []
        self._on_refusal = on_refusal
        self._refusals: set[str] = set()  # why the file was refused, each said once
        self._entries: dict[str, dict[str, Any]] = {}
        self._dirty: dict[str, dict[str, Any]] = {}  # put since the last load or save
        if self.path is not None:
            self._entries = dict(self._load("the cache starts empty and the file will be rewritten"))

    def _load(self, consequence: str) -> dict[str, dict[str, Any]]:
        """The valid entries on disk; a refused file gives one warning and no entries."""
        assert self.path is not None
        try:
            return _read(self.path) or {}
        except _Refused as refusal:
            if str(refusal) in self._refusals:
                return {}
            self._refusals.add(str(refusal))
            message = f"timing cache {self.path} ignored: {refusal}; {consequence}"
            self.warnings.append(message)
            if self._on_refusal is not None:
                self._on_refusal(message)
            else:
                warnings.warn(message, TimingCacheWarning, stacklevel=3)
            return {}

    def key(self, fields: dict[str, Any]) -> str:
        """sha256 hex of the canonical JSON of ``fields`` plus this cache's environment."""
        if "env" in fields:
            raise ValueError("'env' is reserved for the cache's environment; rename that field")
        canonical = _dumps({**fields, "env": self.environment}, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        """A copy of the entry under ``key`` (counted as a hit), or None (counted as a miss)."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        return copy.deepcopy(entry)

    def put(self, key: str, entry: dict[str, Any]) -> None:
        """Record ``entry`` under ``key``; it is checked as loading would check it, then copied."""
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(f"a timing cache key is 64 lowercase hex digits (from key()), got {key!r}")
        problem = _entry_problem(entry)
        if problem is not None:
            raise ValueError(f"invalid timing cache entry {entry!r}: {problem.replace('an entry', 'it')}")
        stored = json.loads(_dumps(entry))  # a JSON-able copy, or an error now rather than at save
        self._entries[key] = stored
        self._dirty[key] = stored

    def __len__(self) -> int:
        return len(self._entries)

    def save(self) -> None:
        """Merge with the file as it is now and write it atomically; nothing is written if nothing
        was put, or if the cache has no path. Raises ``KilnError`` if the file cannot be written."""
        if self.path is None or not self._dirty:
            return
        path = self.path
        lock_path = f"{path}.lock"
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        except OSError as error:
            raise KilnError(f"cannot save the timing cache {path}: {error}") from error
        try:
            # O_NOFOLLOW: a symlink put in the lock's place must not make kiln create its target
            lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as error:
            symlink = "; it is a symlink" if os.path.islink(lock_path) else ""
            raise KilnError(f"cannot save the timing cache {path}: cannot open its lock file {lock_path} "
                            f"({error.strerror or error}{symlink})") from error
        if not stat.S_ISREG(os.fstat(lock_fd).st_mode):
            os.close(lock_fd)
            raise KilnError(f"cannot save the timing cache {path}: its lock file {lock_path} is not a regular file")
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            on_disk = self._load("it will be overwritten with the valid entries")
            merged = {**self._entries, **on_disk, **self._dirty}
            document = {"format": FORMAT, "version": VERSION, "entries": merged}
            data = (_dumps(document, indent=0, separators=(",", ":")) + "\n").encode("ascii")
            try:
                write_atomically(path, lambda handle: handle.write(data))
            except KilnError as error:
                raise KilnError(f"cannot save the timing cache: {error}") from error
        except OSError as error:
            raise KilnError(f"cannot save the timing cache {path}: {error.strerror or error}") from error
        finally:
            os.close(lock_fd)  # closing releases the lock
        self._entries = merged
        self._dirty = {}
