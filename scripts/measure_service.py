"""Measure the worker service on this machine: queue overhead, memory per process, redo time of a killed job.

    python scripts/measure_service.py --parity-dir ../shared/parity [--jobs 200] [--kills 5]
    python scripts/measure_service.py --quick    # small checkpoint everywhere, few jobs: a smoke test

Starts its own redis-server (loopback, free port) and `celery -A tasks worker --pool=prefork`
subprocesses, and stops them all before exiting. Three measurements:

1. Enqueue-to-result overhead beyond synthesis, over --jobs small jobs sent one at a time on the
   small parity checkpoint: client-side latency (send_task .. result.get) minus the in-task run time
   the worker reports in its task-succeeded event. The no-op `pocket_tts.worker_info` round trip is
   reported too, as Celery's own floor.
2. Memory of a prefork worker on a full-size random-weight checkpoint in the official layout, with
   1, 2, ... --max-children children, after each child ran jobs: PSS (proportional set size,
   /proc/<pid>/smaps_rollup) of the main process and of each child, the total, and what each added
   child adds. Once with jobs in the default voice (an exported voice state), once with jobs that
   clone a .wav prompt (the Mimi encoder then runs in the children).
3. How long a job whose child is SIGKILLed mid-job takes to start again (task-started events),
   --kills times, on the full-size checkpoint.

The random checkpoints make noise, never speech; only the costs are meaningful.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from celery import Celery, group

from tasks.local_stack import REPO_ROOT, Worker, client_app, memory_mib, redis_server, running_worker, worker_env

VOICE_FILE = "voice_24k.wav"
VOICE_STATE_FILE = "voice_24k.safetensors"
LONG_TEXT = " ".join(f"Sentence number {i} is here to keep the worker busy for a while." for i in range(14))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def child_running(worker: Worker, client: Celery, task_id: str) -> int:
    """The pid of the child running a job (events carry the main process's pid)."""
    active = client.control.inspect(destination=[worker.node], timeout=5).active()[worker.node]
    return next(request["worker_pid"] for request in active if request["id"] == task_id)


class TaskEvents:
    """Collects task events from the workers in a background thread."""

    def __init__(self, client: Celery):
        self.succeeded: dict[str, dict] = {}
        self.started: dict[str, list[dict]] = {}
        self._client = client
        self._receiver = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        time.sleep(0.5)  # let the receiver bind before jobs are sent

    def _run(self) -> None:
        with self._client.connection_for_read() as connection:
            self._receiver = self._client.events.Receiver(
                connection,
                handlers={
                    "task-succeeded": lambda e: self.succeeded.__setitem__(e["uuid"], e),
                    "task-started": lambda e: self.started.setdefault(e["uuid"], []).append(e),
                },
            )
            self._receiver.capture(limit=None, timeout=None, wakeup=True)

    def wait_for(self, table: dict, task_id: str, count: int = 1, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while True:
            entry = table.get(task_id)
            if entry is not None and (not isinstance(entry, list) or len(entry) >= count):
                return entry
            if time.monotonic() > deadline:
                raise TimeoutError(f"no event for {task_id}")
            time.sleep(0.005)

    def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True  # seen within a second: the receiver polls once per second
        self._thread.join(timeout=5)  # before Redis goes away under it


def export_voice_state(config: Path, weights: Path | None, voices: Path) -> None:
    """The voice prompt's state for this checkpoint, as the voice-state file of the memory jobs."""
    from pocket_tts.models.tts_model import TTSModel, export_model_state

    model = TTSModel.load_model(config=config, weights=weights)
    export_model_state(model.get_state_for_audio_prompt(str(voices / VOICE_FILE)), voices / VOICE_STATE_FILE)


def worker_settings(storage: Path, voices: Path, config: Path, weights: Path | None) -> dict[str, str]:
    storage.mkdir(parents=True, exist_ok=True)  # workers refuse a missing storage root
    settings = {
        "POCKET_TTS_CONFIG": str(config),
        "POCKET_TTS_STORAGE_DIR": str(storage),
        "POCKET_TTS_VOICES_DIR": str(voices),
        "POCKET_TTS_DEFAULT_VOICE": VOICE_FILE,
        "POCKET_TTS_NUM_THREADS": "1",
        "POCKET_TTS_MAX_TEXT_CHARS": "2000",
    }
    if weights is not None:
        settings["POCKET_TTS_WEIGHTS"] = str(weights)
    return settings


def measure_overhead(client: Celery, events: TaskEvents, jobs: int) -> dict:
    def timed(name: str, args=(), kwargs=None) -> tuple[float, str]:
        started = time.perf_counter()
        result = client.send_task(name, args=args, kwargs=kwargs)
        result.get(timeout=60)
        return time.perf_counter() - started, result.id

    for _ in range(20):  # warm connections, voice cache and code paths
        timed("pocket_tts.synthesize", ("Hi.",), {"temperature": 0})
    latencies, runtimes = [], []
    for _ in range(jobs):
        latency, task_id = timed("pocket_tts.synthesize", ("Hi.",), {"temperature": 0})
        latencies.append(latency)
        runtimes.append(events.wait_for(events.succeeded, task_id)["runtime"])
    noop = [timed("pocket_tts.worker_info")[0] for _ in range(jobs)]
    overhead = [lat - run for lat, run in zip(latencies, runtimes)]
    ms = lambda values, q: round(1000 * percentile(values, q), 2)  # noqa: E731
    return {
        "jobs": jobs,
        "end_to_end_ms": {"p50": ms(latencies, 50), "p95": ms(latencies, 95)},
        "in_task_ms": {"p50": ms(runtimes, 50), "p95": ms(runtimes, 95)},
        "overhead_beyond_synthesis_ms": {"p50": ms(overhead, 50), "p95": ms(overhead, 95)},
        "noop_worker_info_round_trip_ms": {"p50": ms(noop, 50), "p95": ms(noop, 95)},
    }


def measure_memory(
    client: Celery, broker_url: str, settings: dict[str, str], tmp: Path, max_children: int, voice: str | None
) -> dict:
    """Total PSS of a prefork worker per number of children, and the step per added child."""
    rows = []
    for children in range(1, max_children + 1):
        # Memory is what this measures: more children than cores are fine (they run one short job each).
        env = worker_env(broker_url, {**settings, "POCKET_TTS_ALLOW_OVERSUBSCRIBE": "1"})
        with running_worker(client, env, tmp / f"memory-{children}.log", f"memory{children}", "-c", str(children)) as w:
            w.wait_children_ready(client, timeout=300)
            # Jobs on every child first: memory as it is between jobs, not just after loading.
            jobs = group(
                client.signature("pocket_tts.synthesize", args=("Warm the child up.", voice), kwargs={"temperature": 0})
                for _ in range(3 * children)
            )
            jobs.apply_async().get(timeout=300)
            pids = w.child_pids(client)
            parent, per_child = memory_mib(w.pid), [memory_mib(pid) for pid in pids]
        total = parent["Pss"] + sum(child["Pss"] for child in per_child)
        rows.append(
            {
                "children": children,
                "total_pss": round(total, 1),
                "added_by_last_child": round(total - rows[-1]["total_pss"], 1) if rows else None,
                "parent": parent,
                "children_mib": per_child,
            }
        )
    return {"voice": voice or settings["POCKET_TTS_DEFAULT_VOICE"], "rows": rows}


def print_memory_table(memory: dict) -> None:
    print(f"PSS of a prefork worker, jobs in voice {memory['voice']} (MiB):", file=sys.stderr)
    print("children | total | added by the last child | parent | private per child", file=sys.stderr)
    for row in memory["rows"]:
        private = ", ".join(f"{c['Private_Clean'] + c['Private_Dirty']:.0f}" for c in row["children_mib"])
        added = "" if row["added_by_last_child"] is None else f"+{row['added_by_last_child']:.0f}"
        print(
            f"{row['children']} | {row['total_pss']:.0f} | {added} | {row['parent']['Pss']:.0f} | {private}",
            file=sys.stderr,
        )


def measure_kill_redo(worker: Worker, client: Celery, events: TaskEvents, kills: int) -> dict:
    delays, totals = [], []
    for _ in range(kills):
        sent = time.time()
        result = client.send_task("pocket_tts.synthesize", args=(LONG_TEXT,), kwargs={"temperature": 0})
        events.wait_for(events.started, result.id, 1, timeout=120)
        time.sleep(0.5)  # mid-job
        os.kill(child_running(worker, client, result.id), signal.SIGKILL)
        killed = time.time()
        second = events.wait_for(events.started, result.id, 2, timeout=120)[1]
        result.get(timeout=300)
        delays.append(second["timestamp"] - killed)
        totals.append(time.time() - sent)
        worker.wait_children_ready(client, timeout=300)
    return {
        "redo_started_after_kill_s": [round(d, 3) for d in delays],
        "median_s": round(statistics.median(delays), 3),
        "killed_job_total_s": [round(t, 1) for t in totals],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parity-dir", type=Path, default=REPO_ROOT.parent / "shared" / "parity")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--max-children", type=int, default=3, help="memory: children from 1 to this")
    parser.add_argument("--quick", action="store_true", help="small checkpoint, 10 jobs, 2 children, no kills")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.kills, args.max_children = 10, 0, 2

    with tempfile.TemporaryDirectory(prefix="measure-service-") as tmp, redis_server() as redis:
        tmp = Path(tmp)
        voices, storage = tmp / "voices", tmp / "audio"
        voices.mkdir()
        (voices / VOICE_FILE).write_bytes((args.parity_dir / VOICE_FILE).read_bytes())
        broker_url = f"{redis.url}/0"
        client = client_app(broker_url)
        events = TaskEvents(client)
        report = {"machine": f"{os.cpu_count()} CPUs, {sys.platform}, python {sys.version.split()[0]}"}
        concurrency = ("-c", str(args.concurrency))
        try:
            small = worker_settings(
                storage, voices, args.parity_dir / "config.yaml", args.parity_dir / "model.safetensors"
            )
            with running_worker(client, worker_env(broker_url, small), tmp / "small.log", "small", *concurrency) as w:
                w.wait_children_ready(client, timeout=300)
                report["overhead"] = measure_overhead(client, events, args.jobs)

            if args.quick:
                config, weights = args.parity_dir / "config.yaml", args.parity_dir / "model.safetensors"
            else:
                from pocket_tts.random_checkpoint import write_random_checkpoint

                config, weights = write_random_checkpoint(tmp / "full"), None
            export_voice_state(config, weights, voices)
            full = worker_settings(storage, voices, config, weights)
            weights_file = weights or config.parent / "model.safetensors"
            report["weights_mib"] = round(weights_file.stat().st_size / 2**20, 1)
            report["memory"] = []
            state_voice = {**full, "POCKET_TTS_DEFAULT_VOICE": VOICE_STATE_FILE}
            for job_voice in (None, VOICE_FILE):
                memory = measure_memory(client, broker_url, state_voice, tmp, args.max_children, job_voice)
                report["memory"].append(memory)
                print_memory_table(memory)
            if args.kills:
                env = worker_env(broker_url, full)
                with running_worker(client, env, tmp / "full.log", "full", *concurrency) as w:
                    w.wait_children_ready(client, timeout=300)
                    report["kill_redo"] = measure_kill_redo(w, client, events, args.kills)
        finally:
            events.stop()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
