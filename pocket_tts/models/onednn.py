"""oneDNN fast paths for float32 (and bfloat16) CPU inference: linear, conv1d, conv_transpose1d.

torch sends float32 matmuls to MKL, whose AVX2 kernels are all it runs on AMD
CPUs, and small convolutions to a naive im2col path. oneDNN's AVX-512 kernels
with a weight re-laid out once ("packed") are 2-5x faster on Mimi's decode
shapes (a 16-row linear: ~85 -> ~230 GFLOP/s on one EPYC core). The ops below
are the mkldnn ones that torch.compile's CPU backend calls on frozen weights.

Results match the plain ops to float32 rounding (a different summation order).
bfloat16 weights (the opt-in bfloat16 Mimi decoder) run on oneDNN's AVX-512 BF16 kernels where
the CPU has bfloat16 support (`NATIVE_BFLOAT16`); elsewhere oneDNN refuses them and they take
torch's own ops. Autograd, other devices or dtypes, and builds without oneDNN take the plain op.
Convolutions are fastest on time-major memory ([B, C, T] views of [B, T, C]
tensors, i.e. channels-last); they return the layout they are given.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pocket_tts.models import kernels

_ops = torch.ops.mkldnn
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(_ops, "_convolution_transpose_pointwise")
# oneDNN runs bfloat16 only on CPUs with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT; on others (an AVX2
# EPYC Zen 3) packing a bfloat16 weight raises "bf16 path needs the cpu support ...".
NATIVE_BFLOAT16 = _ONEDNN and hasattr(_ops, "_is_mkldnn_bf16_supported") and bool(_ops._is_mkldnn_bf16_supported())


# Below this many weight elements a oneDNN linear call costs more than MKL's whole matmul:
# ~20-30 us of fixed overhead vs 3-7 us for a 112 x 576 row (the small models' every layer).
SMALL_LINEAR = 1 << 18


def _fast(weight: torch.Tensor) -> bool:
    dtype_runs = weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and NATIVE_BFLOAT16)
    return _ONEDNN and dtype_runs and weight.device.type == "cpu" and not torch.is_grad_enabled()


def _fast_linear(weight: torch.Tensor) -> bool:
    return weight.numel() > SMALL_LINEAR and _fast(weight)


class PackedWeight:
    """A module's weight in oneDNN layout, rebuilt when the parameter is replaced or written in place.

    Copies and pickles of the module start empty: oneDNN tensors can't be copied.
    """

    def __init__(self):
        self.entry = None  # (weight, its version, packed), swapped whole: safe across threads
        self.onednn_wins: dict[tuple, bool] = {}  # convolutions: per input layout, see `_use_onednn`

    def __reduce__(self):
        return PackedWeight, ()

    def get(self, weight: torch.Tensor, pack: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        version = 0 if weight.is_inference() else weight._version  # inference tensors have no counter
        entry = self.entry
        if entry is None or entry[0] is not weight or entry[1] != version:
            entry = self.entry = (weight, version, pack(weight.detach()))
        return entry[2]


class Linear(nn.Linear):
    """nn.Linear (same parameters) that runs on oneDNN."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.packed = PackedWeight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fast_linear(self.weight):
            return F.linear(x, self.weight, self.bias)
        w = self.packed.get(self.weight, _ops._reorder_linear_weight)
        return _ops._linear_pointwise(x, w, self.bias, "none", [], "")


class SharedLinear(nn.Linear):
    """nn.Linear on oneDNN that reads the weight where it is, without a packed copy.

    Slower than `Linear` (oneDNN re-lays the weight out on the fly) but faster than
    MKL on AMD, and the weight stays the loaded checkpoint tensor that forked workers
    share: the FlowLM backbone's 300 MB must not get a second, packed copy.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shared_linear(x, self.weight, self.bias)


def shared_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, for few rows through `kernels`, else on oneDNN for weights above SMALL_LINEAR (read
    in place, see `SharedLinear`)."""
    if kernels.applies(x, weight, kernels.row_limit(x.shape[-1])):
        return kernels.product(x, kernels.as_array(weight), kernels.as_array(bias))
    if not _fast_linear(weight):
        return F.linear(x, weight, bias)
    return _ops._linear_pointwise(x, weight, bias, "none", [], "")


class Projection:
    """F.linear(x, weight, bias) for 2-D x, on the fastest kernel for x's row count.

    Few float32 rows go to `kernels` (the weight read once, front to back). `owned`: the weight
    is a table of the caller's, not the checkpoint's (the flow head's concatenated modulation
    weights), so a oneDNN-packed copy of it costs no sharing: more rows read it (the default
    head's 10240x512 table at 8 rows: 3.7 -> 2.5 ms); those of a checkpoint weight read it in
    place (`shared_linear`).
    """

    __slots__ = ("weight", "bias", "arrays", "packed")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, owned: bool = False):
        self.weight, self.bias = weight, bias
        self.arrays = (kernels.as_array(weight), kernels.as_array(bias)) if weight.dtype == torch.float32 else None
        self.packed = _ops._reorder_linear_weight(weight.detach()) if owned and _fast_linear(weight) else None

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x @ weight.T + bias, plus `residual` when given."""
        if self.arrays is not None and kernels.applies(x, self.weight, kernels.row_limit(x.shape[-1])):
            return kernels.product(x, *self.arrays, residual=residual)
        if self.packed is not None and not torch.is_grad_enabled():
            out = _ops._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        else:
            out = shared_linear(x, self.weight, self.bias)
        return out if residual is None else out.add_(residual)


def conv1d(packed: PackedWeight, x, weight, bias, stride: int = 1, dilation: int = 1) -> torch.Tensor:
    """F.conv1d(x, weight, bias, stride, padding=0, dilation) for x [B, C_in, T]."""

    def plain():
        return F.conv1d(x, weight, bias, stride, 0, dilation)

    def fast():
        args = [0, 0], [1, stride], [1, dilation], 1  # padding, stride, dilation, groups
        w = packed.get(weight, lambda w: _ops._reorder_convolution_weight(w.unsqueeze(2), *args))
        return _ops._convolution_pointwise(x.unsqueeze(2), w, bias, *args, "none", [], "").squeeze(2)

    return fast() if _use_onednn(packed, x, weight, fast, plain) else plain()


def conv_transpose1d(packed: PackedWeight, x, weight, bias, stride: int, groups: int = 1) -> torch.Tensor:
    """F.conv_transpose1d(x, weight, bias, stride, groups=groups) for x [B, C_in, T]."""

    def plain():
        return F.conv_transpose1d(x, weight, bias, stride, groups=groups)

    def fast():
        args = [0, 0], [0, 0], [1, stride], [1, 1], groups  # padding, output padding, stride, dilation
        w = packed.get(weight, lambda w: _ops._reorder_convolution_transpose_weight(w.unsqueeze(2), *args))
        return _ops._convolution_transpose_pointwise(x.unsqueeze(2), w, bias, *args, "none", [], "").squeeze(2)

    return fast() if _use_onednn(packed, x, weight, fast, plain) else plain()


def _use_onednn(packed: PackedWeight, x: torch.Tensor, weight: torch.Tensor, fast, plain) -> bool:
    """Whether oneDNN runs this convolution faster than torch's own.

    bfloat16: always (torch's own kernels for it won none of 264 timed layouts, every shipped decoder
    size at 1-32 rows and 1-4 frames: oneDNN 1.02-7.5x faster). Timing each new layout there
    stalled a batch's stream for up to 1.3 s (8 rows of the default decoder meeting a new frame
    count), 8.1 s over a worker's first 25 streams.

    float32: timed once per input layout. Neither wins everywhere: oneDNN is 2-5x faster on the
    default Mimi decoder's shapes but ~20x slower on the 2M model's first decoder conv (128 -> 192
    channels, kernel 3: 4.7 ms against 0.23 ms). The batch size counts by powers of two: at 32 rows
    torch's kernel took 36 ms on the 18M decoder's 32 -> 16 channel conv at 24 kHz against oneDNN's
    6 ms, whichever won at 1 row.
    """
    if not _fast(weight):
        return False
    if weight.dtype == torch.bfloat16:
        return True
    layout = (x.shape[0].bit_length(), tuple(x.shape[1:]), x.stride()[1:])
    wins = packed.onednn_wins.get(layout)
    if wins is None:
        fast_s, plain_s = _best_times([fast, plain])
        wins = packed.onednn_wins[layout] = fast_s < plain_s
    return wins


def _best_times(fns: list, rounds: int = 5) -> list[float]:
    """Each function's best time over `rounds`, the functions taking turns within each round: on
    a shared machine a burst of other work then slows every candidate, not just one. (Three
    back-to-back runs each picked torch's kernel for the 2M decoder's 24 -> 12 channel conv at
    24 kHz under load, 0.96 ms against oneDNN's 0.30 ms.)"""
    for fn in fns:
        fn()  # packing, primitive creation
    best = [math.inf] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best
