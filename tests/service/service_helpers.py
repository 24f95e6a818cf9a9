"""Helpers of the worker-service tests: process control, the service's folders, audio comparison."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
HOOKS_DIR = Path(__file__).resolve().parent  # holds service_test_hooks.py
SAMPLE_RATE = 24000
# Decoded 16-bit audio vs the engine's float output: 1e-4 numeric slack plus two quantization steps.
AUDIO_TOLERANCE = 1e-4 + 2 / 32768
WORKER_START_TIMEOUT = 60
WORKER_STOP_TIMEOUT = 20
TEST_DEFAULT_VOICE = "voice_state.safetensors"
TEST_MAX_DELIVERIES = 2


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian: apt-get install redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(process: subprocess.Popen, timeout: float = WORKER_STOP_TIMEOUT) -> None:
    """SIGTERM the process group, SIGKILL it if still alive after `timeout` seconds."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    except ProcessLookupError:
        pass
    finally:
        # Children of a SIGKILLed parent may still be around.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class ServiceFiles:
    root: Path
    voices: Path
    storage: Path
    hooks: Path  # where service_test_hooks records job starts

    def files_of(self, task_id: str) -> list[Path]:
        """Everything in the storage tree that belongs to a job, temporary files included."""
        return [p for p in self.storage.rglob(f"*{task_id}*")]


@dataclass
class WorkerProcess:
    """One `celery -A tasks worker` subprocess in its own process group."""

    process: subprocess.Popen
    node: str
    log: Path
    queue: str = "celery"
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def child_pids(self, client_app) -> list[int]:
        stats = client_app.control.inspect(destination=[self.node], timeout=5).stats() or {}
        return stats[self.node]["pool"]["processes"]


def start_worker(env, logs_dir: Path, name: str, *args: str) -> subprocess.Popen:
    log = logs_dir / f"{name}.log"
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool=prefork", "-n", f"{name}@%h",
             "--loglevel=INFO", "--without-mingle", "--without-gossip", *args],  # fmt: skip
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_children_ready(worker: WorkerProcess, client_app, timeout: float = WORKER_START_TIMEOUT) -> dict[int, dict]:
    """worker_info of every child of `worker`, once each has loaded its model."""
    from celery import group

    children = set(worker.child_pids(client_app))
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    info = client_app.signature("pocket_tts.worker_info", options={"queue": worker.queue})
    while not children <= {pid for pid, report in seen.items() if report["ready"]}:
        if time.monotonic() > deadline:
            pytest.fail(f"children {children} not all ready; reports: {seen}\n{worker.output()[-3000:]}")
        # Sent as a group so that the pool hands them to several idle children at once.
        for report in group(info.clone() for _ in range(4 * len(children))).apply_async().get(timeout=30):
            seen[report["pid"]] = report
        children = set(worker.child_pids(client_app))
    return {pid: seen[pid] for pid in children}


def assert_audio_matches(path: Path, expected: np.ndarray) -> None:
    """`path` is mono 24 kHz 16-bit audio equal to `expected` up to quantization."""
    import soundfile as sf

    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16"), info
    decoded = sf.read(str(path), dtype="int16")[0].astype(np.float64) / 32767
    assert decoded.shape == expected.shape
    assert np.max(np.abs(decoded - np.clip(expected, -1, 1))) <= AUDIO_TOLERANCE

