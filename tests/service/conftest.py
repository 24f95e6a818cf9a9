"""Fixtures of the worker-service tests: a real redis-server, real prefork workers, the reference engine.

Everything that starts a process is bounded in time and always cleaned up:
redis-server and workers run in their own process groups and are stopped with
SIGTERM, then SIGKILL after a bound, in `finally` blocks.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from service_helpers import (
    HOOKS_DIR,
    REPO_ROOT,
    TEST_DEFAULT_VOICE,
    TEST_MAX_DELIVERIES,
    WORKER_START_TIMEOUT,
    ServiceFiles,
    WorkerProcess,
    free_port,
    require_binary,
    start_worker,
    stop_process_group,
    wait_children_ready,
)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    """A private redis-server on 127.0.0.1 and a free port; yields its URL without a database number."""
    binary = require_binary("redis-server")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}"
    finally:
        stop_process_group(process, timeout=10)


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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POCKET_TTS_", "CELERY_"))}
    env.update(
        CELERY_BROKER_URL=f"{redis_url}/0",
        POCKET_TTS_CONFIG=str(parity_dir / "config.yaml"),
        POCKET_TTS_WEIGHTS=str(parity_dir / "model.safetensors"),
        POCKET_TTS_VOICES_DIR=str(service_files.voices),
        POCKET_TTS_STORAGE_DIR=str(service_files.storage),
        POCKET_TTS_DEFAULT_VOICE=TEST_DEFAULT_VOICE,
        POCKET_TTS_NUM_THREADS="1",
        POCKET_TTS_MAX_DELIVERIES=str(TEST_MAX_DELIVERIES),
        SERVICE_TEST_HOOK_DIR=str(service_files.hooks),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), str(HOOKS_DIR), os.environ.get("PYTHONPATH")])),
    )
    return env


@pytest.fixture(scope="session")
def client_app(redis_url: str):
    """A web app's view of the service: plain Celery, JSON only, tasks sent by name."""
    from celery import Celery

    app = Celery("service-tests", broker=f"{redis_url}/0", backend=f"{redis_url}/0")
    app.conf.update(
        accept_content=["json"], result_accept_content=["json"], task_serializer="json", result_serializer="json"
    )
    return app


@pytest.fixture(scope="session")
def launch_worker(worker_env, client_app, tmp_path_factory):
    """Start workers that are stopped at the end of the session; returns a WorkerProcess once it answers ping."""
    logs_dir = tmp_path_factory.mktemp("worker-logs")
    started: list[WorkerProcess] = []

    def launch(name: str, *args: str, env: dict[str, str] | None = None, queue: str = "celery") -> WorkerProcess:
        process = start_worker({**worker_env, **(env or {})}, logs_dir, name, "-Q", queue, *args)
        worker = WorkerProcess(process, f"{name}@{socket.gethostname()}", logs_dir / f"{name}.log", queue)
        started.append(worker)
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while not client_app.control.ping(destination=[worker.node], timeout=0.5):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"worker {name} did not become ready:\n{worker.output()[-3000:]}")
        return worker

    try:
        yield launch
    finally:
        for worker in started:
            stop_process_group(worker.process)


@pytest.fixture(scope="session")
def session_worker(launch_worker, client_app) -> WorkerProcess:
    """The shared `-c 2` worker: one torch thread per child, the test hooks loaded."""
    worker = launch_worker("svc", "-c", "2", "--include", "service_test_hooks")
    wait_children_ready(worker, client_app)
    return worker


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
