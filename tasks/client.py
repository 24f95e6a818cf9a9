"""Send synthesis jobs and read their state, from Python or the `pocket-tts enqueue` / `jobs` commands (torch-free).

Every failure is one line: an unreachable broker fails within seconds naming the
URL (password masked) and the variable that set it, a job that failed says so
with the worker's reason, a wait that ran out says the job is still queued or running.
"""

from __future__ import annotations

import time
from contextlib import suppress
from collections.abc import Callable
from dataclasses import dataclass

import redis
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu import Connection

from tasks.celery_app import app
from tasks.deliveries import KEY_PREFIX as DELIVERIES_KEY_PREFIX
from tasks.errors import one_line
from tasks.synthesis import synthesize
from worker_config.settings import masked_url

CONNECT_TIMEOUT = 3.0  # seconds; without this check Celery retries a dead broker for ~20 s
WAIT_STEP = 1.0  # seconds between progress reports while waiting
INSPECT_TIMEOUT = 1.0  # seconds the workers get to say which job they run
# What a wait on a result raises while Redis restarts (Celery's reconnect gives up after ~20 s
# with RuntimeError); the wait goes on until its own timeout.
BACKEND_OUTAGE_ERRORS = (ConnectionError, OSError, RuntimeError, redis.RedisError)


class BrokerUnreachableError(ConnectionError):
    """The broker or the result backend does not answer; the message names the URL and the variable."""


class JobFailedError(RuntimeError):
    """The job ended in FAILURE; the message carries the worker's one-line reason."""


def check_connections(timeout: float = CONNECT_TIMEOUT) -> None:
    """Raise BrokerUnreachableError unless the broker and the result backend answer within `timeout` s.

    Reading `app.conf` first validates the settings (SettingsError names a bad URL).
    """
    broker, backend = app.conf.broker_write_url, app.conf.result_backend
    places = [("broker", broker, "CELERY_BROKER_URL")]
    if backend != broker:
        places.append(("result backend", backend, "CELERY_RESULT_BACKEND"))
    for what, url, variable in places:
        try:
            with Connection(url, connect_timeout=timeout) as connection:
                connection.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - refused, unknown host, auth, timeout: all one line
            raise BrokerUnreachableError(
                f"cannot reach the {what} at {masked_url(url)} (set by {variable}): "
                f"{one_line(exc)}"
            ) from None


def submit(text: str, voice: str | None = None, temperature: float | None = None, format: str = "wav",
           seed: int | None = None) -> AsyncResult:  # fmt: skip
    """Send a `pocket_tts.synthesize` job after checking that the broker answers; return its result handle."""
    check_connections()
    options = {"voice": voice, "temperature": temperature, "format": format, "seed": seed}
    return synthesize.apply_async(args=(text,), kwargs=options)


def wait_for(
    result: AsyncResult,
    timeout: float | None = 600.0,
    on_progress: Callable[[str, float], None] | None = None,
) -> str:
    """The path of the finished job's audio; `on_progress(state, waited_seconds)` about every second.

    Raises JobFailedError when the job fails and TimeoutError when it has not
    finished after `timeout` seconds (None waits forever). A result backend that
    goes away meanwhile (a Redis restart) is waited for, within the same timeout;
    still away at the end, it is a BrokerUnreachableError.
    """
    started = time.monotonic()
    outage = None  # why the last try could not reach the result backend, while it cannot
    try:
        while True:
            waited = time.monotonic() - started
            step = WAIT_STEP if timeout is None else min(WAIT_STEP, timeout - waited)
            try:
                outcome = result.get(timeout=max(step, 0.001), propagate=False)
                # A connection lost under the wait can come back as the "outcome": the job's own state says.
                if isinstance(outcome, BACKEND_OUTAGE_ERRORS) and not _stored_failure(result):
                    raise outcome
                break
            except CeleryTimeoutError:
                outage = None
            except BACKEND_OUTAGE_ERRORS as exc:  # Redis restarting: the job goes on, and so does the wait
                outage = one_line(exc)
                result = _fresh_handle(result)  # the old one may hold the lost connection's error
                time.sleep(max(0.0, min(WAIT_STEP, step)))
            waited = time.monotonic() - started
            if timeout is not None and waited >= timeout:
                if outage is not None:
                    raise BrokerUnreachableError(
                        f"job {result.id}: the result backend was unreachable ({outage}) when the "
                        f"{timeout:g} s wait ran out; the job itself may still finish"
                    ) from None
                raise TimeoutError(
                    f"job {result.id} did not finish within {timeout:g} s; it is still {result.state.lower()} "
                    f"(see `pocket-tts jobs {result.id}`)"
                ) from None
            if on_progress is not None and outage is None:
                on_progress(result.state, waited)
    finally:
        # Stop listening for the result now: left to AsyncResult.__del__ at interpreter exit,
        # the unsubscribe runs while Python shuts down and prints a traceback.
        with suppress(*BACKEND_OUTAGE_ERRORS):
            result.backend.remove_pending_result(result)
    if result.failed():
        raise JobFailedError(f"job {result.id} failed: {type(outcome).__name__}: {one_line(outcome)}")
    return outcome


def _stored_failure(result: AsyncResult) -> bool:
    return result.backend.get_task_meta(result.id, cache=False)["status"] == "FAILURE"


def _fresh_handle(result: AsyncResult) -> AsyncResult:
    with suppress(*BACKEND_OUTAGE_ERRORS):
        result.backend.remove_pending_result(result)
    return AsyncResult(result.id, backend=result.backend, app=result.app)


def enqueue(
    text: str,
    voice: str | None = None,
    temperature: float | None = None,
    format: str = "wav",
    wait: bool = False,
    timeout: float | None = 600.0,
    seed: int | None = None,
) -> str:
    """Send a `pocket_tts.synthesize` job; return its id, or with `wait` the path of the finished audio.

    Raises BrokerUnreachableError when the broker does not answer; with `wait`,
    JobFailedError when the job fails and TimeoutError when it has not finished
    after `timeout` seconds (None waits forever).
    """
    result = submit(text, voice, temperature, format, seed)
    return wait_for(result, timeout) if wait else result.id


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: str  # queued, reserved, running, succeeded, failed, unknown (or another Celery state, lower case)
    detail: str  # where it runs and for how long, the audio path, the failure reason

    def describe(self) -> str:
        return f"{self.job_id}: {self.state}" + (f": {self.detail}" if self.detail else "")


def job_status(job_id: str) -> JobStatus:
    """What became of a job: from its result, else the workers and the queue in Redis."""
    check_connections()
    result = app.AsyncResult(job_id)
    try:
        state, info = result.state, result.info
    finally:
        result.backend.remove_pending_result(result)
    if state == "SUCCESS":
        return JobStatus(job_id, "succeeded", str(info))
    if state == "FAILURE":
        return JobStatus(job_id, "failed", f"{type(info).__name__}: {one_line(info)}")
    deliveries = _delivery_count(result)
    attempt = f", delivery {deliveries}" if deliveries else ""
    if state == "STARTED":
        return JobStatus(job_id, "running", _running_detail(job_id, info) + attempt)
    if state != "PENDING":
        return JobStatus(job_id, state.lower(), " ".join(str(info or "").split()))
    # PENDING is also what Celery says of an id it never saw: look for the message itself.
    where = _find_message(job_id)
    if where == "queue":
        return JobStatus(job_id, "queued", "waiting for a free worker" + attempt)
    if where == "unacked":
        return JobStatus(job_id, "reserved", "taken by a worker, not started yet" + attempt)
    return JobStatus(job_id, "unknown", "never sent, or its result expired (POCKET_TTS_RESULT_EXPIRES)")


def _delivery_count(result: AsyncResult) -> int:
    try:
        return int(result.backend.get(DELIVERIES_KEY_PREFIX + result.id) or 0)
    except (AttributeError, ValueError):  # a backend without key access
        return 0


def _running_detail(job_id: str, info) -> str:
    host = info.get("hostname") if isinstance(info, dict) else None
    replies = app.control.inspect(timeout=INSPECT_TIMEOUT).query_task(job_id) or {}
    for worker, tasks in replies.items():
        state, request = tasks.get(job_id, (None, None))
        if state == "active" and request.get("time_start"):
            return f"on {worker} for {time.time() - request['time_start']:.0f} s"
    return f"on {host}" if host else "on a worker"


def _find_message(job_id: str) -> str | None:
    """'queue' when the job's message waits in a queue, 'unacked' when a worker holds it, else None."""
    needle = job_id.encode()
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        client = channel.client
        queue = app.conf.task_default_queue
        for key in client.scan_iter(match=f"{queue}*", _type="list"):  # the queue and its priority lists
            if any(needle in message for message in client.lrange(key, 0, -1)):
                return "queue"
        if any(needle in message for _, message in client.hscan_iter(channel.unacked_key)):
            return "unacked"
    return None
