"""The tasks: `pocket_tts.synthesize` (text -> audio file path) and `pocket_tts.worker_info`.

Every message reaches them through `tasks.boundary`, which refuses malformed
ones in the worker's main process; the task validates the values, runs the
engine and stores the audio once (`tasks.storage`), holding the job's lease
(`tasks.leases`) so that no two attempts of a job ever run at once.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext

from billiard.exceptions import WorkerLostError
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.worker.request import Request

from tasks import audio_stream
from tasks.celery_app import RESULT_STORE_RETRIES, app
from tasks.deliveries import delivery_count, record_delivery
from tasks.engine import load_engine, process_info
from tasks.errors import InvalidJobError, RedeliveryLimitError, StorageError, SynthesisTimeLimitError
from tasks.leases import JobLease, release_lease
from tasks.storage import audio_path, write_once
from tasks.validation import validate_job
from worker_config import current_settings

BOUNDARY_STRATEGY = "tasks.boundary:guarded_strategy"


class SynthesisRequest(Request):
    """Worker-side request whose time limits scale with the text length.

    Computed here, from the message body, so jobs sent by name from web apps
    (`send_task`) get them too; limits set explicitly by the sender win. Runs in
    the worker's main process: nothing here may assume the arguments' shapes.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not any(self.time_limits):
            settings = current_settings()
            text = _text_argument(self.args, self.kwargs)
            soft, hard = settings.time_limits(len(text) if isinstance(text, str) else settings.max_text_chars)
            self.time_limits = (hard, soft)  # Celery's order

    def on_failure(self, exc_info, *args, **kwargs):
        exc = getattr(exc_info.exception, "exc", exc_info.exception)  # unwrap billiard's ExceptionWithTraceback
        if isinstance(exc, (WorkerLostError, TimeLimitExceeded)):
            # The process that held the job's lease is gone: its next attempt need not wait for the TTL.
            # In a thread: the main process's event loop must not wait on Redis.
            client, task_id = self.task.backend.client, self.id
            threading.Thread(target=release_lease, args=(client, task_id), daemon=True).start()
        return super().on_failure(exc_info, *args, **kwargs)


def _text_argument(args, kwargs):
    if isinstance(args, (list, tuple)) and args:
        return args[0]
    return kwargs.get("text") if isinstance(kwargs, dict) else None


class SynthesisTask(Task):
    Request = SynthesisRequest
    Strategy = BOUNDARY_STRATEGY
    max_retries = None  # retries only wait for a running attempt's lease (bounded by its hard time limit)
    # Expected failures: logged as one line, without a traceback, and never retried.
    throws = (InvalidJobError, StorageError, RedeliveryLimitError, SynthesisTimeLimitError)

    # A streaming job's reader learns how it ended from its audio stream (tasks.audio_stream).
    def on_success(self, retval, task_id, args, kwargs):
        if kwargs.get("stream"):
            audio_stream.publish_end(task_id)

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        if kwargs.get("stream"):
            audio_stream.publish_error(task_id, exc)


@app.task(name="pocket_tts.synthesize", bind=True, base=SynthesisTask)
def synthesize(self, text: str, voice: str | None = None, temperature: float | None = None, format: str = "wav",
               seed: int | None = None, *, stream: bool = False) -> str:  # fmt: skip
    """Synthesize `text` and return the path of the audio file in the shared storage.

    With `seed`, running the job again gives the same audio (same worker settings and model).
    A job whose file exists already (a redelivered message, a re-sent task id)
    returns that file without generating anything.
    `stream`: also publish the audio while it is generated (tasks.audio_stream).
    """
    settings = current_settings()
    job = validate_job(text, voice, temperature, format, settings, seed)
    path = audio_path(settings.storage_dir, self.request.id, job.format)
    if path.is_file():
        return _stored(self, path, stream)
    lease = JobLease(self.backend.client, self.request.id)
    try:  # the soft time limit may also pass while Redis is away, before the lease is taken
        if not _through_outage(self.backend, lease.acquire):  # another attempt runs: come back when it ends
            raise self.retry(countdown=_through_outage(self.backend, lease.seconds_left) + 1)
        if path.is_file():  # finished between the first check and the lease
            return _stored(self, path, stream)
        attempt = _through_outage(
            self.backend, record_delivery, self.backend, self.request.id, settings.max_deliveries,
            settings.result_expires,
        )  # fmt: skip
        engine = load_engine(settings)  # already loaded in a prefork child; loads on first use elsewhere

        from pocket_tts.audio import encode_audio  # torch module: workers only

        publisher = audio_stream.AudioPublisher(self, engine.sample_rate, attempt, job.seed is not None) if stream else None
        with publisher or nullcontext():
            audio = engine.synthesize(job, publisher, time_limit=_soft_limit(self.request, settings, job))
        write_once(settings.storage_dir, path, encode_audio(audio, engine.sample_rate, job.format))
    except SoftTimeLimitExceeded:
        raise SynthesisTimeLimitError(
            f"synthesis of {len(job.text)} characters passed its soft time limit of "
            f"{_soft_limit(self.request, settings, job):g} s "
            "(POCKET_TTS_TIME_LIMIT_BASE / POCKET_TTS_TIME_LIMIT_PER_CHAR)"
        ) from None
    finally:
        lease.release()
    return str(path)


def _stored(task, path, stream: bool) -> str:
    """The path of a job whose file is stored already (its worker died before acknowledging it, or
    the task id was sent again). A streaming job also publishes the file's audio before its end:
    a reader that lost part of the stream (expired, a Redis that lost its last writes) or came
    late gets all of it, and `Relay` skips what a reader has."""
    if stream:
        task_id = task.request.id
        attempt = _through_outage(task.backend, delivery_count, task.backend, task_id) + 1
        _through_outage(task.backend, audio_stream.publish_stored, task_id, path, attempt)
    return str(path)


def _through_outage(backend, fun, *args):
    """`fun(*args)`, retried while Redis is away, as long as result writes are (a job that starts
    during a Redis restart waits for it instead of failing with a connection error)."""
    return backend.ensure(fun, args, max_retries=RESULT_STORE_RETRIES, interval_step=1, interval_max=10)


def _soft_limit(request, settings, job) -> float:
    _, sent_soft_limit = request.timelimit or (None, None)
    return sent_soft_limit or settings.time_limits(len(job.text))[0]


@app.task(name="pocket_tts.worker_info", Strategy=BOUNDARY_STRATEGY)
def worker_info() -> dict:
    """pid, torch threads, inter-op threads, model and readiness of the process that runs it."""
    return process_info()
