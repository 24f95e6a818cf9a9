"""Loaded into chaos workers (`celery worker --include _chaos_hooks`): records every attempt of every job.

Each attempt appends "start <task id> <pid> <time>" before generating and
"end <task id> <pid> <time>" after, to $CHAOS_ATTEMPTS_DIR/<pid>.log. When an
attempt starts while an earlier attempt of the same job is still alive on this
host (its process exists and has not written "end"), it writes "overlap" too:
two attempts of one job at once, which the job leases must make impossible.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from celery import current_task

from tasks import engine

_synthesize = engine.Engine.synthesize
_DIR = Path(os.environ["CHAOS_ATTEMPTS_DIR"])
_JOB_SECONDS = float(os.environ.get("CHAOS_JOB_SECONDS", "0"))
_running_here: set[str] = set()  # pool threads of a batching worker share the process
_lock = threading.Lock()


def _record(kind: str, task_id: str) -> None:
    with (_DIR / f"{os.getpid()}.log").open("a") as log:
        log.write(f"{kind} {task_id} {os.getpid()} {time.time():.3f}\n")


def _running_elsewhere(task_id: str) -> list[int]:
    """Pids on this host whose latest record for `task_id` is a start, and that are still alive."""
    alive = []
    for log in _DIR.glob("*.log"):
        pid = int(log.stem)
        if pid == os.getpid():
            continue
        states = [line.split()[0] for line in log.read_text().splitlines() if f" {task_id} " in line]
        if states and states[-1] == "start":
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            alive.append(pid)
    return alive


def _recorded_synthesize(self, job, *args, **kwargs):
    task_id = current_task.request.id
    with _lock:
        twice_here = task_id in _running_here
        _running_here.add(task_id)
    if twice_here or _running_elsewhere(task_id):
        _record("overlap", task_id)
    _record("start", task_id)
    try:
        time.sleep(_JOB_SECONDS)  # jobs of the small checkpoint take ~0.1 s: too short for kills to hit
        audio = _synthesize(self, job, *args, **kwargs)
    finally:
        with _lock:
            _running_here.discard(task_id)
    _record("end", task_id)
    return audio


engine.Engine.synthesize = _recorded_synthesize
