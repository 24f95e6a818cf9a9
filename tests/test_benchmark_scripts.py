"""The benchmark scripts in their smallest setting on the parity checkpoint (no timing checks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = REPO_ROOT / "scripts"
KYUTAI_PYTHON = Path(os.environ.get("KYUTAI_PYTHON", "/work/kyutai-venv/bin/python"))
SUMMARY_FIELDS = {
    "threads",
    "iterations",
    "audio_s",
    "wall_s_median",
    "wall_s_min",
    "wall_s_max",
    "rtf",
    "first_chunk_s",
    "cpu_per_wall",
    "others_cpu_per_wall",
    "audio_per_cpu_s",
}


def run_script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "POCKET_TTS_NUM_THREADS"}
    return subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=300, check=False,
    )  # fmt: skip


def test_benchmark_engine_writes_the_layout_of_a_config(parity_dir, tmp_path):
    """--config: random weights in another family's layout (here the 7M drifting one, reduced)."""
    config = parity_dir / "families" / "tiny_drifting" / "config.yaml"
    if not config.is_file():
        pytest.skip("family fixtures not found")
    result = run_script(
        "benchmark_engine.py", "--config", str(config), "--checkpoint-dir", str(tmp_path / "ckpt"), "--threads", "1",
        "--iterations", "1", "--json", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)["results"]
    assert row["audio_s"] > 0 and row["audio_per_cpu_s"] > 0
    written = (tmp_path / "ckpt" / "config.yaml").read_text()
    assert "type: drifting" in written and "num_kv_heads: 2" in written


def test_benchmark_engine_json_on_a_given_checkpoint(parity_dir, tmp_path):
    result = run_script(
        "benchmark_engine.py", "--checkpoint-dir", str(parity_dir), "--threads", "1", "--iterations", "1", "--json",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["checkpoint"] == str(parity_dir.resolve() / "config.yaml")
    assert {"cpu", "cpus"} <= report["machine"].keys()
    assert [(row["engine"], row["threads"]) for row in report["results"]] == [("ours float32", 1)]
    for row in report["results"]:
        assert SUMMARY_FIELDS <= row.keys()
        assert row["audio_s"] > 0 and row["rtf"] > 0 and row["first_chunk_s"] > 0
    assert "[ours float32, 1 thread(s)] utterance 1/1" in result.stderr  # progress


@pytest.mark.skipif(not KYUTAI_PYTHON.is_file(), reason="Kyutai's reference package is not installed here")
def test_benchmark_engine_side_by_side_with_kyutai(parity_dir, tmp_path):
    result = run_script(
        "benchmark_engine.py", "--checkpoint-dir", str(parity_dir), "--threads", "1", "--iterations", "1",
        "--kyutai-python", str(KYUTAI_PYTHON), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "xRT ours/this" in lines[1] and "first chunk ours/this" in lines[1]
    engines = [line.split("|")[2].strip() for line in lines[3:]]
    assert engines == ["ours float32", "kyutai float32"]
    # Same checkpoint, same text, fixed length: both engines produce the same audio length.
    assert len({line.split("|")[3] for line in lines[3:]}) == 1


def test_benchmark_threads_json_on_a_small_checkpoint(parity_dir, tmp_path):
    result = run_script(
        "benchmark_threads.py", "--config", str(parity_dir / "config.yaml"),
        "--weights", str(parity_dir / "model.safetensors"), "--voice", str(parity_dir / "voice_24k.wav"),
        "--threads", "1,2", "--texts", "short,long", "--iterations", "1", "--json", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [(row["threads"], row["text"]) for row in report["results"]] == [
        (1, "short"), (1, "long"), (2, "short"), (2, "long"),
    ]  # fmt: skip
    for row in report["results"]:
        assert SUMMARY_FIELDS <= row.keys()
        assert row["audio_s"] > 0 and row["rtf"] > 0
    assert "2 thread(s): fresh process" in result.stderr


def test_benchmark_threads_table_with_a_synthetic_voice(parity_dir, tmp_path):
    result = run_script(
        "benchmark_threads.py", "--config", str(parity_dir / "config.yaml"),
        "--weights", str(parity_dir / "model.safetensors"), "--threads", "1", "--iterations", "1", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("machine: ")
    assert [cell.strip() for cell in lines[1].split("|")[1:-1]] == [
        "threads", "text", "audio s", "generation s median (min-max)", "RTF", "first chunk s", "CPU s/s",
        "others CPU s/s",
    ]  # fmt: skip
    assert [line.split("|")[2].strip() for line in lines[3:]] == ["short", "medium", "long"]


def test_benchmark_threads_rejects_a_bad_thread_list(tmp_path):
    result = run_script("benchmark_threads.py", "--threads", "1,zero", cwd=tmp_path)
    assert result.returncode == 2
    assert "--threads" in result.stderr


@pytest.mark.parametrize("script", ["benchmark_engine.py", "benchmark_fleet.py"])
def test_benchmarks_take_a_shipped_model_name(script, tmp_path):
    result = run_script(script, "--language", "klingon", cwd=tmp_path)

    assert result.returncode == 2
    assert "argument --language: unknown language 'klingon'; available: dutch, dutch_24l, english," in result.stderr
