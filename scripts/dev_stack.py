#!/usr/bin/env python
"""A local stack for developing a web app: Redis, workers (and the gateway when installed) on loopback until Ctrl-C.

    python scripts/dev_stack.py                         # the official English model (hub cache)
    python scripts/dev_stack.py --random-weights        # no download; the audio is noise
    python scripts/dev_stack.py --workers 2 -c 1 --redis-port 6390 --gateway-port 8000

Prints the URLs and the environment a web app (or `pocket-tts enqueue`) needs, then keeps
everything running until Ctrl-C or SIGTERM, and stops it all; a process of the stack that dies
stops the stack with its log's last lines. The model and the other POCKET_TTS_* settings come
from this environment, as for scripts/run_local.py. Needs redis-server.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import _bench_common as bench
from run_local import default_cache_dir, worker_refusal, worker_settings

from tasks import app, local_stack

GATEWAY_START_TIMEOUT = 60.0
POLL_SECONDS = 0.5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("-c", "--concurrency", type=int, help="children per worker (default: CPUs // threads)")
    parser.add_argument("--redis-port", type=int, help="Redis port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--gateway-port", type=int, default=8000, help="gateway port, when installed (default 8000)")
    parser.add_argument(
        "--storage-dir",
        type=Path,
        default=Path(os.environ.get("POCKET_TTS_STORAGE_DIR") or "audio"),
        help="where the audio goes (default: POCKET_TTS_STORAGE_DIR or ./audio)",
    )
    parser.add_argument("--log-dir", type=Path, help="worker and gateway logs (default: a temporary folder)")
    parser.add_argument(
        "--random-weights", action="store_true", help="full-size English architecture with random weights (noise)"
    )
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="where --random-weights keeps it")
    return parser.parse_args()


def start_gateway(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(port)],
            cwd=local_stack.REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + GATEWAY_START_TIMEOUT
    while local_stack.port_is_free(port):
        if process.poll() is not None or time.monotonic() > deadline:
            local_stack.stop_process_group(process)
            tail = log.read_text(errors="replace")[-local_stack.LOG_TAIL_CHARS :]
            raise local_stack.StackError(f"the gateway did not start on port {port}:\n{tail}")
        time.sleep(POLL_SECONDS)
    return process


def run_stack(args: argparse.Namespace, logs: Path) -> None:
    settings = worker_settings(args)
    worker_args = ["-c", str(args.concurrency)] if args.concurrency else []
    with ExitStack() as stack:
        redis = stack.enter_context(local_stack.redis_server(port=args.redis_port))
        broker_url = f"{redis.url}/0"
        os.environ.update(CELERY_BROKER_URL=broker_url, CELERY_RESULT_BACKEND=broker_url)
        env = local_stack.worker_env(broker_url, settings, inherit_settings=True)
        bench.log(f"redis-server on {redis.url}; starting {args.workers} worker(s) ...")
        workers = [
            stack.enter_context(local_stack.running_worker(app, env, logs / f"dev{n}.log", f"dev{n}", *worker_args))
            for n in range(1, args.workers + 1)
        ]
        processes = {"redis-server": (redis.process, None)}
        processes.update({worker.node: (worker.process, worker.log) for worker in workers})
        lines = [f"  redis    {broker_url}"] + [f"  worker   {w.node} (log {w.log})" for w in workers]
        if importlib.util.find_spec("gateway") is not None:
            gateway = start_gateway(env, args.gateway_port, logs / "gateway.log")
            stack.callback(local_stack.stop_process_group, gateway)
            processes["gateway"] = (gateway, logs / "gateway.log")
            lines.append(f"  gateway  http://127.0.0.1:{args.gateway_port}/ (log {logs / 'gateway.log'})")
        print("Pocket TTS dev stack is up; Ctrl-C stops it.", *lines, sep="\n")
        print("Environment for a web app, `pocket-tts enqueue` or `pocket-tts jobs`:")
        print(f"  export CELERY_BROKER_URL={broker_url}")
        print(f"  export POCKET_TTS_STORAGE_DIR={settings['POCKET_TTS_STORAGE_DIR']}", flush=True)
        while True:
            for name, (process, log) in processes.items():
                if process.poll() is not None:
                    tail = log.read_text(errors="replace")[-local_stack.LOG_TAIL_CHARS :] if log else ""
                    raise local_stack.StackError(f"{name} exited with code {process.returncode}\n{tail}".rstrip())
            time.sleep(POLL_SECONDS)


def stop_like_ctrl_c(_signum, _frame) -> None:
    """SIGTERM (and SIGINT): the context managers stop every process of the stack, as for Ctrl-C."""
    raise KeyboardInterrupt


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, stop_like_ctrl_c)
    # A shell starts a background job with SIGINT ignored, and Python then leaves it so: `kill -INT`
    # (a test's Ctrl-C) would not stop the stack.
    signal.signal(signal.SIGINT, stop_like_ctrl_c)
    try:
        local_stack.redis_binary()
        if args.random_weights:
            bench.log("note: --random-weights: the model has random weights, its audio is noise, not speech")
        if args.log_dir:
            args.log_dir.mkdir(parents=True, exist_ok=True)
            run_stack(args, args.log_dir)
        else:
            with tempfile.TemporaryDirectory(prefix="pocket-tts-dev-") as logs:
                run_stack(args, Path(logs))
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 0
    except (local_stack.StackError, ValueError) as exc:  # ValueError: an invalid POCKET_TTS_* setting
        print(f"error: {worker_refusal(str(exc)) or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
