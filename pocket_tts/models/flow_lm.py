"""FlowLM: a causal transformer over [voice prompt, text, latents] and the flow head that
turns its output into the next continuous latent.

Latents live in a normalised "flow space"; `emb_std`/`emb_mean` map them to the
Mimi codec's space. A NaN input latent marks the beginning of speech and is
replaced by the learnt `bos_emb`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pocket_tts.config import FlowLMConfig
from pocket_tts.models.onednn import SharedLinear as Linear
from pocket_tts.models import kernels
from pocket_tts.models.onednn import Projection
from pocket_tts.models.transformer import LayerState, Transformer

VoiceState = dict[str, LayerState]


class VarianceNorm(nn.Module):
    """x * alpha / sqrt(unbiased variance + eps), without centring: the flow head's time-embedding norm."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.alpha = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.alpha * torch.rsqrt(x.var(dim=-1, keepdim=True) + self.eps))


class TimeEmbedding(nn.Module):
    """Scalar time in [0, 1] -> vector, through sinusoidal features and a small MLP."""

    def __init__(self, dim: int, n_frequencies: int = 256):
        super().__init__()
        # exp(-ln(10000) k / half), stored in the checkpoint. Computing it here on the meta
        # device would import ~70 MB of torch's compiler stack into every worker.
        self.register_buffer("freqs", torch.empty(n_frequencies // 2))
        self.mlp = nn.Sequential(Linear(n_frequencies, dim), nn.SiLU(), Linear(dim, dim), VarianceNorm(dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t * self.freqs
        return self.mlp(torch.cat((torch.cos(angles), torch.sin(angles)), dim=-1))


HEAD_NORM_EPS = 1e-6  # every norm of the flow head


class FlowResBlock(nn.Module):
    """x + gate * mlp(LN(x) * (1 + scale) + shift), (shift, scale, gate) from the condition
    through `adaLN_modulation` (see `FlowHead.velocity`, which runs the blocks)."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(dim, eps=HEAD_NORM_EPS)
        self.mlp = nn.Sequential(Linear(dim, dim), nn.SiLU(), Linear(dim, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 3 * dim))


class FlowFinalLayer(nn.Module):
    """linear(LN(x) * (1 + scale) + shift), the norm without affine parameters."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.linear = Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 2 * dim))


# Time conditions each sampler head takes: LSD two (start and end of a jump), flow matching
# one (the Euler step's time), the one-step heads none.
HEAD_TIME_CONDITIONS = {"lsd": 2, "flow_matching": 1, "drifting": 0, "pointwise": 0}


@dataclass
class HeadTables:
    """What the head's decode repeats every frame, built once per model (`FlowHead.tables`).

    `modulation`: the product of the activated condition whose output, split every `dim` columns, is each
    block's (shift, 1 + scale, gate) and the final layer's (shift, 1 + scale): the 1 is in
    the bias. `times`: the time condition of each integration step (none for one-step heads).
    The other fields are the head's linears as `Projection`s: a frame's few rows reach the kernels
    without converting the weights each call (~2 us per product, ~20 products per frame).
    """

    times: list[torch.Tensor]
    modulation: Projection
    cond_embed: Projection
    input_proj: Projection
    mlps: list[tuple[Projection, Projection]]  # each block's inner and outer linear
    final: Projection
    fused: tuple  # all of it as the arrays of `kernels.head_velocity`


class FlowHead(nn.Module):
    """f(c, times..., x): an MLP over the latent x, modulated by backbone output c and the head's time conditions."""

    def __init__(self, latent_dim: int, dim: int, cond_dim: int, depth: int, kind: str = "lsd"):
        super().__init__()
        self.kind = kind
        self.dim = dim
        self.time_embed = nn.ModuleList(TimeEmbedding(dim) for _ in range(HEAD_TIME_CONDITIONS[kind]))
        self.cond_embed = Linear(cond_dim, dim)
        self.input_proj = Linear(latent_dim, dim)
        self.res_blocks = nn.ModuleList(FlowResBlock(dim) for _ in range(depth))
        self.final_layer = FlowFinalLayer(dim, latent_dim)

    def time_condition(self, *times: torch.Tensor) -> torch.Tensor:
        """The mean of the time embeddings, one time per embedder."""
        return sum(embed(t) for embed, t in zip(self.time_embed, times)) / len(self.time_embed)

    def forward(self, c: torch.Tensor, *times_and_x: torch.Tensor) -> torch.Tensor:
        *times, x = times_and_x
        y = self.cond_embed(c)
        return self.velocity(y + self.time_condition(*times) if times else y, x, self.tables(0))

    def tables(self, steps: int) -> HeadTables:
        """The decode's constant tables for `steps` integration steps (ignored by one-step heads).

        LSD jumps i/n -> (i+1)/n; flow matching takes Euler steps at times i/n (1 is never
        evaluated); the one-step heads take none.
        """
        if self.kind == "lsd":
            times = [self.time_condition(_time(i / steps), _time((i + 1) / steps)) for i in range(steps)]
        elif self.kind == "flow_matching":
            times = [self.time_condition(_time(i / steps)) for i in range(steps)]
        else:
            times = []
        linears = [block.adaLN_modulation[1] for block in self.res_blocks] + [self.final_layer.adaLN_modulation[1]]
        plus_one = [torch.tensor([0.0, 1.0, 0.0][: lin.out_features // self.dim]).repeat_interleave(self.dim) for lin in linears]
        # Every block's modulation in one product over a concatenated copy (one op instead of five
        # per velocity for the small heads; the default head's 21 MB table costs 21 MB more for
        # the oneDNN-packed copy that `Projection` reads, shared by forked workers).
        weight = torch.cat([lin.weight for lin in linears])
        bias = torch.cat([lin.bias + one for lin, one in zip(linears, plus_one)])
        modulation = Projection(weight, bias, owned=True)
        mlps = [(_projection_of(b.mlp[0]), _projection_of(b.mlp[2])) for b in self.res_blocks]
        input_proj, final = _projection_of(self.input_proj), _projection_of(self.final_layer.linear)
        norms = tuple((kernels.as_array(b.in_ln.weight), kernels.as_array(b.in_ln.bias)) for b in self.res_blocks)
        inners, outers = tuple(inner.arrays for inner, _ in mlps), tuple(outer.arrays for _, outer in mlps)
        fused = (modulation.arrays, input_proj.arrays, norms, inners, outers, final.arrays, np.float32(HEAD_NORM_EPS))
        return HeadTables(times, modulation, _projection_of(self.cond_embed), input_proj, mlps, final, fused)

    def velocity(self, y: torch.Tensor, x: torch.Tensor, tables: HeadTables) -> torch.Tensor:
        """The head's MLP over x [B, latent_dim] under condition y [B, dim]."""
        # One call instead of ~25 tensor ops (default head, 8 rows: 6.4 -> 4.5 ms).
        if kernels.applies(x, y, kernels.row_limit(self.dim)):
            return kernels.head_velocity(y, x, tables.fused)
        act = F.silu(y)
        mods = tables.modulation(act).split(self.dim, dim=-1)
        x = tables.input_proj(x)
        for i, (block, (inner, outer)) in enumerate(zip(self.res_blocks, tables.mlps)):
            shift, scale, gate = mods[3 * i : 3 * i + 3]
            ln = block.in_ln
            h = torch.addcmul(shift, F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps), scale)
            x = torch.addcmul(x, gate, outer(F.silu(inner(h))))
        shift, scale = mods[-2:]
        return tables.final(torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=HEAD_NORM_EPS), scale))

    def sample(self, c: torch.Tensor, noise: torch.Tensor, tables: HeadTables) -> torch.Tensor:
        """The latent for backbone output c, starting from x0 = noise."""
        cond = tables.cond_embed(c)
        if self.kind == "drifting":
            return self.velocity(cond, noise, tables)
        if self.kind == "pointwise":
            return noise + self.velocity(cond, noise, tables)
        x, steps = noise, len(tables.times)
        for time in tables.times:
            x = x + self.velocity(time + cond, x, tables) / steps
        return x


def _projection_of(linear: nn.Linear) -> Projection:
    return Projection(linear.weight, linear.bias)


def _time(value: float) -> torch.Tensor:
    return torch.full((1, 1), value)


class TextEmbedding(nn.Module):
    """Lookup table for token ids (one spare row at the end, unused at inference).

    With a `rank`, rows are rank wide and a bias-free projection maps them to `dim`.
    """

    def __init__(self, n_bins: int, dim: int, rank: int | None = None):
        super().__init__()
        width = rank or dim
        # An explicit weight skips the random init, which on the meta device imports torch's compiler stack.
        self.embed = nn.Embedding(n_bins + 1, width, _weight=torch.empty(n_bins + 1, width))
        self.proj = None if rank is None else Linear(rank, dim, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return x if self.proj is None else self.proj(x)


class FlowLM(nn.Module):
    """`voice_dim` is the width of the Mimi encoder's latents that `speaker_proj_weight` reads."""

    def __init__(self, cfg: FlowLMConfig, latent_dim: int, voice_dim: int | None = None):
        super().__init__()
        tcfg = cfg.transformer
        d = tcfg.d_model
        self.dim, self.latent_dim = d, latent_dim
        self.conditioner = TextEmbedding(cfg.lookup_table.n_bins, d, cfg.lookup_table.rank)
        out_dim = cfg.z_dim or d
        self.flow_net = FlowHead(latent_dim, cfg.flow.dim, out_dim, cfg.flow.depth, cfg.flow.type)
        self.register_buffer("emb_std", torch.ones(latent_dim))
        self.register_buffer("emb_mean", torch.zeros(latent_dim))
        self.bos_emb = nn.Parameter(torch.zeros(latent_dim))
        self.insert_bos_before_voice = cfg.insert_bos_before_voice
        if self.insert_bos_before_voice:
            self.bos_before_voice = nn.Parameter(torch.zeros(1, 1, d))
        self.speaker_proj_weight = nn.Parameter(torch.zeros(d, voice_dim or latent_dim))
        self.input_linear = nn.Linear(latent_dim, d, bias=False)
        self.transformer = Transformer(
            d, tcfg.num_heads, tcfg.num_layers, tcfg.feedforward, float(tcfg.max_period), linear=Linear,
            attn_dim=tcfg.attn_dim, num_kv_heads=tcfg.num_kv_heads,
        )  # fmt: skip
        self.out_norm = nn.LayerNorm(d, eps=1e-5)
        # The dtype of generation's KV caches (`TTSModel._chunk_state`, the batcher's); voice states stay
        # float32, the released format. Reduced-precision backbones set bfloat16 (`TTSModel.load_model`).
        self.cache_dtype = torch.float32
        # The sampler and EOS heads read a z_dim-wide projection of the backbone output when there is one.
        self.z_proj = None if cfg.z_dim is None else Linear(d, cfg.z_dim, bias=False)
        self.out_eos = nn.Linear(out_dim, 1)

    # --- streaming state -------------------------------------------------------------
    def layer_names(self) -> list[str]:
        return [f"transformer.layers.{i}.self_attn" for i in range(len(self.transformer.layers))]

    def init_state(self, batch_size: int, capacity: int, dtype: torch.dtype = torch.float32) -> VoiceState:
        return {
            name: layer.self_attn.init_linear_state(batch_size, capacity, dtype)
            for name, layer in zip(self.layer_names(), self.transformer.layers)
        }

    def _layer_states(self, state: VoiceState) -> list[LayerState]:
        return [state[name] for name in self.layer_names()]

    # --- forward pieces ---------------------------------------------------------------
    def speaker_prompt(self, mimi_latents: torch.Tensor) -> torch.Tensor:
        """Voice-prompt embeddings [B, (1 +) frames, d] from Mimi encoder latents [B, frames, voice_dim]."""
        prompt = F.linear(mimi_latents, self.speaker_proj_weight)
        if self.insert_bos_before_voice:
            prompt = torch.cat((self.bos_before_voice.expand(prompt.shape[0], -1, -1), prompt), dim=1)
        return prompt

    def embed_latents(self, latents: torch.Tensor) -> torch.Tensor:
        latents = torch.where(torch.isnan(latents), self.bos_emb, latents)
        return self.input_linear(latents)

    def backbone(self, inputs: torch.Tensor, state: VoiceState | None) -> torch.Tensor:
        """Run embeddings [B, T, d] through the transformer, the output norm and `z_proj`."""
        if state is not None and inputs.shape[1] == 1:  # a generated frame: the lean one-position path
            return self.backbone_step(inputs[:, 0], state)[:, None]
        out = self.out_norm(self.transformer(inputs, None if state is None else self._layer_states(state)))
        return out if self.z_proj is None else self.z_proj(out)

    def backbone_step(self, inputs: torch.Tensor, state: VoiceState) -> torch.Tensor:
        """`backbone` for one new position per row: embeddings [B, d] -> [B, z_dim or d]."""
        out = self.out_norm(self.transformer.step(inputs, self._layer_states(state)))
        return out if self.z_proj is None else self.z_proj(out)

    def prompt(self, embeddings: torch.Tensor, state: VoiceState) -> None:
        """Feed conditioning (voice prompt or text embeddings) into the cache; outputs are not needed."""
        self.transformer(embeddings, self._layer_states(state))

    def eos_logit(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out_eos(hidden)

    def head_tables(self, steps: int) -> HeadTables:
        return self.flow_net.tables(steps)

    def sample(self, hidden: torch.Tensor, noise: torch.Tensor, tables: HeadTables) -> torch.Tensor:
        return self.flow_net.sample(hidden, noise, tables)

    def to_mimi_space(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * self.emb_std + self.emb_mean
