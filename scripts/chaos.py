"""A fault storm against a real stack: is any job lost, failed without a reason, or run twice at once?

    python scripts/chaos.py --parity-dir ../shared/parity --minutes 10 --mode prefork
    python scripts/chaos.py --parity-dir ../shared/parity --minutes 10 --mode batching

Starts a redis-server with an append-only file (fsync on every write, as a setup
that must not lose queued jobs runs it) and two workers on the small parity
checkpoint (random weights: noise, never speech), all on loopback; each job
sleeps --job-seconds before generating, so that kills find jobs running. For
--minutes it sends a steady stream of jobs (one in 20 is invalid on purpose)
while a random fault hits every --fault-every seconds: SIGKILL of a pool child,
SIGKILL of a whole worker (main process and children, as when its container
dies; restarted after 2 s) or SIGKILL of redis-server (restarted after 1 to --redis-down seconds).
Then it stops the faults and waits until every job has ended, up to the
recovery bound of the settings plus a margin, and prints:

  sent        jobs the broker accepted (a send refused while Redis is down is retried by this client)
  completed   SUCCESS, with the file present and complete
  failed      FAILURE, each with its one-line reason (counted by reason)
  lost        sent but never ended
  duplicated  attempts of one job that ran at the same time (recorded by scripts/_chaos_hooks.py)
  re-run      jobs with more than one attempt (after a kill: expected, and harmless)
  overwritten finished files that changed after their job reported them
  .part left  temporary files left in the storage folder after the run
  died        workers that stopped on an error of their own ("Unrecoverable error")

and, per main-process kill, how long its running jobs took to start again.

With --outage SECONDS it runs one scenario instead of the storm: --jobs jobs are
sent at once, Redis is SIGKILLed while the first ones run and restarted SECONDS
later, and a client waits on every job in turn through the outage with
tasks.client.wait_for (its outcomes are printed as client_waits).
Worker settings are the defaults (visibility timeout = longest hard limit + 60 s),
so that the recovery measured is the one a default deployment gets.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

from tasks.client import wait_for
from tasks.local_stack import Worker, client_app, group_pids, redis_server, start_worker, worker_env
from worker_config import load_settings

SCRIPTS_DIR = Path(__file__).resolve().parent
WORDS = "the quick brown fox jumps over a lazy dog while seven clocks tick softly in an old house".split()
FAULTS = (("child", 0.5), ("worker", 0.25), ("redis", 0.25))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parity-dir", type=Path, default=SCRIPTS_DIR.parent.parent / "shared" / "parity")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--mode", choices=("prefork", "batching"), default="prefork")
    parser.add_argument("--rate", type=float, default=1.0, help="jobs sent per second")
    parser.add_argument("--job-seconds", type=float, default=1.5, help="added to each job, so that kills hit jobs")
    parser.add_argument("--fault-every", type=float, default=20.0, help="seconds between faults (on average)")
    parser.add_argument("--faults", default="child,worker,redis", help="the kinds of fault to draw from")
    parser.add_argument("--redis-down", type=float, default=5.0, help="longest Redis outage, seconds (at least 1)")
    parser.add_argument("--outage", type=float, help="one Redis outage of this many seconds instead of the storm")
    parser.add_argument("--jobs", type=int, default=50, help="jobs sent before the --outage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the counts here")
    parser.add_argument("--keep", type=Path, help="keep the worker logs, attempt records and audio in this folder")
    return parser.parse_args(argv)


class Stack:
    """Redis with an append-only file and two workers that can be killed and restarted."""

    def __init__(self, stack: ExitStack, args, root: Path):
        self.redis = stack.enter_context(redis_server(persistent=True))
        self.app = client_app(f"{self.redis.url}/0")
        self.storage, self.attempts, self.logs = root / "audio", root / "attempts", root / "logs"
        for folder in (self.storage, self.attempts, self.logs):
            folder.mkdir()
        settings = {
            "POCKET_TTS_CONFIG": str(args.parity_dir / "config.yaml"),
            "POCKET_TTS_WEIGHTS": str(args.parity_dir / "model.safetensors"),
            "POCKET_TTS_VOICES_DIR": str(args.parity_dir),
            "POCKET_TTS_DEFAULT_VOICE": "voice_state.safetensors",
            "POCKET_TTS_STORAGE_DIR": str(self.storage),
            "POCKET_TTS_NUM_THREADS": "1",
            "CHAOS_ATTEMPTS_DIR": str(self.attempts),
            "CHAOS_JOB_SECONDS": str(args.job_seconds),
        }
        if args.mode == "batching":
            settings["POCKET_TTS_MAX_BATCH"] = "2"
        self.env = worker_env(f"{self.redis.url}/0", settings, python_path=[SCRIPTS_DIR])
        self.settings = load_settings({k: v for k, v in self.env.items() if k.startswith("POCKET_TTS_")})
        self.pool, self.concurrency = ("threads", "2") if args.mode == "batching" else ("prefork", "1")
        self.workers: dict[str, Worker] = {}
        self.restarts = Counter()
        stack.callback(self.stop)
        for name in ("w1", "w2"):
            self.start(name)

    def start(self, name: str) -> None:
        log = self.logs / f"{name}-{self.restarts[name]}.log"
        self.restarts[name] += 1
        self.workers[name] = start_worker(
            self.env, log, name, "-c", self.concurrency, "--include", "_chaos_hooks", pool=self.pool
        )

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()

    def children(self, name: str) -> list[int]:
        worker = self.workers[name]
        return [pid for pid in group_pids(worker.pid) if pid != worker.pid]


def send(app, text: str) -> str | None:
    try:
        return app.send_task("pocket_tts.synthesize", args=(text,)).id
    except Exception:  # noqa: BLE001 - Redis away: the caller tries again later
        return None


def random_text(rng: random.Random) -> str:
    if rng.random() < 0.05:
        return rng.choice(["", "\u200b\u200b", "?!..."])  # refused on purpose: failures with a reason
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + "."


def running_jobs(attempts: Path, pids: set[int]) -> set[str]:
    """Jobs whose latest attempt record, in one of `pids`' logs, is a start."""
    jobs = set()
    for pid in pids:
        log = attempts / f"{pid}.log"
        if log.exists():
            latest = {}
            for line in log.read_text().splitlines():
                kind, task_id = line.split()[:2]
                latest[task_id] = kind
            jobs |= {task_id for task_id, kind in latest.items() if kind == "start"}
    return jobs


def storm(stack: Stack, args, rng: random.Random) -> tuple[list[str], list[dict]]:
    """Send jobs and inject faults for args.minutes; the ids sent and the kills of running jobs."""
    sent, pending_texts, kills = [], [], []
    end = time.monotonic() + args.minutes * 60
    next_fault = time.monotonic() + rng.expovariate(1 / args.fault_every)
    while time.monotonic() < end:
        pending_texts.append(random_text(rng))
        while pending_texts and (task_id := send(stack.app, pending_texts[0])):
            sent.append(task_id)
            pending_texts.pop(0)
        if time.monotonic() >= next_fault:
            kills.append(fault(stack, args, rng))
            next_fault = time.monotonic() + rng.expovariate(1 / args.fault_every)
        time.sleep(1 / args.rate)
    return sent, kills


def fault(stack: Stack, args, rng: random.Random) -> dict:
    kinds = [(kind, weight) for kind, weight in FAULTS if kind in args.faults.split(",")]
    kind = rng.choices([k for k, _ in kinds], [w for _, w in kinds])[0]
    name = rng.choice(sorted(stack.workers))
    event = {"kind": kind, "worker": name, "at": time.time(), "jobs": []}
    if kind == "child":
        children = stack.children(name)
        if children:
            victim = rng.choice(children) if stack.pool == "prefork" else None
            if victim is None:  # a batching worker runs jobs in its main process: its kill is a worker kill
                event["kind"] = kind = "worker"
            else:
                event["jobs"] = sorted(running_jobs(stack.attempts, {victim}))
                os.kill(victim, signal.SIGKILL)
        else:
            event["kind"] = kind = "worker"
    if kind == "worker":
        worker = stack.workers[name]
        event["jobs"] = sorted(running_jobs(stack.attempts, set(group_pids(worker.pid))))
        os.killpg(worker.pid, signal.SIGKILL)
        worker.process.wait(10)
        time.sleep(2)
        stack.start(name)
    elif kind == "redis":
        every_process = {pid for worker in stack.workers.values() for pid in group_pids(worker.pid)}
        event["jobs"] = sorted(running_jobs(stack.attempts, every_process))
        stack.redis.kill()
        time.sleep(rng.uniform(1, max(1.0, args.redis_down)))
        stack.redis.start()
    print(f"  {time.strftime('%H:%M:%S')} fault: {event['kind']} {name} ({len(event['jobs'])} running job(s))",
          flush=True)  # fmt: skip
    return event


def outage(stack: Stack, args, rng: random.Random) -> tuple[list[str], list[dict], Counter]:
    """Send args.jobs jobs, SIGKILL Redis while they run and restart it args.outage s later; a client
    waits on each job in turn meanwhile. The ids sent, the fault, and the client's outcomes."""
    results = [stack.app.send_task("pocket_tts.synthesize", args=(random_text(rng),)) for _ in range(args.jobs)]
    waits = Counter()

    def wait_on_each() -> None:
        for result in results:
            try:
                wait_for(result, timeout=stack.settings.recovery_bound + args.outage + 120)
                waits["file"] += 1
            except Exception as exc:  # noqa: BLE001 - counted by kind
                waits[type(exc).__name__] += 1

    client = threading.Thread(target=wait_on_each)
    client.start()
    every_process = {pid for worker in stack.workers.values() for pid in group_pids(worker.pid)}
    while not (running := running_jobs(stack.attempts, every_process)):
        time.sleep(0.1)
    event = {"kind": "redis", "worker": "-", "at": time.time(), "jobs": sorted(running)}
    stack.redis.kill()
    print(f"  {time.strftime('%H:%M:%S')} Redis killed for {args.outage:g} s ({len(running)} running)", flush=True)
    time.sleep(args.outage)
    stack.redis.start()
    client.join()
    return [result.id for result in results], [event], waits


def outcomes(app, task_ids: list[str], deadline: float) -> dict[str, object]:
    """Final results by id, polled until all have ended or `deadline` (monotonic) passes."""
    ended: dict[str, object] = {}
    while time.monotonic() < deadline:
        for task_id in task_ids:
            if task_id in ended:
                continue
            try:
                result = app.AsyncResult(task_id)
                if result.state in ("SUCCESS", "FAILURE"):
                    ended[task_id] = (result.state, result.result)
            except Exception:  # noqa: BLE001 - Redis restarting
                break
        if len(ended) == len(task_ids):
            break
        time.sleep(2)
    return ended


def attempt_records(attempts: Path) -> list[tuple[str, str, int, float]]:
    records = []
    for log in attempts.glob("*.log"):
        for line in log.read_text().splitlines():
            kind, task_id, pid, when = line.split()
            records.append((kind, task_id, int(pid), float(when)))
    return sorted(records, key=lambda record: record[3])


def report(stack: Stack, args, sent: list[str], kills: list[dict], ended: dict, elapsed: float) -> dict:
    records = attempt_records(stack.attempts)
    starts = Counter(task_id for kind, task_id, _, _ in records if kind == "start")
    recoveries = []
    for event in kills:
        if event["kind"] != "worker":
            continue
        for task_id in event["jobs"]:
            later = [when for kind, tid, _, when in records if kind == "start" and tid == task_id and when > event["at"]]
            if later:
                recoveries.append(later[0] - event["at"])
    completed, failed, overwritten = 0, Counter(), 0
    for task_id in sent:
        state, value = ended.get(task_id, (None, None))
        if state == "SUCCESS":
            path = Path(value)
            if path.is_file() and path.stat().st_size > 44:
                completed += 1
            else:
                failed["reported SUCCESS without a complete file"] += 1
        elif state == "FAILURE":
            one_line = str(value).strip() and "\n" not in str(value)
            failed[f"{type(value).__name__}: {value}"[:90] if one_line else "FAILURE WITHOUT A ONE-LINE REASON"] += 1
    finished = {task_id: Path(v[1]) for task_id, v in ended.items() if v[0] == "SUCCESS"}
    for task_id, path in finished.items():  # a later attempt would have produced different noise (no seed)
        ends = [when for kind, tid, _, when in records if kind == "end" and tid == task_id]
        if path.is_file() and ends and path.stat().st_mtime > max(ends) + 5:
            overwritten += 1
    counts = {
        "mode": args.mode,
        "minutes": args.minutes,
        "sent": len(sent),
        "completed": completed,
        "failed": sum(failed.values()),
        "failed_by_reason": dict(failed),
        "lost": len(sent) - completed - sum(failed.values()),
        "lost_ids": [task_id for task_id in sent if task_id not in ended][:10],
        "duplicated": sum(1 for kind, *_ in records if kind == "overlap"),
        "re_run": sum(1 for n in starts.values() if n > 1),
        "overwritten": overwritten,
        "part_files_left": len(list(stack.storage.rglob("*.part"))),
        "workers_died_by_themselves": sum("Unrecoverable error" in log.read_text() for log in stack.logs.glob("*.log")),
        "faults": dict(Counter(event["kind"] for event in kills)),
        "worker_kills_with_running_jobs": sum(1 for e in kills if e["kind"] == "worker" and e["jobs"]),
        "recovery_s_after_worker_kill": sorted(round(r, 1) for r in recoveries),
        "recovery_bound_s": stack.settings.recovery_bound,
        "elapsed_s": round(elapsed),
    }
    return counts


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the stack on SIGTERM too
    if not (args.parity_dir / "config.yaml").is_file():
        sys.exit(f"no checkpoint in {args.parity_dir} (--parity-dir)")
    rng = random.Random(args.seed)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pocket-tts-chaos-") as tmp, ExitStack() as stack_context:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        stack = Stack(stack_context, args, root)
        for worker in stack.workers.values():
            worker.wait_ready(stack.app)
        plan = (f"{args.jobs} jobs, one {args.outage:g} s Redis outage" if args.outage else
                f"{args.minutes:g} min, {args.rate:g} job/s, a fault every ~{args.fault_every:g} s")  # fmt: skip
        print(f"chaos: {args.mode}, {plan}; recovery bound {stack.settings.recovery_bound} s", flush=True)
        if args.outage:
            sent, kills, waits = outage(stack, args, rng)
        else:
            sent, kills = storm(stack, args, rng)
        print(f"storm over: {len(sent)} sent; waiting for every job to end", flush=True)
        ended = outcomes(stack.app, sent, time.monotonic() + stack.settings.recovery_bound + 120)
        counts = report(stack, args, sent, kills, ended, time.monotonic() - started)
        if args.outage:
            counts["client_waits"] = dict(waits)
    for key, value in counts.items():
        print(f"{key:>32}: {value}")
    if args.json:
        args.json.write_text(json.dumps(counts, indent=2))
    bad = counts["lost"] or counts["duplicated"] or counts["overwritten"] or counts["part_files_left"]
    bad = bad or "FAILURE WITHOUT A ONE-LINE REASON" in counts["failed_by_reason"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
