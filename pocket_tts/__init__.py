"""Pocket TTS inference engine: Kyutai's released weights, our own code."""

from pocket_tts.models.tts_model import TTSModel, export_model_state

__all__ = ["TTSModel", "export_model_state"]
