"""The model of a worker and its cached voice states.

A prefork worker loads it once in its main process, before forking, so the
children share it copy-on-write; a threads-pool worker loads it in its only
process. torch is imported only inside these functions: web processes import
this module without touching torch.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import cache
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded

from tasks.errors import InvalidJobError, one_line
from tasks.validation import Job, resolve_voice
from worker_config import Settings

logger = logging.getLogger(__name__)

_load_lock = threading.Lock()
_engine: Engine | None = None


class DefaultVoiceError(RuntimeError):
    """POCKET_TTS_DEFAULT_VOICE names a voice the loaded model cannot use."""


class Engine:
    def __init__(self, model, description: str, voice_cache_size: int, max_batch: int = 1):
        self.model = model
        self.description = description
        self._voice_cache_size = voice_cache_size
        self._voice_states: OrderedDict[tuple, object] = OrderedDict()
        self._voice_lock = threading.Lock()  # guards the cache only, never a load
        self._batcher = None
        if max_batch > 1:
            from pocket_tts.batching import BatchedSynthesizer

            self._batcher = BatchedSynthesizer(model, max_batch=max_batch)

    @classmethod
    def load(cls, settings: Settings, num_threads: int) -> Engine:
        from pocket_tts.models.tts_model import TTSModel  # applies POCKET_TTS_NUM_THREADS on first import

        configure_torch_threads(num_threads)
        model = TTSModel.load_model(language=settings.language, config=settings.config, weights=settings.weights)
        model.warmup(encoder=model.has_voice_cloning)  # packed once, before forking: children share it
        engine = cls(model, describe_model(settings), settings.voice_cache_size, settings.max_batch)
        if engine._batcher is not None:
            engine._batcher.warm_up()
        engine.preload_voice(settings)
        return engine

    def preload_voice(self, settings: Settings) -> None:
        """Cache the default voice's state: loaded before forking, the children share it (and, for an
        audio prompt, the Mimi encoder's packed weights). A voice that fails stops the worker, unless
        POCKET_TTS_START_WITHOUT_MODEL=1: then it is logged and reported by its jobs."""
        try:
            self.voice_state(resolve_voice(settings.default_voice, settings.voices_dir))
        except Exception as exc:
            message = f"the default voice {settings.default_voice!r} (POCKET_TTS_DEFAULT_VOICE) cannot be used: {exc}"
            if not settings.start_without_model:
                raise DefaultVoiceError(" ".join(message.split())) from None
            logger.warning("pocket-tts: %s", message)

    @property
    def sample_rate(self) -> int:
        return self.model.sample_rate

    def voice_state(self, voice: str):
        """The voice state for a resolved voice; a file's state is rebuilt when the file changes.

        Only the cache is locked: a slow voice load never makes other voices' jobs wait
        (two jobs loading the same new voice at once each build it).
        """
        try:
            key = (voice, Path(voice).stat().st_mtime_ns if os.path.isabs(voice) else None)
        except OSError as exc:
            raise InvalidJobError(f"voice {voice!r} cannot be used: {exc.strerror or exc}") from None
        with self._voice_lock:
            state = self._voice_states.get(key)
            if state is not None:
                self._voice_states.move_to_end(key)
                return state
        try:
            state = self.model.get_state_for_audio_prompt(voice)
        except (ValueError, OSError, RuntimeError, MemoryError) as exc:  # a corrupt or hostile file
            reason = one_line(exc)
            raise InvalidJobError(f"voice {voice!r} cannot be used: {reason}") from None
        with self._voice_lock:
            self._voice_states[key] = state
            while len(self._voice_states) > self._voice_cache_size:
                self._voice_states.popitem(last=False)
        return state

    def synthesize(self, job: Job, on_audio: Callable | None = None, time_limit: float | None = None):
        """1-D float32 audio at `sample_rate` (the voice state is never mutated).

        `on_audio(piece)` receives the audio in order as it is produced, in the calling
        thread; an exception it raises stops the generation and propagates. `time_limit`
        (seconds) is enforced here in batching mode only; prefork children have Celery's.
        """
        voice = self.voice_state(job.voice)
        if self._batcher is not None:  # generated together with the other pool threads' jobs
            return self._batched(voice, job, on_audio, time_limit)
        if on_audio is None:
            audio = self.model.generate_audio(voice, job.text, temp=job.temperature, seed=job.seed)
        else:
            pieces = []
            for piece in self.model.generate_audio_stream(voice, job.text, temp=job.temperature, seed=job.seed):
                on_audio(piece)
                pieces.append(piece)
            audio = _concatenated(pieces)
        return_freed_heap()
        return audio

    def _batched(self, voice, job: Job, on_audio: Callable | None, time_limit: float | None):
        """The job's audio from the shared batch; past `time_limit` s its rows leave the batch and
        SoftTimeLimitExceeded is raised, as Celery does for prefork (the threads pool enforces no limit)."""
        deadline = None if time_limit is None else time.monotonic() + time_limit
        produced: queue.SimpleQueue = queue.SimpleQueue()  # filled by the batcher's loop thread
        future = self._batcher.submit(
            voice, job.text, temp=job.temperature, seed=job.seed, on_audio=produced.put if on_audio else None
        )
        future.add_done_callback(lambda _: produced.put(None))
        try:
            while (piece := produced.get(timeout=_left(deadline))) is not None:
                if on_audio is not None:
                    on_audio(piece)
        except queue.Empty:
            future.cancel()  # the batcher frees the job's rows at its next step
            raise SoftTimeLimitExceeded() from None
        except BaseException:
            future.cancel()
            raise
        return future.result()


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _concatenated(pieces: list):
    import torch

    return torch.cat(pieces) if pieces else torch.zeros(0)


@cache
def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to trim
        return None


def return_freed_heap() -> None:
    """Hand the job's freed activations back to the OS (glibc keeps them in the heap otherwise).

    Measured on a full-size prefork child: ~28 MB less private memory between jobs, in < 1 ms.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def configure_torch_threads(num_threads: int) -> None:
    """Intra-op threads = the budget per process; one inter-op thread (nothing here runs ops in parallel).

    Safe to call again, e.g. in a child whose parent already set one inter-op thread.
    """
    import torch

    if torch.get_num_interop_threads() != 1:
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # only possible where torch already ran parallel work, e.g. an in-process test worker
            logger.warning("inter-op threads already fixed at %d", torch.get_num_interop_threads())
    torch.set_num_threads(num_threads)


def describe_model(settings: Settings) -> str:
    if settings.config:
        return f"config={settings.config} weights={settings.weights or '(from config)'}"
    return f"language={settings.language or 'english'}" + (f" weights={settings.weights}" if settings.weights else "")


def load_engine(settings: Settings, num_threads: int | None = None) -> Engine:
    """The process's engine, loaded on first call with `num_threads` (default: the budget per process)."""
    global _engine
    with _load_lock:
        if _engine is None:
            _engine = Engine.load(settings, settings.num_threads if num_threads is None else num_threads)
            logger.info("pocket-tts model ready in process %d: %s", os.getpid(), _engine.description)
        return _engine


def loaded_engine() -> Engine | None:
    """This process's engine if it is loaded (never loads it)."""
    return _engine


def process_info() -> dict:
    """What `pocket_tts.worker_info` reports about the process that runs it."""
    torch = sys.modules.get("torch")
    return {
        "pid": os.getpid(),
        "torch_threads": torch.get_num_threads() if torch else None,
        "interop_threads": torch.get_num_interop_threads() if torch else None,
        "model": _engine.description if _engine else None,
        "ready": _engine is not None,
    }
