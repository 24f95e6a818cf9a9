"""Reduced precision: the FlowLM backbone's linears in int8 or bfloat16, the Mimi decoder in bfloat16.

The backbone reads ~75M weights per generated frame, so its speed is set by
memory traffic: int8 weights (per-output-channel scales, activations quantised
on the fly by fbgemm) move 4x fewer bytes, bfloat16 2x. The flow head and the
norms stay in float32. The Mimi decoder is compute-bound at batch (the small models'
~133 MFLOP per frame): in bfloat16 (weights, activations and streaming state) its products
and convolutions run on AVX-512 BF16 and its signals move half the bytes; its audio comes
out in float32. Drift against float32 is measured in docs/performance.md.

On CPUs without bfloat16 support (`onednn.NATIVE_BFLOAT16`, e.g. AVX2 only) bfloat16 still runs,
on torch's generic kernels, but slower than float32 (an AVX2 EPYC, 18M layout, one stream: decoder
3-4x, backbone ~2x slower), so loading it logs a warning.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from pocket_tts.models import onednn
from pocket_tts.precision_env import PRECISIONS, precision_name

logger = logging.getLogger(__name__)


def check_precision(value: str, source: str | None = None) -> str:
    value = precision_name(value, PRECISIONS, source)
    if value == "int8" and "fbgemm" not in torch.backends.quantized.supported_engines and "x86" not in torch.backends.quantized.supported_engines:
        raise ValueError("int8 precision needs torch's fbgemm/x86 quantized engine, absent from this build")
    return value


class Int8Linear(nn.Module):
    """y = x W^T with W stored as int8 per output channel; x is quantised per call (dynamic)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        with warnings.catch_warnings():  # torch flags quantized tensor creation as legacy API
            warnings.simplefilter("ignore")
            qweight = torch.quantize_per_channel(
                weight, scale.double(), torch.zeros(weight.shape[0], dtype=torch.long), 0, torch.qint8
            )
            self._packed = torch.ops.quantized.linear_prepack(qweight, linear.bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range keeps the u8 x s8 products clear of int16 saturation on CPUs without VNNI.
        return torch.ops.quantized.linear_dynamic(x, self._packed, True)


class BFloat16Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


def lower_backbone_precision(transformer: nn.Module, precision: str) -> None:
    """Swap the attention and feed-forward linears of `transformer.layers` in place."""
    if precision == "float32":
        return
    _warn_without_native_bfloat16(precision, "backbone")
    make = Int8Linear if precision == "int8" else BFloat16Linear
    for layer in transformer.layers:
        attn = layer.self_attn
        attn.in_proj, attn.out_proj = make(attn.in_proj), make(attn.out_proj)
        layer.linear1, layer.linear2 = make(layer.linear1), make(layer.linear2)


def lower_decoder_precision(mimi: nn.Module, precision: str) -> None:
    """Convert the Mimi decoder (projection, upsampling, transformer, SEANet) to `precision` in place.

    The encoder (voice prompts) stays float32. Decoder states made afterwards take the weights' dtype.
    """
    if precision == "float32":
        return
    _warn_without_native_bfloat16(precision, "Mimi decoder")
    for part in (mimi.quantizer, mimi.upsample, mimi.decoder_transformer, mimi.decoder):
        if part is not None:
            part.to(torch.bfloat16)


def _warn_without_native_bfloat16(precision: str, part: str) -> None:
    if precision == "bfloat16" and not onednn.NATIVE_BFLOAT16:
        logger.warning("bfloat16 %s on a CPU without bfloat16 support in oneDNN (it needs AVX-512 or AVX-NE-CONVERT): "
                       "it runs on torch's generic kernels, slower than float32 here", part)  # fmt: skip
