"""Causal transformer shared by FlowLM and Mimi: RoPE attention with an explicit KV cache.

Parameter names follow the released checkpoints (`self_attn.in_proj`, `norm1`,
`linear1`, `layer_scale_1.scale`, ...). Streaming state lives outside the
modules, in one dict per attention layer, so a voice state can be copied,
exported and reused without touching the model.

Two cache layouts exist:
* FlowLM (`context=None`, unlimited attention): the official voice-state layout
  `{"offset": int64[B], "pad": int64[B], "cache": [2, B, T, H, D]}` with keys
  stored after RoPE. `T` is a capacity; `offset` positions are filled.
* Mimi (`context=N`): a sliding window `{"offset": int, "k": [B, H, W, D], "v": ...}`
  holding at most the N - 1 most recent positions, all a new query can see.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LayerState = dict[str, torch.Tensor]


def rope_tables(positions: torch.Tensor, head_dim: int, max_period: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [T, 1, head_dim/2] for absolute `positions` (float32)."""
    ds = torch.arange(head_dim // 2, dtype=torch.float32)
    freqs = torch.exp(ds * (-math.log(max_period) * 2 / head_dim))
    angles = freqs * positions.to(torch.float32).view(-1, 1, 1)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x [B, T, H, D]."""
    b, t, h, d = x.shape
    pairs = x.view(b, t, h, d // 2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    return torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).view(b, t, h, d)


class Attention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, max_period: float, context: int | None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.max_period = max_period
        self.context = context
        self.in_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, state: LayerState | None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.in_proj(x).view(b, t, 3, self.num_heads, self.head_dim).unbind(dim=2)
        offset = 0 if state is None else int(state["offset"].view(-1)[0])
        cos, sin = rope_tables(torch.arange(offset, offset + t), self.head_dim, self.max_period)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if state is None:
            keys, values, first_key, pad = k.transpose(1, 2), v.transpose(1, 2), 0, 0
        elif "cache" in state:
            keys, values, first_key, pad = self._append_linear(state, k, v, offset)
        else:
            keys, values, first_key, pad = self._append_window(state, k, v, offset)

        mask = self._mask(offset, t, first_key, keys.shape[2], pad)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))

    @staticmethod
    def _append_linear(state: LayerState, k, v, offset: int):
        cache = state["cache"]
        end = offset + k.shape[1]
        if end > cache.shape[2]:
            raise RuntimeError(f"KV cache holds {cache.shape[2]} positions, {end} needed")
        cache[0, :, offset:end] = k
        cache[1, :, offset:end] = v
        pad = int(state["pad"].view(-1)[0]) if "pad" in state else 0
        return cache[0, :, :end].transpose(1, 2), cache[1, :, :end].transpose(1, 2), 0, pad

    def _append_window(self, state: LayerState, k, v, offset: int):
        keys = torch.cat((state["k"], k.transpose(1, 2)), dim=2)
        values = torch.cat((state["v"], v.transpose(1, 2)), dim=2)
        first_key = offset - state["k"].shape[2]
        keep = self.context - 1
        state["k"], state["v"] = keys[:, :, -keep:], values[:, :, -keep:]
        return keys, values, first_key, 0

    def _mask(self, offset: int, t: int, first_key: int, n_keys: int, pad: int) -> torch.Tensor | None:
        if t == 1 and pad == 0 and (self.context is None or n_keys <= self.context):
            return None  # a single query sees every key it was given
        q_pos = torch.arange(offset, offset + t).view(-1, 1)
        k_pos = torch.arange(first_key, first_key + n_keys).view(1, -1)
        delta = q_pos - k_pos
        mask = (delta >= 0) & (k_pos >= pad)
        if self.context is not None:
            mask &= delta < self.context
        return mask

    def init_linear_state(self, batch_size: int, capacity: int, dtype=torch.float32) -> LayerState:
        return {
            "offset": torch.zeros(batch_size, dtype=torch.long),
            "pad": torch.zeros(batch_size, dtype=torch.long),
            "cache": torch.full((2, batch_size, capacity, self.num_heads, self.head_dim), float("nan"), dtype=dtype),
        }

    def init_window_state(self, batch_size: int, dtype=torch.float32) -> LayerState:
        empty = torch.zeros(batch_size, self.num_heads, 0, self.head_dim, dtype=dtype)
        return {"offset": torch.zeros(1, dtype=torch.long), "k": empty, "v": empty.clone()}


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class TransformerLayer(nn.Module):
    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dim_feedforward: int,
        max_period: float,
        context: int | None,
        layer_scale: float | None,
    ):
        super().__init__()
        self.self_attn = Attention(d_model, num_heads, max_period, context)
        self.norm1 = nn.LayerNorm(d_model, eps=1e-5)
        self.norm2 = nn.LayerNorm(d_model, eps=1e-5)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=False)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=False)
        if layer_scale is None:
            self.layer_scale_1 = self.layer_scale_2 = nn.Identity()
        else:
            self.layer_scale_1 = LayerScale(d_model, layer_scale)
            self.layer_scale_2 = LayerScale(d_model, layer_scale)

    def forward(self, x: torch.Tensor, state: LayerState | None) -> torch.Tensor:
        x = x + self.layer_scale_1(self.self_attn(self.norm1(x), state))
        hidden = F.gelu(self.linear1(self.norm2(x)), approximate="tanh")
        return x + self.layer_scale_2(self.linear2(hidden))


class Transformer(nn.Module):
    """A stack of pre-norm layers. `states` holds one dict per layer, or is None (no cache)."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_layers: int,
        dim_feedforward: int,
        max_period: float = 10000.0,
        context: int | None = None,
        layer_scale: float | None = None,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerLayer(d_model, num_heads, dim_feedforward, max_period, context, layer_scale)
            for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor, states: list[LayerState] | None = None) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, None if states is None else states[i])
        if states is not None:
            for state in states:
                state["offset"] += x.shape[1]
        return x
