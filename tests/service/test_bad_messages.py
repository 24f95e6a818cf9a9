"""Poison messages, corrupt voice files and hostile arguments against a real prefork worker.

Each one must fail only its own job, with a one-line reason, and leave the
worker serving: the same main process answers the next job.
"""

from __future__ import annotations

import json
import struct
import uuid
import wave
from pathlib import Path

import numpy as np
import pytest
from service_helpers import assert_audio_matches

pytestmark = pytest.mark.service

JOB_TIMEOUT = 60
SECRET = "BODY-MUST-NOT-BE-LOGGED"


def send_raw(client_app, body=None, header_changes=None, raw: bytes | None = None):
    """Publish a `pocket_tts.synthesize` message as Celery would, with its body or headers replaced."""
    task_id = str(uuid.uuid4())
    message = client_app.amqp.as_task_v2(task_id, "pocket_tts.synthesize", args=(f"Hi {SECRET}.",), kwargs={})
    headers = {**message.headers, **(header_changes or {})}
    with client_app.producer_or_acquire() as producer:
        if raw is not None:
            options = {"content_type": "application/json", "content_encoding": "utf-8"}
            producer.publish(raw, routing_key="celery", exchange="", headers=headers, **options, **message.properties)
        else:
            payload = message.body if body is None else body
            producer.publish(payload, routing_key="celery", exchange="", headers=headers, serializer="json",
                             **message.properties)  # fmt: skip
    return client_app.AsyncResult(task_id)


def assert_refused(result, message: str, error: str = "InvalidJobError") -> None:
    result.get(timeout=JOB_TIMEOUT, propagate=False)
    assert result.state == "FAILURE", result.state
    assert type(result.result).__name__ == error, repr(result.result)
    assert message in str(result.result) and "\n" not in str(result.result), str(result.result)


def assert_still_serving(worker, client_app, main_pid: int) -> None:
    result = client_app.send_task("pocket_tts.synthesize", args=("Still serving.",))
    assert Path(result.get(timeout=JOB_TIMEOUT)).is_file()
    assert worker.process.poll() is None and worker.pid == main_pid
    assert "Unrecoverable error" not in worker.output()


@pytest.mark.parametrize(
    "body, headers, message",
    [
        ([["Hi."], ["kwargs", "as", "a", "list"], {}], None, "task kwargs must be an object, got list"),
        ([{"text": "Hi."}, {}, {}], None, "task args must be a list, got dict"),
        ({"args": ["Hi."]}, None, "message body must be [args, kwargs, embed]"),
        (["Hi."], None, "message body must be [args, kwargs, embed]"),
        ([["Hi."], {}, {"callbacks": "x"}], None, "message embed (callbacks, errbacks, chain, chord) is malformed"),
        (None, {"timelimit": ["a", "b"]}, "header 'timelimit' must be [hard, soft] seconds"),
        (None, {"timelimit": "soon"}, "header 'timelimit' must be [hard, soft] seconds"),
        (None, {"retries": "many"}, "header 'retries' must be a non-negative integer"),
        (None, {"eta": "not a date"}, "malformed message: InvalidTaskError"),
        ([["Hi."], {"colour": "red"}, {}], None, "got an unexpected keyword argument 'colour'"),
        ([[], {}, {}], None, "missing a required argument: 'text'"),
        ([["Hi.", None, None, "wav", 1, False, "extra"], {}, {}], None, "too many positional arguments"),  # 6 parameters
        ([["x" * 200_000], {}, {}], None, "message body is 2000"),  # refused by size, before decoding
    ],
)
def test_a_malformed_message_fails_only_its_own_job(session_worker, client_app, body, headers, message):
    main_pid = session_worker.pid

    assert_refused(send_raw(client_app, body, headers), message)

    assert_still_serving(session_worker, client_app, main_pid)
    refusals = [line for line in session_worker.output().splitlines() if "refused message" in line]
    assert refusals and SECRET not in session_worker.output() and "x" * 100 not in session_worker.output()


def test_undecodable_and_id_less_messages_are_dropped(session_worker, client_app):
    main_pid = session_worker.pid

    assert_refused(send_raw(client_app, raw=b"[not json"), "message body cannot be decoded")
    send_raw(client_app, header_changes={"id": {"not": "a string"}})
    send_raw(client_app, header_changes={"task": ["not", "a", "name"]})

    assert_still_serving(session_worker, client_app, main_pid)
    assert "refused message (no id): message has no task id" in session_worker.output()


# ---------------------------------------------------------------- voice files


def write_wav(path: Path, rate: int, seconds: float, channels: int = 1) -> None:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(np.zeros(int(rate * seconds) * channels, dtype=np.int16).tobytes())


def write_safetensors(path: Path, header: dict | bytes, header_len: int | None = None, data: bytes = b"") -> None:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded) if header_len is None else header_len) + encoded + data)


@pytest.fixture(scope="module")
def corrupt_voices(service_files):
    voices = service_files.voices
    write_safetensors(voices / "huge_header.safetensors", {}, header_len=2**62)
    write_safetensors(voices / "not_json.safetensors", b"\xff" * 16)
    tensor = {"dtype": "F32", "shape": [1, 10**9, 1024], "data_offsets": [0, 16]}
    write_safetensors(voices / "lying_shape.safetensors", {"audio_prompt": tensor}, data=b"\x00" * 16)
    tensor = {"dtype": "F32", "shape": [4], "data_offsets": [0, 10**12]}
    write_safetensors(voices / "past_the_end.safetensors", {"audio_prompt": tensor}, data=b"\x00" * 16)
    write_wav(voices / "one_hertz.wav", rate=1, seconds=20)
    write_wav(voices / "many_channels.wav", rate=24000, seconds=0.1, channels=64)
    (voices / "garbage.flac").write_bytes(b"fLaC" + b"\x00" * 64)
    return voices


@pytest.mark.parametrize(
    "voice, message",
    [
        ("huge_header.safetensors", "header length 4611686018427387904 in a"),
        ("not_json.safetensors", "not a readable safetensors file"),
        ("lying_shape.safetensors", "does not fill its 16 bytes"),
        ("past_the_end.safetensors", "is truncated"),
        ("one_hertz.wav", "has a sample rate of 1 Hz"),
        ("many_channels.wav", "has 64 channels"),
        ("garbage.flac", "cannot read audio file"),
    ],
)
def test_a_corrupt_voice_file_fails_its_job_and_nothing_else(
    session_worker, client_app, service_files, corrupt_voices, voice, message
):
    main_pid = session_worker.pid
    result = client_app.send_task("pocket_tts.synthesize", args=("Hi.",), kwargs={"voice": voice})

    assert_refused(result, f"voice '{corrupt_voices / voice}' cannot be used: ")
    assert message in str(result.result)
    assert service_files.files_of(result.id) == []
    assert_still_serving(session_worker, client_app, main_pid)


# ---------------------------------------------------------------- argument values


@pytest.mark.parametrize(
    "text, options, message",
    [
        ("\x00\x00\x00", {}, "text has nothing to speak"),
        ("\ufeff", {}, "text has nothing to speak"),
        ("\u200b\u200b \u200d", {}, "text has nothing to speak"),
        ("\U0001f600\U0001f389", {}, "text has nothing to speak"),
        ("?!... ---", {}, "text has nothing to speak"),
        ("Hi \ud800 there.", {}, "text has an unencodable character U+D800 at position 3"),
        ("Hi.", {"voice": "a\x00b.wav"}, "contains control or unencodable characters"),
        ("Hi.", {"voice": "v" * 300 + ".wav"}, "has a name over 255 bytes"),
        ("Hi.", {"temperature": 10**400}, "temperature must be between 0 and 2, got 1000000000"),
        ("Hi.", {"format": ["wav"]}, "format ['wav'] is not supported"),
    ],
)
def test_hostile_values_fail_with_one_line(session_worker, client_app, service_files, text, options, message):
    result = client_app.send_task("pocket_tts.synthesize", args=(text,), kwargs=options)

    assert_refused(result, message)
    assert service_files.files_of(result.id) == []


def test_a_reused_task_id_returns_the_finished_file_untouched(session_worker, client_app, reference_audio):
    task_id = str(uuid.uuid4())
    first = client_app.send_task("pocket_tts.synthesize", args=("First use.",), kwargs={"temperature": 0},
                                 task_id=task_id)  # fmt: skip
    path = Path(first.get(timeout=JOB_TIMEOUT))
    before = (path.read_bytes(), path.stat().st_mtime_ns)

    again = client_app.send_task("pocket_tts.synthesize", args=("Something else.",), task_id=task_id)

    assert Path(again.get(timeout=JOB_TIMEOUT)) == path
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert_audio_matches(path, reference_audio("First use."))
