"""scripts/dev_stack.py: a persistent local stack that serves jobs until Ctrl-C, then leaves nothing behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from service_helpers import REPO_ROOT, require_redis_server

from tasks.local_stack import free_port, port_is_free, stop_process_group

pytestmark = pytest.mark.service

START_TIMEOUT = 90


def test_the_dev_stack_serves_jobs_until_ctrl_c(worker_env, tmp_path):
    require_redis_server()
    port = free_port()
    env = {key: value for key, value in worker_env.items() if not key.startswith("CELERY_")}
    stack = subprocess.Popen(
        [sys.executable, "scripts/dev_stack.py", "-c", "1", "--redis-port", str(port), "--gateway-port",
         str(free_port()), "--storage-dir", str(tmp_path / "audio"), "--log-dir", str(tmp_path / "logs")],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        printed, deadline = [], time.monotonic() + START_TIMEOUT
        while not any(line.startswith("  export POCKET_TTS_STORAGE_DIR=") for line in printed):
            assert time.monotonic() < deadline and stack.poll() is None, "".join(printed) + stack.stderr.read()
            printed.append(stack.stdout.readline())
        exports = dict(line.split()[1].split("=", 1) for line in printed if line.startswith("  export "))
        assert exports["CELERY_BROKER_URL"] == f"redis://127.0.0.1:{port}/0"

        client_env = {**env, **exports}
        done = subprocess.run(
            [sys.executable, "-m", "pocket_tts", "enqueue", "Hello, dev stack.", "--wait", "--quiet"],
            cwd=REPO_ROOT, env=client_env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert Path(done.stdout.strip()).is_relative_to(tmp_path / "audio") and Path(done.stdout.strip()).is_file()

        stack.send_signal(signal.SIGINT)
        assert stack.wait(timeout=60) == 0
    finally:
        stop_process_group(stack)
    assert port_is_free(port) and stack_processes(port) == []  # redis and the workers are gone too


def stack_processes(port: int) -> list[int]:
    """Processes started for the stack on `port`: its broker URL is in their environment or command line."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and any(
                f"127.0.0.1:{port}".encode() in (entry / name).read_bytes() for name in ("environ", "cmdline")
            ):
                found.append(int(entry.name))
        except OSError:  # exited meanwhile, or not ours to read
            pass
    return found
