"""`pocket-tts serve`: the gateway under uvicorn (registered through the `pocket_tts.commands` entry points)."""

from __future__ import annotations

import argparse
import sys

DEFAULT_HOST = "127.0.0.1"  # loopback unless asked: put a TLS proxy in front before exposing it
DEFAULT_PORT = 8000


def add_serve_command(commands) -> None:
    parser = commands.add_parser("serve", help="serve the HTTP API and web page in front of the workers")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default: {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--workers", type=int, default=1, help="gateway processes (default: 1)")
    parser.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> None:
    """Settings are read (and refused with one line) before uvicorn starts."""
    import uvicorn

    from pocket_tts.cli import CliError, usage_error
    from worker_config import SettingsError
    from worker_config.gateway import load_gateway_settings

    if args.workers < 1 or not 0 < args.port < 65536:
        raise usage_error("--workers must be >= 1 and --port between 1 and 65535")
    try:
        load_gateway_settings()
    except SettingsError as exc:
        raise CliError(str(exc)) from None
    uvicorn.run(
        "gateway.app:create_app", factory=True, host=args.host, port=args.port, workers=args.workers, log_level="info"
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m gateway [--host ...]`: the same as `pocket-tts serve`."""
    from pocket_tts.cli import CliError

    parser = argparse.ArgumentParser(prog="python -m gateway")
    add_serve_command(parser.add_subparsers())
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        args.run(args)
    except CliError as exc:
        raise SystemExit(f"error: {exc}") from None
