"""Task logic through Celery's own pytest fixtures: `celery_session_app` is overridden with the real
app (its tasks, settings and signal handlers) and `celery_session_worker` runs it in this process
(solo pool), so faults can be injected with monkeypatch. The broker is the test redis-server."""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

import pytest
from service_helpers import TEST_DEFAULT_VOICE, assert_audio_matches

import tasks.celery_app
import tasks.synthesis
from tasks import synthesize, worker_info
from tasks.storage import audio_path
from worker_config import load_settings

pytestmark = pytest.mark.service

JOB_TIMEOUT = 60


@pytest.fixture(scope="session")
def inprocess_settings(parity_dir, service_files):
    (service_files.root / "inprocess-audio").mkdir(exist_ok=True)
    return load_settings(
        {
            "POCKET_TTS_CONFIG": str(parity_dir / "config.yaml"),
            "POCKET_TTS_WEIGHTS": str(parity_dir / "model.safetensors"),
            "POCKET_TTS_VOICES_DIR": str(service_files.voices),
            "POCKET_TTS_DEFAULT_VOICE": TEST_DEFAULT_VOICE,
            "POCKET_TTS_STORAGE_DIR": str(service_files.root / "inprocess-audio"),
        }
    )


@pytest.fixture(scope="session")
def celery_session_app(redis_url, inprocess_settings):
    """The service's own app on its own Redis database, with test settings instead of the environment."""
    import celery.contrib.testing.tasks  # noqa: F401  registers celery.ping, the worker fixture's readiness check

    patch = pytest.MonkeyPatch()
    for module in (tasks.celery_app, tasks.synthesis):
        patch.setattr(module, "current_settings", lambda: inprocess_settings)
    tasks.app.conf.update(broker_url=f"{redis_url}/1", result_backend=f"{redis_url}/1")
    try:
        yield tasks.app
    finally:
        patch.undo()


def stored_files(settings, task_id: str) -> list[Path]:
    return list(settings.storage_dir.rglob(f"*{task_id}*"))


def test_the_worker_process_loads_the_model_once(celery_session_worker):
    report = worker_info.delay().get(timeout=JOB_TIMEOUT)

    assert report["pid"] == os.getpid() and report["ready"] and report["torch_threads"] == 1


def test_synthesize_stores_the_engines_audio(celery_session_worker, inprocess_settings, reference_audio):
    path = Path(synthesize.delay("In process.", temperature=0).get(timeout=JOB_TIMEOUT))

    assert path.is_relative_to(inprocess_settings.storage_dir)
    assert_audio_matches(path, reference_audio("In process."))


def test_a_full_disk_fails_the_job_without_a_partial_file(celery_session_worker, inprocess_settings, monkeypatch):
    def write_half_then_fill_the_disk(fd, data):
        os.write(fd, data[:6])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("tasks.storage._write_all", write_half_then_fill_the_disk)
    result = synthesize.delay("No room.")
    result.get(timeout=JOB_TIMEOUT, propagate=False)

    assert result.state == "FAILURE" and type(result.result).__name__ == "StorageError"
    assert str(result.result).endswith(": No space left on device")
    assert stored_files(inprocess_settings, result.id) == []


def test_unwritable_storage_fails_the_job_clearly(celery_session_worker, inprocess_settings):
    task_id = str(uuid.uuid4())
    blocked = audio_path(inprocess_settings.storage_dir, task_id, "wav").parent
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("a file where the shard folder should be")

    result = synthesize.apply_async(("Nowhere to go.",), task_id=task_id)
    result.get(timeout=JOB_TIMEOUT, propagate=False)

    assert result.state == "FAILURE" and type(result.result).__name__ == "StorageError"
    assert f"cannot write audio in {blocked}" in str(result.result)
    assert stored_files(inprocess_settings, task_id) == []


def test_the_default_voice_is_cached_when_the_model_loads(inprocess_settings, caplog):
    from dataclasses import replace

    from tasks.engine import DefaultVoiceError, Engine
    from tasks.validation import resolve_voice

    engine = Engine.load(inprocess_settings, num_threads=1)
    engine.model.get_state_for_audio_prompt = lambda voice: pytest.fail(f"{voice} loaded again")
    assert engine.voice_state(resolve_voice(inprocess_settings.default_voice, inprocess_settings.voices_dir))

    # A default voice that cannot be loaded stops the worker, unless it opted in to start without it:
    # then it is only reported (its jobs fail clearly, the others run).
    missing = replace(inprocess_settings, default_voice="missing.wav")
    with pytest.raises(DefaultVoiceError, match="default voice 'missing.wav' .* cannot be used: unknown voice"):
        Engine.load(missing, num_threads=1)
    with caplog.at_level("WARNING"):
        Engine.load(replace(missing, start_without_model=True), num_threads=1)
    assert "default voice 'missing.wav' (POCKET_TTS_DEFAULT_VOICE) cannot be used: unknown voice" in caplog.text


def test_a_seed_makes_a_job_reproducible(celery_session_worker, reference_model, service_files):
    text = "Seeded words."
    first, again, other = (
        Path(synthesize.delay(text, temperature=0.8, seed=seed).get(timeout=JOB_TIMEOUT)) for seed in (42, 42, 43)
    )

    voice = reference_model.get_state_for_audio_prompt(str(service_files.voices / TEST_DEFAULT_VOICE))
    expected = reference_model.generate_audio(voice, text, temp=0.8, seed=42).numpy()
    assert_audio_matches(first, expected)
    assert_audio_matches(again, expected)
    assert first.read_bytes() == again.read_bytes()
    assert other.read_bytes() != first.read_bytes()


def test_a_bad_seed_fails_the_job_with_one_line(celery_session_worker, inprocess_settings):
    result = synthesize.apply_async(("Hello.",), {"seed": "42"})
    result.get(timeout=JOB_TIMEOUT, propagate=False)

    assert result.state == "FAILURE" and type(result.result).__name__ == "InvalidJobError"
    assert str(result.result) == "seed must be an integer between 0 and 2**64-1, got '42'"
    assert stored_files(inprocess_settings, result.id) == []
