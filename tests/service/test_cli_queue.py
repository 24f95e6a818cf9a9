"""`pocket-tts enqueue` and `pocket-tts jobs` against a real redis-server and worker: one-line errors, job states."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
from service_helpers import run_python

from tasks.local_stack import free_port, redis_server

pytestmark = pytest.mark.service

# Celery retries a dead broker for ~20 s: a command still running after this has not failed fast.
FAST_FAILURE_BOUND = 10


def pocket_tts(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return run_python(env, "-m", "pocket_tts", *args, timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ")
    return line


@pytest.fixture
def idle_queue_env(worker_env, redis_url) -> dict[str, str]:
    """A client on a Redis database no worker listens to: jobs stay queued."""
    return {**worker_env, "CELERY_BROKER_URL": f"{redis_url}/7", "CELERY_RESULT_BACKEND": f"{redis_url}/7"}


def test_unreachable_broker_fails_fast_naming_the_url_and_the_variable(worker_env):
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    env = {**worker_env, "CELERY_BROKER_URL": url, "CELERY_RESULT_BACKEND": ""}

    line = one_error_line(pocket_tts(env, "enqueue", "Hello.", timeout=FAST_FAILURE_BOUND))

    assert url.replace("s3cret", "**") in line and "CELERY_BROKER_URL" in line and "s3cret" not in line


@pytest.mark.parametrize(
    ("url", "fragment"),
    [("notaurl", "is not a URL"), ("http://localhost/0", "unknown transport 'http'"), ("redis://h:99999/0", "port")],
)
def test_a_bad_broker_url_is_one_line(worker_env, url, fragment):
    line = one_error_line(pocket_tts({**worker_env, "CELERY_BROKER_URL": url}, "enqueue", "Hello."))

    assert "CELERY_BROKER_URL" in line and fragment in line


def test_waiting_past_the_timeout_ends_cleanly_and_the_job_stays_queued(idle_queue_env):
    line = one_error_line(pocket_tts(idle_queue_env, "enqueue", "Nobody takes this.", "--wait", "--timeout", "1"))
    job_id = line.split("job ")[1].split()[0]

    assert "did not finish within 1 s; it is still pending" in line  # one line: no AsyncResult.__del__ traceback
    status = pocket_tts(idle_queue_env, "jobs", job_id)
    assert (status.returncode, status.stdout) == (0, f"{job_id}: queued: waiting for a free worker\n"), status.stderr


def test_unknown_job_ids_say_so(idle_queue_env):
    job_id = str(uuid.uuid4())

    line = one_error_line(pocket_tts(idle_queue_env, "jobs", job_id))

    assert line == f"error: no such job (never sent, or its result expired): {job_id}"


def test_finished_and_failed_jobs(session_worker, worker_env, service_files):
    done = pocket_tts(worker_env, "enqueue", "From the command line.", "--wait", "--quiet")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    path = Path(done.stdout.strip())
    assert path.is_file() and path.is_relative_to(service_files.storage)

    failed = one_error_line(pocket_tts(worker_env, "enqueue", "Hi.", "--voice", "nobody", "--wait"))
    assert " failed: InvalidJobError: unknown voice 'nobody'" in failed and "could not enqueue" not in failed

    failed_id = failed.split("job ")[1].split()[0]
    status = pocket_tts(worker_env, "jobs", path.stem, failed_id)
    succeeded_line, failed_line = status.stdout.splitlines()
    assert succeeded_line == f"{path.stem}: succeeded: {path}"
    assert failed_line.startswith(f"{failed_id}: failed: InvalidJobError: unknown voice 'nobody'")


def test_a_seeded_job_from_the_command_line_is_reproducible(session_worker, worker_env):
    paths = [
        pocket_tts(worker_env, "enqueue", "Same again.", "--temperature", "0.9", "--seed", "5", "--wait", "--quiet")
        for _ in range(2)
    ]
    assert all(p.returncode == 0 for p in paths), [p.stderr for p in paths]
    first, second = (Path(p.stdout.strip()) for p in paths)
    assert first != second and first.read_bytes() == second.read_bytes()

    usage = pocket_tts(worker_env, "enqueue", "Hi.", "--seed", "-1")
    assert (usage.returncode, usage.stderr) == (2, "error: argument --seed: expected an integer from 0 to 2**64-1, got '-1'\n")


def test_the_redis_password_can_come_from_a_file(worker_env, tmp_path):
    secret = tmp_path / "redis_password"
    secret.write_text("s3cret\n")
    with redis_server(password="s3cret") as redis:
        env = {**worker_env, "CELERY_BROKER_URL": f"{redis.url}/0", "CELERY_RESULT_BACKEND": ""}

        refused = one_error_line(pocket_tts(env, "enqueue", "Hello."))
        sent = pocket_tts({**env, "REDIS_PASSWORD_FILE": str(secret)}, "enqueue", "Hello.")
        status = pocket_tts({**env, "REDIS_PASSWORD_FILE": str(secret)}, "jobs", sent.stdout.strip())

    assert "Authentication required" in refused and "CELERY_BROKER_URL" in refused
    assert sent.returncode == 0, sent.stderr
    assert status.stdout.endswith(": queued: waiting for a free worker\n"), status.stderr
