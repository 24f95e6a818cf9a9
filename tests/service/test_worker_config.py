"""Settings from the environment, usable CPUs (affinity mask, cgroup quota) and the thread budget."""

from __future__ import annotations

import os
from types import SimpleNamespace

import celery.utils.sysinfo as sysinfo
import pytest
from celery.concurrency.prefork import TaskPool as PreforkPool

import tasks.celery_app as celery_app
from worker_config import (
    OversubscriptionError,
    SettingsError,
    UsableCpus,
    check_thread_budget,
    load_settings,
    usable_cpus,
)

FOUR_CPUS = UsableCpus(count=4, affinity=4, cgroup_quota=None)


def settings_from(cpus=FOUR_CPUS, **env):
    return load_settings({k: str(v) for k, v in env.items()}, cpus=cpus)


def test_defaults():
    settings = settings_from()

    assert settings.broker_url == settings.result_backend == "redis://localhost:6379/0"
    assert (settings.num_threads, settings.concurrency) == (1, 4)
    assert settings.default_voice == "alba" and settings.voices_dir is None
    assert settings.storage_dir.is_absolute()
    assert settings.max_deliveries == 3 and not settings.allow_oversubscribe


@pytest.mark.parametrize(
    "language, voice", [("french", "estelle"), ("german_24l", "juergen"), ("english_7m_2026-10", "alba")]
)
def test_a_named_model_brings_its_languages_default_voice(language, voice):
    assert settings_from(POCKET_TTS_LANGUAGE=language).default_voice == voice
    assert settings_from(POCKET_TTS_LANGUAGE=language, POCKET_TTS_DEFAULT_VOICE="marius").default_voice == "marius"


def test_an_unknown_model_name_is_refused_with_the_names():
    with pytest.raises(SettingsError, match=r"^POCKET_TTS_LANGUAGE: unknown language 'klingon'; available: dutch, "):
        settings_from(POCKET_TTS_LANGUAGE="klingon")


def test_precision_settings_are_checked_before_the_model_loads():
    settings_from(POCKET_TTS_PRECISION="int8", POCKET_TTS_DECODER_PRECISION="bf16")
    with pytest.raises(SettingsError, match=r"^POCKET_TTS_DECODER_PRECISION='int8': decoder precision must be one of float32, bfloat16$"):
        settings_from(POCKET_TTS_DECODER_PRECISION="int8")
    with pytest.raises(SettingsError, match=r"^POCKET_TTS_PRECISION='fp8': precision must be one of float32, bfloat16, int8$"):
        settings_from(POCKET_TTS_PRECISION="FP8")


def test_result_backend_defaults_to_the_brokers_redis():
    settings = settings_from(CELERY_BROKER_URL="redis://:pw@redis:6379/2")

    assert settings.result_backend == "redis://:pw@redis:6379/2"
    assert settings_from(CELERY_RESULT_BACKEND="redis://other/1").result_backend == "redis://other/1"


def test_the_redis_password_can_come_from_a_file(tmp_path):
    secret = tmp_path / "redis_password"
    secret.write_text("p@ss/word\n")

    settings = settings_from(CELERY_BROKER_URL="redis://redis:6379/0", REDIS_PASSWORD_FILE=secret)

    assert settings.broker_url == settings.result_backend == "redis://:p%40ss%2Fword@redis:6379/0"
    with pytest.raises(SettingsError, match=f"REDIS_PASSWORD_FILE={tmp_path}/nope: cannot read the file"):
        settings_from(REDIS_PASSWORD_FILE=tmp_path / "nope")
    with pytest.raises(SettingsError, match="CELERY_RESULT_BACKEND has no password and Celery reads it as given"):
        settings_from(REDIS_PASSWORD_FILE=secret, CELERY_RESULT_BACKEND="redis://redis:6379/1")
    secret.write_text("\n")
    with pytest.raises(SettingsError, match="REDIS_PASSWORD_FILE=.* the file is empty"):
        settings_from(REDIS_PASSWORD_FILE=secret)


@pytest.mark.parametrize(
    "threads, cpus, concurrency",
    [(1, 4, 4), (2, 4, 2), (3, 4, 1), (8, 4, 1), (2, 5, 2)],
)
def test_default_concurrency_is_usable_cpus_over_threads(threads, cpus, concurrency):
    settings = settings_from(UsableCpus(cpus, cpus, None), POCKET_TTS_NUM_THREADS=threads)

    assert settings.concurrency == concurrency


@pytest.mark.parametrize(
    "env, message",
    [
        ({"POCKET_TTS_NUM_THREADS": "0"}, "POCKET_TTS_NUM_THREADS must be a positive integer"),
        ({"POCKET_TTS_NUM_THREADS": "two"}, "POCKET_TTS_NUM_THREADS must be a positive integer"),
        ({"POCKET_TTS_CONCURRENCY": "-1"}, "POCKET_TTS_CONCURRENCY must be an integer >= 1"),
        ({"POCKET_TTS_MAX_TEXT_CHARS": "lots"}, "POCKET_TTS_MAX_TEXT_CHARS must be an integer >= 1"),
        ({"POCKET_TTS_TIME_LIMIT_PER_CHAR": "nan"}, "POCKET_TTS_TIME_LIMIT_PER_CHAR must be a number of seconds"),
        ({"POCKET_TTS_ALLOW_OVERSUBSCRIBE": "maybe"}, "POCKET_TTS_ALLOW_OVERSUBSCRIBE must be 1/0"),
        ({"POCKET_TTS_LANGUAGE": "english", "POCKET_TTS_CONFIG": "c.yaml"}, "either POCKET_TTS_LANGUAGE or"),
        ({"POCKET_TTS_VISIBILITY_TIMEOUT": "160"}, "must be longer than the longest hard time limit"),
        ({"CELERY_BROKER_URL": "notaurl"}, "CELERY_BROKER_URL='notaurl' is not a URL"),
        ({"CELERY_BROKER_URL": "redis://:pw@h:99999/0"}, r"CELERY_BROKER_URL='redis://:\*\*@h:99999/0': bad port"),
        ({"CELERY_RESULT_BACKEND": "nosuch://h/0"}, "CELERY_RESULT_BACKEND='nosuch://h/0': unknown transport"),
        ({"POCKET_TTS_START_WITHOUT_MODEL": "sometimes"}, "POCKET_TTS_START_WITHOUT_MODEL must be 1/0"),
    ],
)
def test_invalid_values_name_the_variable(env, message):
    with pytest.raises(SettingsError, match=message):
        settings_from(**env)


def test_time_limits_scale_with_the_text_and_the_visibility_timeout_covers_the_longest():
    settings = settings_from(
        POCKET_TTS_TIME_LIMIT_BASE=10, POCKET_TTS_TIME_LIMIT_PER_CHAR=0.5, POCKET_TTS_TIME_LIMIT_GRACE=5,
        POCKET_TTS_MAX_TEXT_CHARS=4000,
    )  # fmt: skip

    assert settings.time_limits(0) == (10, 15)
    assert settings.time_limits(100) == (60, 65)
    assert settings.longest_time_limits == settings.time_limits(10**6) == (2010, 2015)
    assert settings.visibility_timeout == 2015 + 60  # the longest hard limit and a margin
    assert settings.recovery_bound == 2075 + 10  # and one restore sweep


def test_default_recovery_after_a_killed_main_process_is_under_five_minutes():
    settings = settings_from()

    assert settings.longest_time_limits == (130, 160)
    assert settings.recovery_bound == 160 + 60 + 10


def test_batching_scales_the_per_character_limit_with_the_rows_sharing_the_process():
    limits = dict(POCKET_TTS_TIME_LIMIT_BASE=10, POCKET_TTS_TIME_LIMIT_PER_CHAR=0.5, POCKET_TTS_TIME_LIMIT_GRACE=5)
    settings = settings_from(POCKET_TTS_MAX_BATCH=8, POCKET_TTS_MAX_TEXT_CHARS=1000, **limits)

    assert settings.time_limits(100) == (410, 415)
    assert settings.visibility_timeout == 10 + 4 * 1000 + 5 + 60  # covers the longest batched job


def test_missing_model_files_are_reported(tmp_path):
    settings = settings_from(
        POCKET_TTS_CONFIG=tmp_path / "missing.yaml", POCKET_TTS_WEIGHTS="hf://kyutai/x/model.safetensors",
        POCKET_TTS_VOICES_DIR=tmp_path / "nope",
    )  # fmt: skip

    assert settings.missing_model_files() == [
        f"POCKET_TTS_CONFIG={tmp_path / 'missing.yaml'} is not a file",
        f"POCKET_TTS_VOICES_DIR={tmp_path / 'nope'} is not a directory",
    ]


@pytest.fixture
def fake_machine(monkeypatch, tmp_path):
    """An affinity mask and a cgroup tree under tmp_path instead of the real ones."""

    def configure(affinity: int, cgroup_lines: str, files: dict[str, str]):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
        if hasattr(os, "process_cpu_count"):
            monkeypatch.setattr(os, "process_cpu_count", lambda: affinity)
        (tmp_path / "proc_self_cgroup").write_text(cgroup_lines)
        monkeypatch.setattr(sysinfo, "PROC_SELF_CGROUP", str(tmp_path / "proc_self_cgroup"))
        monkeypatch.setattr(sysinfo, "CGROUP_ROOT", str(tmp_path / "cgroup"))
        for relative, content in files.items():
            path = tmp_path / "cgroup" / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)

    return configure


def test_usable_cpus_follow_the_affinity_mask(fake_machine):
    fake_machine(3, "0::/\n", {})

    assert usable_cpus() == UsableCpus(count=3, affinity=3, cgroup_quota=None)


def test_usable_cpus_follow_a_cgroup_v2_quota(fake_machine):
    fake_machine(16, "0::/docker/abc\n", {"docker/abc/cpu.max": "150000 100000\n", "cpu.max": "max 100000\n"})

    assert usable_cpus() == UsableCpus(count=2, affinity=16, cgroup_quota=1.5)


def test_usable_cpus_follow_a_cgroup_v1_quota(fake_machine):
    fake_machine(
        8,
        "4:cpu,cpuacct:/kubepods/pod1\n",
        {
            "cpu,cpuacct/kubepods/pod1/cpu.cfs_quota_us": "200000\n",
            "cpu,cpuacct/kubepods/pod1/cpu.cfs_period_us": "100000\n",
        },
    )

    assert usable_cpus() == UsableCpus(count=2, affinity=8, cgroup_quota=2.0)


def test_budget_within_the_cpus_passes_silently():
    assert check_thread_budget(settings_from(POCKET_TTS_NUM_THREADS=2).thread_budget(2), False) is None


def test_oversubscription_is_refused_with_the_numbers_and_the_fix():
    budget = settings_from(UsableCpus(2, 4, 2.0), POCKET_TTS_NUM_THREADS=2).thread_budget(3)

    with pytest.raises(OversubscriptionError) as refused:
        check_thread_budget(budget, allow_oversubscribe=False)

    message = str(refused.value)
    assert "\n" not in message
    assert "concurrency 3 x 2 torch thread(s) per child = 6 threads on 2 usable CPUs" in message
    assert "(affinity mask 4, cgroup quota 2)" in message
    assert "lower the concurrency to 1" in message and "POCKET_TTS_ALLOW_OVERSUBSCRIBE=1" in message


def test_oversubscription_opt_in_starts_with_a_warning():
    budget = settings_from(UsableCpus(2, 2, None)).thread_budget(3)

    assert "starting oversubscribed because POCKET_TTS_ALLOW_OVERSUBSCRIBE=1" in check_thread_budget(budget, True)


@pytest.fixture
def model_loads(monkeypatch, tmp_path):
    """The thread counts the worker parent loads the model with (recorded, not loaded); the
    default storage folder (./audio) exists."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "audio").mkdir()
    loads = []
    monkeypatch.setattr(celery_app, "load_engine", lambda settings, num_threads=None: loads.append(num_threads))
    return loads


def test_worker_parent_refuses_oversubscription_and_otherwise_logs_its_budget(monkeypatch, caplog, model_loads):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "8")  # restored after the test
    monkeypatch.setattr(celery_app, "current_settings", lambda: settings_from(UsableCpus(2, 2, None)))

    with pytest.raises(SystemExit) as refused:
        celery_app.prepare_worker_parent(sender="w@h", instance=SimpleNamespace(concurrency=3, pool_cls=PreforkPool))
    assert refused.value.code == celery_app.EX_CONFIG

    with caplog.at_level("INFO"):
        celery_app.prepare_worker_parent(sender="w@h", instance=SimpleNamespace(concurrency=2, pool_cls=PreforkPool))
    assert "thread budget: concurrency 2 x 1 torch thread(s) per child = 2 threads on 2 usable CPUs" in caplog.text
    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "1"
    # Loaded once, before forking, on one thread (never after a refusal).
    assert model_loads == [1]


def test_worker_parent_allows_oversubscription_when_asked(monkeypatch, caplog, model_loads):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    settings = settings_from(UsableCpus(2, 2, None), POCKET_TTS_ALLOW_OVERSUBSCRIBE="true")
    monkeypatch.setattr(celery_app, "current_settings", lambda: settings)

    with caplog.at_level("WARNING"):
        celery_app.prepare_worker_parent(sender="w@h", instance=SimpleNamespace(concurrency=4, pool_cls=PreforkPool))

    assert "starting oversubscribed" in caplog.text and "4 threads on 2 usable CPUs" in caplog.text


def test_batching_feeds_every_row_and_counts_one_process_against_the_cpus():
    cpus = UsableCpus(count=2, affinity=2, cgroup_quota=None)
    settings = load_settings({"POCKET_TTS_MAX_BATCH": "8", "POCKET_TTS_NUM_THREADS": "2"}, cpus=cpus)
    assert settings.batching and settings.concurrency == 8
    budget = settings.thread_budget()
    assert budget.torch_threads == 2 and not budget.oversubscribed
    with pytest.raises(SettingsError, match="POCKET_TTS_MAX_BATCH"):
        load_settings({"POCKET_TTS_MAX_BATCH": "0"}, cpus=cpus)


def test_worker_parent_refuses_a_missing_storage_root(monkeypatch, caplog, model_loads, tmp_path):
    settings = settings_from(UsableCpus(2, 2, None), POCKET_TTS_STORAGE_DIR=tmp_path / "unmounted")
    monkeypatch.setattr(celery_app, "current_settings", lambda: settings)

    with pytest.raises(SystemExit) as refused:
        celery_app.prepare_worker_parent(sender="w@h", instance=SimpleNamespace(concurrency=1, pool_cls=PreforkPool))

    assert refused.value.code == 78 and model_loads == []
    assert f"storage directory {tmp_path / 'unmounted'} does not exist" in caplog.text
    assert not (tmp_path / "unmounted").exists()
