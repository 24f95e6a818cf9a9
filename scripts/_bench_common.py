"""What the benchmark scripts share: checkpoints, worker processes, summaries and tables.

Every measurement runs in a fresh worker process (`_bench_worker.py`) because the
torch thread count is a per-process setting. The worker runs either our engine or,
with another interpreter, Kyutai's reference package; both are imported by the
worker only, never here.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_bench_worker.py")
THREADS_ENV = "POCKET_TTS_NUM_THREADS"

# Random weights never emit a meaningful end of speech: with an unreachable EOS
# threshold every chunk runs to its maximum length, which the text length fixes.
NEVER_EOS_THRESHOLD = 1e9
WARMUP_TEXT = "Hello there."
# A run during which other processes used more CPU than this (CPU s per wall s) is disturbed.
DISTURBED_CPU_PER_WALL = 0.2


class BenchError(RuntimeError):
    """A benchmark step failed; the message says which and why."""


def parse_threads(raw: str) -> list[int]:
    try:
        threads = [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        threads = []
    if not threads or min(threads) < 1:
        raise ValueError(f"--threads wants a comma-separated list of positive integers, got {raw!r}")
    return threads


def positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError(f"expected a positive integer, got {raw!r}")
    return value


def add_run_options(parser, default_threads: list[int]) -> None:
    """The options both benchmark scripts share."""
    defaults = ",".join(map(str, default_threads))
    parser.add_argument(
        "--threads", type=parse_threads, default=default_threads, help=f"comma-separated (default {defaults})"
    )
    parser.add_argument(
        "--iterations", type=positive_int, default=3, help="timed runs per text after one warm-up (default 3)"
    )
    parser.add_argument(
        "--wait-idle",
        action="store_true",
        help="for shared machines: start each process once the CPUs are idle, and redo runs during which "
        f"other processes used more than {DISTURBED_CPU_PER_WALL} CPU s/s",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def log(message: str) -> None:
    """Progress goes to stderr so that stdout holds only the results."""
    print(message, file=sys.stderr, flush=True)


def machine_cpu_seconds() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot; None where /proc/stat is missing."""
    try:
        first_line = Path("/proc/stat").read_text().split("\n", 1)[0]
    except OSError:
        return None
    ticks = [int(value) for value in first_line.split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    per_second = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - idle) / per_second, sum(ticks) / per_second


def wait_for_idle_cpus(min_idle: float = 0.9, window_s: float = 5.0, max_wait_s: float = 900.0) -> None:
    """Wait until the machine's CPUs were at least `min_idle` idle over `window_s` (Linux only).

    On a shared machine another process on "our" cores makes a multi-threaded run
    wait at every parallel op; starting each measurement on idle CPUs avoids most of it.
    """
    if machine_cpu_seconds() is None:
        return
    deadline = time.monotonic() + max_wait_s
    while True:
        busy_before, total_before = machine_cpu_seconds()
        time.sleep(window_s)
        busy_after, total_after = machine_cpu_seconds()
        idle = 1 - (busy_after - busy_before) / max(1e-9, total_after - total_before)
        if idle >= min_idle:
            return
        if time.monotonic() > deadline:
            log(f"CPUs still busy ({idle:.0%} idle) after {max_wait_s:.0f} s; measuring anyway")
            return
        log(f"waiting for idle CPUs ({idle:.0%} idle) ...")


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version()}


# ---------------------------------------------------------------------------
# Checkpoints and voices
# ---------------------------------------------------------------------------


def shipped_language(raw: str) -> str:
    """An argparse type: the name of a model Kyutai ships (`--language`)."""
    import argparse

    sys.path.insert(0, str(REPO_ROOT))
    from pocket_tts.catalog import check_language

    try:
        return check_language(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def random_checkpoint(checkpoint_dir: Path, layout: str | Path = "english") -> Path:
    """config.yaml of a full-size architecture with random weights in `checkpoint_dir`.

    `layout` is a shipped language name or a config YAML (any of Kyutai's layouts). An
    existing checkpoint there (config.yaml + model.safetensors) is reused as is, which also
    lets a small checkpoint stand in for the full-size one.
    """
    checkpoint_dir = checkpoint_dir.resolve()  # workers run in another directory
    config = checkpoint_dir / "config.yaml"
    if config.is_file() and (checkpoint_dir / "model.safetensors").is_file():
        log(f"reusing the checkpoint in {checkpoint_dir}")
        return config
    log(f"writing the full-size {layout} architecture with random weights to {checkpoint_dir} ...")
    sys.path.insert(0, str(REPO_ROOT))
    from pocket_tts.random_checkpoint import write_random_checkpoint

    return Path(write_random_checkpoint(checkpoint_dir, layout, seed=0))


def write_synthetic_voice(path: Path, seconds: float = 5.0, sample_rate: int = 24000) -> Path:
    """A voice prompt for models without catalog voices: harmonics under a syllable-rate envelope.

    Only its length matters for the cost of generation; it is not speech.
    """
    frames = bytearray()
    for i in range(int(seconds * sample_rate)):
        t = i / sample_rate
        pitch = 120 + 30 * math.sin(2 * math.pi * 0.5 * t)
        envelope = 0.5 + 0.5 * math.sin(2 * math.pi * 4 * t)
        value = sum(math.sin(2 * math.pi * k * pitch * t) / k for k in range(1, 6))
        frames += struct.pack("<h", int(8000 * envelope * value / 2.3))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(bytes(frames))
    return path


def kyutai_config(config: Path, weights: Path, out_dir: Path) -> Path:
    """A copy of `config` that Kyutai's loader reads the same checkpoint from.

    It resolves relative paths against its working directory and loads the weights
    named in the YAML, so the copy gets an absolute tokenizer path and `weights_path`.
    """
    import yaml

    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    lookup = raw["flow_lm"]["lookup_table"]
    tokenizer = Path(lookup["tokenizer_path"])
    if not tokenizer.is_absolute():
        lookup["tokenizer_path"] = str((config.parent / tokenizer).resolve())
    raw["weights_path"] = str(weights.resolve())
    raw.pop("weights_path_without_voice_cloning", None)
    out = out_dir / "kyutai_config.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return out


# ---------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------


def first_cpus(count: int) -> list[int]:
    """The first `count` CPUs this process may run on (all of them if there are fewer)."""
    return sorted(os.sched_getaffinity(0))[:count]


def run_worker(spec: dict, python: str = sys.executable, cwd: Path | None = None, wait_idle: bool = False) -> dict:
    """Run one `_bench_worker.py` process on `spec`; return its JSON result.

    Our engine reads the thread count from the environment at import; Kyutai's worker
    sets it through torch. Kyutai's package has our package's import name, so it runs
    from outside the repository with no PYTHONPATH pointing at it.
    """
    env = dict(os.environ)
    env.pop(THREADS_ENV, None)
    if spec["engine"] == "ours":
        env[THREADS_ENV] = str(spec["threads"])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    else:
        env.pop("PYTHONPATH", None)
    if wait_idle:
        wait_for_idle_cpus()
    completed = subprocess.run(
        [python, str(WORKER), json.dumps(spec)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        check=False,
        text=True,
    )
    if completed.returncode != 0:
        raise BenchError(f"{spec['label']} worker with {spec['threads']} thread(s) exited {completed.returncode}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    if result["torch_threads"] != spec["threads"]:
        raise BenchError(
            f"{spec['label']} worker asked for {spec['threads']} thread(s) but torch used {result['torch_threads']}"
        )
    return result


def summarize(runs: list[dict]) -> dict:
    """Median and range of the timed runs of one text."""
    wall = [run["wall_s"] for run in runs]
    audio = statistics.median(run["audio_s"] for run in runs)
    wall_median = statistics.median(wall)
    return {
        "iterations": len(runs),
        "audio_s": round(audio, 3),
        "wall_s_median": round(wall_median, 3),
        "wall_s_min": round(min(wall), 3),
        "wall_s_max": round(max(wall), 3),
        "rtf": round(audio / wall_median, 3),
        "cpu_per_wall": round(statistics.median(run["cpu_s"] / run["wall_s"] for run in runs), 2),
        # Audio per CPU second: the speed with the core to itself, on a machine where it waited for one.
        "audio_per_cpu_s": round(audio / statistics.median(run["cpu_s"] for run in runs), 3),
        "others_cpu_per_wall": _others_per_wall(runs),
        "first_chunk_s": round(statistics.median(run["first_chunk_s"] for run in runs), 4),
    }


def _others_per_wall(runs: list[dict]) -> float | None:
    if any(run["others_cpu_s"] is None for run in runs):
        return None
    return round(statistics.median(run["others_cpu_s"] / run["wall_s"] for run in runs), 2)


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, so the output can be pasted into docs as is."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells):
        return "| " + " | ".join(str(cell).ljust(width) for cell, width in zip(cells, widths)) + " |"

    return "\n".join([line(headers), line(["-" * width for width in widths]), *map(line, rows)])


def wall_cell(summary: dict) -> str:
    return f"{summary['wall_s_median']:.2f} ({summary['wall_s_min']:.2f}-{summary['wall_s_max']:.2f})"


def cpu_cells(summary: dict) -> list[str]:
    """This process's and other processes' CPU seconds per wall second."""
    others = summary["others_cpu_per_wall"]
    return [f"{summary['cpu_per_wall']:.2f}", "?" if others is None else f"{others:.2f}"]


def run_and_report(args, measure, print_table, errors: tuple = (BenchError, OSError, ValueError)) -> dict | None:
    """Measure in a scratch directory, then print the report as a table or (--json) as JSON.

    Returns the report, or None after printing one `error:` line for any of `errors`.
    """
    with tempfile.TemporaryDirectory(prefix="pocket-tts-bench-") as workdir:
        try:
            report = measure(args, Path(workdir))
        except errors as exc:
            print(f"error: {exc}", file=sys.stderr)
            return None
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return report
