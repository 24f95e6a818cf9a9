"""The `pocket-tts` command line, run as a subprocess on the small parity checkpoint."""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from pocket_tts.cli import ProgressLine

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(
    *args: str, stdin: str = "", cwd: Path | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    full_env = {key: value for key, value in os.environ.items() if key != "POCKET_TTS_NUM_THREADS"}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pocket_tts.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd or REPO_ROOT,
        env=full_env,
        timeout=120,
        check=False,
    )


def assert_one_error_line(result: subprocess.CompletedProcess, exit_code: int, fragment: str) -> None:
    assert result.returncode == exit_code, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert fragment in lines[0]


@pytest.fixture(scope="module")
def small_model(parity_dir: Path) -> list[str]:
    return ["--config", str(parity_dir / "config.yaml"), "--weights", str(parity_dir / "model.safetensors")]


def test_generate_writes_24k_wav_and_prints_timings(tmp_path, parity_dir, small_model):
    output = tmp_path / "speech.wav"
    result = run_cli(
        "generate", "Hello world, this is a test.", *small_model,
        "--voice", str(parity_dir / "voice_state.safetensors"), "--output", str(output),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    info = sf.info(str(output))
    assert (info.samplerate, info.channels, info.format) == (24000, 1, "WAV")
    assert info.frames > 0
    for label in ("audio duration", "generation time", "real-time factor", "first-chunk latency"):
        assert label in result.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["speech.wav"]  # no temporary file left


@pytest.mark.parametrize(
    ("audio_format", "text_source"),
    [("flac", "stdin"), ("ogg", "option")],
)
def test_generate_other_formats_and_options(tmp_path, parity_dir, small_model, audio_format, text_source):
    output = tmp_path / f"speech.{audio_format}"
    text = "A second test, read from somewhere else."
    text_args = ["--text", text] if text_source == "option" else []
    result = run_cli(
        "generate", *text_args, *small_model, "--voice", str(parity_dir / "voice_24k.wav"),
        "--output", str(output), "--threads", "2", "--temperature", "0", "--max-tokens", "20",
        "--frames-after-eos", "1", "--eos-threshold", "-10",
        stdin=text if text_source == "stdin" else "",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    info = sf.info(str(output))
    assert info.samplerate == 24000
    assert info.format == audio_format.upper()
    assert info.frames > 0
    assert "torch threads:       2" in result.stdout


def test_export_voice_writes_a_loadable_voice_state(tmp_path, parity_dir, small_model):
    from safetensors import safe_open

    voice = tmp_path / "voice.safetensors"
    result = run_cli("export-voice", str(parity_dir / "voice_24k.wav"), str(voice), *small_model)
    assert result.returncode == 0, result.stderr
    with safe_open(str(voice), "np") as exported, safe_open(str(parity_dir / "voice_state.safetensors"), "np") as ref:
        assert sorted(exported.keys()) == sorted(ref.keys())

    output = tmp_path / "out.wav"
    result = run_cli("generate", "Hello again.", *small_model, "--voice", str(voice), "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert sf.info(str(output)).samplerate == 24000


# (arguments after "generate", stdin, exit code, fragment of the error line); paths are
# formatted with the test's tmp_path and the parity folder.
GENERATE_ERRORS = {
    "empty text": (["", "{model}", "--voice", "{voice}"], "", 2, "text to speak is empty"),
    "blank stdin": (["{model}", "--voice", "{voice}"], "  \n", 2, "text to speak is empty"),
    "missing voice file": (["hi", "{model}", "--voice", "{tmp}/nope.wav"], "", 1, "voice file not found"),
    "voice not audio": (["hi", "{model}", "--voice", "{parity}/cases.json"], "", 1, "cannot read audio file"),
    "unknown language": (["hi", "--language", "klingon"], "", 2, "unknown language 'klingon'"),
    "threads zero": (["hi", "{model}", "--threads", "0"], "", 2, "--threads"),
    "threads not a number": (["hi", "{model}", "--threads", "two"], "", 2, "--threads"),
    "unwritable output": (["hi", "{model}", "--output", "{tmp}/no/such/dir/out.wav"], "", 1, "cannot write"),
    "unknown extension": (["hi", "{model}", "--output", "{tmp}/out.mp3"], "", 2, "unsupported audio extension"),
    "negative temperature": (["hi", "{model}", "--temperature", "-1"], "", 2, "--temperature"),
    "missing checkpoint": (["hi", "{model}", "--checkpoint", "{tmp}/step.pt"], "", 1, "checkpoint file not found"),
    "checkpoint not a .pt": (["hi", "{model}", "--checkpoint", "{parity}/cases.json", "--voice", "{voice}"], "", 1,
                             "cannot be read as a training checkpoint"),
    "quantize and precision": (["hi", "{model}", "--quantize", "--precision", "bfloat16"], "", 2, "not allowed with"),
    "catalog voice, custom model": (["hi", "{model}", "--voice", "alba"], "", 1, "needs a model loaded by language"),
}


@pytest.mark.parametrize("case", GENERATE_ERRORS, ids=list(GENERATE_ERRORS))
def test_generate_bad_input_is_one_error_line(tmp_path, parity_dir, small_model, case):
    template, stdin, exit_code, fragment = GENERATE_ERRORS[case]
    args = []
    for arg in template:
        if arg == "{model}":
            args += small_model
        else:
            args.append(arg.format(tmp=tmp_path, parity=parity_dir, voice=parity_dir / "voice_24k.wav"))
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out.wav")]
    result = run_cli("generate", *args, stdin=stdin)
    assert_one_error_line(result, exit_code, fragment)
    assert not list(tmp_path.glob("*.wav")) and not list(tmp_path.glob(".*"))  # no partial output


def test_invalid_thread_environment_is_one_error_line(tmp_path, parity_dir, small_model):
    result = run_cli(
        "generate", "hi", *small_model, "--voice", str(parity_dir / "voice_24k.wav"),
        "--output", str(tmp_path / "out.wav"), env={"POCKET_TTS_NUM_THREADS": "many"},
    )  # fmt: skip
    assert_one_error_line(result, 1, "POCKET_TTS_NUM_THREADS")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("output_name", "exit_code", "fragment"),
    [("voice.bin", 2, ".safetensors"), ("voice.safetensors", 1, "audio file not found")],
)
def test_export_voice_bad_input_is_one_error_line(tmp_path, small_model, output_name, exit_code, fragment):
    result = run_cli("export-voice", str(tmp_path / "missing.wav"), str(tmp_path / output_name), *small_model)
    assert_one_error_line(result, exit_code, fragment)
    assert not list(tmp_path.iterdir())


PLUGIN_MODULE = """
from pathlib import Path

Path("plugin-imported").touch()

def add_hello(commands):
    parser = commands.add_parser("hello", help="say hello")
    parser.add_argument("name")
    parser.set_defaults(run=lambda args: print(f"hello {args.name}"))

def add_broken(commands):
    raise ImportError("No module named 'fastapi'")
"""


@pytest.fixture
def plugin_dir(tmp_path) -> Path:
    """A package registering `hello` and a `broken` command through the `pocket_tts.commands` entry points."""
    (tmp_path / "demo_commands.py").write_text(PLUGIN_MODULE)
    dist_info = tmp_path / "demo_commands-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-commands\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(
        "[pocket_tts.commands]\nhello = demo_commands:add_hello\nbroken = demo_commands:add_broken\n"
    )
    return tmp_path


def test_packages_add_commands_through_entry_points(plugin_dir):
    hello = run_cli("hello", "world", cwd=plugin_dir)
    assert (hello.returncode, hello.stdout) == (0, "hello world\n"), hello.stderr

    listing = run_cli("--help", cwd=plugin_dir)
    assert "hello" in listing.stdout and "unavailable: No module named 'fastapi'" in listing.stdout

    assert_one_error_line(run_cli("broken", "x", cwd=plugin_dir), 1, "'broken' command is unavailable: No module")


def test_engine_commands_load_no_other_package(plugin_dir):
    result = run_cli("generate", "--temperature", "-1", cwd=plugin_dir)
    assert_one_error_line(result, 2, "--temperature")
    assert not (plugin_dir / "plugin-imported").exists()


def test_the_engine_package_never_imports_the_service():
    service_packages = {"tasks", "worker_config", "gateway"}
    for module in (REPO_ROOT / "pocket_tts").rglob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not {name.split(".")[0] for name in names} & service_packages, module


def test_version_and_python_dash_m():
    result = subprocess.run(
        [sys.executable, "-m", "pocket_tts", "--version"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("pocket-tts ") and result.stdout.split()[1][0].isdigit()
    assert "enqueue" in run_cli("--help").stdout  # the service's commands, from this checkout's entry points


def test_progress_line_waits_one_interval_and_can_be_silenced():
    stream = io.StringIO()
    progress = ProgressLine(stream=stream, interval=60)
    progress.update("too early")
    progress.update("a state change", now=True)
    ProgressLine(enabled=False, stream=stream, interval=0).update("quiet", now=True)
    progress.close()
    assert stream.getvalue() == "a state change\n"


def test_usage_errors_are_one_line():
    assert_one_error_line(run_cli(), 2, "COMMAND")
    assert_one_error_line(run_cli("speak"), 2, "invalid choice")
    assert_one_error_line(run_cli("generate", "a", "--text", "b"), 2, "not both")
