"""How far reduced precision (backbone, Mimi decoder) drifts from float32, on the parity fixtures.

For each backbone / decoder precision pair, regenerates the temperature-0 parity utterances and prints
the max abs difference of the audio against float32 and against Kyutai's stored
audio, and a log-spectral distance (dB, mean over STFT bins) against float32.

    python scripts/measure_precision_drift.py [--parity-dir ../shared/parity]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from pocket_tts.models.tts_model import TTSModel

# (backbone, Mimi decoder): `precision=` and `decoder_precision=` of load_model.
PRECISIONS = (
    ("float32", "float32"), ("bfloat16", "float32"), ("int8", "float32"), ("float32", "bfloat16"), ("int8", "bfloat16"),
)  # fmt: skip


def log_spectral_distance(a: torch.Tensor, b: torch.Tensor, n_fft: int = 1024) -> float:
    """Mean absolute difference of STFT magnitudes in dB (floor -100 dB)."""
    window = torch.hann_window(n_fft)

    def db(x: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(x, n_fft, hop_length=n_fft // 4, window=window, return_complex=True).abs()
        return 20 * torch.log10(spec.clamp(min=1e-5))

    return (db(a) - db(b)).abs().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parity-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "parity")
    args = parser.parse_args()
    logging.getLogger("pocket_tts").setLevel(logging.ERROR)  # EOS is disabled on purpose here
    cases = json.loads((args.parity_dir / "cases.json").read_text())
    stored = load_file(str(args.parity_dir / "cases.safetensors"))

    outputs: dict[tuple[str, str], list[torch.Tensor]] = {}
    for precision, decoder in PRECISIONS:
        model = TTSModel.load_model(config=args.parity_dir / "config.yaml", weights=args.parity_dir / "model.safetensors",
                                    temp=0.0, eos_threshold=1e9, precision=precision, decoder_precision=decoder)  # fmt: skip
        voice = model.get_state_for_audio_prompt(args.parity_dir / "voice_24k.wav")
        outputs[precision, decoder] = [model.generate_audio(voice, c["text"], max_tokens=c["max_tokens"]) for c in cases["e2e"]]

    print(f"{'backbone/decoder':<18} {'case':<5} {'max|Δ| vs fp32':>15} {'max|Δ| vs Kyutai':>17} {'LSD vs fp32 (dB)':>17}")
    for pair in PRECISIONS:
        for i, audio in enumerate(outputs[pair]):
            fp32 = outputs["float32", "float32"][i]
            print(f"{'/'.join(pair):<18} {i:<5} {(audio - fp32).abs().max().item():>15.2e} "
                  f"{(audio - stored[f'e2e.{i}.audio']).abs().max().item():>17.2e} "
                  f"{log_spectral_distance(audio, fp32):>17.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
