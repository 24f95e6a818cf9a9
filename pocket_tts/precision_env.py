"""The precision settings' names and their environment variables (torch-free: worker settings check them).

`POCKET_TTS_PRECISION` sets the FlowLM backbone's weight format, `POCKET_TTS_DECODER_PRECISION`
the Mimi decoder's (weights and activations); both default to float32.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

PRECISION_ENV = "POCKET_TTS_PRECISION"
PRECISIONS = ("float32", "bfloat16", "int8")
DECODER_PRECISION_ENV = "POCKET_TTS_DECODER_PRECISION"
DECODER_PRECISIONS = ("float32", "bfloat16")
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "qint8": "int8"}


def precision_name(value: str, choices: tuple[str, ...] = PRECISIONS, source: str | None = None) -> str:
    """`value` (or its alias) if it is one of `choices`, else ValueError naming `source`."""
    value = _ALIASES.get(value, value)
    if value not in choices:
        what = "decoder precision" if choices == DECODER_PRECISIONS else "precision"
        raise ValueError(f"{source or repr(value)}: {what} must be one of {', '.join(choices)}")
    return value


def precision_from_env(environ: Mapping[str, str] | None = None, decoder: bool = False) -> str:
    """The backbone's (or with `decoder`, the Mimi decoder's) precision from the environment."""
    name, choices = (DECODER_PRECISION_ENV, DECODER_PRECISIONS) if decoder else (PRECISION_ENV, PRECISIONS)
    value = (os.environ if environ is None else environ).get(name, "").strip().lower() or "float32"
    return precision_name(value, choices, f"{name}={value!r}")
