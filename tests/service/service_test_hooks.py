"""Test-only misbehaviour, loaded into test workers with `celery worker --include service_test_hooks`.

The engine's `synthesize` is wrapped in the worker's main process before the
pool forks, so every child inherits the wrapper. Texts that start with a marker:

* ``SLOW``: append "<pid> <time>" to ``$SERVICE_TEST_HOOK_DIR/<task id>.starts``,
  sleep ``$SERVICE_TEST_SLOW_SECONDS`` (default 3), then synthesize normally;
* ``CRASH``: the child SIGKILLs itself, like a job that crashes native code;
* ``BUSY``: runs Python code for ``$SERVICE_TEST_SLOW_SECONDS`` before synthesizing, as the engine
  does between two pieces of audio, writing "start" then "end" to ``$SERVICE_TEST_HOOK_DIR/<task id>.busy``;
* ``DRIP``: each piece of streamed audio is published ``$SERVICE_TEST_PIECE_SECONDS`` (default
  0.1) late, so that a short job still streams when a test acts on it;
* ``STORED``: the child SIGKILLs itself right after storing the audio file, before the job is
  acknowledged;
* ``BREAK``: the job fails once its audio is generated (and streamed), before anything is stored;
* ``PAUSE``, with ``$SERVICE_TEST_PAUSE_ON_RECEIVE`` set: the process that receives the message
  from Redis writes its pid to ``$SERVICE_TEST_HOOK_DIR/<task id>.received`` and stops itself
  (SIGSTOP) before handing the message to its consumer, i.e. after the message left its queue and
  before kombu's own transport records it as unacked; the test then SIGKILLs it there.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from pathlib import Path

from celery import current_task
from kombu.transport import virtual

from tasks import engine, synthesis

_synthesize = engine.Engine.synthesize


def _misbehaving_synthesize(self, job, on_audio=None, *args, **kwargs):
    if job.text.startswith("CRASH"):
        os.kill(os.getpid(), signal.SIGKILL)
    if job.text.startswith("SLOW"):
        starts = Path(os.environ["SERVICE_TEST_HOOK_DIR"]) / f"{current_task.request.id}.starts"
        with starts.open("a") as f:
            f.write(f"{os.getpid()} {time.time()}\n")
        time.sleep(float(os.environ.get("SERVICE_TEST_SLOW_SECONDS", "3")))
    if job.text.startswith("BUSY"):
        busy = Path(os.environ["SERVICE_TEST_HOOK_DIR"]) / f"{current_task.request.id}.busy"
        busy.write_text("start\n")
        deadline = time.monotonic() + float(os.environ.get("SERVICE_TEST_SLOW_SECONDS", "3"))
        while time.monotonic() < deadline:
            pass
        with busy.open("a") as f:
            f.write("end\n")
    if job.text.startswith("DRIP") and on_audio is not None:
        on_audio = _late(on_audio, float(os.environ.get("SERVICE_TEST_PIECE_SECONDS", "0.1")))
    audio = _synthesize(self, job, on_audio, *args, **kwargs)
    if job.text.startswith("BREAK"):
        raise RuntimeError("the test hook breaks this job after its audio")
    return audio


def _late(publish, seconds: float):
    def late_publish(piece):
        time.sleep(seconds)
        publish(piece)

    return late_publish


engine.Engine.synthesize = _misbehaving_synthesize


_write_once = synthesis.write_once


def _dying_write_once(storage_dir, path, data):
    written = _write_once(storage_dir, path, data)
    if str(synthesis._text_argument(current_task.request.args, current_task.request.kwargs)).startswith("STORED"):
        os.kill(os.getpid(), signal.SIGKILL)
    return written


synthesis.write_once = _dying_write_once


_deliver = virtual.Transport._deliver


def _stopping_deliver(self, message, queue):
    if os.environ.get("SERVICE_TEST_PAUSE_ON_RECEIVE") and _text_of(message).startswith("PAUSE"):
        received = Path(os.environ["SERVICE_TEST_HOOK_DIR"]) / f"{message['headers']['id']}.received"
        received.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)
    return _deliver(self, message, queue)


def _text_of(message) -> str:
    try:
        args = json.loads(base64.b64decode(message["body"]))[0]
        return args[0] if args and isinstance(args[0], str) else ""
    except Exception:  # noqa: BLE001 - not a task of ours
        return ""


virtual.Transport._deliver = _stopping_deliver
