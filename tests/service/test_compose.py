"""docker-compose.yml and Dockerfile: validated with `docker-compose config` (no Docker engine needed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from service_helpers import REPO_ROOT

COMPOSE_ENV: dict[str, str] = {}
HOST_VARIABLES = ("POCKET_TTS_", "REDIS_", "FLOWER_", "WORKER_", "HF_")


def compose_config(extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (Debian: apt-get install docker-compose)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(HOST_VARIABLES)}
    return subprocess.run(
        [binary, "--file", "docker-compose.yml", "config"],
        cwd=REPO_ROOT,
        env={**env, **extra_env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)([hms])", duration))


def config_of(extra_env: dict[str, str]) -> dict:
    run = compose_config(extra_env)
    assert run.returncode == 0, run.stderr
    return yaml.safe_load(run.stdout)


@pytest.fixture(scope="module")
def compose() -> dict:
    return config_of(COMPOSE_ENV)


def mounts(service: dict) -> dict[str, str]:
    """container path -> 'source[:ro]' of a service's volumes."""
    found = {}
    for volume in service["volumes"]:
        source, target, *mode = volume.split(":")
        found[target] = source + (":ro" if mode == ["ro"] else "")
    return found


def test_the_compose_file_has_no_version_key_for_compose_v2():
    assert "version" not in yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


def test_redis_persists_never_evicts_and_reads_its_password_from_a_secret_file(compose):
    redis = compose["services"]["redis"]
    script = redis["command"][-1]

    assert "--appendonly yes" in script and "--maxmemory-policy noeviction" in script
    assert '--maxmemory "256mb"' in script and redis["mem_limit"] == "512m"
    assert "cat /run/secrets/redis_password" in script and redis["secrets"] == [{"source": "redis_password"}]
    assert "redis-data:/data:rw" in redis["volumes"] and "environment" not in redis


def test_no_secret_reaches_a_container_environment_or_command_line(compose):
    for name, service in compose["services"].items():
        env = service.get("environment", {})
        assert not {"REDIS_PASSWORD", "FLOWER_BASIC_AUTH", "REDISCLI_AUTH"} & set(env), name
        if "CELERY_BROKER_URL" in env:
            assert env["CELERY_BROKER_URL"] == "redis://redis:6379/0"  # no password in the URL
            assert env["REDIS_PASSWORD_FILE"] == "/run/secrets/redis_password"
    assert set(compose["secrets"]) == {"redis_password", "flower_basic_auth", "gateway_api_keys"}
    assert compose["secrets"]["redis_password"]["file"].endswith("/secrets/redis_password")


def test_workers_scale_shut_down_within_the_grace_period_and_stay_down_on_a_config_error(compose):
    worker = compose["services"]["worker"]
    env = worker["environment"]

    assert "container_name" not in worker and "ports" not in worker  # `--scale worker=N` needs both absent
    assert env["REMAP_SIGTERM"] == "SIGQUIT"
    assert seconds(worker["stop_grace_period"]) > float(env["POCKET_TTS_SOFT_SHUTDOWN_TIMEOUT"])
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    assert env["POCKET_TTS_NUM_THREADS"] == "1" and worker["cpus"] == 2.0 and worker["mem_limit"] == "2g"
    assert mounts(worker)["/cache/huggingface"] == "hf-cache" and env["HF_HOME"] == "/cache/huggingface"
    assert mounts(worker)["/data/audio"] == "audio" and env["POCKET_TTS_STORAGE_DIR"] == "/data/audio"
    assert worker["restart"] == "on-failure:3"  # exit 78 (configuration) is not retried forever
    assert worker["healthcheck"]["test"] == ["CMD", "python", "-m", "tasks.healthcheck"]


def test_a_local_model_is_served_with_environment_variables_only(tmp_path):
    from worker_config import load_settings

    worker = config_of(
        {
            "POCKET_TTS_MODELS_HOST_DIR": str(tmp_path),
            "POCKET_TTS_CONFIG": "/models/config.yaml",
            "POCKET_TTS_WEIGHTS": "/models/model.safetensors",
            "POCKET_TTS_DEFAULT_VOICE": "voice.wav",
            "HF_HUB_OFFLINE": "1",
        }
    )["services"]["worker"]
    env = worker["environment"]

    assert mounts(worker)["/models"] == f"{tmp_path}:ro"
    assert (env["POCKET_TTS_CONFIG"], env["POCKET_TTS_WEIGHTS"]) == ("/models/config.yaml", "/models/model.safetensors")
    assert (env["POCKET_TTS_DEFAULT_VOICE"], env["HF_HUB_OFFLINE"]) == ("voice.wav", "1")
    # Before: POCKET_TTS_LANGUAGE defaulted to english, which conflicts with a config.
    settings = load_settings({k: v or "" for k, v in env.items() if k != "REDIS_PASSWORD_FILE"})
    assert (settings.language, settings.config) == (None, "/models/config.yaml")


def test_model_settings_default_to_empty(compose):
    env = compose["services"]["worker"]["environment"]
    for name in ("POCKET_TTS_LANGUAGE", "POCKET_TTS_CONFIG", "POCKET_TTS_WEIGHTS", "POCKET_TTS_DEFAULT_VOICE",
                 "HF_HUB_OFFLINE"):  # fmt: skip
        assert env[name] in ("", None), name
    assert mounts(compose["services"]["worker"])["/models"].endswith("/models:ro")


def test_the_budget_comes_from_the_environment():
    worker = config_of({"POCKET_TTS_NUM_THREADS": "2", "WORKER_CPUS": "4"})["services"]["worker"]

    assert worker["environment"]["POCKET_TTS_NUM_THREADS"] == "2" and worker["cpus"] == 4.0


def test_the_network_and_the_audio_volume_have_fixed_names(compose):
    assert compose["networks"]["default"]["name"] == "pocket-tts"
    assert compose["volumes"]["audio"]["name"] == "pocket-tts-audio"


def test_flower_is_password_protected_and_local_only(compose):
    flower = compose["services"]["flower"]
    script = flower["command"][-1]

    assert "cat /run/secrets/flower_basic_auth" in script and 'export FLOWER_BASIC_AUTH="$$auth"' in script
    assert "--address=0.0.0.0" in script
    assert flower["ports"] == ["127.0.0.1:5555:5555/tcp"]


def test_the_gateway_is_published_on_loopback_with_keys_and_a_healthcheck(compose):
    gateway = compose["services"]["gateway"]
    env = gateway["environment"]

    assert gateway["command"][:2] == ["pocket-tts", "serve"] and "0.0.0.0" in gateway["command"]
    assert gateway["ports"] == ["127.0.0.1:8000:8000/tcp"]
    assert env["POCKET_TTS_API_KEYS_FILE"] == "/run/secrets/gateway_api_keys"
    assert {"source": "gateway_api_keys"} in gateway["secrets"]
    assert "/health" in gateway["healthcheck"]["test"][-1]
    # The same storage and voices as the workers: it serves their files, they read its uploads.
    worker_mounts = mounts(compose["services"]["worker"])
    assert mounts(gateway)["/data/audio"] == "audio:ro" and worker_mounts["/data/audio"] == "audio"
    assert mounts(gateway)["/voices"] == worker_mounts["/voices"].removesuffix(":ro")
    assert env["POCKET_TTS_STORAGE_DIR"] == "/data/audio" and env["POCKET_TTS_VOICES_DIR"] == "/voices"


def test_the_image_takes_pip_sources_as_build_args_and_installs_dependencies_before_the_code():
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    first_install = dockerfile.index("pip install")
    for arg in ("PIP_NO_INDEX", "PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        assert re.search(rf"^ARG {arg}$", dockerfile, re.M).start() < first_install  # unset unless given
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu$", dockerfile, re.M)
    assert '--index-url "$TORCH_INDEX_URL"' in dockerfile
    code_copied = dockerfile.index("COPY pocket_tts")
    assert first_install < code_copied < dockerfile.index("pip install --no-deps --no-build-isolation .")
    assert re.search(r"^USER app$", dockerfile, re.M).start() > code_copied


def test_the_dependency_layer_reads_pyproject(tmp_path):
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path)
    script = str(REPO_ROOT / "docker" / "requirements.py")
    torch = subprocess.run([sys.executable, script, "torch"], cwd=tmp_path, capture_output=True, text=True, check=True)
    others = subprocess.run(
        [sys.executable, script, "others", "flower"], cwd=tmp_path, capture_output=True, text=True, check=True
    )

    assert torch.stdout.split() == ["torch>=2.4,<2.14"]
    assert {"celery[redis]>=5.7,<6", "flower>=2.0", "setuptools>=68"} <= set(others.stdout.split())
    assert not any(line.startswith("torch") for line in others.stdout.split())


def test_tests_and_benchmarks_stay_out_of_the_image():
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {"tests", "scripts", "tasks/local_stack.py"} <= set(ignored)
