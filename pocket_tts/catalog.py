"""What Kyutai ships, by name: the models (`language=`), each one's default voice, the voice catalog.

Plain data and no imports beyond the standard library: web processes, worker
settings and argument checks use these names without loading torch or a config.
Each model name has its config, pocket_tts/config/<name>.yaml, with the hub paths
and revisions of Kyutai's pocket-tts 4.0.1 release.
"""

from __future__ import annotations

DEFAULT_LANGUAGE = "english"  # the same weights as english_2026-10

SPOKEN_LANGUAGES = ("english", "french", "german", "spanish", "italian", "portuguese", "dutch")

# Every model by name, grouped by what it is. `_24l`: a 24-layer backbone; `_refl`: the same
# layout as its sibling, other weights; 2m / 7m / 18m: the small 2026-10 models.
LANGUAGES = (
    "english", "english_2026-10", "english_2026-01", "english_2026-04", "english_2026-04_24l",
    "english_2026-09", "english_2026-09_2", "english_2026-09_24l", "english_drifting_26-09",
    "english_18m_2026-10", "english_18m_refl_2026-10", "english_7m_2026-10", "english_7m_refl_2026-10",
    "english_2m_2026-10", "english_2m_refl_2026-10",
    "french", "french_24l", "german", "german_24l", "spanish", "spanish_24l",
    "italian", "italian_24l", "portuguese", "portuguese_24l", "dutch", "dutch_24l",
)  # fmt: skip

# Voices whose states Kyutai computed with the released weights of every model
# (hub: kyutai/pocket-tts-without-voice-cloning, languages/<model>/embeddings/<voice>.safetensors).
PREDEFINED_VOICES = (
    "alba", "marius", "javert", "jean", "fantine", "cosette", "eponine", "azelma",
    "anna", "vera", "charles", "paul", "george", "mary", "jane", "michael", "eve",
    "bill_boerst", "peter_yearsley", "stuart_bell", "caro_davy",
    "giovanni", "lola", "juergen", "rafael", "daan", "estelle",
)  # fmt: skip
VOICE_STATE_PATH = (
    "hf://kyutai/pocket-tts-without-voice-cloning/languages/{language}/embeddings/{voice}.safetensors"
    "@a7056f505a4a8ca72d8b5fb1440071d6f1a35739"
)

# A native speaker per language; English and anything unlisted speak with alba.
DEFAULT_VOICES = {
    "french": "estelle",
    "german": "juergen",
    "spanish": "lola",
    "italian": "giovanni",
    "portuguese": "rafael",
    "dutch": "daan",
}
FALLBACK_VOICE = "alba"
# The recording behind alba: what a custom config or a training checkpoint clones by default.
CUSTOM_MODEL_DEFAULT_VOICE = "hf://kyutai/tts-voices/alba-mackenna/casual.wav"


def spoken_language(language: str) -> str:
    """The language a model speaks: "french" for "french_24l", "english" for "english_7m_2026-10"."""
    return language.split("_", 1)[0]


def default_voice(language: str | None = None) -> str:
    """The catalog voice used when a request names none (None: the default model's)."""
    return DEFAULT_VOICES.get(spoken_language(language or DEFAULT_LANGUAGE), FALLBACK_VOICE)


def check_language(language: str) -> str:
    """`language` if Kyutai ships a model of that name, else ValueError listing the names."""
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; available: {', '.join(sorted(LANGUAGES))}")
    return language


def voice_state_path(language: str, voice: str) -> str:
    """Hub path of a catalog voice's precomputed state for the model `language`."""
    return VOICE_STATE_PATH.format(language=language, voice=voice)
