"""The client side of scripts/compose_e2e.sh, run inside the stack (`docker-compose run ... worker python`).

    python compose_e2e_client.py batch N            # N short jobs at once; prints each path once all finished
    python compose_e2e_client.py send-watch TEXT TIMEOUT  # "job <id>", then "<epoch> <state> <hostname>"
                                                          # on each change; the path at the end

Uses the image's own client (tasks.client): the broker and its password come from the
container's settings (REDIS_PASSWORD_FILE), exactly as for `pocket-tts enqueue`.
"""

from __future__ import annotations

import sys
import time

from tasks.celery_app import app
from tasks.client import submit, wait_for

POLL_SECONDS = 0.2


def batch(count: int) -> None:
    results = [submit(f"Job number {n} of the compose test.") for n in range(count)]
    for result in results:
        print(wait_for(result, timeout=300))


def watch(job_id: str, timeout: float) -> int:
    """Print every state change (with the worker's hostname once it runs) until the job ends."""
    result = app.AsyncResult(job_id)
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        state, info = result.state, result.info
        host = info.get("hostname", "-") if isinstance(info, dict) else "-"
        if (state, host) != last:
            print(f"{time.time():.3f} {state} {host}", flush=True)
            last = (state, host)
        if state == "SUCCESS":
            print(info, flush=True)
            return 0
        if state == "FAILURE":
            print(f"failed: {info!r}", flush=True)
            return 1
        time.sleep(POLL_SECONDS)
    print(f"timeout after {timeout:g} s", flush=True)
    return 1


def main() -> int:
    command, *args = sys.argv[1:]
    if command == "batch":
        batch(int(args[0]))
    elif command == "send-watch":
        job_id = submit(args[0]).id
        print(f"job {job_id}", flush=True)
        return watch(job_id, float(args[1]))
    else:
        raise SystemExit(f"unknown command {command!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
