"""End-to-end parity: voice states and temperature-0 generation against Kyutai's pocket-tts 4.0.1."""

from __future__ import annotations

import pytest
import torch

from pocket_tts.models.tts_model import STREAM_DECODE_FRAMES, TTSModel, export_model_state
from pocket_tts.text import prepare_text

TOL = 1e-4


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def voice_state(parity_model, parity_dir):
    return parity_model.get_state_for_audio_prompt(parity_dir / "voice_24k.wav")


def test_voice_state_from_audio_matches_exported_file(parity_model, parity_dir, voice_state):
    stored = parity_model.import_voice_state(parity_dir / "voice_state.safetensors")
    assert sorted(stored) == sorted(voice_state)
    for name, layer in stored.items():
        assert int(voice_state[name]["offset"]) == int(layer["offset"]) == 31
        assert max_diff(voice_state[name]["cache"], layer["cache"]) < TOL


def test_legacy_voice_state_layout_is_equivalent(parity_model, parity_dir):
    new = parity_model.import_voice_state(parity_dir / "voice_state.safetensors")
    legacy = parity_model.import_voice_state(parity_dir / "voice_state_legacy.safetensors")
    for name in new:
        assert torch.equal(new[name]["offset"], legacy[name]["offset"])
        assert torch.equal(new[name]["cache"], legacy[name]["cache"])


@pytest.mark.parametrize("index", [0, 1])
def test_e2e_generation_temperature_zero(parity_model, parity_cases, parity_tensors, voice_state, index):
    case = parity_cases["e2e"][index]
    for c, chunk in enumerate(case["chunks"]):
        prepared, guess = prepare_text(chunk["prepared_text"], parity_model.text_options)
        steps = list(parity_model.generate_latents(voice_state, chunk["token_ids"], guess + 2))
        assert len(steps) == chunk["frames_generated"]
        prefix = f"e2e.{index}.chunk{c}"
        assert max_diff(torch.cat([s.latent[0] for s in steps]), parity_tensors[f"{prefix}.latents"]) < TOL
        assert max_diff(torch.cat([s.hidden for s in steps]), parity_tensors[f"{prefix}.backbone_out"]) < TOL
        logits = torch.tensor([s.eos_logit for s in steps])
        assert max_diff(logits, parity_tensors[f"{prefix}.eos_logits"]) < TOL

    audio = parity_model.generate_audio(voice_state, case["text"], max_tokens=case["max_tokens"])
    assert audio.dtype == torch.float32 and audio.dim() == 1
    assert audio.numel() == case["n_samples"]
    assert max_diff(audio, parity_tensors[f"e2e.{index}.audio"]) < TOL


@pytest.mark.parametrize("index", [0, 1])
def test_stream_concatenation_equals_generate_audio(parity_model, parity_cases, voice_state, index):
    case = parity_cases["e2e"][index]
    pieces = list(parity_model.generate_audio_stream(voice_state, case["text"], max_tokens=case["max_tokens"]))
    frame = parity_model.mimi.frame_size
    assert pieces[0].numel() == frame  # the first frame is not held back
    assert all(p.numel() % frame == 0 and 0 < p.numel() <= STREAM_DECODE_FRAMES * frame for p in pieces)
    whole = parity_model.generate_audio(voice_state, case["text"], max_tokens=case["max_tokens"])
    assert torch.equal(torch.cat(pieces), whole)


@pytest.mark.parametrize("index", [0, 1])
def test_eos_stops_generation(parity_dir, parity_cases, parity_tensors, voice_state, index):
    case = parity_cases["e2e_eos"][index]
    model = TTSModel.load_model(
        config=parity_dir / "config.yaml", weights=parity_dir / "model.safetensors", temp=0.0,
        eos_threshold=case["eos_threshold"],
    )  # fmt: skip
    audio = model.generate_audio(voice_state, case["text"])
    assert audio.numel() == case["n_samples"] == case["frames_emitted"] * model.mimi.frame_size
    assert max_diff(audio, parity_tensors[f"e2e_eos.{index}.audio"]) < TOL


def test_voice_state_file_generation_and_export_round_trip(parity_model, parity_dir, parity_cases, parity_tensors, tmp_path, voice_state):
    text = parity_cases["voicefile"]["text"]
    from_file = parity_model.get_state_for_audio_prompt(parity_dir / "voice_state.safetensors")
    audio = parity_model.generate_audio(from_file, text)
    assert max_diff(audio, parity_tensors["voicefile.audio"]) < TOL

    exported = tmp_path / "voice.safetensors"
    export_model_state(voice_state, exported)
    again = parity_model.generate_audio(parity_model.get_state_for_audio_prompt(exported), text)
    assert max_diff(again, parity_tensors["voicefile.audio"]) < TOL


def test_generation_never_mutates_the_voice_state(parity_model, voice_state):
    before = {name: {k: v.clone() for k, v in layer.items()} for name, layer in voice_state.items()}
    parity_model.generate_audio(voice_state, "Hi there.", temp=0.7)
    for name, layer in voice_state.items():
        for key, value in layer.items():
            assert torch.equal(value, before[name][key]) or (key == "cache" and torch.equal(value.nan_to_num(), before[name][key].nan_to_num()))


def test_temperature_zero_is_deterministic_and_positive_temperature_samples(parity_model, voice_state):
    a = parity_model.generate_audio(voice_state, "Hi there.", temp=0.0)
    b = parity_model.generate_audio(voice_state, "Hi there.", temp=0.0)
    assert torch.equal(a, b)
    torch.manual_seed(0)
    c = parity_model.generate_audio(voice_state, "Hi there.", temp=0.7)
    assert c.shape == a.shape and max_diff(c, a) > 1e-3


@pytest.mark.parametrize("wav, prefix", [("voice_16k.wav", "voice.voice_16k"), ("voice_44k_stereo.wav", "voice.voice_44k_stereo")])
def test_voice_prompts_at_other_rates_reach_flow_lm_as_reference(parity_model, parity_dir, parity_tensors, wav, prefix):
    state = parity_model.get_state_for_audio_prompt(parity_dir / wav)
    prompt = parity_tensors[f"{prefix}.prompt"]
    reference = parity_model.flow_lm.init_state(1, prompt.shape[1])
    with torch.inference_mode():
        parity_model.flow_lm.prompt(prompt, reference)
    for name, layer in state.items():
        assert int(layer["offset"]) == prompt.shape[1]
        assert max_diff(layer["cache"], reference[name]["cache"]) < TOL
