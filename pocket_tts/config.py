"""The model configuration: the YAML schema of Kyutai's released configs.

Every key of that schema is read (architecture options included); unknown keys and
values we cannot run fail at load time with the key's name.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from pocket_tts.catalog import LANGUAGES, check_language

CONFIGS_DIR = Path(__file__).parent / "config"
HEAD_TYPES = ("lsd", "flow_matching", "drifting", "pointwise")  # flow_lm.flow.type


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FlowHeadConfig(_Strict):
    dim: int
    depth: int
    type: str = "lsd"


class FlowTransformerConfig(_Strict):
    d_model: int
    hidden_scale: int
    max_period: int
    num_heads: int
    num_layers: int
    attn_dim: int | None = None
    num_kv_heads: int | None = None
    dim_feedforward: int | None = None

    @property
    def feedforward(self) -> int:
        return self.dim_feedforward or self.d_model * self.hidden_scale


class LookupTableConfig(_Strict):
    dim: int
    n_bins: int
    tokenizer: str
    tokenizer_path: str
    rank: int | None = None


class FlowLMConfig(_Strict):
    dtype: str
    flow: FlowHeadConfig
    transformer: FlowTransformerConfig
    lookup_table: LookupTableConfig
    weights_path: str | None = None
    insert_bos_before_voice: bool = False
    z_dim: int | None = None


class SEANetConfig(_Strict):
    dimension: int
    channels: int
    n_filters: int
    n_residual_layers: int
    ratios: list[int]
    kernel_size: int
    residual_kernel_size: int
    last_kernel_size: int
    dilation_base: int
    pad_mode: str
    compress: int


class MimiTransformerConfig(_Strict):
    d_model: int
    input_dimension: int
    output_dimensions: tuple[int, ...]
    num_heads: int
    num_layers: int
    layer_scale: float
    context: int
    max_period: float = 10000.0
    dim_feedforward: int


class QuantizerConfig(_Strict):
    dimension: int
    output_dimension: int


class MimiConfig(_Strict):
    dtype: str
    sample_rate: int
    channels: int
    frame_rate: float
    seanet: SEANetConfig
    transformer: MimiTransformerConfig
    quantizer: QuantizerConfig
    weights_path: str | None = None
    inner_dim: int | None = None
    outer_dim: int | None = None
    decoder_seanet: SEANetConfig | None = None
    decoder_transformer: MimiTransformerConfig | None = None


class ModelConfig(_Strict):
    flow_lm: FlowLMConfig
    mimi: MimiConfig
    weights_path: str | None = None
    weights_path_without_voice_cloning: str | None = None
    pad_with_spaces_for_short_inputs: bool = False
    remove_semicolons: bool = False
    append_terminal_punctuation: bool = True
    capitalize_first_letter: bool = True
    replace_characters: dict[str, str] = {}
    model_recommended_frames_after_eos: int | None = None
    default_temperature: float = 0.3
    default_eos_threshold: float = -4.0

    @model_validator(mode="after")
    def _supported_architecture(self) -> "ModelConfig":
        fl, mimi, t = self.flow_lm, self.mimi, self.flow_lm.transformer
        unsupported = {
            "flow_lm.dtype": fl.dtype != "float32",
            "mimi.dtype": mimi.dtype != "float32",
        }
        bad = [key for key, is_bad in unsupported.items() if is_bad]
        if bad:
            raise ValueError(f"this engine does not implement the config option(s) {', '.join(bad)}")
        if fl.flow.type not in HEAD_TYPES:
            raise ValueError(f"flow_lm.flow.type {fl.flow.type!r} is not one of {', '.join(HEAD_TYPES)}")
        if (t.attn_dim or t.d_model) % t.num_heads:
            raise ValueError("flow_lm.transformer.attn_dim (default d_model) must be a multiple of num_heads")
        if t.num_kv_heads is not None and (t.num_kv_heads < 1 or t.num_heads % t.num_kv_heads):
            raise ValueError("flow_lm.transformer.num_heads must be a multiple of num_kv_heads")
        if fl.lookup_table.dim != t.d_model:
            raise ValueError("flow_lm.lookup_table.dim must equal flow_lm.transformer.d_model")
        return self

    @property
    def voice_dim(self) -> int:
        """Width of the Mimi encoder's latents, which the voice projection reads."""
        return self.mimi.inner_dim or self.mimi.seanet.dimension

    @property
    def latent_dim(self) -> int:
        return self.mimi.quantizer.dimension


def available_languages() -> list[str]:
    """The names `load_model(language=...)` accepts: every model Kyutai ships."""
    return sorted(LANGUAGES)


def config_path_for_language(language: str) -> Path:
    return CONFIGS_DIR / f"{check_language(language)}.yaml"


def load_config(path: str | Path) -> ModelConfig:
    """Read and validate a YAML config; errors name the file and the offending key."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        raise ValueError(f"config must be a .yaml file, got {path}")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"config {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"config {path} must be a YAML mapping")
    try:
        return ModelConfig(**raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise ValueError(f"invalid config {path}: {where}: {first['msg']}") from None
