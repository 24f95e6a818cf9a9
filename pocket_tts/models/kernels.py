"""numba kernels for a generated frame's few rows: weight products and cached attention,
each reading its weights or keys once, front to back.

A generated frame multiplies one row per stream by every weight of the backbone and the flow
head, so those products cost what reading the weights costs. MKL's and oneDNN's kernels for
them walk 4-8 weight rows at once, interleaved streams that this CPU's prefetchers follow at
~8 GB/s on a 1 MB weight; reading one weight row after the other runs at the ~18 GB/s of a
plain `sum` (one EPYC Zen 4 core, weights not in cache, one row, ours against the faster of
MKL and oneDNN: 192x192 16 against 31 us, 512x512 64 against 105, 1536x512 152 against 263,
4096x1024 808 against 1018; two rows of 4096x1024 755 against 1627). From 8 rows on the
library kernels catch up (1536x512: 531 against 448 us), so more rows take them.

The kernel is compiled by numba at its first call (~0.9 s, once per process: prefork workers
warm up in the parent, see `TTSModel.warmup`), and runs on the calling thread: with more torch
threads than one the library kernels run in parallel instead.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

MAX_ROWS = 4

_F32 = np.float32
_NONE_1D = np.zeros(0, dtype=_F32)
_NONE_2D = np.zeros((0, 0), dtype=_F32)


# reassoc lets LLVM vectorise the dot products (its own summation order, like any BLAS); no other
# fast-math flag, so infinities and NaNs propagate as in torch.
@numba.njit(fastmath={"reassoc", "contract"}, nogil=True)
def _rows_by_weight(x, weight, bias, scale, residual, out):  # pragma: no cover (compiled)
    """out[j, r] = residual[j, r] + scale[r] * (x[j] . weight[r] + bias[r]); empty arrays: no such term."""
    rows, width = x.shape
    for r in range(weight.shape[0]):
        w = weight[r]
        b = bias[r] if bias.shape[0] else _F32(0.0)
        s = scale[r] if scale.shape[0] else _F32(1.0)
        for j in range(rows):
            xj = x[j]
            acc = _F32(0.0)
            for c in range(width):
                acc += w[c] * xj[c]
            value = (acc + b) * s
            out[j, r] = residual[j, r] + value if residual.shape[0] else value


def applies(x: torch.Tensor, weight: torch.Tensor, max_rows: int | None = MAX_ROWS) -> bool:
    """Whether the kernels should take rows x (and their product with weight, or attention over
    the cache `weight`): few float32 rows (`max_rows`, None: any number) on one thread, no autograd."""
    return (
        x.dim() == 2
        and (max_rows is None or x.shape[0] <= max_rows)
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and torch.get_num_threads() == 1
    )


def as_array(t: torch.Tensor | None, empty: np.ndarray = _NONE_1D) -> np.ndarray:
    """A contiguous float32 tensor as the kernel's array (shared memory), `empty` for None."""
    return empty if t is None else t.detach().contiguous().numpy()


def product(
    x: torch.Tensor,
    weight: np.ndarray,
    bias: np.ndarray = _NONE_1D,
    scale: np.ndarray = _NONE_1D,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """residual + scale * (x @ weight.T + bias) for x [rows, in] (see `applies`); weight [out, in]."""
    out = torch.empty(x.shape[0], weight.shape[0])
    _rows_by_weight(as_array(x, _NONE_2D), weight, bias, scale, as_array(residual, _NONE_2D), out.numpy())
    return out


@numba.njit(fastmath={"reassoc", "contract"}, nogil=True)
def _attend_rows(queries, keys, values, first, last, out):  # pragma: no cover (compiled)
    """out[b, h, g] = softmax over t in [first[b], last[b]] of queries[b, h, g] . keys[b, h, t], times values.

    queries / out [B, KV, G, D]: the G query heads that share each key head; keys / values [B, KV, T, D].
    """
    batch, kv_heads, group, dim = queries.shape
    weights = np.empty(keys.shape[2], dtype=_F32)
    for b in range(batch):
        lo, hi = first[b], last[b] + 1
        for h in range(kv_heads):
            k, v = keys[b, h], values[b, h]
            for g in range(group):
                q = queries[b, h, g]
                top = -np.inf
                for t in range(lo, hi):
                    acc = _F32(0.0)
                    for d in range(dim):
                        acc += q[d] * k[t, d]
                    weights[t] = acc
                    top = max(top, acc)
                total = _F32(0.0)
                for t in range(lo, hi):
                    e = np.exp(weights[t] - top)
                    weights[t] = e
                    total += e
                o = out[b, h, g]
                o[:] = 0.0
                for t in range(lo, hi):
                    p = weights[t]
                    for d in range(dim):
                        o[d] += p * v[t, d]
                for d in range(dim):
                    o[d] /= total


def attend(queries: torch.Tensor, cache: np.ndarray, first: np.ndarray, last: np.ndarray) -> torch.Tensor:
    """Each row's queries [B, KV, G, D] (scaled) against its cached positions first..last (inclusive).

    `cache`: the [2, B, KV, T, D] array of keys and values (`transformer.linear_cache`'s memory).
    """
    out = torch.empty(queries.shape)
    _attend_rows(as_array(queries), cache[0], cache[1], first, last, out.numpy())
    return out
