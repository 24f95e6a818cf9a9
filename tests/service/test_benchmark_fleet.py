"""scripts/run_local.py, benchmark_fleet.py, benchmark_gateway.py and measure_service.py end to end on the small parity checkpoint (no timing checks)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from service_helpers import REPO_ROOT, SAMPLE_RATE, require_redis_server, run_python

pytestmark = pytest.mark.service

SCRIPTS = REPO_ROOT / "scripts"
RESULT_FIELDS = {
    "mode", "processes", "threads", "precision", "jobs", "wall_s", "jobs_per_s", "audio_s", "audio_per_wall_s",
    "latency_s", "cpu_utilisation", "others_cpu_per_wall", "process_memory", "valid_outputs", "problems",
}  # fmt: skip


def run_script(name: str, *args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return run_python(env, str(SCRIPTS / name), *args, timeout=300, cwd=cwd)


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without service settings, plus `settings`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("POCKET_TTS_", "CELERY_"))}
    return {**env, **settings}


def test_run_local_prints_the_path_of_24khz_audio(parity_dir, tmp_path):
    import soundfile as sf

    require_redis_server()
    env = clean_env(
        POCKET_TTS_CONFIG=str(parity_dir / "config.yaml"),
        POCKET_TTS_WEIGHTS=str(parity_dir / "model.safetensors"),
        POCKET_TTS_VOICES_DIR=str(parity_dir),
        POCKET_TTS_DEFAULT_VOICE="voice_state.safetensors",
    )
    run = run_script("run_local.py", "Hello from a local stack.", "--storage-dir", "audio", env=env, cwd=tmp_path)

    assert run.returncode == 0, run.stderr
    path = Path(run.stdout.strip())
    assert path.is_file() and path.is_relative_to(tmp_path / "audio")
    info = sf.info(str(path))
    assert info.samplerate == SAMPLE_RATE and info.frames > 0


def test_run_local_names_the_package_when_redis_is_missing(tmp_path):
    run = run_script("run_local.py", "Hello.", env=clean_env(PATH=str(tmp_path)), cwd=tmp_path)

    assert run.returncode == 1
    assert run.stderr == "error: redis-server is not installed (Debian/Ubuntu: apt-get install redis-server)\n"


def test_benchmark_fleet_quick_json(parity_dir, tmp_path):
    require_redis_server()
    run = run_script(
        "benchmark_fleet.py", "--quick", "--json", "--parity-dir", str(parity_dir), env=clean_env(), cwd=tmp_path
    )

    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert {"cpu", "usable_cpus"} <= report["machine"].keys()
    assert (report["cores"], report["jobs"]) == (1, 4)
    assert [(row["mode"], row["processes"], row["threads"]) for row in report["results"]] == [
        ("prefork", 1, 1),
        ("batching", 1, 1),
    ]
    for row in report["results"]:
        assert RESULT_FIELDS <= row.keys()
        assert row["valid_outputs"] == 4 and row["problems"] == []
        assert row["audio_s"] > 0 and row["jobs_per_s"] > 0 and 0 < row["cpu_utilisation"]
        assert {"p50", "p95"} == row["latency_s"].keys()
        roles = [process["role"] for process in row["process_memory"]]
        assert roles == (["main", "child"] if row["mode"] == "prefork" else ["main"])
        assert all(process["pss_mib"] > 0 and process["rss_mib"] > 0 for process in row["process_memory"])
    assert "[batching 1x1 float32]" in run.stderr  # progress


def test_measure_service_quick_reports_memory_per_added_child(parity_dir, tmp_path):
    require_redis_server()
    run = run_script("measure_service.py", "--quick", "--parity-dir", str(parity_dir), env=clean_env(), cwd=tmp_path)

    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["overhead"]["jobs"] == 10 and "kill_redo" not in report
    assert [memory["voice"] for memory in report["memory"]] == ["voice_24k.safetensors", "voice_24k.wav"]
    for memory in report["memory"]:
        first, second = memory["rows"]
        assert (first["children"], len(first["children_mib"]), second["children"], len(second["children_mib"])) == (
            1, 1, 2, 2,
        )  # fmt: skip
        assert first["added_by_last_child"] is None and second["added_by_last_child"] > 0
        assert second["total_pss"] == round(second["parent"]["Pss"] + sum(c["Pss"] for c in second["children_mib"]), 1)
    assert "added by the last child" in run.stderr  # the printed table


def test_benchmark_gateway_quick_json(parity_dir, tmp_path):
    require_redis_server()
    pytest.importorskip("fastapi")
    run = run_script(
        "benchmark_gateway.py", "--quick", "--clients", "2", "--mode", "batching", "--workers", "2", "--json",
        "--parity-dir", str(parity_dir), env=clean_env(), cwd=tmp_path,
    )  # fmt: skip

    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert (report["mode"], report["workers"], report["clients"], report["streams"], report["errors"]) == (
        "batching", 2, 2, 4, []
    )
    assert report["in_process_first_chunk_ms"]["p50"] > 0 and report["gateway_ttfb_ms"]["p50"] > 0
    assert report["audio_s_per_wall_s"] > 0 and report["slowest_stream_rtf"] > 0
    assert len(report["disconnect_stop_ms"]) == 2 and report["disconnect_final_states"] == ["REVOKED"]
