"""Every model family Kyutai ships, against its audio (../shared/parity/families, README §3).

Each folder holds a small random-weight model in one family's layout and the audio Kyutai's
pocket-tts 4.0.1 produced for it through its public API. The cases are replayed the same way:
load_model with the case's temperature / EOS threshold (None: the config's default), a voice
from the WAV or the exported voice-state file, an optional seed right before generating, then
generate_audio and generate_audio_stream. The batcher must give each family's audio too.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from pocket_tts.batching import BatchedSynthesizer
from pocket_tts.models.tts_model import TTSModel, export_model_state
from tests.conftest import REPO_ROOT

TOL = 1e-4
FAMILIES_DIR = REPO_ROOT.parent / "shared" / "parity" / "families"
FAMILIES = sorted(p.parent.name for p in FAMILIES_DIR.glob("*/cases.json"))

pytestmark = pytest.mark.skipif(not FAMILIES, reason=f"family fixtures not found in {FAMILIES_DIR}")


@functools.cache
def family(name: str) -> tuple[Path, dict, dict]:
    from safetensors.torch import load_file

    folder = FAMILIES_DIR / name
    return folder, json.loads((folder / "cases.json").read_text()), load_file(str(folder / "cases.safetensors"))


@functools.cache
def model_for(name: str, temperature: float | None, eos_threshold: float | None) -> TTSModel:
    folder, cases, _ = family(name)
    kwargs = {}
    if cases["sampler_decode_steps"] != 1:
        kwargs["sampler_decode_steps"] = cases["sampler_decode_steps"]
    return TTSModel.load_model(
        config=folder / "config.yaml", weights=folder / "model.safetensors",
        temp=temperature, eos_threshold=eos_threshold, **kwargs,
    )  # fmt: skip


@functools.cache
def voice_for(name: str, voice: str):
    folder, _, _ = family(name)
    return model_for(name, 0.0, None).get_state_for_audio_prompt(folder / voice)


def case_model_and_voice(name: str, case: dict):
    return model_for(name, case["temperature"], case["eos_threshold"]), voice_for(name, case["voice"])


def replay(model: TTSModel, voice, case: dict, stream: bool = False) -> torch.Tensor:
    if case["seed"] is not None:
        torch.manual_seed(case["seed"])
    if stream:
        return torch.cat(list(model.generate_audio_stream(voice, case["text"], max_tokens=case["max_tokens"])))
    return model.generate_audio(voice, case["text"], max_tokens=case["max_tokens"])


def assert_matches(audio: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert audio.shape == expected.shape, f"{what}: {audio.numel()} samples, expected {expected.numel()}"
    diff = (audio - expected).abs().max().item()
    assert diff < TOL, f"{what}: max abs difference {diff:.2e}"


def all_cases():
    for name in FAMILIES:
        for case in family(name)[1]["cases"]:
            yield pytest.param(name, case["name"], id=f"{name}-{case['name']}")


@pytest.mark.parametrize("name, case_name", list(all_cases()))
def test_case_reproduces_kyutai_audio(name, case_name):
    _, cases, tensors = family(name)
    case = next(c for c in cases["cases"] if c["name"] == case_name)
    model, voice = case_model_and_voice(name, case)
    expected = tensors[case["audio"]]
    assert expected.numel() == case["n_samples"]
    assert_matches(replay(model, voice, case), expected, f"{name}/{case_name} generate_audio")
    if case["stream"]:
        assert_matches(replay(model, voice, case, stream=True), expected, f"{name}/{case_name} stream")


@pytest.mark.parametrize("name", FAMILIES)
def test_voice_state_is_reusable_and_exports(name, tmp_path):
    folder, cases, tensors = family(name)
    first = cases["cases"][0]
    model, voice = case_model_and_voice(name, first)
    assert_matches(replay(model, voice, first), tensors[first["audio"]], f"{name} reused state")

    stored = model.import_voice_state(folder / "voice_state.safetensors")
    from_wav = voice_for(name, "voice.wav")
    for module, layer in stored.items():
        assert int(layer["offset"]) == int(from_wav[module]["offset"]) == cases["voice"]["prompt_positions"]
        assert (layer["cache"] - from_wav[module]["cache"]).abs().max().item() < TOL

    medium = next(c for c in cases["cases"] if c["name"] == "medium")
    exported = tmp_path / "voice.safetensors"
    export_model_state(from_wav, exported)
    from safetensors.torch import load_file

    written = {key: list(t.shape) for key, t in load_file(str(exported)).items()}
    assert written == {key: info["shape"] for key, info in cases["voice_state"]["keys"].items()}
    model = model_for(name, medium["temperature"], medium["eos_threshold"])
    again = model.generate_audio(model.get_state_for_audio_prompt(exported), medium["text"], max_tokens=medium["max_tokens"])
    assert_matches(again, tensors[medium["audio"]], f"{name} exported state")


@pytest.mark.parametrize("name", FAMILIES)
def test_batcher_matches_single_stream(name):
    """Two utterances of different lengths share the batch; each gets its single-stream audio."""
    _, cases, tensors = family(name)
    long, medium = (next(c for c in cases["cases"] if c["name"] == n) for n in ("long", "medium"))
    model, voice = case_model_and_voice(name, long)
    alone = model.generate_audio(voice, medium["text"], max_tokens=medium["max_tokens"])
    batcher = BatchedSynthesizer(model, max_batch=2)
    try:
        futures = [batcher.submit(voice, c["text"], max_tokens=c["max_tokens"]) for c in (long, medium)]
        assert_matches(futures[0].result(timeout=300), tensors[long["audio"]], f"{name} batched long")
        assert_matches(futures[1].result(timeout=300), alone, f"{name} batched medium")
    finally:
        batcher.close()
