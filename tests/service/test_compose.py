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

COMPOSE_ENV = {"REDIS_PASSWORD": "test-password", "FLOWER_BASIC_AUTH": "admin:secret"}


def compose_config(extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (Debian: apt-get install docker-compose)")
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_ENV and not k.startswith("POCKET_TTS_")}
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


@pytest.fixture(scope="module")
def compose() -> dict:
    run = compose_config(COMPOSE_ENV)
    assert run.returncode == 0, run.stderr
    return yaml.safe_load(run.stdout)


def test_the_compose_file_has_no_version_key_for_compose_v2():
    assert "version" not in yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


def test_redis_persists_and_requires_the_password(compose):
    command = compose["services"]["redis"]["command"]

    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--requirepass") + 1] == "test-password"
    assert "redis-data:/data:rw" in compose["services"]["redis"]["volumes"]


def test_workers_scale_and_shut_down_within_the_grace_period(compose):
    worker = compose["services"]["worker"]
    env = worker["environment"]

    assert "container_name" not in worker and "ports" not in worker  # `--scale worker=N` needs both absent
    assert env["CELERY_BROKER_URL"] == "redis://:test-password@redis:6379/0"
    assert env["REMAP_SIGTERM"] == "SIGQUIT"
    assert seconds(worker["stop_grace_period"]) > float(env["POCKET_TTS_SOFT_SHUTDOWN_TIMEOUT"])
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    assert env["POCKET_TTS_NUM_THREADS"] == "1" and worker["cpus"] == 2.0
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in worker["volumes"]}
    assert mounts["/cache/huggingface"] == "hf-cache" and env["HF_HOME"] == "/cache/huggingface"
    assert mounts["/data/audio"] == "audio" and env["POCKET_TTS_STORAGE_DIR"] == "/data/audio"


def test_the_budget_comes_from_the_environment():
    run = compose_config({**COMPOSE_ENV, "POCKET_TTS_NUM_THREADS": "2", "WORKER_CPUS": "4"})
    worker = yaml.safe_load(run.stdout)["services"]["worker"]

    assert worker["environment"]["POCKET_TTS_NUM_THREADS"] == "2" and worker["cpus"] == 4.0


def test_flower_is_password_protected_and_local_only(compose):
    flower = compose["services"]["flower"]

    assert flower["environment"]["FLOWER_BASIC_AUTH"] == "admin:secret"
    assert flower["ports"] == ["127.0.0.1:5555:5555/tcp"]


@pytest.mark.parametrize("missing", sorted(COMPOSE_ENV))
def test_secrets_must_be_given(missing):
    run = compose_config({k: v for k, v in COMPOSE_ENV.items() if k != missing})

    assert run.returncode != 0 and f"set {missing}" in run.stderr


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
