#!/usr/bin/env python
"""Synthesize one text through the real service on this machine, then stop it.

    python scripts/run_local.py "Hello there." [--voice alba] [--format wav] [--storage-dir audio]
    python scripts/run_local.py "Hello there." --random-weights     # no download; the audio is noise

Starts a private redis-server on 127.0.0.1 and one `celery -A tasks worker --pool=prefork -c 1`
(tasks.local_stack), enqueues the text with `tasks.client.enqueue(..., wait=True)`, prints the path
of the audio file and stops both. The model is the official English one, downloaded from the
Hugging Face hub on first use and cached, unless POCKET_TTS_CONFIG / POCKET_TTS_WEIGHTS /
POCKET_TTS_LANGUAGE say otherwise; the other POCKET_TTS_* settings apply too (docs/deployment.md).
Needs redis-server (Debian/Ubuntu: apt-get install redis-server).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import _bench_common as bench

from tasks import app, local_stack
from tasks.client import JobFailedError, enqueue

RANDOM_VOICE = "voice.wav"
# A first run downloads the model while the worker's child starts: give it time.
CHILD_START_TIMEOUT = "1800"
LOG_TAIL_LINES = 15


def default_cache_dir(language: str = "english") -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pocket-tts" / f"random-{language}"


def random_weights_checkpoint(cache_dir: Path, language: str = "english") -> Path:
    """A folder with a shipped model's full-size architecture (random weights) and a voice prompt, written once.

    The config's EOS threshold is unreachable: random weights would otherwise stop
    after a few frames, so every job runs to the longest audio its text allows.
    """
    if (cache_dir / "config.yaml").is_file() and (cache_dir / RANDOM_VOICE).is_file():
        return cache_dir
    # Imports torch: only when the checkpoint must be written.
    from pocket_tts.random_checkpoint import write_random_checkpoint

    bench.log(f"writing a full-size {language} random-weight checkpoint to {cache_dir} (once) ...")
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(cache_dir, ignore_errors=True)  # an incomplete one
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache_dir.parent))
    try:
        write_random_checkpoint(partial, language, overrides={"default_eos_threshold": bench.NEVER_EOS_THRESHOLD})
    except BaseException:
        shutil.rmtree(partial)
        raise
    bench.write_synthetic_voice(partial / RANDOM_VOICE)
    try:
        partial.rename(cache_dir)  # whole or absent, even if this run is killed while writing
    except OSError:  # another run finished first
        shutil.rmtree(partial)
    return cache_dir


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text")
    parser.add_argument("--voice", help="catalog voice or file in POCKET_TTS_VOICES_DIR (default: the worker's)")
    parser.add_argument("--format", choices=("wav", "flac", "ogg"), default="wav")
    parser.add_argument("--temperature", type=float, help="default: the model's")
    parser.add_argument(
        "--storage-dir",
        type=Path,
        default=Path(os.environ.get("POCKET_TTS_STORAGE_DIR") or "audio"),
        help="where the audio goes (default: POCKET_TTS_STORAGE_DIR or ./audio)",
    )
    parser.add_argument(
        "--random-weights", action="store_true", help="full-size English architecture with random weights (noise)"
    )
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="where --random-weights keeps it")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the audio (default 1800)")
    return parser.parse_args()


def worker_settings(args: argparse.Namespace) -> dict[str, str]:
    """What the worker gets on top of this process's POCKET_TTS_* settings."""
    # Workers refuse a missing storage root (a failed mount must not fill another disk); a local
    # stack owns its folder, so it makes it.
    args.storage_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "POCKET_TTS_STORAGE_DIR": str(args.storage_dir.absolute()),  # the worker runs in the repository
        "POCKET_TTS_CHILD_START_TIMEOUT": os.environ.get("POCKET_TTS_CHILD_START_TIMEOUT") or CHILD_START_TIMEOUT,
    }
    if args.random_weights:
        checkpoint = random_weights_checkpoint(args.cache_dir)
        settings.update(
            POCKET_TTS_CONFIG=str(checkpoint / "config.yaml"),
            POCKET_TTS_LANGUAGE="",  # empty is unset: the random checkpoint replaces any model named
            POCKET_TTS_WEIGHTS="",
            POCKET_TTS_VOICES_DIR=str(checkpoint),
            POCKET_TTS_DEFAULT_VOICE=RANDOM_VOICE,
        )
    return settings


def synthesize_locally(args: argparse.Namespace, logs: Path) -> str:
    settings = worker_settings(args)
    with local_stack.redis_server() as redis:
        broker_url = f"{redis.url}/0"
        # This process's client (tasks.app) reads the broker from the environment at its first send.
        os.environ.update(CELERY_BROKER_URL=broker_url, CELERY_RESULT_BACKEND=broker_url)
        env = local_stack.worker_env(broker_url, settings, inherit_settings=True)
        log = logs / "worker.log"
        bench.log(f"started redis-server on {redis.url}; starting a worker ...")
        with local_stack.running_worker(app, env, log, f"local{os.getpid()}", "-c", "1") as worker:
            try:
                return enqueue(args.text, args.voice, args.temperature, args.format, wait=True, timeout=args.timeout)
            except (JobFailedError, TimeoutError) as exc:
                tail = "\n".join(worker.output().splitlines()[-LOG_TAIL_LINES:])
                raise local_stack.StackError(f"{one_line(exc)}\nworker log, last lines:\n{tail}") from None


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def worker_refusal(message: str) -> str | None:
    """The one-line reason a worker gave for refusing to start (model, voice, settings), if it gave one."""
    found = re.search(r"CRITICAL/MainProcess\] pocket-tts worker: (.*)", message)
    return found.group(1) if found else None


def main() -> int:
    args = parse_args()
    try:
        local_stack.redis_binary()
        if args.random_weights:
            bench.log("note: --random-weights: the model has random weights, its audio is noise, not speech")
        with tempfile.TemporaryDirectory(prefix="pocket-tts-local-") as logs:
            path = synthesize_locally(args, Path(logs))
    except (local_stack.StackError, ValueError) as exc:  # ValueError: an invalid POCKET_TTS_* setting
        refusal = worker_refusal(str(exc))
        if refusal is not None:
            print(f"error: {refusal}", file=sys.stderr)
            if not args.random_weights:
                print("no network? --random-weights runs the same pipeline on random weights (noise)", file=sys.stderr)
            return 1
        first, _, rest = str(exc).partition("\n")
        print(f"error: {first}", file=sys.stderr)
        if rest:
            print(rest, file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
