"""Test-only misbehaviour, loaded into test workers with `celery worker --include service_test_hooks`.

The engine's `synthesize` is wrapped in the worker's main process before the
pool forks, so every child inherits the wrapper. Texts that start with a marker:

* ``SLOW``: append "<pid> <time>" to ``$SERVICE_TEST_HOOK_DIR/<task id>.starts``,
  sleep ``$SERVICE_TEST_SLOW_SECONDS`` (default 3), then synthesize normally;
* ``CRASH``: the child SIGKILLs itself, like a job that crashes native code.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from celery import current_task

from tasks import engine

_synthesize = engine.Engine.synthesize


def _misbehaving_synthesize(self, job, *args, **kwargs):
    if job.text.startswith("CRASH"):
        os.kill(os.getpid(), signal.SIGKILL)
    if job.text.startswith("SLOW"):
        starts = Path(os.environ["SERVICE_TEST_HOOK_DIR"]) / f"{current_task.request.id}.starts"
        with starts.open("a") as f:
            f.write(f"{os.getpid()} {time.time()}\n")
        time.sleep(float(os.environ.get("SERVICE_TEST_SLOW_SECONDS", "3")))
    return _synthesize(self, job, *args, **kwargs)


engine.Engine.synthesize = _misbehaving_synthesize
