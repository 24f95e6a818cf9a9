"""The `pocket-tts` command line: generate speech and export voice states; service packages add more.

The engine (and with it torch) is imported inside the commands that need it:
`--threads` must reach POCKET_TTS_NUM_THREADS before the engine module is first
imported.

Commands of other packages (the worker queue's `enqueue` and `jobs`, the
gateway's `serve`) come from the entry-point group `pocket_tts.commands`, so
this engine package never imports the service. The contract of such a command:

    # pyproject.toml
    [project.entry-points."pocket_tts.commands"]
    enqueue = "tasks.cli:add_enqueue_command"

* The entry point's name is the command's name.
* Its object is a callable `add(commands)` that receives the subparsers action
  and adds the parser of that command with `commands.add_parser(name, help=...)`
  and `parser.set_defaults(run=function)`; `function(args)` runs the command.
* It is loaded only when its command is asked for (or for the command list of
  `--help`), so keep module-level imports light. A command that cannot be
  loaded still appears and fails with one line saying why.
* `function` reports a failure by raising `CliError` (or `usage_error(...)`):
  one `error: ...` line on stderr. Helpers for commands: `add_text_arguments`,
  `read_text`, `ProgressLine`, `one_line`, `positive_float`, `non_negative_float`.

Every failure ends with one `error: ...` line on stderr and exit code 2 for bad
usage (arguments, text, output name) or 1 for a failure while running.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn, TextIO

from pocket_tts.catalog import CUSTOM_MODEL_DEFAULT_VOICE, check_language, default_voice
from pocket_tts.precision_env import DECODER_PRECISIONS
from pocket_tts.threads import THREADS_ENV

DEFAULT_OUTPUT = "./tts_output.wav"
REMOTE_PREFIXES = ("hf://", "http://", "https://")

USAGE_ERROR = 2
RUNTIME_ERROR = 1

COMMANDS_GROUP = "pocket_tts.commands"  # entry points of other packages' commands
DISTRIBUTION = "pocket-tts-workers"


class CliError(Exception):
    """A failure reported as one `error:` line, with the exit code to end on."""

    def __init__(self, message: str, exit_code: int = RUNTIME_ERROR):
        super().__init__(message)
        self.exit_code = exit_code


def usage_error(message: str) -> CliError:
    return CliError(message, USAGE_ERROR)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (library messages may span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as one `error:` line instead of usage + message."""

    def error(self, message: str) -> NoReturn:
        raise usage_error(message)


def _checked_number(convert: Callable[[str], float], is_valid: Callable[[float], bool], description: str):
    """An argparse type that converts a value and rejects those outside the valid range."""

    def parse(raw: str):
        try:
            value = convert(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {description}, got {raw!r}") from None
        if not is_valid(value):
            raise argparse.ArgumentTypeError(f"expected {description}, got {raw!r}")
        return value

    return parse


_positive_int = _checked_number(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _checked_number(int, lambda v: v >= 0, "an integer >= 0")
non_negative_float = _checked_number(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
positive_float = _checked_number(float, lambda v: 0 < v < math.inf, "a positive number")


class ProgressLine:
    """Progress of a long-running command on stderr; `enabled=False` (--quiet) silences it.

    On a terminal one line is rewritten in place every `TTY_INTERVAL` s; elsewhere
    (logs, pipes) a full line is written every `LOG_INTERVAL` s. Nothing is shown
    during the first interval, so short commands print no progress at all.
    """

    TTY_INTERVAL = 0.5
    LOG_INTERVAL = 5.0

    def __init__(self, enabled: bool = True, stream: TextIO | None = None, interval: float | None = None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.in_place = self.stream.isatty()
        self.interval = interval if interval is not None else self.TTY_INTERVAL if self.in_place else self.LOG_INTERVAL
        self._next = time.monotonic() + self.interval
        self._shown = False

    def update(self, message: str, now: bool = False) -> None:
        """Show `message` if an interval has passed since the last one (`now`: at once)."""
        if not self.enabled or (not now and time.monotonic() < self._next):
            return
        self._next = time.monotonic() + self.interval
        self.stream.write(f"\r\033[K{message}" if self.in_place else f"{message}\n")
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        """Erase the in-place line, so that what the command prints next starts clean."""
        if self._shown and self.in_place:
            self.stream.write("\r\033[K")
            self.stream.flush()


# ---------------------------------------------------------------------------
# Shared pieces of the commands
# ---------------------------------------------------------------------------


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--language", help="a shipped model by name, e.g. french or english_7m_2026-10 (default: english)")
    which.add_argument("--config", help="a model config .yaml (local path or hf://...)")
    parser.add_argument("--weights", help="model .safetensors to use instead of the config's weights")
    parser.add_argument("--checkpoint", help="training checkpoint (.pt) whose weights (EMA when saved) to use")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument(
        "--precision",
        choices=("float32", "bfloat16", "int8"),
        help="backbone weight format (default: POCKET_TTS_PRECISION, else float32)",
    )
    precision.add_argument("--quantize", action="store_true", help="int8 backbone weights (same as --precision int8)")
    parser.add_argument(
        "--decoder-precision",
        choices=DECODER_PRECISIONS,
        help="Mimi decoder format (default: POCKET_TTS_DECODER_PRECISION, else float32)",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        help=f"torch intra-op threads for this process (sets {THREADS_ENV}; default 1)",
    )


def _check_model_options(args: argparse.Namespace) -> None:
    """Fail before loading anything on an unknown model name or a missing checkpoint."""
    if args.language is not None:
        try:
            check_language(args.language)
        except ValueError as exc:
            raise usage_error(str(exc)) from None
    if args.checkpoint is not None:
        _check_local_file(args.checkpoint, "checkpoint")


def _check_local_file(spec: str, what: str) -> None:
    """Fail before loading the model when a local input file is missing."""
    if spec.startswith(REMOTE_PREFIXES):
        return
    path = Path(spec).expanduser()
    if not path.is_file():
        raise CliError(f"{what} file not found: {spec}")


def _looks_like_path(voice: str) -> bool:
    """Predefined voices are bare names ("alba"); anything with a suffix or a folder is a file."""
    return bool(Path(voice).suffix) or os.sep in voice or "/" in voice


def _load_model(args: argparse.Namespace, **settings):
    """Apply --threads, then import the engine (and torch) and load the model."""
    if args.threads is not None:
        # Read once, when the engine module is first imported: it must be set before.
        os.environ[THREADS_ENV] = str(args.threads)
    from pocket_tts.models.tts_model import TTSModel

    return TTSModel.load_model(
        language=args.language, config=args.config, weights=args.weights, checkpoint=args.checkpoint,
        precision=args.precision, quantize=args.quantize, decoder_precision=args.decoder_precision, **settings,
    )  # fmt: skip


def read_text(args: argparse.Namespace) -> str:
    if args.text is not None and args.text_option is not None:
        raise usage_error("give the text either as an argument or with --text, not both")
    text = args.text if args.text is not None else args.text_option
    if text is None or text == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise usage_error("no text given: pass TEXT, --text, or pipe the text on stdin")
        text = sys.stdin.read()
    if not text.strip():
        raise usage_error("the text to speak is empty")
    return text


@contextmanager
def _atomic_output(path: Path, suffix: str) -> Iterator[Path]:
    """Yield a temporary file beside `path`, renamed onto it only if the block succeeds.

    The temporary file is created first, so an unwritable destination fails before
    the model is loaded, and a failure never leaves a partial file at `path`.
    """
    if path.is_dir():
        raise usage_error(f"the output {str(path)!r} is a directory")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        tmp.open("xb").close()  # "x" honours the umask, unlike mkstemp's private 0600 files
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------


def _output_format(path: Path) -> str:
    from pocket_tts.audio import audio_format

    try:
        return audio_format(path)
    except ValueError as exc:
        raise usage_error(str(exc)) from None


def cmd_generate(args: argparse.Namespace) -> None:
    text = read_text(args)
    output = Path(args.output).expanduser()
    audio_format = _output_format(output)
    _check_model_options(args)
    if args.voice is None:  # the catalog's states fit only the released weights of a named model
        custom = args.config is not None or args.checkpoint is not None
        args.voice = CUSTOM_MODEL_DEFAULT_VOICE if custom else default_voice(args.language)
    if _looks_like_path(args.voice):
        _check_local_file(args.voice, "voice")

    with _atomic_output(output, suffix=f".{audio_format}") as tmp_output:
        started = time.perf_counter()
        model = _load_model(args, temp=args.temperature, eos_threshold=args.eos_threshold)
        voice_state = model.get_state_for_audio_prompt(args.voice)
        load_seconds = time.perf_counter() - started

        import torch

        from pocket_tts.audio import write_audio

        chunks = []
        first_chunk_seconds = None
        generated_samples = 0
        progress = ProgressLine(enabled=not args.quiet)
        started = time.perf_counter()
        for chunk in model.generate_audio_stream(
            voice_state, text, max_tokens=args.max_tokens, frames_after_eos=args.frames_after_eos
        ):
            if first_chunk_seconds is None:
                first_chunk_seconds = time.perf_counter() - started
            chunks.append(chunk)
            generated_samples += chunk.shape[-1]
            progress.update(
                f"generating: {generated_samples / model.sample_rate:.1f} s of audio "
                f"in {time.perf_counter() - started:.1f} s"
            )
        progress.close()
        generation_seconds = time.perf_counter() - started
        if not chunks:
            raise CliError("the model generated no audio")

        audio = torch.cat(chunks)
        write_audio(tmp_output, audio, model.sample_rate, format=audio_format)

    audio_seconds = audio.shape[-1] / model.sample_rate
    print(f"wrote {output} ({audio_format}, {model.sample_rate} Hz)")
    print(f"model and voice loaded in {load_seconds:.2f} s")
    print(f"audio duration:      {audio_seconds:.2f} s")
    print(f"generation time:     {generation_seconds:.2f} s")
    print(f"real-time factor:    {audio_seconds / generation_seconds:.2f}x (audio s / wall s)")
    print(f"first-chunk latency: {first_chunk_seconds:.3f} s")
    print(f"torch threads:       {torch.get_num_threads()}")


# ---------------------------------------------------------------------------
# export-voice
# ---------------------------------------------------------------------------


def cmd_export_voice(args: argparse.Namespace) -> None:
    output = Path(args.output).expanduser()
    if output.suffix != ".safetensors":
        raise usage_error(f"the voice state must be written to a .safetensors file, got {str(output)!r}")
    _check_model_options(args)
    _check_local_file(args.audio, "audio")

    with _atomic_output(output, suffix=".safetensors") as tmp_output:
        model = _load_model(args)
        from pocket_tts.models.tts_model import export_model_state

        # Like the reference's export-voice: a prompt longer than 30 s only costs memory.
        voice_state = model.get_state_for_audio_prompt(args.audio, truncate=True)
        export_model_state(voice_state, tmp_output)
    print(f"wrote voice state {output}")


# ---------------------------------------------------------------------------
# Parser and entry point
# ---------------------------------------------------------------------------


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", nargs="?", help="text to speak; '-' or nothing reads stdin")
    parser.add_argument("--text", dest="text_option", metavar="TEXT", help="text to speak")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown (not installed)"


def _add_engine_commands(commands) -> None:
    generate = commands.add_parser("generate", help="speak a text into an audio file")
    add_text_arguments(generate)
    generate.add_argument(
        "--voice",
        help="predefined voice name, audio file, or exported .safetensors voice state (default: the language's "
        "voice, e.g. alba for English, estelle for French; with --config or --checkpoint, alba's recording)",
    )
    generate.add_argument(
        "--output",
        default=DEFAULT_OUTPUT,
        help="output file; .wav, .flac or .ogg picks the format (default: ./tts_output.wav)",
    )
    _add_model_options(generate)
    generate.add_argument("--temperature", type=non_negative_float, help="sampling temperature (default: the model's)")
    generate.add_argument("--max-tokens", type=_positive_int, default=50, help="tokens per text chunk")
    generate.add_argument("--frames-after-eos", type=_non_negative_int, help="frames kept after end of speech")
    generate.add_argument("--eos-threshold", type=float, help="end-of-speech logit threshold (default: the model's)")
    generate.add_argument("--quiet", action="store_true", help="no progress on stderr")
    generate.set_defaults(run=cmd_generate)

    export = commands.add_parser("export-voice", help="save the voice state of an audio prompt")
    export.add_argument("audio", help="audio prompt (prompts longer than 30 s are truncated)")
    export.add_argument("output", help="voice state file to write (.safetensors)")
    _add_model_options(export)
    export.set_defaults(run=cmd_export_voice)


def _add_unavailable_command(commands, name: str, reason: str) -> None:
    """A command whose package failed to load: listed, and failing with one line when run."""
    parser = commands.add_parser(name, help=f"(unavailable: {reason})", add_help=False)
    parser.add_argument("ignored", nargs=argparse.REMAINDER)

    def run(_args: argparse.Namespace) -> None:
        raise CliError(f"the {name!r} command is unavailable: {reason}")

    parser.set_defaults(run=run)


def _add_package_commands(commands, wanted: str | None) -> None:
    """Commands registered in the `pocket_tts.commands` entry-point group (see the module docstring).

    Only `wanted`'s entry point is loaded when it names one; all of them for the
    command list (no command, or an unknown one).
    """
    from importlib.metadata import entry_points

    entries = {}
    for entry in entry_points(group=COMMANDS_GROUP):
        if entry.name not in commands.choices:  # built-in names win; the first installed copy wins
            entries.setdefault(entry.name, entry)
    if wanted in entries:
        entries = {wanted: entries[wanted]}
    for name, entry in entries.items():
        try:
            entry.load()(commands)
        except Exception as exc:  # noqa: BLE001 - a broken package must not take the other commands down
            if name not in commands.choices:
                _add_unavailable_command(commands, name, one_line(exc))


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; `argv` (default: sys.argv[1:]) decides which packages' commands are loaded."""
    argv = sys.argv[1:] if argv is None else argv
    parser = _Parser(prog="pocket-tts", description="Pocket TTS on the CPU.")
    parser.add_argument("--version", action="version", version=f"pocket-tts {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_engine_commands(commands)
    wanted = next((arg for arg in argv if not arg.startswith("-")), None)
    if wanted not in commands.choices:
        _add_package_commands(commands, wanted)
    return parser


def main(argv: list[str] | None = None) -> int:
    # The engine's warnings (e.g. a chunk cut at its length limit) as labelled lines on stderr.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        args = build_parser(argv).parse_args(argv)
        args.run(args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as exc:
        # Engine, file and audio-library failures: the message is the useful part.
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return RUNTIME_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
