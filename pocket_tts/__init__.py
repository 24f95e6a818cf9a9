"""Pocket TTS inference engine: Kyutai's released weights, our own code.

`TTSModel` and `export_model_state` are imported lazily so that light modules
(`pocket_tts.cli`'s queue client, `pocket_tts.files`) do not pull in torch.
"""

__all__ = ["TTSModel", "export_model_state"]


def __getattr__(name: str):
    if name in __all__:
        from pocket_tts.models import tts_model

        return getattr(tts_model, name)
    raise AttributeError(f"module 'pocket_tts' has no attribute {name!r}")
