"""Mimi codec and audio I/O against the reference's parity fixtures (README §5d, §5e, §6.5)."""

from __future__ import annotations

import json
import os
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from pocket_tts.audio import SUPPORTED_FORMATS, end_on_pause, read_audio, resample, write_audio
from pocket_tts.config import config_path_for_language, load_config
from pocket_tts.models.mimi import Mimi

TOL = 1e-4
VOICES = ["voice_24k", "voice_16k", "voice_44k_stereo"]
DECODE_STAGES = ["quantizer_out", "upsampled", "transformer_out", "audio_batch"]


def _parity_dir() -> Path | None:
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "parity"]
    if os.environ.get("POCKET_TTS_PARITY_DIR"):
        candidates.append(Path(os.environ["POCKET_TTS_PARITY_DIR"]))
    for path in candidates:
        if (path / "cases.safetensors").is_file():
            return path
    return None


PARITY_DIR = _parity_dir()
needs_fixtures = pytest.mark.skipif(
    PARITY_DIR is None, reason="parity fixtures not found (../shared/parity or $POCKET_TTS_PARITY_DIR)"
)


def max_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype
    return (actual - expected).abs().max().item()


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return load_file(PARITY_DIR / "model.safetensors")


@pytest.fixture(scope="module")
def cases() -> dict[str, torch.Tensor]:
    return load_file(PARITY_DIR / "cases.safetensors")


@pytest.fixture(scope="module")
def cases_json() -> dict:
    return json.loads((PARITY_DIR / "cases.json").read_text())


@pytest.fixture(scope="module")
def mimi(weights) -> Mimi:
    cfg = load_config(PARITY_DIR / "config.yaml")
    model = Mimi.from_config(cfg.mimi).eval()
    model.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("mimi.")}, strict=True)
    return model


@pytest.fixture(scope="module")
def mimi_in(weights, cases) -> torch.Tensor:
    """FlowLM's de-normalisation of the decoder input (flow space -> Mimi space)."""
    return cases["mimi_decode.latents_norm"] * weights["flow_lm.emb_std"] + weights["flow_lm.emb_mean"]


# --- layout --------------------------------------------------------------------------


def test_english_layout_matches_official_keys():
    listing = Path(__file__).resolve().parents[2] / "shared" / "parity" / "english_state_dict.txt"
    if PARITY_DIR is not None:
        listing = PARITY_DIR / "english_state_dict.txt"
    if not listing.is_file():
        pytest.skip("english_state_dict.txt not found")
    expected = {}
    for line in listing.read_text().splitlines():
        if line.startswith("mimi."):
            key, shape, _dtype, _kind = line.split("\t")
            expected[key[len("mimi.") :]] = json.loads(shape)
    with torch.device("meta"):
        model = Mimi.from_config(load_config(config_path_for_language("english")).mimi)
    actual = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert actual == expected
    assert (model.frame_size, model.steps_per_frame, model.sample_rate) == (1920, 16, 24000)


@needs_fixtures
def test_parity_layout(mimi, weights):
    assert mimi.frame_size == 1920 and mimi.steps_per_frame == 16 and mimi.latent_dim == 32
    expected = {k[5:]: tuple(v.shape) for k, v in weights.items() if k.startswith("mimi.")}
    assert {k: tuple(v.shape) for k, v in mimi.state_dict().items()} == expected


# --- decoder (§5d) ---------------------------------------------------------------------


@needs_fixtures
def test_decoder_input_denormalisation(mimi_in, cases):
    assert max_diff(mimi_in, cases["mimi_decode.mimi_in"]) <= TOL


@needs_fixtures
def test_decoder_stages_one_call(mimi, mimi_in, cases):
    state = mimi.init_decoder_state()
    with torch.no_grad():
        stages = {}
        x = stages["quantizer_out"] = mimi.quantizer["output_proj"](mimi_in.transpose(1, 2))
        x = stages["upsampled"] = mimi.upsample["convtr"](x, state.upsample)
        x = stages["transformer_out"] = mimi.decoder_transformer(x, state.transformer)
        stages["audio_batch"] = mimi.decoder(x, state.seanet)
    for name in DECODE_STAGES:
        assert max_diff(stages[name], cases[f"mimi_decode.{name}"]) <= TOL, name
    # The public entry point computes the same thing.
    audio = mimi.decode(mimi_in, mimi.init_decoder_state())
    assert max_diff(audio, cases["mimi_decode.audio_batch"]) <= TOL


def _decode_in_groups(mimi: Mimi, latents: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    assert sum(sizes) == latents.shape[1]
    state, pieces, start = mimi.init_decoder_state(latents.shape[0]), [], 0
    for size in sizes:
        piece = mimi.decode(latents[:, start : start + size], state)
        assert piece.shape[-1] == size * mimi.frame_size
        pieces.append(piece)
        start += size
    return torch.cat(pieces, dim=-1)


@needs_fixtures
def test_decoder_one_frame_per_call(mimi, mimi_in, cases):
    audio = _decode_in_groups(mimi, mimi_in, [1] * mimi_in.shape[1])
    assert max_diff(audio, cases["mimi_decode.audio_stream"]) <= TOL


@needs_fixtures
def test_decoder_groups(mimi, mimi_in, cases, cases_json):
    sizes = cases_json["mimi_decode"]["group_sizes"]
    assert sizes == [1, 3, 7, 9]
    audio = _decode_in_groups(mimi, mimi_in, sizes)
    assert max_diff(audio, cases["mimi_decode.audio_groups"]) <= TOL


@needs_fixtures
def test_decoder_batch_rows_are_independent_streams(mimi, mimi_in, cases):
    # Row 0: the fixture latents; row 1: other latents. Row 0 must not notice row 1.
    other = torch.randn(mimi_in.shape, generator=torch.Generator().manual_seed(0))
    batch = torch.cat((mimi_in, other), dim=0)
    audio = _decode_in_groups(mimi, batch, [2, 5, 1, 12])
    assert max_diff(audio[:1], cases["mimi_decode.audio_batch"]) <= TOL
    alone = mimi.decode(other, mimi.init_decoder_state())
    assert max_diff(audio[1:], alone) <= TOL


# --- voice prompt: reading, resampling, pause handling, encoder (§5e) -------------------


@needs_fixtures
@pytest.mark.parametrize("voice", VOICES)
def test_voice_prompt_preparation(voice, cases, cases_json):
    info = cases_json["voices"][voice]
    wav, rate = read_audio(PARITY_DIR / info["file"])
    assert rate == info["sample_rate"]
    assert max_diff(wav, cases[f"voice.{voice}.wav_read"]) <= TOL
    wav = resample(wav, rate, 24000)
    assert max_diff(wav, cases[f"voice.{voice}.wav_24k"]) <= TOL
    wav = end_on_pause(wav, 24000)
    assert max_diff(wav, cases[f"voice.{voice}.wav_prompt"]) <= TOL


@needs_fixtures
@pytest.mark.parametrize("voice", VOICES)
def test_voice_encoder(voice, mimi, weights, cases):
    wav = cases[f"voice.{voice}.wav_prompt"].unsqueeze(0)
    with torch.no_grad():
        padded = torch.nn.functional.pad(wav, (0, -wav.shape[-1] % mimi.frame_size))
        seanet = mimi.encoder(padded)
        hidden = mimi.encoder_transformer(seanet)
    assert max_diff(seanet, cases[f"voice.{voice}.seanet_out"]) <= TOL
    assert max_diff(hidden, cases[f"voice.{voice}.transformer_out"]) <= TOL

    latents = mimi.encode(wav)
    assert max_diff(latents, cases[f"voice.{voice}.latents"]) <= TOL
    # FlowLM's side of the voice prompt, computed here from the checkpoint tensors.
    conditioning = latents @ weights["flow_lm.speaker_proj_weight"].T
    assert max_diff(conditioning, cases[f"voice.{voice}.conditioning"]) <= TOL
    prompt = torch.cat((weights["flow_lm.bos_before_voice"], conditioning), dim=1)
    assert max_diff(prompt, cases[f"voice.{voice}.prompt"]) <= TOL


@needs_fixtures
def test_encode_pads_to_whole_frames(mimi):
    wav = torch.randn(2, 1, 3 * 1920 + 7, generator=torch.Generator().manual_seed(1)) * 0.1
    latents = mimi.encode(wav)
    assert latents.shape == (2, 4, 32)
    padded = torch.nn.functional.pad(wav, (0, 1920 - 7))
    assert max_diff(mimi.encode(padded), latents) == 0.0
    assert max_diff(mimi.encode(wav[1:]), latents[1:]) <= 1e-5
    with pytest.raises(ValueError):
        mimi.encode(torch.zeros(1, 1, 0))


# --- audio helpers ----------------------------------------------------------------------


def test_resample_identity_and_length():
    wav = torch.randn(1, 16000, generator=torch.Generator().manual_seed(2))
    assert resample(wav, 16000, 16000) is wav
    assert resample(wav, 16000, 24000).shape == (1, 24000)
    assert resample(wav, 44100, 24000).dtype == torch.float32


def test_end_on_pause_trims_silence_and_appends_pause():
    loud = torch.full((1, 4800), 0.5)
    quiet = torch.full((1, 2400), 1e-4)  # 74 dB below: trimmed
    out = end_on_pause(torch.cat((loud, quiet), dim=-1), 24000)
    assert out.shape == (1, 4800 + 1920)
    assert torch.all(out[:, 4800:] == 0)
    assert out[0, 4800 - 480] == 0.5 and out[0, 4799] == 0.0
    assert torch.equal(out[:, :4320], loud[:, :4320])
    short = torch.ones(1, 100)
    assert torch.equal(end_on_pause(short, 24000), short)


def _tone(n: int = 24000, rate: int = 24000) -> np.ndarray:
    t = np.arange(n) / rate
    return (0.5 * np.sin(2 * np.pi * 440 * t) * np.linspace(0.2, 1, n)).astype(np.float32)


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_write_read_round_trip_lossless(tmp_path, fmt):
    samples = _tone()
    path = tmp_path / f"out.{fmt}"
    write_audio(path, torch.from_numpy(samples), 24000)
    wav, rate = read_audio(path)
    assert rate == 24000 and wav.shape == (1, samples.size) and wav.dtype == torch.float32
    assert np.abs(wav[0].numpy() - samples).max() <= 2 / 32768
    assert sf.info(str(path)).subtype == "PCM_16"


def test_write_read_round_trip_ogg(tmp_path):
    samples = _tone()
    path = tmp_path / "out.ogg"
    write_audio(path, samples, 24000)
    info = sf.info(str(path))
    assert (info.format, info.subtype, info.samplerate) == ("OGG", "VORBIS", 24000)
    wav, rate = read_audio(path)
    assert rate == 24000 and wav.shape == (1, samples.size)
    err = wav[0].numpy() - samples
    assert np.sqrt(np.mean(err**2)) < 0.02  # lossy, but close on a pure tone


def test_write_explicit_format_to_exact_path(tmp_path):
    path = tmp_path / "partial.tmp"
    write_audio(path, _tone(2400), 24000, format="flac")
    assert path.is_file() and sf.info(str(path)).format == "FLAC"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial.tmp"]


def test_write_wav_matches_reference_pcm_convention(tmp_path):
    # Clamp to [-1, 1], scale by 32767, truncate toward zero.
    samples = np.array([0.0, 1.5, -2.0, 0.5, -0.5, 0.99999], dtype=np.float32)
    path = tmp_path / "clip.wav"
    write_audio(path, samples, 24000)
    with wave.open(str(path), "rb") as f:
        assert (f.getsampwidth(), f.getnchannels(), f.getframerate()) == (2, 1, 24000)
        ints = np.frombuffer(f.readframes(-1), dtype=np.int16)
    assert ints.tolist() == [0, 32767, -32767, 16383, -16383, 32766]


def test_write_unsupported_format(tmp_path):
    assert SUPPORTED_FORMATS == ("wav", "flac", "ogg")
    with pytest.raises(ValueError, match="mp3"):
        write_audio(tmp_path / "out.mp3", _tone(100), 24000)
    with pytest.raises(ValueError, match="unsupported"):
        write_audio(tmp_path / "out.wav", _tone(100), 24000, format="aiff")


def test_write_to_missing_directory(tmp_path):
    with pytest.raises(OSError, match="out.wav"):
        write_audio(tmp_path / "missing" / "out.wav", _tone(100), 24000)


def test_read_stereo_16bit_and_float_wav(tmp_path):
    left, right = _tone(480), -_tone(480) * 0.5
    stereo = (np.stack((left, right), axis=1) * 32768).astype(np.int16)
    path = tmp_path / "stereo.wav"
    sf.write(str(path), stereo, 16000, subtype="PCM_16")
    wav, rate = read_audio(path)
    expected = (stereo.astype(np.float32) / 32768).mean(axis=1)
    assert rate == 16000 and np.array_equal(wav[0].numpy(), expected)

    path = tmp_path / "float.wav"
    sf.write(str(path), left, 22050, subtype="FLOAT")
    wav, rate = read_audio(path)
    assert rate == 22050 and np.array_equal(wav[0].numpy(), left)


def test_read_missing_file(tmp_path):
    missing = tmp_path / "nope.wav"
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        read_audio(missing)


@pytest.mark.parametrize("name", ["broken.wav", "broken.flac", "broken.ogg", "broken.mp3", "garbage.wav"])
def test_read_corrupt_file(tmp_path, name):
    path = tmp_path / name
    header = b"" if name.startswith("garbage") else b"RIFF\x00\x00\x00\x00WAVEjunk"
    path.write_bytes(header + np.random.default_rng(0).bytes(1000))
    with pytest.raises(ValueError) as info:
        read_audio(path)
    message = str(info.value)
    assert name in message and "\n" not in message


def test_read_empty_audio(tmp_path):
    path = tmp_path / "empty.wav"
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(24000)
    with pytest.raises(ValueError, match="no samples"):
        read_audio(path)
    path = tmp_path / "empty24.wav"  # the soundfile path
    sf.write(str(path), np.zeros(0, dtype=np.float32), 24000, subtype="PCM_24")
    with pytest.raises(ValueError, match="empty24.wav contains no samples"):
        read_audio(path)


def test_read_truncated_wav(tmp_path):
    data = (PARITY_DIR or Path("/nonexistent")) / "voice_24k.wav"
    path = tmp_path / "cut.wav"
    if data.is_file():
        path.write_bytes(data.read_bytes()[:1001])  # header + 478.5 samples
    else:
        write_audio(path, _tone(1000), 24000)
        path.write_bytes(path.read_bytes()[:1001])
    wav, rate = read_audio(path)
    assert rate == 24000 and wav.shape == (1, 478)


def test_read_directory(tmp_path):
    with pytest.raises(ValueError, match="not a file"):
        read_audio(tmp_path)
