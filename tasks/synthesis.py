"""The tasks: `pocket_tts.synthesize` (text -> audio file path) and `pocket_tts.worker_info`."""

from __future__ import annotations

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.worker.request import Request

from tasks.celery_app import app
from tasks.deliveries import record_delivery
from tasks.engine import load_engine, process_info
from tasks.errors import InvalidJobError, RedeliveryLimitError, StorageError, SynthesisTimeLimitError
from tasks.storage import audio_path, write_atomically
from tasks.validation import validate_job
from worker_config import current_settings


class SynthesisRequest(Request):
    """Worker-side request whose time limits scale with the text length.

    Computed here, from the message body, so jobs sent by name from web apps
    (`send_task`) get them too; limits set explicitly by the sender win.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not any(self.time_limits):
            settings = current_settings()
            text = self.args[0] if self.args else self.kwargs.get("text")
            soft, hard = settings.time_limits(len(text) if isinstance(text, str) else settings.max_text_chars)
            self.time_limits = (hard, soft)  # Celery's order


class SynthesisTask(Task):
    Request = SynthesisRequest
    # Expected failures: logged as one line, without a traceback, and never retried.
    throws = (InvalidJobError, StorageError, RedeliveryLimitError, SynthesisTimeLimitError)


@app.task(name="pocket_tts.synthesize", bind=True, base=SynthesisTask)
def synthesize(self, text: str, voice: str | None = None, temperature: float | None = None, format: str = "wav",
               seed: int | None = None) -> str:  # fmt: skip
    """Synthesize `text` and return the path of the audio file in the shared storage.

    With `seed`, running the job again gives the same audio (same worker settings and model).
    """
    settings = current_settings()
    record_delivery(self.backend, self.request.id, settings.max_deliveries, settings.result_expires)
    job = validate_job(text, voice, temperature, format, settings, seed)
    path = audio_path(settings.storage_dir, self.request.id, job.format)
    engine = load_engine(settings)  # already loaded in a prefork child; loads on first use elsewhere

    from pocket_tts.audio import write_audio  # torch module: workers only

    try:
        audio = engine.synthesize(job)
        write_atomically(path, lambda temp_path: write_audio(temp_path, audio, engine.sample_rate, job.format))
    except SoftTimeLimitExceeded:
        _, sent_soft_limit = self.request.timelimit or (None, None)
        soft_limit = sent_soft_limit or settings.time_limits(len(job.text))[0]
        raise SynthesisTimeLimitError(
            f"synthesis of {len(job.text)} characters passed its soft time limit of {soft_limit:g} s "
            "(POCKET_TTS_TIME_LIMIT_BASE / POCKET_TTS_TIME_LIMIT_PER_CHAR)"
        ) from None
    return str(path)


@app.task(name="pocket_tts.worker_info")
def worker_info() -> dict:
    """pid, torch threads, inter-op threads, model and readiness of the process that runs it."""
    return process_info()
