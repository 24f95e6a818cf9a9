"""The per-process torch thread setting, read from POCKET_TTS_NUM_THREADS (torch-free)."""

from __future__ import annotations

import os

THREADS_ENV = "POCKET_TTS_NUM_THREADS"
DEFAULT_THREADS = 1


def threads_from_env(environ: dict[str, str] | None = None) -> int:
    """Validated thread count; a bad value raises ValueError naming the variable."""
    raw = (os.environ if environ is None else environ).get(THREADS_ENV, "").strip()
    if not raw:
        return DEFAULT_THREADS
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{THREADS_ENV} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{THREADS_ENV} must be a positive integer, got {raw!r}")
    return value
