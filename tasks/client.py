"""Enqueue a synthesis job from Python code or the `pocket-tts enqueue` command (torch-free)."""

from __future__ import annotations

from celery.exceptions import TimeoutError as CeleryTimeoutError

from tasks.synthesis import synthesize


class JobFailedError(RuntimeError):
    """The job ended in FAILURE; the message carries the worker's one-line reason."""


def enqueue(
    text: str,
    voice: str | None = None,
    temperature: float | None = None,
    format: str = "wav",
    wait: bool = False,
    timeout: float | None = 600.0,
) -> str:
    """Send a `pocket_tts.synthesize` job; return its id, or with `wait` the path of the finished audio.

    With `wait`, raises JobFailedError when the job fails and TimeoutError when it
    has not finished after `timeout` seconds (None waits forever).
    """
    result = synthesize.apply_async(args=(text,), kwargs={"voice": voice, "temperature": temperature, "format": format})
    if not wait:
        return result.id
    try:
        outcome = result.get(timeout=timeout, propagate=False)
    except CeleryTimeoutError:
        raise TimeoutError(f"job {result.id} did not finish within {timeout:g} s") from None
    if result.failed():
        raise JobFailedError(f"job {result.id} failed: {type(outcome).__name__}: {outcome}")
    return outcome
