"""Audio files in and out, resampling, and voice-prompt end trimming.

Reading follows the reference bit for bit: 16-bit PCM WAV is decoded with the
stdlib `wave` module as int / 32768, everything else goes through soundfile as
float32; channels are averaged. Errors are one line that names the file.
"""

from __future__ import annotations

import io
import math
import wave
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

SUPPORTED_FORMATS = ("wav", "flac", "ogg")

# soundfile (format, subtype) per output format.
_SF_FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS")}

# Limits on audio read as a voice prompt, checked from the header before decoding: a 1 Hz file
# would be upsampled 24000x (measured 4.3 GB), a header may claim any length or channel count.
MIN_READ_RATE = 8000
MAX_READ_RATE = 192000
MAX_READ_CHANNELS = 8
MAX_READ_SAMPLES = 300 * 48000 * 2  # frames x channels: five minutes of 48 kHz stereo (~110 MB as float32)


def _error_reason(exc: Exception) -> str:
    # libsndfile errors repeat the path; its own error string is the useful part.
    reason = getattr(exc, "error_string", None) or str(exc) or type(exc).__name__
    return " ".join(str(reason).split())


def _mix_down(samples: np.ndarray) -> torch.Tensor:
    """[T, channels] float32 -> [1, T], channels averaged."""
    mono = samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1)
    return torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32)).unsqueeze(0)


def _read_pcm16_wav(path: Path) -> tuple[torch.Tensor, int] | None:
    """16-bit PCM WAV via `wave`; None when the file is a WAV that `wave` cannot
    decode as 16-bit PCM (other widths, float, extensible headers)."""
    try:
        with wave.open(str(path), "rb") as f:
            if f.getsampwidth() != 2:
                return None
            channels, rate = f.getnchannels(), f.getframerate()
            _check_audio_shape(path, rate, channels, f.getnframes())
            raw = f.readframes(-1)
    except (wave.Error, EOFError):
        return None
    raw = raw[: len(raw) - len(raw) % (2 * channels)]  # a truncated file may end mid-frame
    samples = np.frombuffer(raw, dtype=np.int16).astype(np.float32) / 32768.0
    return _mix_down(samples.reshape(-1, channels)), rate


def _check_audio_shape(path: Path, rate: int, channels: int, frames: int) -> None:
    if not MIN_READ_RATE <= rate <= MAX_READ_RATE:
        raise ValueError(f"audio file {path} has a sample rate of {rate} Hz; {MIN_READ_RATE}-{MAX_READ_RATE} Hz is read")
    if not 1 <= channels <= MAX_READ_CHANNELS:
        raise ValueError(f"audio file {path} has {channels} channels; at most {MAX_READ_CHANNELS} are read")
    if frames * channels > MAX_READ_SAMPLES:
        raise ValueError(
            f"audio file {path} holds {frames / rate:.0f} s x {channels} channels; "
            f"at most {MAX_READ_SAMPLES} samples ({MAX_READ_SAMPLES // 96000} s of 48 kHz stereo) are read"
        )


def read_audio(path: str | Path) -> tuple[torch.Tensor, int]:
    """Read an audio file as float32 [1, T] (channels averaged) and its sample rate."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"audio file not found: {path}")
    if not path.is_file():
        raise ValueError(f"audio path is not a file: {path}")
    result = _read_pcm16_wav(path) if path.suffix.lower() == ".wav" else None
    if result is None:
        try:
            info = sf.info(str(path))
            _check_audio_shape(path, info.samplerate, info.channels, info.frames)
            data, rate = sf.read(str(path), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"cannot read audio file {path}: {_error_reason(exc)}") from None
        result = (_mix_down(data), int(rate))
    wav, rate = result
    if wav.shape[-1] == 0:
        raise ValueError(f"audio file {path} contains no samples")
    if rate <= 0:
        raise ValueError(f"audio file {path} has an invalid sample rate {rate}")
    return wav, rate


def resample(wav: torch.Tensor, from_rate: int, to_rate: int) -> torch.Tensor:
    """Polyphase resampling along the last axis (SciPy's default Kaiser(5.0) filter)."""
    if from_rate == to_rate:
        return wav
    from scipy.signal import resample_poly  # only voice prompts need SciPy

    g = math.gcd(int(from_rate), int(to_rate))
    out = resample_poly(wav.detach().cpu().numpy(), int(to_rate) // g, int(from_rate) // g, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(out)).to(device=wav.device, dtype=wav.dtype)


def end_on_pause(
    wav: torch.Tensor, sample_rate: int, pause_sec: float = 0.08, fade_sec: float = 0.02, floor_db: float = 35.0
) -> torch.Tensor:
    """Make a voice prompt [..., T] end on exactly `pause_sec` of silence.

    A prompt that stops mid-word makes the model continue that word, and a long
    trailing silence delays the onset. So: cut after the last 20 ms frame within
    `floor_db` of the loudest frame, fade out the last `fade_sec` that remain,
    and append `pause_sec` of zeros. Shorter than one frame: returned unchanged.
    """
    frame = max(1, int(0.02 * sample_rate))
    n_frames = wav.shape[-1] // frame
    if n_frames == 0:
        return wav
    frames = wav[..., : n_frames * frame].reshape(-1, n_frames, frame)
    rms = frames.square().mean(dim=(0, 2)).sqrt()
    level_db = 20 * torch.log10(rms + 1e-12)
    loud = torch.nonzero(level_db > level_db.max() - floor_db).flatten()
    end = (int(loud[-1]) + 1) * frame
    fade = min(int(fade_sec * sample_rate), end)
    out = wav[..., :end].clone()
    out[..., end - fade :] *= torch.linspace(1, 0, fade, device=wav.device, dtype=wav.dtype)
    silence = wav.new_zeros(*wav.shape[:-1], int(pause_sec * sample_rate))
    return torch.cat((out, silence), dim=-1)


def audio_format(path: str | Path, format: str | None = None) -> str:
    """The output format: `format` if given, else the file extension; must be supported."""
    fmt = (format or Path(path).suffix.lstrip(".")).lower()
    if fmt not in SUPPORTED_FORMATS:
        what = f"format {format!r}" if format else f"extension of {Path(path).name!r}"
        raise ValueError(f"unsupported audio {what}; supported: {', '.join(SUPPORTED_FORMATS)}")
    return fmt


def encode_audio(samples: torch.Tensor | np.ndarray, sample_rate: int, format: str) -> bytes:
    """Mono samples [T] (float, nominally in [-1, 1]) as the bytes of a `format` file.

    wav and flac are 16-bit PCM, ogg is Vorbis. Encoding in memory keeps disk
    errors out of libsndfile's callbacks: the caller writes the bytes itself.
    """
    fmt = audio_format("", format)
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu().numpy()
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    clipped = np.clip(samples, -1.0, 1.0)
    if fmt == "ogg":
        data = clipped
    else:
        # Scale by 32767 and truncate toward zero, as the reference's WAV writer does.
        data = (clipped * 32767).astype(np.int16)
    sf_format, subtype = _SF_FORMATS[fmt]
    buffer = io.BytesIO()
    try:
        sf.write(buffer, data, int(sample_rate), format=sf_format, subtype=subtype)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise ValueError(f"cannot encode {fmt} audio: {_error_reason(exc)}") from None
    return buffer.getvalue()


def write_audio(
    path: str | Path, samples: torch.Tensor | np.ndarray, sample_rate: int, format: str | None = None
) -> None:
    """Write mono samples [T] to exactly `path`, in `format` or else the format of its extension."""
    data = encode_audio(samples, sample_rate, audio_format(path, format))
    # Opening the file ourselves gives OS errors that name the path.
    with open(path, "wb") as f:
        f.write(data)
