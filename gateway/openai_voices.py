"""OpenAI's speech voice names, mapped onto voices this fleet has, so OpenAI clients work unchanged.

OpenAI's `/v1/audio/speech` takes one of its own voice names (`alloy`, `nova`, ...).
Each maps to a fixed catalog voice (pocket_tts.catalog): for English, a distinct
voice per name, chosen by the voice's perceived gender and register only (they
do not imitate OpenAI's voices); every other shipped language has one native
catalog voice, which all the names then use; a custom model (no catalog voice
states) uses the fleet's default voice. Names that are not OpenAI's pass through
unchanged: catalog voices and voice files keep working, and an unknown name is
refused by the worker as for any request. Torch-free: the gateway imports it.
"""

from __future__ import annotations

from pocket_tts.catalog import default_voice, spoken_language

# OpenAI's API reference (audio/createSpeech, 2025): the 13 voices of tts-1 and gpt-4o-mini-tts.
ENGLISH_VOICES = {
    "alloy": "alba",  # OpenAI: neutral, balanced
    "ash": "marius",
    "ballad": "jean",
    "coral": "cosette",
    "echo": "javert",
    "fable": "george",
    "nova": "fantine",
    "onyx": "charles",  # deep
    "sage": "eponine",
    "shimmer": "azelma",
    "verse": "paul",
    "marin": "mary",
    "cedar": "michael",
}
OPENAI_VOICES = tuple(ENGLISH_VOICES)


def catalog_voice(voice: str, language: str, fleet_default: str) -> str:
    """The voice to synthesize for a request's `voice` on a fleet serving `language`
    ("custom": a custom config, whose default voice is `fleet_default`)."""
    if voice not in ENGLISH_VOICES:
        return voice
    if language == "custom":
        return fleet_default
    if spoken_language(language) == "english":
        return ENGLISH_VOICES[voice]
    return default_voice(language)


def voice_map(language: str, fleet_default: str) -> dict[str, str]:
    """Every OpenAI name and the voice it becomes on this fleet (what GET /v1/voices lists)."""
    return {name: catalog_voice(name, language, fleet_default) for name in OPENAI_VOICES}
