"""Audio of a streaming job, published while it is generated: one Redis Stream per job.

A `synthesize` job sent with `stream=True` appends its audio to the stream
`pocket_tts:audio:<task id>` as the engine produces it, then one closing entry;
the gateway reads the stream and relays it to its HTTP client. A job redelivered after its
worker died runs again from its start and publishes its audio again into the same stream,
under the next attempt number: a reader skips the samples it already has (`Relay`). A
redelivered job whose file is stored already (its worker died between storing and the
acknowledgement) publishes the stored file's audio instead (`publish_stored`), then its end:
a reader that missed the tail gets it. Entries:

* audio: ``pcm`` (16-bit little-endian mono samples), ``rate``, ``samples`` (total so far, this
  piece included), ``attempt`` (the job's delivery count), ``seeded`` (1: a seeded job, whose
  every attempt makes the same audio) or ``stored`` (1: read from the stored file);
* end: ``end`` (the audio file is stored);
* error: ``error`` (the exception's class name), ``reason`` (its one-line message).

The stream is capped (`MAX_ENTRIES`) and expires `STREAM_TTL_SECONDS` after its
last entry, so an abandoned stream never stays in Redis. Whoever wants a job
stopped sets `pocket_tts:cancel:<task id>`: the job sees it at its next piece of
audio (a prefork job also within CANCEL_POLL_SECONDS, wherever its generation is), publishes
nothing more, writes no file and ends REVOKED.
Torch-free at import: the gateway imports the key names and readers from here.
"""

from __future__ import annotations

import _thread
import signal
import threading
from functools import cache

from tasks.errors import one_line

AUDIO_KEY = "pocket_tts:audio:{}"
CANCEL_KEY = "pocket_tts:cancel:{}"
# Prefork jobs publish a piece per 8 frames (640 ms), batching jobs per frame (80 ms): 8192
# entries hold 11 to 87 minutes of audio, far more than the longest text allowed.
MAX_ENTRIES = 8192
CANCEL_POLL_SECONDS = 0.1
# Raised in the main thread by `_thread.interrupt_main`: no signal is sent to the process.
CANCEL_SIGNAL = signal.SIGUSR2
STORED_PIECE_SAMPLES = 24000  # a stored file is published in pieces of 1 s at 24 kHz (48 kB entries)
STREAM_TTL_SECONDS = 600
CANCELLED_REASON = "cancelled: the client went away"


def audio_key(task_id: str) -> str:
    return AUDIO_KEY.format(task_id)


def cancel_key(task_id: str) -> str:
    return CANCEL_KEY.format(task_id)


@cache
def _redis(url: str):
    import redis

    return redis.Redis.from_url(url)


def _client():
    from worker_config import current_settings

    return _redis(current_settings().broker_url)


class _Cancelled(Exception):
    """Raised in a job's main thread when its cancel key appears; `AudioPublisher` stops the job."""


class AudioPublisher:
    """The `on_audio` callback of one streaming job: publishes each piece, stops on cancellation.

    Each publish checks the cancel key in the same round trip. A prefork job publishes a piece per
    8 frames (640 ms of audio: ~0.4-0.6 s of compute on the full-size model), so a job run in its
    process's main thread inside `with publisher:` is also watched by a thread that polls the key
    every CANCEL_POLL_SECONDS and interrupts the generation where it is, as Celery's soft time
    limit does. Pool threads (batching) publish every frame: their check stays per piece.
    """

    def __init__(self, task, sample_rate: int, attempt: int = 1, seeded: bool = False):
        self._task = task
        self._key = audio_key(task.request.id)
        self._cancel_key = cancel_key(task.request.id)
        self._fields = {"rate": sample_rate, "attempt": attempt, "seeded": int(seeded)}
        self._samples = 0
        self._watch: threading.Thread | None = None
        self._done = threading.Event()
        self._armed = False  # the interrupt raises only while the engine runs, never in a publish
        self._interrupted = False
        self._previous_handler = None

    def __enter__(self) -> AudioPublisher:
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(CANCEL_SIGNAL, self._interrupt)
            self._watch = threading.Thread(target=self._poll, name="pocket-tts-cancel", daemon=True)
            self._watch.start()
        self._armed = True
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._armed = False
        if self._watch is not None:
            self._done.set()
            self._watch.join()
            signal.signal(CANCEL_SIGNAL, self._previous_handler or signal.SIG_DFL)  # None: not set from Python
        if exc_type is _Cancelled:
            self._stop()

    def _poll(self) -> None:
        import redis

        while not self._done.wait(CANCEL_POLL_SECONDS):
            try:
                if _client().exists(self._cancel_key):
                    _thread.interrupt_main(CANCEL_SIGNAL)
                    return
            except redis.RedisError:  # Redis away: the next publish reports it
                continue

    def _interrupt(self, signum, frame) -> None:
        if self._armed:
            raise _Cancelled()
        self._interrupted = True  # in a publish: it stops the job when its round trip is done

    def __call__(self, piece) -> None:
        import torch

        self._armed = False
        pcm = (piece.clamp(-1, 1) * 32767).to(torch.int16).numpy().tobytes()
        self._samples += piece.numel()
        pipe = _client().pipeline(transaction=False)
        pipe.exists(self._cancel_key)  # checked in the same round trip as the publish
        pipe.xadd(self._key, {"pcm": pcm, "samples": self._samples, **self._fields}, maxlen=MAX_ENTRIES)
        pipe.expire(self._key, STREAM_TTL_SECONDS)
        cancelled, *_ = pipe.execute()
        if cancelled or self._interrupted:
            self._stop()
        self._armed = True

    def _stop(self):
        from celery.exceptions import Ignore

        task_id = self._task.request.id
        _client().delete(self._key, self._cancel_key)
        # Ignore keeps Celery from storing another state over REVOKED; nothing was written yet.
        self._task.backend.mark_as_revoked(task_id, CANCELLED_REASON, request=self._task.request)
        raise Ignore(CANCELLED_REASON)


def publish_stored(task_id: str, path, attempt: int) -> None:
    """Publish a stored audio file into the job's stream, in pieces at their sample offsets."""
    import soundfile as sf

    samples, rate = sf.read(str(path), dtype="<i2")
    fields = {"rate": rate, "attempt": attempt, "stored": 1}
    pieces = []
    for start in range(0, len(samples), STORED_PIECE_SAMPLES):
        piece = samples[start : start + STORED_PIECE_SAMPLES]
        pieces.append({"pcm": piece.tobytes(), "samples": start + len(piece), **fields})
    _publish(task_id, *pieces)


class AttemptChanged(Exception):
    """An unseeded job restarted after part of its audio was relayed: the rest would not fit."""


class Relay:
    """What a reader of one job's stream has relayed: turns audio entries into the new samples only.

    Entries of another attempt continue what was relayed, cut at the sample offset, when that
    attempt makes the same audio: a seeded job's, or the stored file's (the audio of the attempt
    that stored it, whose pieces came before in the stream; exact whatever the seed). An unseeded
    job's new attempt after audio was relayed raises AttemptChanged.
    """

    def __init__(self):
        self.samples = 0  # relayed so far
        self.attempt: bytes | None = None

    def new_audio(self, entry: dict[bytes, bytes]) -> bytes:
        """The part of an audio entry's PCM not relayed yet (b"" for a replayed piece)."""
        attempt = entry.get(b"attempt")
        if attempt != self.attempt:
            if self.samples and b"1" not in (entry.get(b"seeded"), entry.get(b"stored")):
                raise AttemptChanged(
                    "the job's worker stopped and the job restarted elsewhere; without a seed its audio "
                    "would not continue what was sent: request it again"
                )
            self.attempt = attempt
        pcm = entry[b"pcm"]
        end = int(entry[b"samples"])
        start = end - len(pcm) // 2
        if end <= self.samples:
            return b""
        skip = max(0, self.samples - start) * 2
        self.samples = end
        return pcm[skip:]


def publish_end(task_id: str) -> None:
    _publish(task_id, {"end": 1})


def publish_error(task_id: str, exc: BaseException) -> None:
    reason = one_line(exc)
    _publish(task_id, {"error": type(exc).__name__, "reason": reason})


def _publish(task_id: str, *entries: dict) -> None:
    pipe = _client().pipeline(transaction=False)
    for entry in entries:
        pipe.xadd(audio_key(task_id), entry, maxlen=MAX_ENTRIES)
    pipe.expire(audio_key(task_id), STREAM_TTL_SECONDS)
    pipe.execute()
