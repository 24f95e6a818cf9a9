"""Shared fixtures: the parity fixtures folder (../shared/parity) and the model loaded from it."""

from __future__ import annotations

import json
import os
import sys
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_parity_dir() -> Path | None:
    candidates = [os.environ.get("POCKET_TTS_PARITY_DIR"), REPO_ROOT.parent / "shared" / "parity"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "cases.json").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session", autouse=True)
def checkout_commands(tmp_path_factory) -> Path:
    """This checkout's `pocket_tts.commands` entry points, visible to this process and its subprocesses.

    The installed project may be another copy (or older): a dist-info folder built from
    pyproject.toml, first on sys.path and PYTHONPATH, makes `pocket-tts` find this checkout's
    service commands without reinstalling.
    """
    groups = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    folder = tmp_path_factory.mktemp("entry-points")
    dist_info = folder / "pocket_tts_checkout_commands-0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: pocket-tts-checkout-commands\nVersion: 0\n")
    lines = [f"[{group}]" + "".join(f"\n{name} = {target}" for name, target in entries.items()) for group, entries in groups.items()]
    (dist_info / "entry_points.txt").write_text("\n\n".join(lines) + "\n")
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), old_path]))
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    if old_path is None:
        del os.environ["PYTHONPATH"]
    else:
        os.environ["PYTHONPATH"] = old_path


@pytest.fixture
def one_thread():
    """torch on one thread for the test, as the engine runs by default (POCKET_TTS_NUM_THREADS=1)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    found = find_parity_dir()
    if found is None:
        pytest.skip("parity fixtures not found: set POCKET_TTS_PARITY_DIR or place them in ../shared/parity")
    return found


@pytest.fixture(scope="session")
def parity_cases(parity_dir: Path) -> dict:
    return json.loads((parity_dir / "cases.json").read_text())


@pytest.fixture(scope="session")
def parity_tensors(parity_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(parity_dir / "cases.safetensors"))


@pytest.fixture(scope="session")
def parity_model(parity_dir: Path):
    """The reduced random-weight model, loaded through the public API like an official checkpoint."""
    from pocket_tts.models.tts_model import TTSModel

    settings = json.loads((parity_dir / "cases.json").read_text())["generation_settings"]
    return TTSModel.load_model(
        config=parity_dir / "config.yaml",
        weights=parity_dir / "model.safetensors",
        temp=settings["temperature"],
        eos_threshold=settings["eos_threshold"],
    )
