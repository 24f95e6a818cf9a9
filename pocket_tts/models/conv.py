"""Causal convolutions with explicit streaming state, and the SEANet encoder/decoder.

Every module takes `state=None` for a one-shot (stateless) call, or a state made
by its own `init_state(batch_size)` that it updates in place, so that feeding a
signal in pieces gives the same output as feeding it at once:

* `StreamingConv1d` keeps the last `kernel_eff - stride` input samples
  (`{"prev": [B, n, C_in]}`), plus a per-row `first` flag in replicate mode.
* `StreamingConvTranspose1d` keeps the last `kernel - stride` output samples,
  which still wait for the contribution of the next input, minus the bias
  (`{"partial": [B, n, C_out]}`).

Every state tensor has the batch first, so rows can be gathered or concatenated.
Signals are [B, C, T] tensors whose memory is time-major ([B, T, C] transposed):
the layout in which history is a cheap concatenation of rows and oneDNN's
convolutions are fastest (see `onednn.py`). A one-shot call is a call on a fresh state.

Module and attribute names follow the released checkpoint (`model.3.conv.weight`,
`model.2.convtr.weight`, `block.1.conv.weight`, ...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pocket_tts.config import SEANetConfig
from pocket_tts.models import kernels
from pocket_tts.models.onednn import PackedWeight, conv1d, conv_transpose1d

ConvState = dict[str, torch.Tensor]
LOG2E = 1 / math.log(2)


def elu(x: torch.Tensor) -> torch.Tensor:
    """F.elu(x) of a signal [B, C, T]: in one pass (`kernels.elu`) where it applies, else within 6e-8
    and about twice as fast as F.elu: torch's expm1 kernel is slow, exp2 is vectorised.

    max(x, e^min(x, 0) - 1) is ELU because e^x - 1 >= x everywhere.
    """
    if kernels.elu_applies(x.transpose(1, 2)):
        return kernels.elu(x.transpose(1, 2)).transpose(1, 2)
    if torch.is_grad_enabled():
        return F.elu(x)
    e = x.clamp(max=0).mul_(LOG2E).exp2_().sub_(1)
    return torch.maximum(x, e, out=e)


class StreamingConv1d(nn.Module):
    """Causal Conv1d: left padding of `kernel_eff - stride`, nothing on the right.

    `pad_mode="constant"` pads the start of the signal with zeros;
    `"replicate"` repeats the first input frame instead.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        bias: bool = True,
        pad_mode: str = "constant",
    ):
        super().__init__()
        if pad_mode not in ("constant", "replicate"):
            raise ValueError(f"unsupported conv pad_mode {pad_mode!r} (expected 'constant' or 'replicate')")
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation, bias=bias)
        self.stride, self.dilation = stride, dilation
        self.pad_mode = pad_mode
        # Input samples from earlier calls that the next output frame still reads.
        self.history = (kernel_size - 1) * dilation + 1 - stride
        self.packed = PackedWeight()

    def init_state(self, batch_size: int) -> ConvState:
        if self.history <= 0:
            return {}
        w = self.conv.weight
        state = {"prev": torch.zeros(batch_size, self.history, self.conv.in_channels, device=w.device, dtype=w.dtype)}
        if self.pad_mode == "replicate":
            state["first"] = torch.ones(batch_size, dtype=torch.bool, device=w.device)
        return state

    def forward(self, x: torch.Tensor, state: ConvState | None = None, activate: bool = False) -> torch.Tensor:
        """The conv of x, or of elu(x) if `activate` (the SEANet's ELUs: they and the history
        concatenation are one pass of `kernels.elu` where it applies)."""
        n = self.history
        if n <= 0:
            x = elu(x) if activate else x
        else:
            if state is not None and x.shape[-1] % self.stride:
                raise ValueError(f"streaming conv input length {x.shape[-1]} is not a multiple of stride {self.stride}")
            state = self.init_state(x.shape[0]) if state is None else state
            prev, x = state["prev"], x.transpose(1, 2)
            joined = None
            if activate and kernels.elu_applies(x):
                joined = kernels.elu(x, history=n)  # its first n rows are ours to fill
                x = joined[:, n:]
            elif activate:
                x = elu(x.transpose(1, 2)).transpose(1, 2)
            if self.pad_mode == "replicate":
                # Rows on their first call pad with their first frame.
                prev = torch.where(state["first"].view(-1, 1, 1), x[:, :1], prev)
                state["first"] = torch.zeros_like(state["first"])
            if joined is None:
                joined = torch.cat((prev, x), dim=1)
            else:
                joined[:, :n] = prev
            state["prev"] = joined[:, joined.shape[1] - n :]
            x = joined.transpose(1, 2)
        return conv1d(self.packed, x, self.conv.weight, self.conv.bias, self.stride, self.dilation)

    def ends_on(self, block: nn.Module, x: torch.Tensor) -> bool:
        """Whether `after_residual` takes the output of `block` on x: a residual block, then this
        conv to one channel (a SEANet decoder's last), on a time-major signal."""
        return (
            isinstance(block, ResidualBlock)
            and self.conv.out_channels == self.stride == self.dilation == 1
            and self.history > 0
            and self.pad_mode == "constant"
            and kernels.elu_applies(x.transpose(1, 2))
        )

    def after_residual(self, x: torch.Tensor, h: torch.Tensor, state: ConvState | None) -> torch.Tensor:
        """self(x + h, state, activate=True) in one pass of `kernels.residual_elu_conv` (see `ends_on`)."""
        state = self.init_state(x.shape[0]) if state is None else state
        if not kernels.elu_applies(h.transpose(1, 2)):
            h = h.transpose(1, 2).contiguous().transpose(1, 2)
        out, state["prev"] = kernels.residual_elu_conv(x, h, state["prev"], self.conv.weight, self.conv.bias)
        return out


class StreamingConvTranspose1d(nn.Module):
    """ConvTranspose1d that emits exactly `stride` samples per input step.

    The last `kernel - stride` samples of each call are incomplete (the next
    input step adds to them); they are carried over, bias removed so that it
    is not counted twice, and added to the start of the next call's output.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int = 1, bias: bool = True
    ):
        super().__init__()
        self.convtr = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias)
        self.overlap = kernel_size - stride
        self.packed = PackedWeight()
        # Mimi's upsampling (one filter per channel) as a broadcast product: oneDNN has no fast
        # kernel for it (bfloat16: 40 ms per 32-row call against 0.1 ms; float32: 0.14 against 0.06).
        self.depthwise = groups == in_channels == out_channels and kernel_size % stride == 0

    def init_state(self, batch_size: int) -> ConvState:
        if self.overlap <= 0:
            return {}
        w = self.convtr.weight
        partial = torch.zeros(batch_size, self.overlap, self.convtr.out_channels, device=w.device, dtype=w.dtype)
        return {"partial": partial}

    def forward(self, x: torch.Tensor, state: ConvState | None = None, activate: bool = False) -> torch.Tensor:
        """The transposed conv of x, or of elu(x) if `activate`."""
        x = elu(x) if activate else x
        c = self.convtr
        if self.depthwise:
            y = _depthwise_transposed(x, c.weight, c.stride[0])
            if c.bias is not None:
                y += c.bias
        else:
            y = conv_transpose1d(self.packed, x, c.weight, c.bias, c.stride[0], c.groups).transpose(1, 2)
        n = self.overlap
        if n > 0:
            if state is not None:
                y[:, :n] += state["partial"]
                tail = y[:, y.shape[1] - n :]
                state["partial"] = tail - c.bias if c.bias is not None else tail
            y = y[:, : y.shape[1] - n]
        return y.transpose(1, 2)


def _depthwise_transposed(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """F.conv_transpose1d(x, weight, stride=stride, groups=C) time-major ([B, T_out, C]), for x
    [B, C, T] and weight [C, 1, K], K a multiple of the stride: each input step scales the kernel
    and the `K / stride` overlapping pieces are summed (the same products and sums as the conv).

    bfloat16 is computed in float32 and rounded once: 3x faster than torch's bfloat16 ops on these
    strided views (8 rows x 4 frames of the default upsampling: 2.0 -> 0.6 ms), and exact to the rounding.
    """
    if x.dtype == torch.bfloat16:
        return _depthwise_transposed(x.float(), weight.float(), stride).to(x.dtype)
    b, c, t = x.shape
    pieces = weight.shape[-1] // stride
    taps = weight[:, 0].t().reshape(pieces, stride, c)
    scaled = x.transpose(1, 2)[:, :, None, None, :] * taps  # [B, T, pieces, stride, C]
    y = scaled.new_zeros(b, t + pieces - 1, stride, c)
    for j in range(pieces):
        y[:, j : j + t] += scaled[:, :, j]
    return y.view(b, (t + pieces - 1) * stride, c)


class ResidualBlock(nn.Module):
    """x + conv_k1(elu(conv_k(elu(x)))), through a `dim // compress` bottleneck.

    The ELUs sit at indices 0 and 2 of `block` only to keep the checkpoint's
    `block.1` / `block.3` names.
    """

    def __init__(self, dim: int, kernel_size: int, dilation: int, compress: int, pad_mode: str):
        super().__init__()
        hidden = dim // compress
        self.block = nn.ModuleList(
            [
                nn.ELU(),
                StreamingConv1d(dim, hidden, kernel_size, dilation=dilation, pad_mode=pad_mode),
                nn.ELU(),
                StreamingConv1d(hidden, dim, 1, pad_mode=pad_mode),
            ]
        )

    def init_state(self, batch_size: int) -> list[ConvState]:
        return [self.block[1].init_state(batch_size), self.block[3].init_state(batch_size)]

    def forward(self, x: torch.Tensor, state: list[ConvState] | None = None) -> torch.Tensor:
        return x + self.branch(x, state)

    def branch(self, x: torch.Tensor, state: list[ConvState] | None = None) -> torch.Tensor:
        """What the block adds to x."""
        s1, s3 = (None, None) if state is None else state
        h = self.block[1](x, s1, activate=True)
        return self.block[3](h, s3, activate=True)


class _SEANet(nn.Module):
    """A flat `model` list run in order; ELUs are parameterless placeholders in it, each applied
    by the conv after it (`activate`)."""

    model: nn.ModuleList

    def init_state(self, batch_size: int) -> list:
        return [None if isinstance(layer, nn.ELU) else layer.init_state(batch_size) for layer in self.model]

    def forward(self, x: torch.Tensor, state: list | None = None) -> torch.Tensor:
        activate = False
        for i, layer in enumerate(self.model):
            if i == len(self.model) - 3 and self.model[-1].ends_on(layer, x):
                # The last residual block's sum, the ELU and the conv to one channel: one pass.
                block_state, last_state = (None, None) if state is None else (state[i], state[-1])
                return self.model[-1].after_residual(x, layer.branch(x, block_state), last_state)
            if isinstance(layer, nn.ELU):
                activate = True
            elif activate:
                x, activate = layer(x, None if state is None else state[i], activate=True), False
            else:
                x = layer(x, None if state is None else state[i])
        return x


class SEANetEncoder(_SEANet):
    """Waveform [B, channels, T] -> features [B, dimension, T / hop_length]."""

    def __init__(self, cfg: SEANetConfig):
        super().__init__()
        self.dimension = cfg.dimension
        self.hop_length = math.prod(cfg.ratios)
        pad, nf = cfg.pad_mode, cfg.n_filters
        layers: list[nn.Module] = [StreamingConv1d(cfg.channels, nf, cfg.kernel_size, pad_mode=pad)]
        width = nf
        for ratio in reversed(cfg.ratios):  # smallest stride first
            for j in range(cfg.n_residual_layers):
                layers.append(
                    ResidualBlock(width, cfg.residual_kernel_size, cfg.dilation_base**j, cfg.compress, pad)
                )
            layers += [nn.ELU(), StreamingConv1d(width, 2 * width, 2 * ratio, stride=ratio, pad_mode=pad)]
            width *= 2
        layers += [nn.ELU(), StreamingConv1d(width, cfg.dimension, cfg.last_kernel_size, pad_mode=pad)]
        self.model = nn.ModuleList(layers)


class SEANetDecoder(_SEANet):
    """Features [B, dimension, T] -> waveform [B, channels, T * hop_length]."""

    def __init__(self, cfg: SEANetConfig):
        super().__init__()
        self.dimension = cfg.dimension
        self.hop_length = math.prod(cfg.ratios)
        pad = cfg.pad_mode
        width = cfg.n_filters * 2 ** len(cfg.ratios)
        layers: list[nn.Module] = [StreamingConv1d(cfg.dimension, width, cfg.kernel_size, pad_mode=pad)]
        for ratio in cfg.ratios:  # largest stride first
            layers += [nn.ELU(), StreamingConvTranspose1d(width, width // 2, 2 * ratio, stride=ratio)]
            width //= 2
            for j in range(cfg.n_residual_layers):
                layers.append(
                    ResidualBlock(width, cfg.residual_kernel_size, cfg.dilation_base**j, cfg.compress, pad)
                )
        layers += [nn.ELU(), StreamingConv1d(width, cfg.channels, cfg.last_kernel_size, pad_mode=pad)]
        self.model = nn.ModuleList(layers)
