"""The gateway's side of the queue: send streaming jobs by name, read their audio streams, cancel them.

Celery (sending, results, control) is synchronous and runs in worker threads;
the audio streams are read with redis-py's asyncio client on the event loop.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import redis.asyncio as aioredis
from celery import Celery
from starlette.concurrency import run_in_threadpool

from tasks.audio_stream import STREAM_TTL_SECONDS, audio_key, cancel_key
from worker_config import Settings

JOB_KEY = "pocket_tts:gateway:job:{}"  # jobs this gateway created: anything else is 404
READ_BLOCK_MS = 1000

# A failed job's reason goes back to the client when it names no path nor host; the others
# (storage failures, crashes) are summarized and left to the worker's log.
CLIENT_ERRORS = {"InvalidJobError": 400}
REPORTED_ERRORS = {"SynthesisTimeLimitError": 504, "RedeliveryLimitError": 500}
HIDDEN_ERRORS = {"StorageError": "the worker could not store the audio (see the worker log)"}


@dataclass(frozen=True)
class JobFailure:
    status: int  # HTTP status for the client
    reason: str  # one line, safe to show


def job_failure(kind: str, reason: str) -> JobFailure:
    if kind in CLIENT_ERRORS:
        return JobFailure(CLIENT_ERRORS[kind], reason)
    if kind in REPORTED_ERRORS:
        return JobFailure(REPORTED_ERRORS[kind], reason)
    return JobFailure(500, HIDDEN_ERRORS.get(kind, f"synthesis failed ({kind}; see the worker log)"))


class QueueTimeout(Exception):
    """No audio from the job within the gateway's queue timeout."""


class JobQueue:
    def __init__(self, settings: Settings, queue_timeout: float, job_queue: str = "celery"):
        self.settings = settings
        self.queue_timeout = queue_timeout
        self.job_queue = job_queue
        self.celery = Celery("pocket-tts-gateway", broker=settings.broker_url, backend=settings.result_backend)
        self.celery.conf.update(
            task_serializer="json",
            result_serializer="json",
            accept_content=["json"],
            result_accept_content=["json"],
            broker_connection_retry_on_startup=False,
            # Celery prefers the CELERY_BROKER_URL variable to `broker=`; with REDIS_PASSWORD_FILE the
            # variable lacks the password that settings.broker_url carries. Connections use these two.
            broker_read_url=settings.broker_url,
            broker_write_url=settings.broker_url,
        )
        self.redis = aioredis.Redis.from_url(settings.broker_url)

    async def close(self) -> None:
        await self.redis.aclose()

    async def submit(self, text: str, voice: str | None, format: str = "wav", temperature: float | None = None) -> str:
        """Send a streaming `pocket_tts.synthesize` job; returns its id. Seeded, so that an attempt
        that runs again after its worker died makes the same audio: its readers skip what they have."""
        task_id = str(uuid.uuid4())
        await self.redis.set(JOB_KEY.format(task_id), time.time(), ex=self.settings.result_expires)
        seed = secrets.randbits(63)
        kwargs = {"voice": voice, "format": format, "temperature": temperature, "seed": seed, "stream": True}
        await run_in_threadpool(
            self.celery.send_task,
            "pocket_tts.synthesize",
            args=(text,),
            kwargs=kwargs,
            task_id=task_id,
            queue=self.job_queue,
        )
        return task_id

    async def exists(self, task_id: str) -> bool:
        return bool(await self.redis.exists(JOB_KEY.format(task_id)))

    async def cancel(self, task_id: str) -> None:
        """Stop a job: a running one at its next piece of audio, a queued one when a worker takes it."""
        with anyio.CancelScope(shield=True):  # also runs while the request that owns it is cancelled
            await self.redis.set(cancel_key(task_id), 1, ex=STREAM_TTL_SECONDS)
            await run_in_threadpool(self.celery.control.revoke, task_id)

    async def entries(self, task_id: str) -> AsyncIterator[dict[bytes, bytes]]:
        """The job's stream entries from the first one; raises QueueTimeout after a silence of
        `queue_timeout` seconds (no worker took the job, or its worker died)."""
        key, last = audio_key(task_id), "0-0"
        silent_since = time.monotonic()
        while True:
            reply = await self.redis.xread({key: last}, count=256, block=READ_BLOCK_MS)
            if not reply:
                if time.monotonic() - silent_since > self.queue_timeout:
                    raise QueueTimeout(f"no worker produced audio for this job within {self.queue_timeout:g} s")
                continue
            silent_since = time.monotonic()
            for entry_id, fields in reply[0][1]:
                last = entry_id
                yield fields

    async def progress(self, task_id: str) -> tuple[int, int]:
        """(samples generated so far, sample rate); (0, 0) before the first piece."""
        last = await self.redis.xrevrange(audio_key(task_id), count=1)
        fields = last[0][1] if last else {}
        return int(fields.get(b"samples", 0)), int(fields.get(b"rate", 0))

    async def state(self, task_id: str) -> tuple[str, object]:
        """Celery's state of the job and its result (path, exception or None)."""
        result = self.celery.AsyncResult(task_id)

        def read():
            return result.state, result.result

        return await run_in_threadpool(read)

    async def redis_reachable(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (aioredis.RedisError, OSError):
            return False

    async def live_workers(self) -> int:
        """Workers answering Celery's control ping within a second."""
        replies = await run_in_threadpool(self.celery.control.ping, timeout=1.0)
        return len(replies or [])
