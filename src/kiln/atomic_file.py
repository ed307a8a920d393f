"""Writing files so that a crash or a full disk never leaves half a file behind.

The content goes to a temporary file in the same folder, is flushed to disk, and only then
replaces the target in one ``os.replace``: readers see the old file or the new one, never a mix.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO

from kiln.errors import KilnError


def _mode_for(path: str) -> int:
    """The replaced file's mode, or what a plain open() would give a new file (mkstemp's is 0600)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_atomically(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(handle)`` on a temporary file, then move it onto ``path``; on any error the
    temporary file is removed, ``path`` is left as it was, and a ``KilnError`` says why."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    except OSError as error:
        raise KilnError(f"{path}: cannot write here ({error.strerror or error})") from error
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except OSError as error:
        os.unlink(tmp)
        raise KilnError(f"{path}: could not write the file ({error.strerror or error}); nothing was changed") from error
    except BaseException:
        os.unlink(tmp)
        raise
