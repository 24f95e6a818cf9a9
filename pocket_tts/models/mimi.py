"""Mimi: the audio codec between waveforms and the 12.5 Hz latents of FlowLM.

encode (voice prompts, one shot):
    wav -> SEANet encoder (200 Hz) -> transformer -> stride-16 conv -> latents
decode (streaming, once per generated frame):
    latents -> 1x1 projection -> stride-16 transposed conv -> transformer -> SEANet decoder -> wav

Latents are in "Mimi space" (FlowLM de-normalises its outputs before calling
`decode`). All decoder streaming state lives in a `MimiDecoderState` that the
caller owns; each batch row is an independent stream. Streams can join and
leave a batched decode between calls: `concat_decoder_states`,
`select_decoder_rows`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pocket_tts.config import MimiConfig, MimiTransformerConfig
from pocket_tts.models import onednn
from pocket_tts.models.conv import ConvState, SEANetDecoder, SEANetEncoder, StreamingConv1d, StreamingConvTranspose1d
from pocket_tts.models.transformer import LayerState, Transformer, concat_window_states, select_window_rows


@dataclass
class MimiDecoderState:
    upsample: ConvState  # overlap of the stride-16 transposed conv ({} if there is none)
    transformer: list[LayerState]  # one sliding-window KV state per decoder transformer layer
    seanet: list  # per SEANet decoder layer: conv state, residual-block states, or None (ELU)


def concat_decoder_states(states: list[MimiDecoderState]) -> MimiDecoderState:
    """One batched state holding the rows of `states`, in order.

    Each row decodes as it would alone (to float32 rounding): its attention
    positions count from its own first frame, however long the batch has run.
    Fresh states (`init_decoder_state`) can join a batch after any number of
    calls; rows that have decoded must be at the batch's position.
    """
    return MimiDecoderState(
        upsample=_map_rows(lambda *ts: torch.cat(ts), *(s.upsample for s in states)),
        transformer=[concat_window_states(list(layer)) for layer in zip(*(s.transformer for s in states))],
        seanet=_map_rows(lambda *ts: torch.cat(ts), *(s.seanet for s in states)),
    )


def select_decoder_rows(state: MimiDecoderState, rows: torch.Tensor | list[int]) -> MimiDecoderState:
    """The state of rows `rows` (indices in the order wanted, or a bool mask): streams leaving a batch."""
    return MimiDecoderState(
        upsample=_map_rows(lambda t: t[rows], state.upsample),
        transformer=[select_window_rows(s, rows) for s in state.transformer],
        seanet=_map_rows(lambda t: t[rows], state.seanet),
    )


def _map_rows(fn, *trees):
    """fn over the matching tensors of same-shaped nests of dicts, lists and Nones (conv states)."""
    first = trees[0]
    if isinstance(first, dict):
        return {key: _map_rows(fn, *(t[key] for t in trees)) for key in first}
    if isinstance(first, list):
        return [_map_rows(fn, *parts) for parts in zip(*trees)]
    return None if first is None else fn(*trees)


class ProjectedTransformer(nn.Module):
    """Channels-first wrapper around `Transformer`, with linear projections only
    where the config's input/output widths differ from `d_model`."""

    def __init__(self, cfg: MimiTransformerConfig):
        super().__init__()
        if len(cfg.output_dimensions) != 1:
            raise ValueError(f"Mimi transformer needs exactly one output dimension, got {cfg.output_dimensions}")
        self.transformer = Transformer(
            d_model=cfg.d_model,
            num_heads=cfg.num_heads,
            num_layers=cfg.num_layers,
            dim_feedforward=cfg.dim_feedforward,
            max_period=cfg.max_period,
            context=cfg.context,
            layer_scale=cfg.layer_scale,
            linear=onednn.Linear,
        )
        self.input_proj = None
        if cfg.input_dimension != cfg.d_model:
            self.input_proj = onednn.Linear(cfg.input_dimension, cfg.d_model, bias=False)
        self.output_projs = None
        if cfg.output_dimensions[0] != cfg.d_model:
            self.output_projs = nn.ModuleList([onednn.Linear(cfg.d_model, cfg.output_dimensions[0], bias=False)])

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> list[LayerState]:
        states = [layer.self_attn.init_window_state(batch_size, dtype) for layer in self.transformer.layers]
        return [{k: v.to(device) for k, v in s.items()} for s in states]

    def forward(self, x: torch.Tensor, states: list[LayerState] | None = None) -> torch.Tensor:
        x = x.transpose(1, 2)
        if self.input_proj is not None:
            x = self.input_proj(x)
        x = self.transformer(x, states)
        if self.output_projs is not None:
            x = self.output_projs[0](x)
        return x.transpose(1, 2)


class Mimi(nn.Module):
    def __init__(self, cfg: MimiConfig):
        super().__init__()
        seanet = cfg.seanet
        if cfg.channels != seanet.channels:
            raise ValueError(f"mimi.channels ({cfg.channels}) != mimi.seanet.channels ({seanet.channels})")
        self.sample_rate = cfg.sample_rate
        self.frame_rate = cfg.frame_rate
        self.channels = cfg.channels
        self.frame_size = int(cfg.sample_rate / cfg.frame_rate)
        self.latent_dim = cfg.quantizer.dimension

        # The decoder side has its own SEANet and transformer sections in some layouts.
        decoder_seanet = cfg.decoder_seanet or seanet
        self.encoder = SEANetEncoder(seanet)
        self.decoder = SEANetDecoder(decoder_seanet)
        self.encoder_transformer = ProjectedTransformer(cfg.transformer)
        self.decoder_transformer = ProjectedTransformer(cfg.decoder_transformer or cfg.transformer)
        # ModuleDicts only to reproduce the checkpoint names `quantizer.output_proj`,
        # `downsample.conv.conv` and `upsample.convtr.convtr`.
        self.quantizer = nn.ModuleDict(
            {"output_proj": nn.Conv1d(cfg.quantizer.dimension, cfg.quantizer.output_dimension, 1, bias=False)}
        )

        # Internal (encoder) steps per latent frame: 24000 / 120 = 200 Hz vs 12.5 Hz -> 16.
        steps = cfg.sample_rate / self.encoder.hop_length / cfg.frame_rate
        if steps != int(steps) or steps < 1:
            raise ValueError(f"encoder rate / frame rate must be a positive integer, got {steps}")
        if self.decoder.hop_length != self.encoder.hop_length:
            raise ValueError("mimi.decoder_seanet.ratios must give the encoder's hop length")
        self.steps_per_frame = int(steps)
        # Encoder latents are `inner_dim` wide (voice prompts read them); generated latents go
        # through the quantizer projection, whose output feeds the upsampling conv.
        resampled = self.steps_per_frame > 1
        self.voice_dim = (cfg.inner_dim or seanet.dimension) if resampled else seanet.dimension
        decoder_in = (cfg.outer_dim or decoder_seanet.dimension) if resampled else decoder_seanet.dimension
        if decoder_in != cfg.quantizer.output_dimension:
            raise ValueError(
                f"inconsistent Mimi widths: the quantizer maps {cfg.quantizer.dimension} -> "
                f"{cfg.quantizer.output_dimension}, the decoder takes {decoder_in}"
            )
        self.downsample = self.upsample = None
        if resampled:
            s, enc_dim, dec_dim = self.steps_per_frame, seanet.dimension, decoder_seanet.dimension
            self.downsample = nn.ModuleDict(
                {"conv": StreamingConv1d(enc_dim, self.voice_dim, 2 * s, stride=s, bias=False, pad_mode="replicate")}
            )
            self.upsample = nn.ModuleDict(
                {"convtr": StreamingConvTranspose1d(decoder_in, dec_dim, 2 * s, stride=s, groups=dec_dim, bias=False)}
            )

    @classmethod
    def from_config(cls, cfg: MimiConfig) -> "Mimi":
        return cls(cfg)

    @torch.no_grad()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """Waveform [B, channels, T] at `sample_rate` -> latents [B, frames, voice_dim] (Mimi space).

        Stateless. The input is zero-padded on the right to a whole number of frames.
        """
        if wav.dim() != 3 or wav.shape[1] != self.channels:
            raise ValueError(f"expected audio of shape [B, {self.channels}, T], got {list(wav.shape)}")
        if wav.shape[-1] == 0:
            raise ValueError("cannot encode empty audio")
        x = F.pad(wav, (0, -wav.shape[-1] % self.frame_size))
        x = self.encoder(x)
        x = self.encoder_transformer(x)
        if self.downsample is not None:
            x = self.downsample["conv"](x)
        return x.transpose(1, 2)

    def init_decoder_state(self, batch_size: int = 1) -> MimiDecoderState:
        w = self.quantizer["output_proj"].weight
        return MimiDecoderState(
            upsample={} if self.upsample is None else self.upsample["convtr"].init_state(batch_size),
            transformer=self.decoder_transformer.init_state(batch_size, w.device, w.dtype),
            seanet=self.decoder.init_state(batch_size),
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, state: MimiDecoderState) -> torch.Tensor:
        """Latents [B, frames, latent_dim] (Mimi space) -> waveform [B, channels, frames * frame_size].

        Streaming: continues from `state` and advances it, so any split of a
        latent sequence into calls gives the same audio as one call.
        """
        if latents.shape[1] == 0:
            return latents.new_zeros(latents.shape[0], self.channels, 0)
        weight = self.quantizer["output_proj"].weight  # its dtype is the decoder's (`lower_decoder_precision`)
        # The 1x1 projection as a matmul: cheaper than a conv call, and time-major like all decoder signals.
        x = F.linear(latents.to(weight.dtype), weight[:, :, 0]).transpose(1, 2)
        if self.upsample is not None:
            x = self.upsample["convtr"](x, state.upsample)
        x = self.decoder_transformer(x, state.transformer)
        return self.decoder(x, state.seanet).float()
