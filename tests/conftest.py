"""Shared fixtures: the parity fixtures folder (../shared/parity) and the model loaded from it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_parity_dir() -> Path | None:
    candidates = [os.environ.get("POCKET_TTS_PARITY_DIR"), REPO_ROOT.parent / "shared" / "parity"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "cases.json").is_file():
            return Path(candidate)
    return None


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
