#!/usr/bin/env python
"""Throughput of the worker service through the queue, for every way to split a core budget among workers.

    python scripts/benchmark_fleet.py                              # full-size random weights, float32
    python scripts/benchmark_fleet.py --language english_18m_2026-10   # another shipped layout, random weights
    python scripts/benchmark_fleet.py --precision float32,int8 --json
    python scripts/benchmark_fleet.py --modes batching --processes 2   # only the batching 2 x 1 split of 2 cores
    python scripts/benchmark_fleet.py --config m/config.yaml --weights m/model.safetensors --voice m/voice.wav
    python scripts/benchmark_fleet.py --quick                      # small parity checkpoint: a smoke test

Starts a private redis-server on loopback (or uses CELERY_BROKER_URL when set) and, for each split
of `--cores`, real `celery -A tasks worker` processes consuming a private queue:

* prefork C x T: one worker `--pool=prefork -c C`, POCKET_TTS_NUM_THREADS=T, for the 1 x 1
  baseline and every C x T == cores;
* batching P x T: P workers `--pool=threads -c B` with POCKET_TTS_MAX_BATCH=B and T threads each,
  for every P x T == cores.

Each split gets a warm-up, then the same `--jobs` medium texts enqueued all at once. Reported: jobs/s,
audio seconds per wall second (x real time), p50/p95 latency from enqueue to stored result, CPU
utilisation (CPU time of the worker processes from /proc / wall / cores), RSS and PSS of every worker
process after the run (/proc/<pid>/smaps_rollup), and whether every output file is 24 kHz audio
with samples. Progress goes to stderr; exit code 1 when a job failed or an output is invalid.

Random weights make noise, never speech. Their checkpoint has an unreachable EOS threshold, so each
job runs to the longest audio its text allows, the same in every split.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import _bench_common as bench
from measure_service import percentile
from run_local import default_cache_dir, random_weights_checkpoint

from tasks.local_stack import (
    REPO_ROOT,
    StackError,
    Worker,
    client_app,
    cpu_seconds,
    group_pids,
    memory_mib,
    redis_server,
    running_worker,
    worker_env,
)
from worker_config import usable_cpus

SAMPLE_RATE = 24000
# 11-14 s of audio each with the random checkpoint (the longest its token counts allow).
MEDIUM_TEXTS = [
    "She sells sea shells by the sea shore.",
    "Our train leaves at half past seven tonight.",
    "Please bring your umbrella, it may rain later.",
    "Thank you for calling, how can I help?",
]
SHORT_TEXTS = ["Hello there.", "Good morning.", "See you soon.", "Thank you."]
WARMUP_TEXT = "Warm up."
JOB_TIMEOUT = 1800
MAX_REDOS = 2  # with --wait-idle: measurements repeated while other processes disturbed them


@dataclass(frozen=True)
class Split:
    mode: str  # "prefork" or "batching"
    processes: int  # prefork children, or batching worker processes
    threads: int  # torch threads per process
    precision: str

    @property
    def label(self) -> str:
        return f"{self.mode} {self.processes}x{self.threads} {self.precision}"


def splits_of(cores: int, precisions: list[str], modes: list[str]) -> list[Split]:
    pairs = [(p, cores // p) for p in range(1, cores + 1) if cores % p == 0]
    shapes = {"prefork": sorted({(1, 1), *pairs}), "batching": pairs}  # prefork also gets the 1 x 1 baseline
    return [Split(mode, p, t, precision) for precision in precisions for mode in modes for p, t in shapes[mode]]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--config", type=Path, help="a model config .yaml (default: full-size random weights)")
    model.add_argument("--quick", action="store_true", help="small parity checkpoint, few short jobs, two splits")
    model.add_argument(
        "--language",
        type=bench.shipped_language,
        help="random weights in this shipped model's full-size architecture (default: english)",
    )
    parser.add_argument("--weights", type=Path, help="model .safetensors for --config")
    parser.add_argument("--voice", help="voice file or catalog name (default: a synthetic prompt)")
    parser.add_argument(
        "--parity-dir",
        type=Path,
        default=Path(os.environ.get("POCKET_TTS_PARITY_DIR") or REPO_ROOT.parent / "shared" / "parity"),
        help="with --quick",
    )
    parser.add_argument("--cache-dir", type=Path, help="random checkpoint's folder (default: one per --language)")
    parser.add_argument("--cores", type=bench.positive_int, help="core budget (default: usable CPUs; 1 with --quick)")
    parser.add_argument("--batch", type=bench.positive_int, help="POCKET_TTS_MAX_BATCH (default 16; 4 with --quick)")
    parser.add_argument("--jobs", type=bench.positive_int, help="jobs per split (default 48; 4 with --quick)")
    parser.add_argument("--precision", default="float32", help="comma-separated: float32, bfloat16, int8")
    parser.add_argument(
        "--decoder-precision", default="float32", help="POCKET_TTS_DECODER_PRECISION of every split: float32, bfloat16"
    )
    parser.add_argument("--modes", default="prefork,batching", help="comma-separated: prefork, batching")
    parser.add_argument(
        "--processes",
        help="comma-separated worker process counts: only those splits (e.g. 2 for 2 x 1 of 2 cores; default: every split)",
    )
    parser.add_argument("--temperature", type=float, default=0.3)
    parser.add_argument(
        "--wait-idle",
        action="store_true",
        help="for shared machines: start each split once the CPUs are idle, and measure it again (up to "
        f"{MAX_REDOS} times) while other processes used more than {bench.DISTURBED_CPU_PER_WALL} CPU s/s",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    args.language = args.language or "english"
    args.cache_dir = args.cache_dir or default_cache_dir(args.language)
    usable = usable_cpus().count
    args.cores = args.cores or (1 if args.quick else usable)
    args.batch = args.batch or (4 if args.quick else 16)
    args.jobs = args.jobs or (4 if args.quick else 48)
    args.precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or not set(args.modes) <= {"prefork", "batching"}:
        parser.error(f"--modes wants prefork and/or batching, got {args.modes!r}")
    if args.cores > usable:
        parser.error(f"--cores {args.cores} is more than the {usable} usable CPUs: workers would refuse to start")
    if args.weights and not args.config:
        parser.error("--weights goes with --config")
    args.splits = splits_of(args.cores, args.precisions, args.modes)
    if args.processes:
        wanted = {p.strip() for p in args.processes.split(",")}
        args.splits = [split for split in args.splits if str(split.processes) in wanted]
        if not args.splits:
            parser.error(f"--processes {args.processes}: no split of {args.cores} core(s) has that many worker processes")
    return args


def model_settings(args, workdir: Path) -> tuple[dict[str, str], str]:
    """The workers' model and voice settings, and a description of the model."""
    if args.quick:
        parity = args.parity_dir.resolve()
        settings = {
            "POCKET_TTS_CONFIG": str(parity / "config.yaml"),
            "POCKET_TTS_WEIGHTS": str(parity / "model.safetensors"),
            "POCKET_TTS_VOICES_DIR": str(parity),
            "POCKET_TTS_DEFAULT_VOICE": "voice_state.safetensors",
        }
        return settings, f"small parity checkpoint {parity} (random weights, not speech)"
    if args.config is None:
        checkpoint = random_weights_checkpoint(args.cache_dir, args.language)
        settings = {
            "POCKET_TTS_CONFIG": str(checkpoint / "config.yaml"),
            "POCKET_TTS_VOICES_DIR": str(checkpoint),
            "POCKET_TTS_DEFAULT_VOICE": "voice.wav",
        }
        return settings, f"full-size {args.language} architecture, random weights (not speech)"
    settings = {"POCKET_TTS_CONFIG": str(args.config.resolve())}
    if args.weights:
        settings["POCKET_TTS_WEIGHTS"] = str(args.weights.resolve())
    voice = Path(args.voice) if args.voice else bench.write_synthetic_voice(workdir / "voice.wav")
    if voice.is_file():
        settings.update(POCKET_TTS_VOICES_DIR=str(voice.resolve().parent), POCKET_TTS_DEFAULT_VOICE=voice.name)
    else:
        settings["POCKET_TTS_DEFAULT_VOICE"] = args.voice  # a catalog voice
    return settings, f"config {args.config}"


class Fleet:
    """Runs the splits on one broker; every split gets fresh workers on a private queue."""

    def __init__(
        self, args, broker_url: str, result_backend: str, settings: dict[str, str], workdir: Path, redis_pid: int | None
    ):
        self.args = args
        # The client (this process) and our Redis are part of the queue, not "other processes".
        self.queue_pids = [os.getpid(), *([redis_pid] if redis_pid else [])]
        self.app = client_app(broker_url, result_backend)
        self.env = worker_env(broker_url, {**settings, "CELERY_RESULT_BACKEND": result_backend})
        self.workdir = workdir
        self.texts = SHORT_TEXTS if args.quick else MEDIUM_TEXTS

    def run(self, split: Split) -> dict:
        if self.args.wait_idle:
            bench.wait_for_idle_cpus()
        label = split.label.replace(" ", "-")
        queue = f"fleet-{label}-{uuid.uuid4().hex[:8]}"
        storage = self.workdir / "audio" / label
        storage.mkdir(parents=True)  # workers refuse a missing storage root
        env = {
            **self.env,
            "POCKET_TTS_NUM_THREADS": str(split.threads),
            "POCKET_TTS_PRECISION": split.precision,
            "POCKET_TTS_DECODER_PRECISION": self.args.decoder_precision,
            "POCKET_TTS_STORAGE_DIR": str(storage),
        }
        bench.log(f"[{split.label}] starting workers ...")
        with ExitStack() as stack:
            workers = self._start(split, env, queue, stack)
            slots = split.processes * (self.args.batch if split.mode == "batching" else 1)
            bench.log(f"[{split.label}] warm-up: {slots} short job(s) ...")
            self._send([WARMUP_TEXT] * slots, queue)
            bench.log(f"[{split.label}] {self.args.jobs} jobs at once ...")
            result = self._measure(workers, queue)
            for _ in range(MAX_REDOS):
                if not self.args.wait_idle or result["others_cpu_per_wall"] <= bench.DISTURBED_CPU_PER_WALL:
                    break
                bench.log(f"[{split.label}] other processes used {result['others_cpu_per_wall']:.2f} CPU s/s: again")
                bench.wait_for_idle_cpus()
                result = self._measure(workers, queue)
        bench.log(
            f"[{split.label}] {result['audio_per_wall_s']:.1f}x real time, {result['jobs_per_s']:.2f} jobs/s, "
            f"p95 {seconds(result['latency_s']['p95'])} s, {result['valid_outputs']}/{result['jobs']} valid"
        )
        return {**asdict(split), "label": split.label, **result}

    def _start(self, split: Split, env: dict[str, str], queue: str, stack: ExitStack) -> list[Worker]:
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        name = f"fleet{os.getpid()}-{split.mode}-{split.processes}x{split.threads}-{split.precision}"
        if split.mode == "prefork":
            worker = stack.enter_context(
                running_worker(self.app, env, logs / f"{name}.log", name, "-c", str(split.processes), queue=queue)
            )
            worker.wait_children_ready(self.app)
            return [worker]
        # A threads-pool worker loads its model before it consumes: ready once it answers ping.
        batching = {**env, "POCKET_TTS_MAX_BATCH": str(self.args.batch)}
        workers, rows = [], ("-c", str(self.args.batch))
        for i in range(split.processes):
            worker = running_worker(
                self.app, batching, logs / f"{name}-{i}.log", f"{name}-{i}", *rows, queue=queue, pool="threads"
            )
            workers.append(stack.enter_context(worker))
        return workers

    def _send(self, texts: list[str], queue: str) -> list[tuple[float, object]]:
        """Enqueue every text at once; wait for all; (send time, result) of each."""
        sent = []
        for text in texts:
            kwargs = {"temperature": self.args.temperature}
            sent.append((time.time(), self.app.send_task("pocket_tts.synthesize", (text,), kwargs, queue=queue)))
        for _, result in sent:
            result.get(timeout=JOB_TIMEOUT, propagate=False)
        return sent

    def _measure(self, workers: list[Worker], queue: str) -> dict:
        pids = [pid for worker in workers for pid in group_pids(worker.pid)]
        queue_before, machine_before = sum(map(cpu_seconds, self.queue_pids)), bench.machine_cpu_seconds()[0]
        cpu_before, started = sum(map(cpu_seconds, pids)), time.time()
        texts = [self.texts[i % len(self.texts)] for i in range(self.args.jobs)]
        sent = self._send(texts, queue)
        cpu_wall = time.time() - started
        cpu = sum(map(cpu_seconds, pids)) - cpu_before
        queue_cpu = sum(map(cpu_seconds, self.queue_pids)) - queue_before
        others = bench.machine_cpu_seconds()[0] - machine_before - cpu - queue_cpu
        done = [result.date_done.timestamp() if result.successful() else None for _, result in sent]
        latencies = [end - start for (start, _), end in zip(sent, done) if end is not None]
        wall = max(filter(None, done), default=time.time()) - started
        audio_s, problems = validate([result for _, result in sent])
        return {
            "jobs": len(sent),
            "wall_s": round(wall, 2),
            "jobs_per_s": round(len(latencies) / wall, 3),
            "audio_s": round(audio_s, 1),
            "audio_per_wall_s": round(audio_s / wall, 2),
            "latency_s": percentiles(latencies),
            "cpu_utilisation": round(cpu / cpu_wall / self.args.cores, 3),
            "client_and_redis_cpu_per_wall": round(queue_cpu / cpu_wall, 3),
            "others_cpu_per_wall": round(max(0.0, others) / cpu_wall, 2),
            "process_memory": [process_memory(worker, pid) for worker in workers for pid in group_pids(worker.pid)],
            "valid_outputs": len(sent) - len(problems),
            "problems": problems,
        }


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None}
    return {"p50": round(percentile(values, 50), 2), "p95": round(percentile(values, 95), 2)}


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def validate(results: list) -> tuple[float, list[str]]:
    """Total audio seconds of the valid outputs, and a line for each job without one."""
    import soundfile as sf

    audio_s, problems = 0.0, []
    for result in results:
        if not result.successful():
            problems.append(f"job {result.id}: {result.state} {result.result}")
            continue
        try:
            info = sf.info(result.result)
        except (RuntimeError, OSError) as exc:  # missing or unreadable file
            problems.append(f"job {result.id}: {result.result}: {exc}")
            continue
        if info.samplerate != SAMPLE_RATE or info.frames == 0:
            problems.append(f"job {result.id}: {result.result}: {info.samplerate} Hz, {info.frames} samples")
            continue
        audio_s += info.frames / info.samplerate
    return audio_s, problems


def process_memory(worker: Worker, pid: int) -> dict:
    role = "main" if pid == worker.pid else "child"
    memory = memory_mib(pid)
    return {
        "pid": pid,
        "role": role,
        "rss_mib": memory["Rss"],
        "pss_mib": memory["Pss"],
        "private_mib": round(memory["Private_Clean"] + memory["Private_Dirty"], 1),
    }


def measure(args, workdir: Path) -> dict:
    settings, described = model_settings(args, workdir)
    broker_url, redis_pid = os.environ.get("CELERY_BROKER_URL"), None
    with ExitStack() as stack:
        if broker_url is None:
            redis = stack.enter_context(redis_server())
            broker_url, redis_pid = f"{redis.url}/0", redis.process.pid
            bench.log(f"started redis-server at {broker_url}")
        result_backend = os.environ.get("CELERY_RESULT_BACKEND") or broker_url
        fleet = Fleet(args, broker_url, result_backend, settings, workdir, redis_pid)
        results = [fleet.run(split) for split in args.splits]
    return {
        "machine": {**bench.machine_info(), "usable_cpus": usable_cpus().count},
        "model": described,
        "cores": args.cores,
        "batch": args.batch,
        "decoder_precision": args.decoder_precision,
        "jobs": args.jobs,
        "texts": fleet.texts,
        "temperature": args.temperature,
        "results": results,
    }


def print_table(report: dict) -> None:
    machine = report["machine"]
    print(f"machine: {machine['cpu']}, {machine['usable_cpus']} usable CPUs; model: {report['model']}")
    print(
        f"{report['jobs']} jobs per split enqueued at once, temperature {report['temperature']}, "
        f"batching rows per process {report['batch']}, core budget {report['cores']}, "
        f"Mimi decoder in {report['decoder_precision']}"
    )
    headers = [
        "split",
        "precision",
        "jobs/s",
        "audio s per wall s",
        "latency p50 / p95 s",
        "CPU util",
        "others' CPU s/s",
        "PSS MiB per process",
        "RSS MiB per process",
        "valid outputs",
    ]
    rows = [
        [
            f"{row['mode']} {row['processes']}x{row['threads']}",
            row["precision"],
            f"{row['jobs_per_s']:.2f}",
            f"{row['audio_per_wall_s']:.2f}",
            f"{seconds(row['latency_s']['p50'])} / {seconds(row['latency_s']['p95'])}",
            f"{row['cpu_utilisation']:.0%}",
            f"{row['others_cpu_per_wall']:.2f}",
            "/".join(f"{p['pss_mib']:.0f}" for p in row["process_memory"]),
            "/".join(f"{p['rss_mib']:.0f}" for p in row["process_memory"]),
            f"{row['valid_outputs']}/{row['jobs']}",
        ]
        for row in report["results"]
    ]
    print(bench.format_table(headers, rows))
    print("CPU util: the workers' CPU time / wall / core budget. Others' CPU s/s: what the rest of the machine")
    print(f"(other processes, steal) used per wall second; above {bench.DISTURBED_CPU_PER_WALL} the run was disturbed.")
    print("PSS and RSS list the worker's main process first (prefork), then its children.")


def main() -> int:
    report = bench.run_and_report(parse_args(), measure, print_table, errors=(StackError, OSError, ValueError))
    if report is None:
        return 1
    problems = [line for row in report["results"] for line in row["problems"]]
    for line in problems:
        print(f"invalid output: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
