"""Errors kiln raises on purpose.

Every error a user can cause (a bad file, an unsupported op, a wrong input) is a ``KilnError``
whose message names the model, the node and the op where they apply and says what to do. The CLI
prints the message on one line and exits with code 2; anything else is a bug in kiln.
"""

from __future__ import annotations

import stat


class KilnError(Exception):
    """Base class: a problem the user can act on."""


class ModelLoadError(KilnError):
    """The model file cannot be read safely (missing, corrupt, too large, hostile external data)."""


class EngineLoadError(KilnError):
    """An engine file cannot be used here (corrupt, tampered, or built for something else)."""


class UnsupportedModelError(KilnError):
    """The model is valid ONNX but uses something kiln cannot run (op, opset, dtype)."""


class InputError(KilnError):
    """Inputs given to a run do not match the model (name, dtype, rank, shape, device)."""


class PrecisionError(KilnError):
    """A build's outputs stay over the precision's tolerance of fp32 on the build's inputs with every
    layer that may move in fp32 (the CLI's exit code 1: over tolerance, not bad input)."""


class OpError(KilnError):
    """An op failed while running; the message names the node and op."""


class ResourceLimitError(KilnError):
    """A tensor would exceed a resource limit (``kiln.limits``); the message names it and the limit to raise."""


def first_line(error: BaseException) -> str:
    """An error's first line (at most 300 characters), or its type where it has no message: what a
    one-line KilnError quotes of the library error under it."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link"))


def file_kind(mode: int) -> str:
    """What a file that is not regular is, by its ``st_mode``, for a message: "a FIFO", "a directory"..."""
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def named(error: KilnError, name: str) -> KilnError:
    """``error`` with ``name`` (the model or engine file) in front of its message, once: the error
    itself when it starts with it already, else a new error of its type."""
    text = str(error)
    return error if text.startswith(f"{name}: ") else type(error)(f"{name}: {text}")
