"""Helpers of the worker-service tests: the service's folders, audio comparison; processes via tasks.local_stack."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tasks import local_stack

# REPO_ROOT, Worker and stop_process_group are imported from here by the tests.
from tasks.local_stack import (  # noqa: F401
    REPO_ROOT,
    StackError,
    Worker,
    redis_binary,
    stop_process_group,
)

HOOKS_DIR = Path(__file__).resolve().parent  # holds service_test_hooks.py
SAMPLE_RATE = 24000
# Decoded 16-bit audio vs the engine's float output: 1e-4 numeric slack plus two quantization steps.
AUDIO_TOLERANCE = 1e-4 + 2 / 32768
WORKER_START_TIMEOUT = 60
TEST_DEFAULT_VOICE = "voice_state.safetensors"
TEST_MAX_DELIVERIES = 2


def require_redis_server() -> None:
    """Skip the test without redis-server (fail in CI, which installs it)."""
    try:
        redis_binary()
    except StackError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@dataclass
class ServiceFiles:
    root: Path
    voices: Path
    storage: Path
    hooks: Path  # where service_test_hooks records job starts

    def files_of(self, task_id: str) -> list[Path]:
        """Everything in the storage tree that belongs to a job, temporary files included."""
        return [p for p in self.storage.rglob(f"*{task_id}*")]


def start_worker(env, logs_dir: Path, name: str, *args: str) -> subprocess.Popen:
    """A prefork worker logging to `logs_dir/<name>.log`, not waited for (tests of workers that refuse to start)."""
    return local_stack.start_worker(env, logs_dir / f"{name}.log", name, *args).process


def run_python(env, *args: str, timeout: float = 60, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """`python ARGS` in `env`, its output captured as text; never raises on a non-zero exit."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def run_until_exit(env, logs_dir: Path, name: str, *args: str) -> tuple[int, str]:
    """Start a worker that is expected to refuse to start; its exit code and log."""
    process = start_worker(env, logs_dir, name, *args)
    try:
        returncode = process.wait(timeout=60)
    finally:
        stop_process_group(process)
    return returncode, (logs_dir / f"{name}.log").read_text()


def wait_children_ready(worker: Worker, client_app, timeout: float = WORKER_START_TIMEOUT) -> dict[int, dict]:
    """worker_info of every child of `worker`, once each has loaded its model."""
    return worker.wait_children_ready(client_app, timeout)


def assert_audio_matches(path: Path, expected: np.ndarray) -> None:
    """`path` is mono 24 kHz 16-bit audio equal to `expected` up to quantization."""
    import soundfile as sf

    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16"), info
    decoded = sf.read(str(path), dtype="int16")[0].astype(np.float64) / 32767
    assert decoded.shape == expected.shape
    assert np.max(np.abs(decoded - np.clip(expected, -1, 1))) <= AUDIO_TOLERANCE


def job_starts(service_files: ServiceFiles, task_id: str) -> list[tuple[int, float]]:
    """(pid, time) of each start of a SLOW job, as recorded by service_test_hooks."""
    starts = service_files.hooks / f"{task_id}.starts"
    if not starts.exists():
        return []
    return [(int(pid), float(when)) for pid, when in (line.split() for line in starts.read_text().splitlines())]


def wait_for_start(service_files: ServiceFiles, task_id: str, count: int = 1, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while len(starts := job_starts(service_files, task_id)) < count:
        assert time.monotonic() < deadline, f"job {task_id} did not start {count} time(s)"
        time.sleep(0.02)
    return starts


@contextmanager
def small_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "64k") mounted at `mount` (needs root: skips otherwise), unmounted afterwards."""
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
