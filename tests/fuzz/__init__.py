"""Fuzzing kiln's readers of untrusted files: one module per target, one runner (``harness``)."""
