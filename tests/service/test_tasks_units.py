"""Task logic without a broker: validation, storage, delivery counting, time limits, Celery settings."""

from __future__ import annotations

import errno
import math
import os
import subprocess
import sys

import pytest
from celery.contrib.testing.mocks import TaskMessage
from service_helpers import REPO_ROOT, small_tmpfs

from tasks import app
from tasks.celery_app import celery_config
from tasks.deliveries import KEY_PREFIX, record_delivery
from tasks.errors import InvalidJobError, RedeliveryLimitError, StorageError
from tasks.storage import audio_path, remove_stale_parts, write_once
from tasks.synthesis import SynthesisRequest
from tasks.validation import resolve_voice, validate_job
from worker_config import UsableCpus, load_settings


def make_settings(**env):
    return load_settings({k: str(v) for k, v in env.items()}, cpus=UsableCpus(2, 2, None))


def test_importing_tasks_does_not_import_torch():
    code = "import sys, tasks, tasks.client; assert 'torch' not in sys.modules, 'torch imported'"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)

    assert run.returncode == 0, run.stderr


# ---------------------------------------------------------------- validation


@pytest.fixture
def voices(tmp_path):
    voices = tmp_path / "voices"
    (voices / "team").mkdir(parents=True)
    for name in ("narrator.wav", "team/lead.safetensors", "notes.txt"):
        (voices / name).write_bytes(b"x")
    (tmp_path / "secret.wav").write_bytes(b"x")
    (voices / "link.wav").symlink_to(tmp_path / "secret.wav")
    return voices


def test_catalogue_voices_and_files_inside_the_voices_dir_resolve(voices):
    assert resolve_voice("alba", voices) == "alba"
    assert resolve_voice("narrator.wav", voices) == str((voices / "narrator.wav").resolve())
    assert resolve_voice("team/lead.safetensors", voices) == str((voices / "team/lead.safetensors").resolve())


@pytest.mark.parametrize(
    "voice, message",
    [
        ("../secret.wav", "must be a file name inside the voices directory"),
        ("team/../../secret.wav", "must be a file name inside the voices directory"),
        ("/etc/passwd", "must be a file name inside the voices directory"),
        ("..\\secret.wav", "must be a file name inside the voices directory"),
        ("link.wav", "resolves outside the voices directory"),
        ("absent.wav", "unknown voice 'absent.wav'"),
        ("notes.txt", "unknown voice 'notes.txt'"),
        ("bob", "unknown voice 'bob'"),
        ("", "voice must be a non-empty string"),
        (3, "voice must be a non-empty string"),
    ],
)
def test_bad_voices_are_refused(voices, voice, message):
    with pytest.raises(InvalidJobError, match=message):
        resolve_voice(voice, voices)


def test_file_voices_need_a_voices_dir():
    with pytest.raises(InvalidJobError, match="unknown voice 'narrator.wav'"):
        resolve_voice("narrator.wav", None)


def test_a_valid_job_uses_the_default_voice(voices):
    settings = make_settings(POCKET_TTS_VOICES_DIR=voices, POCKET_TTS_DEFAULT_VOICE="narrator.wav")

    job = validate_job("Hello.", None, 0, "flac", settings)

    assert (job.text, job.voice, job.temperature, job.format) == (
        "Hello.", str((voices / "narrator.wav").resolve()), 0.0, "flac",
    )  # fmt: skip


@pytest.mark.parametrize(
    "text, temperature, format, message",
    [
        ("", None, "wav", "text is empty"),
        ("\n\t ", None, "wav", "text is empty"),
        (None, None, "wav", "text must be a string"),
        ("x" * 11, None, "wav", "text is 11 characters long; the limit is 10"),
        ("Hi.", True, "wav", "temperature must be a number"),
        ("Hi.", "0.5", "wav", "temperature must be a number"),
        ("Hi.", -0.1, "wav", "temperature must be between 0 and 2"),
        ("Hi.", 2.5, "wav", "temperature must be between 0 and 2"),
        ("Hi.", math.nan, "wav", "temperature must be between 0 and 2"),
        ("Hi.", math.inf, "wav", "temperature must be between 0 and 2"),
        ("Hi.", None, "mp3", "format 'mp3' is not supported; use one of wav, flac, ogg"),
        ("Hi.", None, None, "format None is not supported"),
    ],
)
def test_bad_requests_are_refused_with_one_line(text, temperature, format, message):
    with pytest.raises(InvalidJobError, match=message) as refused:
        validate_job(text, "alba", temperature, format, make_settings(POCKET_TTS_MAX_TEXT_CHARS=10))

    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("seed", [True, -1, 2**64, 1.5, "7", [7]])
def test_bad_seeds_are_refused_with_one_line(seed):
    with pytest.raises(InvalidJobError, match=r"^seed must be an integer between 0 and 2\*\*64-1, got "):
        validate_job("Hi.", "alba", None, "wav", make_settings(), seed)


def test_a_seed_is_kept_on_the_job():
    assert validate_job("Hi.", "alba", None, "wav", make_settings()).seed is None
    assert validate_job("Hi.", "alba", None, "wav", make_settings(), 2**64 - 1).seed == 2**64 - 1


# ---------------------------------------------------------------- storage


def test_audio_paths_are_sharded_by_task_id(tmp_path):
    path = audio_path(tmp_path, "0b7f3c1e-5a8a-4c1c-9d0e-1f2a3b4c5d6e", "ogg")

    assert path.name == "0b7f3c1e-5a8a-4c1c-9d0e-1f2a3b4c5d6e.ogg"
    assert path.parent.parent.parent == tmp_path
    assert all(len(part) == 2 for part in (path.parent.name, path.parent.parent.name))


@pytest.mark.parametrize("task_id", ["", "../x", "a/b", ".hidden", "x" * 200])
def test_unsafe_task_ids_are_refused(tmp_path, task_id):
    with pytest.raises(InvalidJobError, match="cannot be used as a file name"):
        audio_path(tmp_path, task_id, "wav")


def test_a_job_file_is_published_complete_and_readable(tmp_path):
    target = tmp_path / "ab" / "cd" / "job.wav"

    assert write_once(tmp_path, target, b"RIFF done")

    assert target.read_bytes() == b"RIFF done"
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    assert sorted(p.name for p in target.parent.iterdir()) == ["job.wav"]


def test_a_finished_file_is_never_overwritten(tmp_path):
    target = tmp_path / "ab" / "cd" / "job.wav"
    write_once(tmp_path, target, b"first")

    assert not write_once(tmp_path, target, b"second attempt")

    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["job.wav"]


def test_leftovers_of_a_killed_attempt_are_removed(tmp_path):
    target = tmp_path / "ab" / "cd" / "job.wav"
    target.parent.mkdir(parents=True)
    (target.parent / ".job.wav.x1y2.part").write_bytes(b"RI")
    (target.parent / ".other.wav.x1y2.part").write_bytes(b"RI")  # another job's, maybe running

    write_once(tmp_path, target, b"RIFF")

    assert sorted(p.name for p in target.parent.iterdir()) == [".other.wav.x1y2.part", "job.wav"]
    os.utime(target.parent / ".other.wav.x1y2.part", (0, 0))
    assert remove_stale_parts(tmp_path, older_than_s=3600) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["job.wav"]


def test_a_full_disk_fails_the_job_and_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "ab" / "cd" / "job.wav"

    def fill_the_disk(fd, data):
        os.write(fd, data[:3])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("tasks.storage._write_all", fill_the_disk)
    with pytest.raises(StorageError, match=f"cannot write audio file {target}: No space left on device"):
        write_once(tmp_path, target, b"RIFF half")
    assert list(target.parent.iterdir()) == []


@pytest.fixture
def tiny_tmpfs(tmp_path):
    with small_tmpfs(tmp_path / "tiny", "64k") as mount:
        yield mount


@pytest.mark.parametrize("optimize", [[], ["-O"]])
def test_a_real_full_disk_is_a_storage_error_even_under_python_O(tiny_tmpfs, optimize):
    script = (
        "import sys; from pathlib import Path; from tasks.storage import write_once; from tasks.errors import StorageError\n"
        "root = Path(sys.argv[1])\n"
        "try:\n"
        "    write_once(root, root / 'ab' / 'cd' / 'job.wav', b'x' * 200_000)\n"
        "except StorageError as exc:\n"
        "    print(exc)\n"
    )
    run = subprocess.run(
        [sys.executable, *optimize, "-c", script, str(tiny_tmpfs)], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip

    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert run.stdout.strip().endswith("job.wav: No space left on device")
    assert [p for p in tiny_tmpfs.rglob("*") if p.is_file()] == []


def test_a_missing_storage_root_is_an_error_not_a_new_folder(tmp_path):
    missing = tmp_path / "not-mounted"

    with pytest.raises(StorageError, match="storage directory .*not-mounted does not exist .*is the volume mounted"):
        write_once(missing, missing / "ab" / "cd" / "job.wav", b"RIFF")
    assert not missing.exists()


def test_unwritable_storage_fails_the_job_clearly(tmp_path):
    (tmp_path / "ab").write_text("a file where a shard folder should be")

    with pytest.raises(StorageError, match=f"cannot write audio in {tmp_path / 'ab' / 'cd'}: "):
        write_once(tmp_path, tmp_path / "ab" / "cd" / "job.wav", b"RIFF")


def test_an_interrupted_write_leaves_no_file_and_is_not_disguised(tmp_path, monkeypatch):
    target = tmp_path / "job.wav"

    def interrupted(fd, data):
        os.write(fd, data)
        raise KeyboardInterrupt  # stands for SoftTimeLimitExceeded or a shutdown

    monkeypatch.setattr("tasks.storage._write_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_once(tmp_path, target, b"RIFF")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- deliveries


class CountingBackend:
    def __init__(self):
        self.counts, self.expiries = {}, {}

    def incr(self, key):
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key]

    def expire(self, key, seconds):
        self.expiries[key] = seconds


def test_deliveries_are_counted_per_task_until_the_cap():
    backend = CountingBackend()

    assert [record_delivery(backend, "job-1", 2, 600) for _ in range(2)] == [1, 2]
    with pytest.raises(RedeliveryLimitError, match="job job-1 was delivered 3 times") as gave_up:
        record_delivery(backend, "job-1", 2, 600)

    assert "POCKET_TTS_MAX_DELIVERIES=2" in str(gave_up.value)
    assert record_delivery(backend, "job-2", 2, 600) == 1
    assert backend.expiries == {KEY_PREFIX + "job-1": 600, KEY_PREFIX + "job-2": 600}


# ---------------------------------------------------------------- time limits and Celery settings


def synthesis_request(*args, **options):
    message = TaskMessage("pocket_tts.synthesize", args=args, timelimit=options.pop("timelimit", [None, None]))
    return SynthesisRequest(message, app=app, task=app.tasks["pocket_tts.synthesize"])


def test_time_limits_follow_the_length_of_the_text(monkeypatch):
    settings = make_settings(POCKET_TTS_TIME_LIMIT_BASE=20, POCKET_TTS_TIME_LIMIT_PER_CHAR=0.5)
    monkeypatch.setattr("tasks.synthesis.current_settings", lambda: settings)

    assert synthesis_request("x" * 100).time_limits == (100, 70)  # (hard, soft)
    assert synthesis_request("x" * 10).time_limits == (55, 25)
    assert synthesis_request(None).time_limits == (550, 520)  # invalid text: the longest limits
    assert synthesis_request("x", timelimit=[9, 8]).time_limits == [9, 8]  # the sender's own limits win


def test_celery_settings_hold_the_reliability_rules():
    settings = make_settings(POCKET_TTS_MAX_MEMORY_PER_CHILD_MB=1500, POCKET_TTS_MAX_TASKS_PER_CHILD=200)
    config = celery_config(settings)

    assert config["accept_content"] == config["result_accept_content"] == ["json"]
    assert config["task_serializer"] == config["result_serializer"] == "json"
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1
    assert config["broker_transport_options"]["visibility_timeout"] > config["task_time_limit"]
    assert config["broker_transport_options"]["unacked_restore_throttle"] == 1
    assert not config["worker_cancel_long_running_tasks_on_connection_loss"]  # running jobs finish and store
    assert config["result_backend_always_retry"]
    assert config["worker_consumer"] == "tasks.boundary:GuardedConsumer"
    assert config["task_soft_time_limit"] < config["task_time_limit"]
    assert config["worker_send_task_events"] and config["task_send_sent_event"]
    assert config["worker_max_memory_per_child"] == 1500 * 1024  # KiB
    assert config["worker_max_tasks_per_child"] == 200
    assert config["worker_soft_shutdown_timeout"] == 60
    assert app.tasks["pocket_tts.synthesize"].name == "pocket_tts.synthesize"
    assert "pocket_tts.worker_info" in app.tasks


# ---------------------------------------------------------------- voices and leases


def test_a_slow_voice_load_does_not_hold_up_other_voices():
    import threading
    from types import SimpleNamespace

    from tasks.engine import Engine

    release = threading.Event()

    def load(voice):
        if voice == "slow":
            assert release.wait(10)
        return f"state of {voice}"

    engine = Engine(SimpleNamespace(get_state_for_audio_prompt=load), "test", voice_cache_size=4)
    slow = threading.Thread(target=engine.voice_state, args=("slow",))
    slow.start()
    try:
        assert engine.voice_state("quick") == "state of quick"  # while "slow" is still loading
    finally:
        release.set()
        slow.join()
    assert engine.voice_state("slow") == "state of slow"


def test_a_voice_that_cannot_load_is_the_jobs_error():
    from types import SimpleNamespace

    from tasks.engine import Engine

    def load(voice):
        raise MemoryError

    engine = Engine(SimpleNamespace(get_state_for_audio_prompt=load), "test", voice_cache_size=4)
    with pytest.raises(InvalidJobError, match="voice 'bad' cannot be used: MemoryError"):
        engine.voice_state("bad")


def test_a_lease_is_held_by_one_attempt_at_a_time(redis_url):
    import redis

    from tasks.leases import LEASE_TTL, JobLease, release_lease

    client = redis.Redis.from_url(f"{redis_url}/2")
    first, second = JobLease(client, "job-lease"), JobLease(client, "job-lease")

    assert first.acquire()
    assert not second.acquire() and 0 < second.seconds_left() <= LEASE_TTL
    first.release()
    assert second.acquire()
    release_lease(client, "job-lease")  # the worker whose child died drops it for the next attempt
    assert first.acquire()
    first.release()
    second.release()  # its own lease is gone: nothing to delete
    assert client.get("pocket_tts:lease:job-lease") is None


def _audio_entries(samples, piece: int, attempt: int, seeded: bool = True):
    """Stream entries of one attempt publishing `samples` (int16) in pieces of `piece` samples."""
    entries, total = [], 0
    for start in range(0, len(samples), piece):
        pcm = samples[start : start + piece].tobytes()
        total += len(pcm) // 2
        fields = {"pcm": pcm, "samples": total, "rate": 24000, "attempt": attempt, "seeded": int(seeded)}
        entries.append({k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()})
    return entries


def test_a_redelivered_jobs_replayed_audio_is_relayed_once():
    import numpy as np

    from tasks.audio_stream import Relay

    audio = np.arange(20 * 1920, dtype="<i2")
    # Attempt 1 (a batching worker, a piece per 80 ms frame) dies after 7 frames; attempt 2 (a
    # prefork worker, several frames per piece) replays from the start: its pieces straddle the cut.
    entries = _audio_entries(audio[: 7 * 1920], 1920, attempt=1) + _audio_entries(audio, 4 * 1920, attempt=2)
    relay = Relay()
    relayed = b"".join(relay.new_audio(entry) for entry in entries)
    assert relayed == audio.tobytes() and relay.samples == len(audio)


def test_an_unseeded_job_that_restarts_mid_stream_ends_the_relay():
    import numpy as np

    from tasks.audio_stream import AttemptChanged, Relay

    audio = np.arange(4 * 1920, dtype="<i2")
    relay = Relay()
    for entry in _audio_entries(audio, 1920, attempt=1, seeded=False):
        relay.new_audio(entry)
    with pytest.raises(AttemptChanged, match="restarted"):
        relay.new_audio(_audio_entries(audio, 1920, attempt=2, seeded=False)[0])
    # Before any audio was relayed, another attempt is simply the stream.
    fresh = Relay()
    assert fresh.new_audio(_audio_entries(audio, 1920, attempt=2, seeded=False)[0]) == audio[:1920].tobytes()


def test_the_stored_files_audio_continues_an_unseeded_attempt():
    import numpy as np

    from tasks.audio_stream import Relay

    # Attempt 1 stored the file and died before its end; attempt 2 publishes the file in 1 s pieces.
    audio = np.arange(3 * 24000, dtype="<i2")
    stored = _audio_entries(audio, 24000, attempt=2, seeded=False)
    for entry in stored:
        entry[b"stored"] = b"1"
    relay = Relay()
    relayed = b"".join(relay.new_audio(entry) for entry in _audio_entries(audio[:30000], 1920, attempt=1, seeded=False) + stored)
    assert relayed == audio.tobytes()
