"""The worker queue's `pocket-tts` commands, `enqueue` and `jobs` (torch-free).

Registered through the `pocket_tts.commands` entry points (pyproject.toml); the
contract is in `pocket_tts.cli`'s docstring. The Celery app is imported only
when one of these commands runs.
"""

from __future__ import annotations

import argparse

from pocket_tts.cli import CliError, ProgressLine, add_text_arguments, non_negative_float, positive_float, read_text


def add_enqueue_command(commands) -> None:
    parser = commands.add_parser("enqueue", help="submit a job to the worker queue")
    add_text_arguments(parser)
    parser.add_argument("--voice", help="voice for the job (default: the worker's)")
    parser.add_argument("--temperature", type=non_negative_float, help="sampling temperature (default: the worker's)")
    parser.add_argument("--format", default="wav", help="audio format of the result (default: wav)")
    parser.add_argument("--seed", type=_seed, help="an integer that makes the job's audio reproducible")
    parser.add_argument("--wait", action="store_true", help="wait for the job and print the path of its audio")
    parser.add_argument("--timeout", type=positive_float, default=600.0, help="seconds to wait with --wait (600)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr while waiting")
    parser.set_defaults(run=run_enqueue)


def _seed(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**64-1, got {raw!r}")
    return value


def add_jobs_command(commands) -> None:
    parser = commands.add_parser("jobs", help="show a job's state: queued, running, its audio path or why it failed")
    parser.add_argument("job_ids", nargs="+", metavar="ID", help="job id printed by `enqueue`")
    parser.set_defaults(run=run_jobs)


def run_enqueue(args: argparse.Namespace) -> None:
    """Failures (settings, broker, the job, the wait) raise errors `pocket_tts.cli.main` prints as one line."""
    text = read_text(args)
    from tasks import client

    result = client.submit(text, voice=args.voice, temperature=args.temperature, format=args.format, seed=args.seed)
    if not args.wait:
        print(result.id)
        return
    progress = ProgressLine(enabled=not args.quiet)
    try:
        path = client.wait_for(
            result, args.timeout, lambda state, waited: progress.update(f"job {result.id}: {state.lower()}, {waited:.0f} s")
        )
    finally:
        progress.close()
    print(path)


def run_jobs(args: argparse.Namespace) -> None:
    from tasks import client

    unknown = []
    for job_id in args.job_ids:
        status = client.job_status(job_id)
        if status.state == "unknown":
            unknown.append(job_id)
        else:
            print(status.describe())
    if unknown:
        raise CliError(f"no such job (never sent, or its result expired): {' '.join(unknown)}")
