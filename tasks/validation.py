"""Checks on a `synthesize` request, before any audio is generated.

Every failure is an InvalidJobError with one line saying what is wrong. The
audio formats live in a torch module, so they are imported inside the function
that needs them: this module is imported by web processes too.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pocket_tts.catalog import PREDEFINED_VOICES
from tasks.errors import InvalidJobError
from worker_config import Settings

VOICE_FILE_SUFFIXES = (".wav", ".flac", ".ogg", ".safetensors")
MAX_TEMPERATURE = 2.0
MAX_SEED = 2**64 - 1  # torch.manual_seed's range
MAX_VOICE_NAME_BYTES = 255  # one file name on Linux file systems
# Letters and digits are what the model can speak; a text of only punctuation,
# symbols (emoji), marks, spaces or invisible format characters (BOM, zero-width) is noise.
_SPEAKABLE_CATEGORIES = ("L", "N")


@dataclass(frozen=True)
class Job:
    text: str
    voice: str  # a catalogue voice name or an absolute path inside the voices directory
    temperature: float | None
    format: str
    seed: int | None = None  # set: the job's sampling noise is reproducible


def validate_job(text, voice, temperature, format, settings: Settings, seed=None) -> Job:
    return Job(
        text=_checked_text(text, settings.max_text_chars),
        voice=resolve_voice(settings.default_voice if voice is None else voice, settings.voices_dir),
        temperature=_checked_temperature(temperature),
        format=_checked_format(format),
        seed=_checked_seed(seed),
    )


def resolve_voice(voice, voices_dir: Path | None) -> str:
    """A catalogue voice name as is, or the real path of a file inside `voices_dir`."""
    if not isinstance(voice, str) or not voice.strip():
        raise InvalidJobError(f"voice must be a non-empty string, got {_short_repr(voice)}")
    if not voice.isprintable() or not _encodable(voice):
        raise InvalidJobError(f"voice {_short_repr(voice)} contains control or unencodable characters")
    if any(len(part.encode()) > MAX_VOICE_NAME_BYTES for part in voice.split("/")):
        raise InvalidJobError(f"voice {_short_repr(voice)} has a name over {MAX_VOICE_NAME_BYTES} bytes")
    if voice in PREDEFINED_VOICES:
        return voice
    unknown = InvalidJobError(
        f"unknown voice {voice!r}: not a catalogue voice ({', '.join(PREDEFINED_VOICES[:8])}, ...) "
        f"nor a {'/'.join(VOICE_FILE_SUFFIXES)} file in the voices directory (POCKET_TTS_VOICES_DIR)"
    )
    relative = PurePosixPath(voice)
    if relative.is_absolute() or ".." in relative.parts or "\\" in voice:
        raise InvalidJobError(f"voice {voice!r} must be a file name inside the voices directory, not a path out of it")
    if voices_dir is None or relative.suffix.lower() not in VOICE_FILE_SUFFIXES:
        raise unknown
    root = voices_dir.resolve()
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root):  # a symlink pointing outside
        raise InvalidJobError(f"voice {voice!r} resolves outside the voices directory")
    if not candidate.is_file():
        raise unknown
    return str(candidate)


def _checked_text(text, max_chars: int) -> str:
    if not isinstance(text, str):
        raise InvalidJobError(f"text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InvalidJobError("text is empty")
    if len(text) > max_chars:
        raise InvalidJobError(
            f"text is {len(text)} characters long; the limit is {max_chars} (POCKET_TTS_MAX_TEXT_CHARS)"
        )
    if not _encodable(text):
        position = next(i for i, char in enumerate(text) if not _encodable(char))
        raise InvalidJobError(f"text has an unencodable character U+{ord(text[position]):04X} at position {position}")
    if not any(unicodedata.category(char)[0] in _SPEAKABLE_CATEGORIES for char in text):
        raise InvalidJobError(
            "text has nothing to speak: no letter or digit (only punctuation, symbols, emoji or invisible characters)"
        )
    return text


def _encodable(text: str) -> bool:
    """False for lone surrogates, which JSON carries but UTF-8 (and the tokenizer) cannot."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _short_repr(value, limit: int = 60) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else f"{shown[:limit]}... ({len(shown)} characters)"


def _checked_temperature(temperature) -> float | None:
    if temperature is None:
        return None
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise InvalidJobError(f"temperature must be a number, got {_short_repr(temperature)}")
    # No float conversion: JSON integers are unbounded (10**400 overflows a float); NaN fails both comparisons.
    if not (0 <= temperature <= MAX_TEMPERATURE):
        raise InvalidJobError(f"temperature must be between 0 and {MAX_TEMPERATURE:g}, got {_short_repr(temperature)}")
    return float(temperature)


def _checked_seed(seed) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise InvalidJobError(f"seed must be an integer between 0 and 2**64-1, got {_short_repr(seed)}")
    return seed


def _checked_format(format) -> str:
    from pocket_tts.audio import SUPPORTED_FORMATS

    if not isinstance(format, str) or format not in SUPPORTED_FORMATS:
        raise InvalidJobError(f"format {_short_repr(format)} is not supported; use one of {', '.join(SUPPORTED_FORMATS)}")
    return format
