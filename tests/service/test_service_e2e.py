"""End to end: real redis-server, real `celery -A tasks worker --pool=prefork` subprocesses.

The checkpoint is the small random-weight one in the official layout: its
audio is noise, never speech; the tests compare it with the in-process engine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from service_helpers import (
    REPO_ROOT,
    TEST_MAX_DELIVERIES,
    assert_audio_matches,
    job_starts,
    run_until_exit,
    wait_children_ready,
    wait_for_start,
)

pytestmark = pytest.mark.service

JOB_TIMEOUT = 60


def run_job(client_app, text, **kwargs):
    """Send `pocket_tts.synthesize` by name, as a web app without this package would; wait for the end."""
    result = client_app.send_task("pocket_tts.synthesize", args=(text,), kwargs=kwargs)
    result.get(timeout=JOB_TIMEOUT, propagate=False)
    return result


@pytest.mark.parametrize(
    "text, options",
    [
        ("Hello from the worker.", {"temperature": 0}),
        ("A second voice, given as a wav file.", {"voice": "voice_24k.wav", "temperature": 0}),
        ("Flac on request.", {"format": "flac", "temperature": 0.0}),
    ],
)
def test_jobs_complete_with_the_engines_audio(
    session_worker, client_app, service_files, reference_audio, text, options
):
    result = run_job(client_app, text, **options)

    assert result.state == "SUCCESS", result.result
    path = Path(result.result)
    fmt = options.get("format", "wav")
    assert path.name == f"{result.id}.{fmt}"
    assert path.parent.parent.parent == service_files.storage  # two shard levels
    assert path.is_file() and not list(path.parent.glob(".*.part"))
    assert_audio_matches(path, reference_audio(text, options.get("voice", "voice_state.safetensors")))


def test_ogg_is_valid_24khz_audio(session_worker, client_app, reference_audio):
    import soundfile as sf

    result = run_job(client_app, "Vorbis too.", format="ogg", temperature=0)

    assert result.state == "SUCCESS", result.result
    samples, rate = sf.read(result.result)
    assert rate == 24000 and abs(len(samples) - len(reference_audio("Vorbis too."))) < 2048


def test_every_child_uses_exactly_the_thread_budget(session_worker, client_app):
    reports = wait_children_ready(session_worker, client_app)

    assert len(reports) == 2
    for report in reports.values():
        assert report["torch_threads"] == 1 and report["interop_threads"] == 1, report
        assert report["ready"] and "config.yaml" in report["model"]
    # The parent loads the model once, after pinning OpenMP to one thread; the children inherit it.
    log = session_worker.output()
    assert "torch was imported before" not in log
    assert log.count("pocket-tts model ready in process") == 1
    assert f"pocket-tts model ready in process {session_worker.pid}:" in log
    assert "pocket-tts thread budget: concurrency 2 x 1 torch thread(s) per child" in session_worker.output()


def test_two_threads_per_child_do_not_hang(launch_worker, client_app, reference_audio):
    from worker_config import usable_cpus

    if usable_cpus().count < 2:
        pytest.skip("needs 2 usable CPUs")
    worker = launch_worker("threads2", "-c", "1", queue="threads2", env={"POCKET_TTS_NUM_THREADS": "2"})
    (report,) = wait_children_ready(worker, client_app).values()
    assert (report["torch_threads"], report["interop_threads"]) == (2, 1)

    result = client_app.send_task("pocket_tts.synthesize", args=("Two threads.", None, 0), queue="threads2")
    assert_audio_matches(Path(result.get(timeout=JOB_TIMEOUT)), reference_audio("Two threads."))


def test_a_sigkilled_childs_job_is_redone(session_worker, client_app, service_files, reference_audio):
    text = "SLOW job whose process gets killed."
    result = client_app.send_task("pocket_tts.synthesize", args=(text,), kwargs={"temperature": 0})
    ((victim, _),) = wait_for_start(service_files, result.id)

    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    path = result.get(timeout=JOB_TIMEOUT)

    (_, first), (rescuer, second) = job_starts(service_files, result.id)
    assert rescuer != victim
    print(f"killed job restarted {second - killed_at:.2f} s after SIGKILL")
    assert_audio_matches(Path(path), reference_audio(text))


def test_a_job_that_keeps_killing_its_child_fails_after_the_delivery_cap(session_worker, client_app, service_files):
    result = run_job(client_app, "CRASH the child, every time.")

    assert result.state == "FAILURE"
    assert type(result.result).__name__ == "RedeliveryLimitError"
    assert f"delivered {TEST_MAX_DELIVERIES + 1} times" in str(result.result)
    assert service_files.files_of(result.id) == []


@pytest.mark.parametrize(
    "text, options, message",
    [
        ("", {}, "text is empty"),
        ("   ", {}, "text is empty"),
        ("x" * 1001, {}, "text is 1001 characters long; the limit is 1000"),
        ("Hi.", {"voice": "nobody"}, "unknown voice 'nobody'"),
        ("Hi.", {"voice": "../voices/voice_24k.wav"}, "not a path out of it"),
        ("Hi.", {"voice": "/etc/passwd"}, "not a path out of it"),
        ("Hi.", {"voice": "escape.wav"}, "resolves outside the voices directory"),
        ("Hi.", {"format": "mp3"}, "format 'mp3' is not supported"),
        ("Hi.", {"temperature": -0.5}, "temperature must be between 0 and 2"),
        ("Hi.", {"temperature": "hot"}, "temperature must be a number"),
    ],
)
def test_bad_inputs_fail_clearly_and_leave_no_file(session_worker, client_app, service_files, text, options, message):
    escape = service_files.voices / "escape.wav"
    if not escape.is_symlink():
        escape.symlink_to(service_files.root / "outside.wav")
        (service_files.root / "outside.wav").write_bytes(b"RIFF")

    result = run_job(client_app, text, **options)

    assert result.state == "FAILURE"
    assert type(result.result).__name__ == "InvalidJobError"
    assert message in str(result.result) and "\n" not in str(result.result)
    assert service_files.files_of(result.id) == []


def test_oversubscribed_worker_refuses_to_start(worker_env, tmp_path):
    from worker_config import usable_cpus

    cpus = usable_cpus().count
    returncode, output = run_until_exit(worker_env, tmp_path, "oversubscribed", "-c", str(cpus + 1))

    assert returncode == 78, output
    assert (
        f"refusing to start an oversubscribed worker: concurrency {cpus + 1} x 1 torch thread(s) per child "
        f"= {cpus + 1} threads on {cpus} usable CPUs" in output
    )
    assert "POCKET_TTS_ALLOW_OVERSUBSCRIBE=1" in output


def test_warm_shutdown_hands_the_running_job_back(launch_worker, session_worker, client_app, service_files):
    leaving = launch_worker(
        "leaving",
        "-c",
        "1",
        "--include",
        "service_test_hooks",
        queue="handback",
        env={"REMAP_SIGTERM": "SIGQUIT", "POCKET_TTS_SOFT_SHUTDOWN_TIMEOUT": "1", "SERVICE_TEST_SLOW_SECONDS": "30"},
    )
    result = client_app.send_task("pocket_tts.synthesize", args=("SLOW job at shutdown.",), queue="handback")
    ((first_pid, _),) = wait_for_start(service_files, result.id)

    os.kill(leaving.pid, signal.SIGTERM)  # what `docker compose stop` sends
    assert leaving.process.wait(timeout=30) is not None
    client_app.control.add_consumer("handback", destination=[session_worker.node], reply=True)
    try:
        path = result.get(timeout=JOB_TIMEOUT)
    finally:
        client_app.control.cancel_consumer("handback", destination=[session_worker.node], reply=True)

    (_, _), (second_pid, _) = job_starts(service_files, result.id)
    assert second_pid in session_worker.child_pids(client_app) and Path(path).is_file()
    assert "Initiating Soft Shutdown, terminating in 1" in leaving.output()


def test_enqueue_client_without_torch(session_worker, worker_env, service_files):
    script = (
        "import sys\n"
        "from tasks.client import JobFailedError, enqueue\n"
        "job_id = enqueue('From the command line.')\n"
        "path = enqueue('From the command line.', voice='voice_24k.wav', wait=True, timeout=60)\n"
        "try:\n"
        "    enqueue('Hi.', voice='nobody', wait=True, timeout=60)\n"
        "except JobFailedError as exc:\n"
        "    print('failed:', exc)\n"
        "assert 'torch' not in sys.modules\n"
        "print(job_id)\n"
        "print(path)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=worker_env, capture_output=True, text=True, timeout=120
    )

    assert run.returncode == 0, run.stderr
    failure, job_id, path = run.stdout.splitlines()
    assert "InvalidJobError: unknown voice 'nobody'" in failure
    assert len(job_id) == 36 and Path(path).is_file() and Path(path).is_relative_to(service_files.storage)


def test_time_limits_computed_from_the_text_are_enforced(launch_worker, client_app, service_files):
    limits = {"POCKET_TTS_TIME_LIMIT_BASE": "1", "POCKET_TTS_TIME_LIMIT_PER_CHAR": "0.01"}
    launch_worker("limits", "-c", "1", "--include", "service_test_hooks", queue="limits", env=limits)
    text = "SLOW job that outlives its limit."  # 33 characters: soft limit 1.33 s, the hook sleeps 3 s

    result = client_app.send_task("pocket_tts.synthesize", args=(text,), queue="limits")
    result.get(timeout=JOB_TIMEOUT, propagate=False)

    assert result.state == "FAILURE" and type(result.result).__name__ == "SynthesisTimeLimitError"
    assert "synthesis of 33 characters passed its soft time limit of 1.33 s" in str(result.result)
    assert service_files.files_of(result.id) == []


def test_time_limits_set_by_the_sender_win(session_worker, client_app, service_files):
    result = client_app.send_task(
        "pocket_tts.synthesize", args=("SLOW job with its own limit.",), soft_time_limit=0.5, time_limit=20
    )
    result.get(timeout=JOB_TIMEOUT, propagate=False)

    assert result.state == "FAILURE" and "passed its soft time limit of 0.5 s" in str(result.result)
    assert service_files.files_of(result.id) == []


def test_batching_worker_generates_concurrent_jobs_together(batching_worker, client_app, reference_audio):
    """--pool=threads with POCKET_TTS_MAX_BATCH: one process, one generation loop, each job its own result."""
    worker = batching_worker
    texts = ["First job in the batch.", "Second one, a little longer than the first.", "Third.", "Fourth job here.",
             "Fifth waits for a free row."]  # fmt: skip
    results = [
        client_app.send_task("pocket_tts.synthesize", args=(text,), kwargs={"temperature": 0}, queue="batched")
        for text in texts
    ]
    for text, result in zip(texts, results):
        assert_audio_matches(Path(result.get(timeout=JOB_TIMEOUT)), reference_audio(text))
    info = client_app.send_task("pocket_tts.worker_info", queue="batched").get(timeout=JOB_TIMEOUT)
    assert info["pid"] == worker.pid and info["ready"]  # the main process ran every job
    output = worker.output()
    assert "concurrency 1 x 1 torch thread(s) per child" in output  # pool threads are not CPU budget


def test_batching_needs_the_threads_pool(worker_env, tmp_path):
    returncode, output = run_until_exit({**worker_env, "POCKET_TTS_MAX_BATCH": "4"}, tmp_path, "batch-prefork", "-c", "1")
    assert returncode == 78, output
    assert "start the worker with --pool=threads" in output
