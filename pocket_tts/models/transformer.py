"""Causal transformer shared by FlowLM and Mimi: RoPE attention with an explicit KV cache.

Parameter names follow the released checkpoints (`self_attn.in_proj`, `norm1`,
`linear1`, `layer_scale_1.scale`, ...). Streaming state lives outside the
modules, in one dict per attention layer, so a voice state can be copied,
exported and reused without touching the model.

Two cache layouts exist:
* FlowLM (`context=None`, unlimited attention): the official voice-state layout
  `{"offset": int64[B], "pad": int64[B], "cache": [2, B, T, H, D]}` with keys
  stored after RoPE. `T` is a capacity; `offset` positions are filled (`linear_cache`).
* Mimi (`context=N`): a sliding window `{"offset": int64[1], "k": [B, H, W, D], "v": ...}`
  holding at most the N - 1 most recent positions, all a new query can see. All
  rows advance together; an optional `"start": int64[B]` records where each row
  began, so a stream can join a batch later (`concat_window_states`,
  `select_window_rows`) and still see the positions it would see alone.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pocket_tts.models import kernels
from pocket_tts.models.onednn import Projection, SharedLinear

LayerState = dict[str, torch.Tensor]


def rope_tables(positions: torch.Tensor, head_dim: int, max_period: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation tables [B, T, 1, head_dim] for absolute `positions` [B, T] (float32).

    Channel pair (2i, 2i+1) turns by angle position * max_period^(-2i / head_dim): the cosine
    table repeats each pair's cosine, the sine table holds (-sin, sin), so that `apply_rope` is
    two products and a sum.
    """
    ds = torch.arange(head_dim // 2, dtype=torch.float32)
    freqs = torch.exp(ds * (-math.log(max_period) * 2 / head_dim))
    angles = positions.to(torch.float32)[..., None, None] * freqs
    cos, sin = torch.cos(angles), torch.sin(angles)
    return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, rope: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, T, H, D]: (a, b) -> (a cos - b sin, a sin + b cos).

    `rope`: complex factors cos + i sin [B, T, 1, D / 2] (one product: a 128-position Mimi call
    64 -> 14 us, the same result to the bit), or `rope_tables`' pair for dtypes without a complex type.
    """
    if isinstance(rope, tuple):
        b, t, h, d = x.shape
        swapped = x.view(b, t, h, d // 2, 2).flip(-1).view(b, t, h, d)
        return x * rope[0] + swapped * rope[1]
    return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rope).flatten(-2)


def gelu_(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh") within 5e-7, in x's memory where `kernels.gelu_` takes it: one
    pass instead of the five below (an 18M-layout Mimi layer's [32, 64, 384], one core: bfloat16 0.7
    against 2.0 ms, float32 0.6 against 1.1, medians of 7). Else nearly twice as fast as F.gelu on a
    Mimi call's [128, 384] (49 against 90 us): 0.5 (1 + tanh(z)) is sigmoid(2 z), and torch's sigmoid
    kernel is the faster."""
    if torch.is_grad_enabled():
        return F.gelu(x, approximate="tanh")
    if x.is_contiguous() and kernels.float_applies(x):
        return kernels.gelu_(x)
    z2 = 2 * math.sqrt(2 / math.pi)
    return (x * x).mul_(0.044715 * z2).add_(z2).mul_(x).sigmoid_().mul_(x)


def linear_cache(batch_size: int, capacity: int, kv_heads: int, head_dim: int, dtype=torch.float32) -> torch.Tensor:
    """A zeroed contiguous cache [2, B, T, H, D].

    In this order a row's filled positions are one run of memory, which the step kernels read
    row by row. Head-major memory ([2, B, H, T, D]) cut that into one short run per head, and the
    CPU's prefetchers restarted at each: 32 rows x 100 positions of the 18M model, 8 layers,
    bfloat16, 8.1-9.0 ms against 3.9-4.4 here (at 300 positions, 14-17 against 10-12).
    """
    return torch.zeros(2, batch_size, capacity, kv_heads, head_dim, dtype=dtype)


class Attention(nn.Module):
    """Queries are `attn_dim` wide (d_model by default) in `num_heads` heads; keys and values have
    `num_kv_heads` heads, each shared by consecutive query heads (grouped-query attention), and
    the cache holds those only."""

    def __init__(
        self, d_model: int, num_heads: int, max_period: float, context: int | None, linear: type[nn.Linear] = nn.Linear,
        attn_dim: int | None = None, num_kv_heads: int | None = None,
    ):  # fmt: skip
        super().__init__()
        attn_dim = attn_dim or d_model
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = attn_dim // num_heads
        self.attn_dim = attn_dim
        self.max_period = max_period
        self.context = context
        self.in_proj = linear(d_model, attn_dim + 2 * self.num_kv_heads * self.head_dim, bias=False)
        self.out_proj = linear(attn_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor, state: LayerState | None, tables: dict | None = None) -> torch.Tensor:
        """`tables` holds what every layer of one transformer call shares (positions, RoPE, mask,
        cache span, or the window kernel's rotations): the first layer fills it, the others reuse it."""
        b, t, _ = x.shape
        tables = {} if tables is None else tables
        projected = self.in_proj(x)
        if state is not None and "k" in state and kernels.float_applies(projected) and state["k"].dtype == projected.dtype:
            return self.out_proj(self._window_kernel(projected, state, tables))
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        if "rope" not in tables:
            tables.update(self._position_tables(state, b, t, x.dtype))
        # Queries and keys are adjacent in the projection: rotated together.
        qk = apply_rope(projected[..., : (heads + kv_heads) * head_dim].view(b, t, heads + kv_heads, head_dim), tables["rope"])
        q, k = qk[:, :, :heads], qk[:, :, heads:]
        v = projected[..., (heads + kv_heads) * head_dim :].view(b, t, kv_heads, head_dim)

        if state is None:
            keys, values, key_positions, first_valid = k.transpose(1, 2), v.transpose(1, 2), tables["positions"], None
        elif "cache" in state:
            keys, values, key_positions, first_valid = self._append_linear(state, k, v, tables)
        else:
            keys, values, key_positions, first_valid = self._append_window(state, k, v, tables["positions"])

        if "mask" not in tables:
            tables["mask"] = self._mask(tables["positions"], key_positions, first_valid)
        mask = tables["mask"]
        if t == 1:  # one query per row (every generated frame): three small ops beat SDPA's ~60 us
            group = q.view(b, kv_heads, heads // kv_heads, head_dim)  # query heads of each KV head
            scores = torch.matmul(group, keys.transpose(2, 3)).mul_(head_dim**-0.5)
            if mask is not None:
                scores.masked_fill_(~mask, -math.inf)
            out = torch.matmul(torch.softmax(scores, dim=-1), values)
            return self.out_proj(out.reshape(b, 1, -1))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=kv_heads != heads
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _window_kernel(self, projected: torch.Tensor, state: LayerState, tables: dict) -> torch.Tensor:
        """`kernels.window_attention` of a sliding-window call; its state replaces the window."""
        if "turns" not in tables:
            b, t, _ = projected.shape
            positions = self._positions(state, b, t)
            cos, sin = rope_tables(positions if "start" in state else positions[:1], self.head_dim, self.max_period)
            tables["turns"] = tuple(table.squeeze(2).numpy() for table in (cos, sin))  # [B or 1, T, D]
            tables["base"] = positions[:, 0].contiguous().numpy()
        out, state["k"], state["v"] = kernels.window_attention(
            projected, state["k"], state["v"], *tables["turns"], tables["base"], self.context, self.num_heads
        )
        return out

    @staticmethod
    def _positions(state: LayerState | None, b: int, t: int) -> torch.Tensor:
        if state is None:
            offsets = torch.zeros(b, dtype=torch.long)
        elif "cache" in state:
            offsets = state["offset"]
        else:  # a sliding window advances all rows together
            offsets = state["offset"].expand(b)
            if "start" in state:  # each row counts from its own first position, exactly as when alone
                offsets = offsets - state["start"]
        return offsets[:, None] + torch.arange(t)

    def _position_tables(self, state: LayerState | None, b: int, t: int, dtype: torch.dtype) -> dict:
        positions = self._positions(state, b, t)
        offsets = positions[:, 0]
        # Computed in float32; a bfloat16 Mimi decoder rotates in its own dtype.
        cos, sin = rope_tables(positions, self.head_dim, self.max_period)
        rope = torch.complex(cos[..., 0::2], sin[..., 1::2]) if dtype == torch.float32 else (cos.to(dtype), sin.to(dtype))
        tables = {"positions": positions, "rope": rope}
        if state is not None and "cache" in state:
            tables["span"] = (int(offsets.min()), int(offsets.max()))
        return tables

    @staticmethod
    def _append_linear(state: LayerState, k, v, tables: dict):
        """Write k/v at each row's offset; rows may be at different offsets (batched streams)."""
        cache, offsets = state["cache"], state["offset"]
        b, t = k.shape[:2]
        first, last = tables["span"]
        end = last + t
        if end > cache.shape[2]:
            raise RuntimeError(f"KV cache holds {cache.shape[2]} positions, {end} needed")
        if first == last:
            cache[0, :, first:end] = k
            cache[1, :, first:end] = v
        elif t == 1:
            rows = torch.arange(b)
            cache[0, rows, offsets] = k[:, 0]
            cache[1, rows, offsets] = v[:, 0]
        else:
            raise ValueError("several positions at once need rows at the same offset")
        if "key_positions" not in tables:
            tables["key_positions"] = torch.arange(end).expand(b, end)
        keys, values = (part[:, :end].transpose(1, 2).to(k.dtype) for part in cache)  # a bfloat16 cache read in k's dtype
        return keys, values, tables["key_positions"], state["pad"]

    def _append_window(self, state: LayerState, k, v, positions: torch.Tensor):
        keys = torch.cat((state["k"], k.transpose(1, 2)), dim=2)
        values = torch.cat((state["v"], v.transpose(1, 2)), dim=2)
        n = keys.shape[2]
        key_positions = (positions[:, -1:] + 1 - n) + torch.arange(n)
        drop = max(n + 1 - self.context, 0)  # keep the context - 1 newest (none when context == 1)
        state["k"], state["v"] = keys[:, :, drop:], values[:, :, drop:]
        # With per-row starts, positions are relative: keys before a row's first position are < 0.
        first_valid = torch.zeros_like(state["start"]) if "start" in state else None
        return keys, values, key_positions, first_valid

    def _mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, first_valid: torch.Tensor | None) -> torch.Tensor | None:
        """[B, 1, Tq, Tk] visibility, or None when every query sees every key."""
        delta = q_pos[:, :, None] - k_pos[:, None, :]
        mask = delta >= 0
        if self.context is not None:
            mask &= delta < self.context
        if first_valid is not None:
            mask &= k_pos[:, None, :] >= first_valid.view(-1, 1, 1)
        if bool(mask.all()):
            return None
        return mask[:, None]

    def init_linear_state(self, batch_size: int, capacity: int, dtype=torch.float32) -> LayerState:
        # Unwritten positions are zeros, not NaN: masked keys still meet the values in the softmax product.
        return {
            "offset": torch.zeros(batch_size, dtype=torch.long),
            "pad": torch.zeros(batch_size, dtype=torch.long),
            "cache": linear_cache(batch_size, capacity, self.num_kv_heads, self.head_dim, dtype),
        }

    def init_window_state(self, batch_size: int, dtype=torch.float32) -> LayerState:
        empty = torch.zeros(batch_size, self.num_kv_heads, 0, self.head_dim, dtype=dtype)
        return {"offset": torch.zeros(1, dtype=torch.long), "k": empty, "v": empty.clone()}


def concat_window_states(states: list[LayerState]) -> LayerState:
    """The rows of several sliding-window states as one batch, at their latest offset.

    A row without history (fresh) joins at the batch's offset with a window of
    zero keys and `start` = that offset: its positions count from there, and
    the zero keys fall before its start and are masked. Rows with history must
    already be at that offset.
    """
    offset = max(int(s["offset"]) for s in states)
    width = max(s["k"].shape[2] for s in states)
    keys, values, starts = [], [], []
    for s in states:
        at, w = int(s["offset"]), s["k"].shape[2]
        start = s.get("start", s["offset"].new_zeros(s["k"].shape[0]))
        if at != offset:
            if w and bool((start < at).any()):
                raise ValueError(f"a row with attention history at offset {at} cannot join a batch at {offset}")
            start = torch.full_like(start, offset)
        pad = (0, 0, width - w, 0)  # on the left of the window axis
        keys.append(F.pad(s["k"], pad))
        values.append(F.pad(s["v"], pad))
        starts.append(start)
    offset_t = states[0]["offset"].new_tensor([offset])
    return {"offset": offset_t, "k": torch.cat(keys), "v": torch.cat(values), "start": torch.cat(starts)}


def select_window_rows(state: LayerState, rows) -> LayerState:
    """Rows `rows` (indices or a mask) of a sliding-window state; the shared offset is copied."""
    return {key: t.clone() if key == "offset" else t[rows] for key, t in state.items()}


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
        linear: type[nn.Linear] = nn.Linear,
        attn_dim: int | None = None,
        num_kv_heads: int | None = None,
    ):
        super().__init__()
        self.self_attn = Attention(d_model, num_heads, max_period, context, linear, attn_dim, num_kv_heads)
        self.norm1 = nn.LayerNorm(d_model, eps=1e-5)
        self.norm2 = nn.LayerNorm(d_model, eps=1e-5)
        self.linear1 = linear(d_model, dim_feedforward, bias=False)
        self.linear2 = linear(dim_feedforward, d_model, bias=False)
        if layer_scale is None:
            self.layer_scale_1 = self.layer_scale_2 = nn.Identity()
        else:
            self.layer_scale_1 = LayerScale(d_model, layer_scale)
            self.layer_scale_2 = LayerScale(d_model, layer_scale)

    def forward(self, x: torch.Tensor, state: LayerState | None, tables: dict | None = None) -> torch.Tensor:
        x = _add_scaled(x, self.layer_scale_1, self.self_attn(_layer_norm(self.norm1, x), state, tables))
        hidden = gelu_(self.linear1(_layer_norm(self.norm2, x)))
        return _add_scaled(x, self.layer_scale_2, self.linear2(hidden))


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """norm(x), on `kernels.layer_norm` where it applies (an 18M-layout Mimi layer's [32, 64, 128]
    in bfloat16: ~120 against torch's 190-250 us)."""
    if x.is_contiguous() and kernels.float_applies(x) and norm.weight.dtype == x.dtype:
        return kernels.layer_norm(x, norm.weight, norm.bias, norm.eps)
    return norm(x)


def _add_scaled(x: torch.Tensor, scale: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """x + scale(y), one op with a layer scale (an 18M-layout Mimi layer's [32, 64, 128] in bfloat16:
    108 against 160 us, one rounding instead of two)."""
    return torch.addcmul(x, scale.scale, y) if isinstance(scale, LayerScale) else x + y


class StepLayer:
    """A `TransformerLayer` for one new position per row with a linear cache (`Transformer.step`):
    its tensors and projections looked up once, so a frame pays no module attribute lookups
    (~1 us each, ~17 per layer) and each projection with its residual is one call."""

    __slots__ = ("source", "norm1", "norm2", "in_proj", "linear1", "add_out", "add_linear2", "heads", "kv_heads", "head_dim", "fused")

    def __init__(self, layer: TransformerLayer):
        attn = layer.self_attn
        self.source = attn.in_proj  # what it was built from (see `Transformer._step_layers`)
        self.norm1 = (layer.norm1.normalized_shape, layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
        self.norm2 = (layer.norm2.normalized_shape, layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
        self.in_proj, self.linear1 = _projection(attn.in_proj), _projection(layer.linear1)
        self.add_out = _residual_projection(attn.out_proj, layer.layer_scale_1)
        self.add_linear2 = _residual_projection(layer.linear2, layer.layer_scale_2)
        self.heads, self.kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.fused = _fused_weights(layer)

    def __call__(self, x: torch.Tensor, state: LayerState, frame: dict) -> torch.Tensor:
        if self.fused is not None and frame["visible"] is not None and kernels.applies(x, state["cache"]):
            # The whole layer in one kernel call: ~20 tensor ops of 3-15 us each saved per layer.
            return kernels.layer_step(x, self.fused, frame["turns"], state["cache"], *frame["visible"], self.heads)
        x = self.add_out(x, self.attend(F.layer_norm(x, *self.norm1), state, frame))
        h = F.gelu(self.linear1(F.layer_norm(x, *self.norm2)), approximate="tanh")
        return self.add_linear2(x, h)

    def attend(self, x: torch.Tensor, state: LayerState, frame: dict) -> torch.Tensor:
        """Normed input x [B, d_model] -> attention output [B, attn_dim]; the new key and value
        go into the cache at each row's position."""
        b = x.shape[0]
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        qk, v = self.in_proj(x).split(((heads + kv_heads) * head_dim, kv_heads * head_dim), dim=1)
        qk = torch.view_as_complex(qk.view(b, heads + kv_heads, head_dim // 2, 2)) * frame["rotation"]
        q, k = torch.view_as_real(qk).view(b, heads + kv_heads, head_dim).split((heads, kv_heads), dim=1)
        cache = state["cache"]
        new = torch.stack((k, v.view(b, kv_heads, head_dim))).to(cache.dtype)
        queries = q.view(b, kv_heads, heads // kv_heads, head_dim)
        # The kernel at any row count: rows share no keys, and it reads each row's at ~18 GB/s where
        # torch's products read ~8 (8 rows at 321 positions, int8 backbone step: 25-28 -> 17.5-19 ms).
        if frame["visible"] is not None and kernels.attend_applies(x, cache):
            return kernels.attend(queries, cache, *frame["visible"], new).view(b, heads * head_dim)
        cache[frame["at"]] = new
        keys, values = cache.narrow(2, 0, frame["end"]).transpose(2, 3).to(q.dtype).unbind(0)  # [B, KV, T, D]
        scores = torch.matmul(queries, keys.transpose(2, 3))
        if frame["hidden"] is not None:
            scores.masked_fill_(frame["hidden"], -math.inf)
        return torch.matmul(torch.softmax(scores, dim=-1), values).view(b, heads * head_dim)


def _fused_weights(layer: TransformerLayer) -> tuple | None:
    """The arrays `kernels.layer_step` reads, for a layer of bias-free float32 linears without layer scale."""
    attn = layer.self_attn
    linears = (attn.in_proj, attn.out_proj, layer.linear1, layer.linear2)
    plain = all(type(lin) in (SharedLinear, nn.Linear) and lin.bias is None and lin.weight.dtype == torch.float32 for lin in linears)
    if not plain or isinstance(layer.layer_scale_1, LayerScale) or layer.norm1.eps != layer.norm2.eps:
        return None
    norms = tuple((kernels.as_array(norm.weight), kernels.as_array(norm.bias)) for norm in (layer.norm1, layer.norm2))
    return (*norms, np.float32(layer.norm1.eps), *(kernels.as_array(lin.weight) for lin in linears))


def _projection(linear: nn.Module):
    """linear's forward without the module call (~2 us), on `Projection`'s kernels, where it is a plain linear."""
    if type(linear) in (SharedLinear, nn.Linear):
        return Projection(linear.weight, linear.bias)
    return linear


def _residual_projection(linear: nn.Module, scale: nn.Module):
    """(x, h) -> x + scale(linear(h)) for 2-D h; without a scale, the sum is in the product's kernel."""
    project = _projection(linear)
    if isinstance(scale, LayerScale):
        return lambda x, h: torch.addcmul(x, scale.scale, project(h))
    if isinstance(project, Projection):
        return lambda x, h: project(h, residual=x)
    return lambda x, h: x + project(h)


class Transformer(nn.Module):
    """A stack of pre-norm layers. `states` holds one dict per layer, or is None (no cache).

    `linear` builds the projections: an `nn.Linear` subclass with the same
    parameters (Mimi passes `onednn.Linear`).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_layers: int,
        dim_feedforward: int,
        max_period: float = 10000.0,
        context: int | None = None,
        layer_scale: float | None = None,
        linear: type[nn.Linear] = nn.Linear,
        attn_dim: int | None = None,
        num_kv_heads: int | None = None,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerLayer(
                d_model, num_heads, dim_feedforward, max_period, context, layer_scale, linear, attn_dim, num_kv_heads
            )
            for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor, states: list[LayerState] | None = None) -> torch.Tensor:
        tables: dict = {}  # all layers see the same positions: RoPE and mask are built once per call
        for i, layer in enumerate(self.layers):
            x = layer(x, None if states is None else states[i], tables)
        if states is not None:
            torch._foreach_add_([state["offset"] for state in states], x.shape[1])
        return x

    def step(self, x: torch.Tensor, states: list[LayerState]) -> torch.Tensor:
        """`forward` for one new position per row with linear (FlowLM) caches: x [B, d_model].

        A small model's frame was ~300 tensor ops at 5-15 us each, nearly all its cost, so this
        path keeps each layer to about a dozen: 2-D activations (no reshapes), RoPE as one
        complex product whose table is built once per frame from one grown per model (with the
        queries' 1/sqrt(head_dim) in it), a small projection and its residual as one addmm,
        and the query's attention as two products and a softmax over each head's cached keys.
        """
        frame = self._frame_tables(states[0], states[0]["pad"], x.shape[0])
        for layer, state in zip(self._step_layers(), states):
            x = layer(x, state, frame)
        torch._foreach_add_([state["offset"] for state in states], 1)
        return x

    def _frame_tables(self, state: LayerState, pad: torch.Tensor, b: int) -> dict:
        """What every layer of a step shares: cache index, span, rotations, hidden keys."""
        offsets = state["offset"]
        positions = offsets.tolist()
        first, last = min(positions), max(positions)
        end = last + 1
        if end > state["cache"].shape[2]:
            raise RuntimeError(f"KV cache holds {state['cache'].shape[2]} positions, {end} needed")
        query_rotations, key_rotations = self._rotations(end)
        attn = self.layers[0].self_attn
        if first == last:
            at, index = (slice(None), slice(None), first), slice(first, first + 1)  # every row at one position
        else:
            at, index = (slice(None), torch.arange(b), offsets), offsets
        rotation = torch.cat(
            (query_rotations[index, None].expand(-1, attn.num_heads, -1), key_rotations[index, None].expand(-1, attn.num_kv_heads, -1)),
            dim=1,
        )  # fmt: skip
        hidden = None
        if first != last or bool(pad.any()):  # keys past a row's own position, or before its start
            key_positions = torch.arange(end)
            hidden = (key_positions > offsets[:, None]) | (key_positions < pad[:, None])
            hidden = hidden[:, None, None]  # [B, 1, 1, T]: every head and query of the row
        # The kernels read the keys and the values each as contiguous memory: `linear_cache`, and the
        # batcher's views of its first rows (with the whole cache's contiguity as the test, a partial
        # batch took torch's ops). Other layouts take torch's ops.
        dense = all(half.is_contiguous() for half in state["cache"])
        visible = (pad.numpy().copy(), offsets.numpy().copy()) if dense else None  # first, last key of each row
        turns = torch.view_as_real(rotation).numpy() if dense else None
        return {"at": at, "end": end, "rotation": rotation, "hidden": hidden, "visible": visible, "turns": turns}

    def _step_layers(self) -> list[StepLayer]:
        """Built at the first step; rebuilt when the projections were swapped (`lower_backbone_precision`)."""
        built = self.__dict__.get("_step_layer_list")
        if built is None or built[0].source is not self.layers[0].self_attn.in_proj:
            built = self.__dict__["_step_layer_list"] = [StepLayer(layer) for layer in self.layers]
        return built

    def _rotations(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE as complex factors [N >= length, head_dim / 2] for positions 0..N-1, queries' scaled
        by 1/sqrt(head_dim); grown by doubling, so built a handful of times per process. The
        angles are `rope_tables`' to the bit (the same float32 products)."""
        table = self.__dict__.get("_rotation_table")
        if table is None or table[0].shape[0] < length:
            attn = self.layers[0].self_attn
            size = max(1024, 1 << (length - 1).bit_length())
            cos, sin = rope_tables(torch.arange(size)[:, None], attn.head_dim, attn.max_period)
            cos, sin = cos[:, 0, 0, 0::2], sin[:, 0, 0, 1::2]
            scale = attn.head_dim**-0.5
            table = (torch.complex(cos * scale, sin * scale), torch.complex(cos, sin))
            self.__dict__["_rotation_table"] = table
        return table
