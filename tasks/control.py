"""Remote control commands of the worker: the health probe, and the thread budget held at run time.

Celery's `pool_grow` and `autoscale` commands (Flower's "Grow" and
"Autoscale" buttons send them) are replaced by versions that refuse a pool
whose concurrency x POCKET_TTS_NUM_THREADS would pass the usable CPUs, with the
same one-line reason the worker gives at start; within the budget, Celery's own
command runs. Imported by `tasks.celery_app`, so every worker registers them.
"""

from __future__ import annotations

from celery.worker.control import Panel, control_command, inspect_command, nok, ok

from tasks.engine import loaded_engine
from worker_config import OversubscriptionError, check_thread_budget, current_settings

HEALTH_COMMAND = "pocket_tts_health"

_celery_pool_grow = Panel.data["pool_grow"]
_celery_autoscale = Panel.data["autoscale"]


def budget_refusal(pool_size: int) -> str | None:
    """Why a pool of `pool_size` may not run, or None when it fits the thread budget (or oversubscription is allowed)."""
    settings = current_settings()
    try:
        check_thread_budget(settings.thread_budget(pool_size), settings.allow_oversubscribe)
    except OversubscriptionError as exc:
        return str(exc).replace("refusing to start an oversubscribed worker", f"refusing a pool of {pool_size}")
    return None


@control_command(args=[("n", int)], signature="[N=1]")
def pool_grow(state, n=1, **kwargs):
    """Grow the pool by n processes/threads, within the thread budget."""
    refusal = budget_refusal(state.consumer.pool.num_processes + int(n))
    if refusal:
        return nok(refusal)
    return _celery_pool_grow(state, n=n, **kwargs)


@control_command(args=[("max", int), ("min", int)], signature="[max [min]]")
def autoscale(state, max=None, min=None):
    """Change the autoscale range, within the thread budget."""
    refusal = budget_refusal(int(max)) if max is not None else None
    if refusal:
        return nok(refusal)
    return _celery_autoscale(state, max=max, min=min)


@inspect_command(name=HEALTH_COMMAND)
def health(state, **kwargs):
    """Whether this worker's main process holds a loaded model (what the compose healthcheck asks)."""
    engine = loaded_engine()
    if engine is None:
        return nok("model not loaded")
    return ok(f"model loaded: {engine.description}")
