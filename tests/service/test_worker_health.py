"""Workers are healthy or down: a model or default voice that cannot load stops the worker at start
with one line; the healthcheck asks the main process; the thread budget holds when the pool is grown."""

from __future__ import annotations

import subprocess

import pytest
from service_helpers import run_python, run_until_exit

from tasks.local_stack import free_port
from worker_config import usable_cpus

pytestmark = pytest.mark.service

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@pytest.fixture
def unreachable_hub_env(worker_env, tmp_path) -> dict[str, str]:
    """The official English model from a hub that refuses connections, with an empty cache."""
    env = {key: value for key, value in worker_env.items() if key not in PROXY_VARIABLES}
    return {
        **env,
        "POCKET_TTS_CONFIG": "",
        "POCKET_TTS_WEIGHTS": "",
        "POCKET_TTS_LANGUAGE": "english",
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "HF_HOME": str(tmp_path / "hf-home"),
    }


def critical_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "CRITICAL" in line]


def test_an_unreachable_hub_stops_the_worker_at_once_naming_the_fixes(unreachable_hub_env, tmp_path):
    # Before: the failure was logged after ~24 s of hub retries and the worker reported ready anyway.
    returncode, log = run_until_exit(unreachable_hub_env, tmp_path, "no-hub", "-c", "1")

    assert returncode == 78, log
    (line,) = critical_lines(log)
    assert "the model (language=english) could not be loaded" in line and "cannot be reached" in line
    for fix in ("POCKET_TTS_CONFIG", "HF_HUB_OFFLINE=1", "POCKET_TTS_START_WITHOUT_MODEL=1"):
        assert fix in line
    assert "Traceback" not in log


def test_a_default_voice_that_cannot_load_stops_the_worker(worker_env, tmp_path):
    returncode, log = run_until_exit({**worker_env, "POCKET_TTS_DEFAULT_VOICE": "nobody.wav"}, tmp_path, "bad-voice")

    assert returncode == 78, log
    (line,) = critical_lines(log)
    assert "default voice 'nobody.wav' (POCKET_TTS_DEFAULT_VOICE) cannot be used" in line


def healthcheck(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return run_python(env, "-m", "tasks.healthcheck", *args)


def test_the_healthcheck_needs_an_answer_and_a_loaded_model(session_worker, worker_env, launch_worker):
    healthy = healthcheck(worker_env, session_worker.node)
    assert (healthy.returncode, healthy.stdout.split(":")[0]) == (0, "healthy"), healthy.stdout + healthy.stderr
    assert "model loaded: config=" in healthy.stdout

    absent = healthcheck(worker_env, "celery@no-such-worker")
    assert absent.returncode == 1 and "celery@no-such-worker did not answer" in absent.stdout


def test_an_opted_in_worker_without_its_model_runs_but_is_unhealthy(unreachable_hub_env, launch_worker):
    worker = launch_worker(
        "no-model", "-c", "1", queue="no-model", env={**unreachable_hub_env, "POCKET_TTS_START_WITHOUT_MODEL": "1"}
    )
    try:
        result = healthcheck(unreachable_hub_env, worker.node)
    finally:
        worker.stop()

    assert result.returncode == 1 and result.stdout == f"unhealthy: {worker.node}: model not loaded\n", result.stdout


def test_growing_the_pool_past_the_thread_budget_is_refused(session_worker, client_app):
    cpus = usable_cpus().count
    node = session_worker.node
    before = len(session_worker.child_pids(client_app))

    (grow,) = client_app.control.pool_grow(n=cpus, reply=True, destination=[node])
    (scale,) = client_app.control.autoscale(max=cpus + 1, min=1, reply=True, destination=[node])

    assert grow[node]["error"].startswith(f"refusing a pool of {before + cpus}: concurrency {before + cpus} x 1")
    assert scale[node]["error"].startswith(f"refusing a pool of {cpus + 1}")
    assert "POCKET_TTS_ALLOW_OVERSUBSCRIBE" in grow[node]["error"]
    assert len(session_worker.child_pids(client_app)) == before


def test_autoscale_past_the_budget_is_refused_at_start(worker_env, tmp_path):
    cpus = usable_cpus().count
    returncode, log = run_until_exit(worker_env, tmp_path, "autoscale", f"--autoscale={cpus + 1},1")

    assert returncode == 78 and f"concurrency {cpus + 1} x 1" in log, log


def test_run_local_without_network_fails_fast_naming_the_ways_out(unreachable_hub_env, tmp_path):
    # Before: 77 s, and nothing said how to use local files.
    env = {key: value for key, value in unreachable_hub_env.items() if not key.startswith("POCKET_TTS_")}
    run = run_python(env, "scripts/run_local.py", "Hello.", "--storage-dir", str(tmp_path / "audio"))

    assert run.returncode == 1, run.stderr
    error, hint = run.stderr.splitlines()[-2:]
    assert error.startswith("error: the model (language=english) could not be loaded") and "POCKET_TTS_CONFIG" in error
    assert "--random-weights" in hint
