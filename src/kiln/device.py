"""Where kiln runs when nobody says: CUDA when torch sees a GPU, else the CPU, with a one-line note.

Every subcommand and ``kiln.build()`` (``BuildConfig.device``) read :func:`default_device`, so the
same machine gives the same answer everywhere. An explicit ``cuda`` without a GPU is refused
(:func:`resolve_device`), never run on the CPU instead.
"""

from __future__ import annotations

import logging

from kiln.errors import KilnError

DEVICES = ("cpu", "cuda")

log = logging.getLogger(__name__)
_noted = False


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def default_device() -> str:
    """``"cuda"`` when torch sees a GPU; else ``"cpu"``, noted once per process (logger ``kiln``)."""
    global _noted
    if cuda_available():
        return "cuda"
    if not _noted:
        _noted = True
        log.warning("no CUDA GPU here (torch sees none): running on the CPU")
    return "cpu"


def resolve_device(device: str | None, flag: str = "--device") -> str:
    """``device`` checked (``None``: :func:`default_device`); ``cuda`` without a GPU is a KilnError."""
    if device is None:
        return default_device()
    if device not in DEVICES:
        raise KilnError(f"{flag} must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not cuda_available():
        raise KilnError(f"{flag} cuda: torch sees no CUDA GPU here; give --device cpu, or leave {flag} out to run "
                        "on the CPU")
    return device
