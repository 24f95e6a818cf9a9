"""One generated frame, written once for single-stream generation and the batcher.

A frame for B streams: the backbone over each stream's last latent, the EOS logit, the
sampler noise, the flow head's decode (`FlowHead.sample`, one branch per head type). Per
stream, `ChunkProgress` applies the EOS rule, and `fade_in` shapes a chunk's first samples.

Noise is drawn from torch's global generator the way Kyutai's package draws it, so a
`torch.manual_seed` before generating gives its audio at any temperature: one
`[1, latent_dim]` draw of N(0, temp) per FlowLM call and stream, also for the call that
feeds the text (its sample is discarded) and at temperature 0 (where it is exactly 0).
A stream may bring its own generator instead (a seeded request): it draws the same
sequence from it, untouched by what other streams or threads draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pocket_tts.models.flow_lm import FlowLM, VoiceState

MIN_FRAMES_BEFORE_EOS = 6  # early EOS flags fire before speech starts for some voices
FADE_IN_SECONDS = 0.005  # hides the step a fresh decoder state puts in its first samples

Generators = list[torch.Generator | None] | None  # per stream; None: all draw from torch's global generator


@dataclass
class Frame:
    latents: torch.Tensor  # [B, latent_dim], flow space
    eos: list[bool]  # EOS logit above the threshold, per stream
    eos_logits: torch.Tensor  # [B]
    hidden: torch.Tensor  # [B, z_dim or d_model]: what the heads read


class FrameSampler:
    """The per-frame step of a loaded model, with its tables (the head's, fade ramp) built once."""

    def __init__(self, flow_lm: FlowLM, sampler_decode_steps: int, noise_clamp: float | None, sample_rate: int):
        self.flow_lm = flow_lm
        self.noise_clamp = noise_clamp
        with torch.inference_mode():
            self.head_tables = flow_lm.head_tables(sampler_decode_steps)
        self.fade_ramp = torch.linspace(0, 1, int(sample_rate * FADE_IN_SECONDS))
        self.bos = torch.full((1, 1, flow_lm.latent_dim), float("nan"))  # the first step's input

    def noise(self, temps: list[float], generators: Generators = None) -> torch.Tensor:
        """x0 of each stream [B, latent_dim], in Kyutai's order (see the module docstring).

        `generators`: each stream's own generator, None for the global one (all None: no list)."""
        dim = self.flow_lm.latent_dim
        if generators is None and all(t == temps[0] for t in temps):  # one call draws what B [1, dim] calls draw
            return self._draw((len(temps), dim), temps[0])
        generators = generators or [None] * len(temps)
        return torch.cat([self._draw((1, dim), t, g) for t, g in zip(temps, generators)])

    def _draw(self, shape: tuple[int, int], temp: float, generator: torch.Generator | None = None) -> torch.Tensor:
        std = temp**0.5
        noise = torch.empty(shape)
        if self.noise_clamp is None or temp == 0:
            return noise.normal_(0.0, std, generator=generator)
        return nn.init.trunc_normal_(noise, std=std, a=-self.noise_clamp, b=self.noise_clamp, generator=generator)

    def prompt_text(self, ids: torch.Tensor, state: VoiceState, temps: list[float], generators: Generators = None) -> None:
        """Feed token ids [B, T] into the cache; draws the noise Kyutai's text call draws."""
        self.flow_lm.prompt(self.flow_lm.conditioner(ids), state)
        self.noise(temps, generators)

    def step(self, inputs: torch.Tensor, state: VoiceState, temps: list[float], eos_threshold: float,
             generators: Generators = None) -> Frame:  # fmt: skip
        """One frame for B streams from their last latents [B, 1, latent_dim] (NaN: none yet)."""
        flow_lm = self.flow_lm
        hidden = flow_lm.backbone_step(flow_lm.embed_latents(inputs[:, 0]), state)
        eos_logits = flow_lm.eos_logit(hidden)[:, 0]
        latents = flow_lm.sample(hidden, self.noise(temps, generators), self.head_tables)
        return Frame(latents, (eos_logits > eos_threshold).tolist(), eos_logits, hidden)

    def fade_in(self, audio: torch.Tensor) -> torch.Tensor:
        """Ramp the first samples of a chunk's audio [T] up from 0, in place."""
        ramp = self.fade_ramp
        audio[: ramp.numel()] *= ramp[: audio.numel()]
        return audio


@dataclass
class ChunkProgress:
    """Where one chunk's generation stands, and the EOS rule that ends it."""

    frames_after_eos: int
    max_frames: int
    step: int = 0
    eos_step: int | None = None

    def accept(self, eos: bool) -> bool:
        """Record this step's EOS flag; False when the chunk has ended and the step's latent is dropped."""
        if self.eos_step is None and eos and self.step >= MIN_FRAMES_BEFORE_EOS:
            self.eos_step = self.step
        if self.eos_step is not None and self.step >= self.eos_step + self.frames_after_eos:
            return False
        self.step += 1
        return True

    @property
    def exhausted(self) -> bool:
        return self.step >= self.max_frames
