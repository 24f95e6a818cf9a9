"""Fixtures of the worker-service tests: a real redis-server, real prefork workers, the reference engine.

Everything that starts a process is bounded in time and always cleaned up:
redis-server and workers run in their own process groups and are stopped with
SIGTERM, then SIGKILL after a bound, in `finally` blocks.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from service_helpers import (
    HOOKS_DIR,
    TEST_DEFAULT_VOICE,
    TEST_MAX_DELIVERIES,
    WORKER_START_TIMEOUT,
    ServiceFiles,
    Worker,
    require_redis_server,
    wait_children_ready,
)

from tasks import local_stack


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A private redis-server on 127.0.0.1 and a free port; yields its URL without a database number."""
    require_redis_server()
    with local_stack.redis_server() as redis:
        yield redis.url


@pytest.fixture(scope="session")
def service_files(tmp_path_factory, parity_dir: Path) -> ServiceFiles:
    root = tmp_path_factory.mktemp("service")
    files = ServiceFiles(root, root / "voices", root / "audio", root / "hooks")
    for folder in (files.voices, files.storage, files.hooks):
        folder.mkdir()
    for name in ("voice_state.safetensors", "voice_24k.wav"):
        shutil.copy(parity_dir / name, files.voices / name)
    return files


@pytest.fixture(scope="session")
def worker_env(parity_dir: Path, service_files: ServiceFiles, redis_url: str) -> dict[str, str]:
    """The environment of a test worker on the small random-weight checkpoint."""
    return local_stack.worker_env(
        f"{redis_url}/0",
        {
            "POCKET_TTS_CONFIG": str(parity_dir / "config.yaml"),
            "POCKET_TTS_WEIGHTS": str(parity_dir / "model.safetensors"),
            "POCKET_TTS_VOICES_DIR": str(service_files.voices),
            "POCKET_TTS_STORAGE_DIR": str(service_files.storage),
            "POCKET_TTS_DEFAULT_VOICE": TEST_DEFAULT_VOICE,
            "POCKET_TTS_NUM_THREADS": "1",
            "POCKET_TTS_MAX_DELIVERIES": str(TEST_MAX_DELIVERIES),
            "SERVICE_TEST_HOOK_DIR": str(service_files.hooks),
        },
        python_path=[HOOKS_DIR],
    )


@pytest.fixture(scope="session")
def client_app(redis_url: str):
    """A web app's view of the service: plain Celery, JSON only, tasks sent by name."""
    return local_stack.client_app(f"{redis_url}/0")


@pytest.fixture(scope="session")
def launch_worker(worker_env, client_app, tmp_path_factory):
    """Start workers that are stopped at the end of the session; returns a Worker once it answers ping."""
    logs_dir = tmp_path_factory.mktemp("worker-logs")
    started: list[Worker] = []

    def launch(name: str, *args: str, env: dict[str, str] | None = None, queue: str = "celery") -> Worker:
        log = logs_dir / f"{name}.log"
        worker = local_stack.start_worker({**worker_env, **(env or {})}, log, name, *args, queue=queue)
        started.append(worker)
        worker.wait_ready(client_app, WORKER_START_TIMEOUT)
        return worker

    try:
        yield launch
    finally:
        for worker in started:
            worker.stop()


@pytest.fixture(scope="session")
def session_worker(launch_worker, client_app) -> Worker:
    """The shared `-c 2` worker: one torch thread per child, the test hooks loaded."""
    worker = launch_worker("svc", "-c", "2", "--include", "service_test_hooks")
    wait_children_ready(worker, client_app)
    return worker


@pytest.fixture(scope="session")
def batching_worker(launch_worker) -> Worker:
    """A batching-mode worker (`--pool=threads -c 4`, POCKET_TTS_MAX_BATCH=4) consuming the queue "batched"."""
    return launch_worker("batched", "--pool=threads", "-c", "4", queue="batched", env={"POCKET_TTS_MAX_BATCH": "4"})


@pytest.fixture(scope="session")
def reference_model(parity_dir: Path):
    """The engine in this process, loaded the way the workers load it."""
    from pocket_tts.models.tts_model import TTSModel

    return TTSModel.load_model(config=parity_dir / "config.yaml", weights=parity_dir / "model.safetensors")


@pytest.fixture(scope="session")
def reference_audio(reference_model, service_files: ServiceFiles):
    """reference_audio(text, voice_file) -> the engine's float output at temperature 0."""

    def generate(text: str, voice: str = TEST_DEFAULT_VOICE) -> np.ndarray:
        state = reference_model.get_state_for_audio_prompt(str(service_files.voices / voice))
        return reference_model.generate_audio(state, text, temp=0.0).numpy()

    return generate
