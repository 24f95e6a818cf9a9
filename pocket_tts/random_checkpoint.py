"""Random-weight checkpoints in the official layout, for benchmarks and tests without a download.

`write_random_checkpoint` writes `config.yaml`, `model.safetensors` and a synthetic
`tokenizer.json` into a folder. The model has the architecture and the cost of
the real one, but its output is noise, never speech.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import yaml

from pocket_tts.config import ModelConfig, config_path_for_language, load_config

SPECIAL_PIECES = ["<unk>", "<s>", "</s>", "\u2581"]
CHARACTERS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?;:'\"-()")


def write_random_checkpoint(out_dir: str | Path, language_or_config: str | Path = "english", seed: int = 0,
                            overrides: dict[str, Any] | None = None) -> Path:  # fmt: skip
    """Write a random checkpoint of a shipped language (or a config file) and return its config path.

    `overrides` maps dotted config keys to values, e.g. {"flow_lm.transformer.num_layers": 1}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = Path(language_or_config)
    if source.suffix not in (".yaml", ".yml"):
        source = config_path_for_language(str(language_or_config))
    raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    for key in ("weights_path", "weights_path_without_voice_cloning"):
        raw.pop(key, None)
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = value
    raw["flow_lm"]["lookup_table"].update(tokenizer="tokenizers", tokenizer_path="tokenizer.json")
    raw["weights_path"] = "model.safetensors"  # relative paths resolve against the config's folder
    config_path = out_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")

    cfg = load_config(config_path)
    write_synthetic_tokenizer(out_dir / "tokenizer.json", cfg.flow_lm.lookup_table.n_bins)
    save_random_weights(cfg, out_dir / "model.safetensors", seed)
    return config_path


def write_synthetic_tokenizer(path: Path, vocab_size: int) -> None:
    """A unigram tokenizer of exactly `vocab_size` pieces: characters, then made-up word pieces."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    # Punctuation never merges with the word-start mark, as in the released tokenizers.
    pieces = SPECIAL_PIECES + CHARACTERS + ["\u2581" + c for c in CHARACTERS if c.isalnum()]
    letters = "etaoinshrdlucmfwypvbgk"
    n = 0
    while len(pieces) < vocab_size:  # deterministic pseudo-syllables fill the vocabulary
        a, b, c = letters[n % 22], letters[(n // 22) % 22], letters[(n // 484) % 22]
        pieces.append(("\u2581" if n % 2 else "") + a + b + (c if n >= 484 else ""))
        n += 1
    pieces = list(dict.fromkeys(pieces))
    while len(pieces) < vocab_size:
        pieces.append(f"\u2581w{len(pieces)}")
    vocab = [(p, 0.0 if i < 4 else -math.log(2 + i)) for i, p in enumerate(pieces[:vocab_size])]
    tok = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    path.write_text(tok.to_str(), encoding="utf-8")


def save_random_weights(cfg: ModelConfig, path: Path, seed: int) -> None:
    """Weights drawn so that activations stay O(1): N(0, 1/sqrt(fan_in)) matrices, norms near 1."""
    from safetensors.torch import save_file

    from pocket_tts.models.flow_lm import FlowLM
    from pocket_tts.models.mimi import Mimi

    with torch.device("meta"):
        parts = {"flow_lm": FlowLM(cfg.flow_lm, cfg.latent_dim, cfg.voice_dim), "mimi": Mimi.from_config(cfg.mimi)}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, module in parts.items():
        for name, meta in module.state_dict().items():
            tensors[f"{prefix}.{name}"] = _random_tensor(name, tuple(meta.shape), generator)
    save_file(tensors, str(path), metadata={"note": json.dumps("random weights, not a trained model")})


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    def normal(mean: float, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std + mean

    leaf = name.rsplit(".", 1)[-1]
    if leaf == "freqs":
        half = shape[0]
        return torch.exp(-math.log(10000.0) * torch.arange(half) / half)
    if leaf == "emb_std":
        return torch.rand(shape, generator=gen) + 0.5
    if leaf == "emb_mean":
        return normal(0.0, 0.3)
    if leaf == "scale":  # LayerScale
        return torch.rand(shape, generator=gen) * 0.25 + 0.05
    if leaf == "alpha" or ("norm" in name or "_ln" in name) and leaf == "weight":
        return normal(1.0, 0.15)
    if leaf == "bias":
        return normal(0.0, 0.1)
    if len(shape) == 1 or "embed.weight" in name or leaf in ("bos_before_voice",):
        return normal(0.0, 1.0)
    fan_in = math.prod(shape[1:]) if "convtr" not in name else shape[0] * shape[-1]
    if name.endswith("cond_embed.weight"):  # keeps the temperature-0 loop from being chaotic
        return normal(0.0, 0.5 / math.sqrt(fan_in))
    return normal(0.0, 1.0 / math.sqrt(fan_in))
