"""Response audio formats: WAV and raw PCM stream as the audio comes; FLAC, Opus and MP3 are
encoded by libsndfile (through soundfile) once the job's audio is complete."""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile as sf

SAMPLE_WIDTH = 2  # 16-bit PCM, as published by the workers (tasks.audio_stream)
# OpenAI's response_format -> (media type, soundfile format, subtype); None: streamed as is.
FORMATS = {
    "wav": ("audio/wav", None, None),
    "pcm": ("audio/pcm", None, None),
    "flac": ("audio/flac", "FLAC", "PCM_16"),
    "opus": ("audio/ogg", "OGG", "OPUS"),
    "mp3": ("audio/mpeg", "MP3", "MPEG_LAYER_III"),
}
STREAMED_FORMATS = ("wav", "pcm")
# Formats the workers store (pocket_tts.audio.SUPPORTED_FORMATS) and their media types.
STORED_MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "ogg": "audio/ogg"}


def supported_formats() -> tuple[str, ...]:
    """Response formats this process can produce: those whose libsndfile encoder is available."""
    available = sf.available_formats()
    return tuple(
        name
        for name, (_, container, subtype) in FORMATS.items()
        if container is None or (container in available and subtype in sf.available_subtypes(container))
    )


def streaming_wav_header(sample_rate: int) -> bytes:
    """A mono 16-bit WAV header for audio of unknown length: the sizes say "as long as possible"."""
    data_size = 0xFFFFFFFF - 36
    byte_rate = sample_rate * SAMPLE_WIDTH
    return (
        b"RIFF" + struct.pack("<I", 36 + data_size) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, byte_rate, SAMPLE_WIDTH, 8 * SAMPLE_WIDTH)
        + b"data" + struct.pack("<I", data_size)
    )  # fmt: skip


def encode(pcm: bytes, sample_rate: int, response_format: str) -> bytes:
    """Whole-utterance 16-bit PCM -> a FLAC, Ogg Opus or MP3 file."""
    _, container, subtype = FORMATS[response_format]
    out = io.BytesIO()
    samples = np.frombuffer(pcm, dtype="<i2")
    sf.write(out, samples, sample_rate, format=container, subtype=subtype)
    return out.getvalue()
