"""Faults of the stack itself: Redis killed and restarted, worker main processes and batching processes
killed, a full disk, a missing storage mount, a job redelivered while its first attempt still runs.

These tests share a private redis-server with an append-only file (its data survives SIGKILL, as a
production Redis that must not lose jobs is run) and start their own workers with short time limits,
so that the visibility timeout, and with it the recovery after a killed worker, is seconds long.
Long outages and long fault storms are measured by scripts/chaos.py, not here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from service_helpers import (
    HOOKS_DIR,
    TEST_DEFAULT_VOICE,
    WORKER_START_TIMEOUT,
    job_starts,
    small_tmpfs,
    wait_for_start,
)

from tasks import local_stack
from tasks.celery_app import VISIBILITY_KEY
from tasks.client import wait_for
from tasks.leases import LEASE_TTL

pytestmark = pytest.mark.service

JOB_TIMEOUT = 90
# Hard limit 5 + 0.01 x 100 + 2 = 8 s: the visibility timeout may be 10 s.
SHORT_LIMITS = {
    "POCKET_TTS_MAX_TEXT_CHARS": "100",
    "POCKET_TTS_TIME_LIMIT_BASE": "5",
    "POCKET_TTS_TIME_LIMIT_PER_CHAR": "0.01",
    "POCKET_TTS_TIME_LIMIT_GRACE": "2",
    "POCKET_TTS_VISIBILITY_TIMEOUT": "10",
}


@pytest.fixture(scope="module")
def redis():
    from service_helpers import require_redis_server

    require_redis_server()
    with local_stack.redis_server(persistent=True) as server:
        yield server


@pytest.fixture
def app(redis):
    """A client per test: connections pooled before a Redis kill are not reused after it."""
    client = local_stack.client_app(f"{redis.url}/0")
    yield client
    client.close()


@pytest.fixture(scope="module")
def fault_env(parity_dir, service_files, redis, tmp_path_factory):
    storage = tmp_path_factory.mktemp("fault-audio")
    return local_stack.worker_env(
        f"{redis.url}/0",
        {
            "POCKET_TTS_CONFIG": str(parity_dir / "config.yaml"),
            "POCKET_TTS_WEIGHTS": str(parity_dir / "model.safetensors"),
            "POCKET_TTS_VOICES_DIR": str(service_files.voices),
            "POCKET_TTS_STORAGE_DIR": str(storage),
            "POCKET_TTS_DEFAULT_VOICE": TEST_DEFAULT_VOICE,
            "POCKET_TTS_NUM_THREADS": "1",
            "SERVICE_TEST_HOOK_DIR": str(service_files.hooks),
            **SHORT_LIMITS,
        },
        python_path=[HOOKS_DIR],
    )


@pytest.fixture
def workers(fault_env, app, redis, tmp_path):
    """start(name, *args, env=..., pool=...) -> a ready Worker; all stopped after the test.

    The workers of each test are a fleet of their own: the fleet-wide visibility timeout starts afresh.
    """
    import redis as redis_client

    with redis_client.Redis.from_url(f"{redis.url}/0") as client:
        client.delete(VISIBILITY_KEY)
    started = []

    def start(name, *args, env=None, pool="prefork", queue="celery"):
        worker = local_stack.start_worker(
            {**fault_env, **(env or {})}, tmp_path / f"{name}.log", name, "--include", "service_test_hooks", *args,
            pool=pool, queue=queue,
        )  # fmt: skip
        started.append(worker)
        worker.wait_ready(app, WORKER_START_TIMEOUT)
        return worker

    try:
        yield start
    finally:
        for worker in started:
            worker.stop()


def send(app, text: str, queue: str = "celery", **kwargs):
    return app.send_task("pocket_tts.synthesize", args=(text,), kwargs=kwargs, queue=queue)


# ---------------------------------------------------------------- Redis restarts


def test_jobs_running_through_a_redis_sigkill_finish_and_none_is_lost(redis, app, workers, service_files):
    # Limits far above the outage: a job is not cut short while its result waits for Redis.
    roomy = {"SERVICE_TEST_SLOW_SECONDS": "3", "POCKET_TTS_TIME_LIMIT_BASE": "60", "POCKET_TTS_VISIBILITY_TIMEOUT": "100"}
    workers("through-redis", "-c", "2", env=roomy)
    results = [send(app, f"SLOW job {i} through a Redis crash.") for i in range(6)]
    wait_for_start(service_files, results[0].id)

    redis.kill()  # two jobs are running, four wait in the queue
    time.sleep(3)
    redis.start()
    # The client waits on the same result handles through the outage.
    paths = [Path(wait_for(result, timeout=JOB_TIMEOUT)) for result in results]

    assert all(path.is_file() for path in paths)
    assert [len(job_starts(service_files, result.id)) for result in results] == [1] * 6  # none redone


# ---------------------------------------------------------------- killed workers


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_the_jobs_of_a_killed_worker_run_again_within_the_recovery_bound(app, workers, service_files, pool):
    env = {"SERVICE_TEST_SLOW_SECONDS": "2"}
    if pool == "threads":  # the batching process: one process runs every job
        env["POCKET_TTS_MAX_BATCH"] = "2"
    victim = workers(f"victim-{pool}", "-c", "2" if pool == "threads" else "1", env=env, pool=pool, queue=pool)
    result = send(app, "SLOW job of a worker that dies.", queue=pool)
    wait_for_start(service_files, result.id)

    os.killpg(victim.pid, signal.SIGKILL)  # the main process and its children: a container dying
    victim.process.wait(10)
    killed_at = time.time()
    workers(f"rescuer-{pool}", "-c", "1", env=env, pool=pool, queue=pool)
    path = Path(result.get(timeout=JOB_TIMEOUT))

    (_, _), (_, restarted) = job_starts(service_files, result.id)
    print(f"{pool}: job restarted {restarted - killed_at:.1f} s after its worker was killed")
    # Visibility timeout 10 s + restore sweep 10 s, or the lease of the killed attempt (20 s), + slack.
    assert restarted - killed_at < LEASE_TTL + 10
    assert path.is_file()


def test_a_worker_killed_right_after_taking_a_job_from_redis_loses_nothing(app, workers, service_files):
    # kombu's transport recorded a message as unacked only after taking it off its queue: a process
    # killed between the two lost the job (5 of 526 in a batching fault storm). The hook stops the
    # receiving process exactly there; tasks.redis_transport has made the message unacked already.
    # A batching worker, where the loss was measured; a prefork main process receives the same way.
    pool, env, queue = "threads", {"POCKET_TTS_MAX_BATCH": "2"}, "window"
    taker = workers("taker", "-c", "2", env={**env, "SERVICE_TEST_PAUSE_ON_RECEIVE": "1"}, pool=pool, queue=queue)
    result = send(app, "PAUSE job taken by a worker that dies.", queue=queue)
    received = service_files.hooks / f"{result.id}.received"
    deadline = time.monotonic() + 30
    while not received.exists():
        assert time.monotonic() < deadline, "the worker did not receive the job"
        time.sleep(0.02)
    assert int(received.read_text()) == taker.pid
    workers("rescuer", "-c", "2", env=env, pool=pool, queue=queue)

    os.killpg(taker.pid, signal.SIGKILL)
    taker.process.wait(10)
    killed_at = time.time()
    path = Path(wait_for(result, timeout=JOB_TIMEOUT))

    print(f"job done {time.time() - killed_at:.1f} s after its worker was killed")
    assert list(path.parent.glob(f"*{result.id}*")) == [path]  # stored once, no .part left


def test_a_job_never_runs_twice_at_once(app, workers, service_files):
    # The sender's own time limit lets the job run past the visibility timeout (10 s): its message
    # comes back after 10-20 s and the second worker receives it while the first attempt still runs.
    first = workers("first", "-c", "1", env={"SERVICE_TEST_SLOW_SECONDS": "30"}, queue="twice")
    result = app.send_task("pocket_tts.synthesize", args=("SLOW job that outlives the visibility timeout.",),
                           queue="twice", time_limit=60, soft_time_limit=50)  # fmt: skip
    ((child, _),) = wait_for_start(service_files, result.id)
    second = workers("second", "-c", "1", queue="twice")

    path = Path(wait_for(result, timeout=JOB_TIMEOUT))

    assert [pid for pid, _ in job_starts(service_files, result.id)] == [child]  # one attempt generated audio
    assert child in first.child_pids(app) and path.is_file()
    assert f"Task pocket_tts.synthesize[{result.id}] retry" in second.output()  # it waited for the lease


def test_every_worker_uses_the_fleets_longest_visibility_timeout(workers):
    workers("patient", "-c", "1", env={"POCKET_TTS_VISIBILITY_TIMEOUT": "40"}, queue="patient")
    hasty = workers("hasty", "-c", "1", queue="hasty")

    assert "visibility timeout 40 s (fleet-wide; ours 10 s)" in hasty.output()


# ---------------------------------------------------------------- storage


@pytest.fixture
def tiny_storage(tmp_path):
    with small_tmpfs(tmp_path / "tiny-storage", "16k") as mount:
        yield mount


def test_a_full_disk_and_a_missing_mount_fail_jobs_with_a_storage_error(app, workers, tiny_storage):
    worker = workers("tiny", "-c", "1", env={"POCKET_TTS_STORAGE_DIR": str(tiny_storage)}, queue="tiny")

    full = send(app, "A text long enough to need more than sixteen kilobytes of audio.", queue="tiny")
    full.get(timeout=JOB_TIMEOUT, propagate=False)

    assert full.state == "FAILURE" and type(full.result).__name__ == "StorageError", full.result
    assert str(full.result).endswith("No space left on device")
    assert [p for p in tiny_storage.rglob("*") if p.is_file()] == []
    assert "Exception ignored" not in worker.output()

    subprocess.run(["umount", str(tiny_storage)], check=True)
    tiny_storage.rmdir()  # the mount point is gone too: nothing may recreate it
    missing = send(app, "Nowhere to go.", queue="tiny")
    missing.get(timeout=JOB_TIMEOUT, propagate=False)

    assert missing.state == "FAILURE" and "does not exist" in str(missing.result), missing.result
    assert not tiny_storage.exists()


# ---------------------------------------------------------------- batching time limits


def test_a_batching_worker_enforces_time_limits(app, workers, fault_env):
    workers("batch-limits", "-c", "2", env={"POCKET_TTS_MAX_BATCH": "2"}, pool="threads", queue="batch-limits")
    text = "A job in a batch that may not take more than a few milliseconds."

    # 1 ms: the parity model takes ~16 ms for this text in a batch (it took ~25 before the kernels of
    # 2026-12-02, when a 20 ms limit still passed first).
    late = app.send_task("pocket_tts.synthesize", args=(text,), queue="batch-limits", soft_time_limit=0.001,
                         time_limit=10)  # fmt: skip
    late.get(timeout=JOB_TIMEOUT, propagate=False)
    on_time = send(app, "The next job is served.", queue="batch-limits")

    assert late.state == "FAILURE" and type(late.result).__name__ == "SynthesisTimeLimitError", late.result
    assert "passed its soft time limit of 0.001 s" in str(late.result)
    assert list(Path(fault_env["POCKET_TTS_STORAGE_DIR"]).rglob(f"*{late.id}*")) == []
    assert Path(wait_for(on_time, timeout=JOB_TIMEOUT)).is_file()
