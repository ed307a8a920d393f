"""Reading a file that must be a regular file of bounded size: engines, timing caches, models.

A hostile path can name a FIFO (``open`` would wait forever), a device (endless bytes) or a file that
grows while it is read. The file is opened without waiting, checked by ``fstat`` on the open handle
(not on the path, which can be swapped in between) and read at most one byte past its limit.
"""

from __future__ import annotations

import os
import stat

from kiln.errors import file_kind


class UnreadableFile(Exception):
    """Why the file could not be taken; the caller wraps ``reason`` into its own ``KilnError``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_regular_file(path: str | os.PathLike[str], max_bytes: int, *, size: int | None = None) -> bytes:
    """The bytes of the regular file at ``path``, at most ``max_bytes`` of them, read in one piece; with
    ``size``, exactly that many (what an earlier ``stat`` found). ``FileNotFoundError`` passes through (a
    caller may treat a missing file as empty); everything else is an ``UnreadableFile`` with a one-line reason."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as error:
        raise UnreadableFile(f"cannot read it ({error.strerror or error})") from None
    try:
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise UnreadableFile(f"it is {file_kind(info.st_mode)}, not a regular file")
            if size is not None and info.st_size != size:
                raise UnreadableFile("the file changed while it was read; try again")
            if info.st_size > max_bytes:
                raise UnreadableFile(f"it is {info.st_size:,} bytes, over the {max_bytes:,}-byte limit")
            data = handle.read(info.st_size + 1)  # one more byte shows a file that grew since the fstat
    except OSError as error:
        raise UnreadableFile(f"cannot read it ({error.strerror or error})") from None
    if len(data) != info.st_size:
        raise UnreadableFile("the file changed while it was read; try again")
    return data
