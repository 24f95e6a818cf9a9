"""Uploaded voices: checked, then stored as content-addressed WAV files the workers read by name.

An upload is decoded completely (a broken file is refused here, not in a
worker), must be short enough, and is stored as 16-bit WAV under
`<voices dir>/uploads/<sha256>.wav`: the name comes from the content, never
from the client, and the same audio uploaded twice is one file.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

import soundfile as sf

from tasks.validation import VOICE_FILE_SUFFIXES

UPLOADS_FOLDER = "uploads"


class VoiceUploadError(ValueError):
    """The upload cannot become a voice; the message is one line for the client."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def store_uploaded_voice(data: bytes, uploads_dir: Path, max_seconds: float) -> str:
    """Check `data` and store it; returns the voice name to send with jobs (relative to the voices dir)."""
    try:
        with sf.SoundFile(io.BytesIO(data)) as audio:
            rate, frames = audio.samplerate, audio.frames
            # Never decode more than the limit: a small compressed file can hold hours of audio.
            samples = audio.read(int(max_seconds * rate) + 1, dtype="int16", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        raise VoiceUploadError("the voice upload is not a readable audio file (WAV, FLAC, Ogg or MP3)") from None
    if samples.shape[0] == 0:
        raise VoiceUploadError("the voice upload contains no audio")
    if samples.shape[0] > max_seconds * rate:
        seconds = max(frames, samples.shape[0]) / rate
        raise VoiceUploadError(f"the voice upload is {seconds:.1f} s long; the limit is {max_seconds:g} s")
    wav = io.BytesIO()
    sf.write(wav, samples, rate, format="WAV", subtype="PCM_16")
    name = hashlib.sha256(wav.getvalue()).hexdigest() + ".wav"
    path = uploads_dir / name
    if not path.is_file():
        _write_atomically(path, wav.getvalue())
    return f"{UPLOADS_FOLDER}/{name}"


def _write_atomically(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".upload.", suffix=".part")
    except OSError:
        raise VoiceUploadError("voice uploads cannot be stored on this server", status=503) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(temp, 0o644)  # workers may run as another user
        os.replace(temp, path)
    except OSError:
        Path(temp).unlink(missing_ok=True)
        raise VoiceUploadError("voice uploads cannot be stored on this server", status=503) from None


def voice_files(voices_dir: Path | None) -> list[str]:
    """Names of the voice files in the voices directory (uploads excluded), as jobs name them."""
    if voices_dir is None or not voices_dir.is_dir():
        return []
    names = (
        path.relative_to(voices_dir).as_posix()
        for path in voices_dir.rglob("*")
        if path.suffix.lower() in VOICE_FILE_SUFFIXES and path.is_file()
    )
    return sorted(name for name in names if not name.startswith(f"{UPLOADS_FOLDER}/"))
