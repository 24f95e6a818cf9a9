"""numba kernels for a generated frame's few rows (one per stream): weight products, attention
over the cache, and a whole backbone layer in one call.

Those products cost what reading the weights costs. MKL's and oneDNN's kernels for them walk
4-8 weight rows at once, interleaved streams that this CPU's prefetchers follow at ~8 GB/s on a
1 MB weight; reading one weight row after the other runs at the ~18 GB/s of a plain `sum` (one
EPYC Zen 4 core, weights not in cache, one row, ours against the faster of MKL and oneDNN:
192x192 16 against 31 us, 512x512 64 against 105, 1536x512 152 against 263, 4096x1024 808
against 1018; two rows of 4096x1024 755 against 1627). From 8 rows on the library kernels catch
up (1536x512: 531 against 448 us), so more rows take them. A small model's layer is ~20 tensor
ops of 3-15 us each besides its products: `layer_step` does all of it in one call (2M backbone
1.38 -> 0.51 ms per frame, 7M 2.54 -> 1.58, 18M 5.93 -> 4.57, medians in one process).

`elu` is the Mimi decoder's ELU in one pass instead of torch's five, written straight into the
input buffer of the convolution that follows (after its history rows). `residual_elu_conv` is the
decoder's end (last residual sum, ELU, conv to one channel) in one pass.

`window_attention` is the Mimi transformer's sliding-window attention over several new positions
(RoPE, the window's append and each query's visible keys included: at most `context` of them,
where SDPA took all and a mask), its products register tiles written in LLVM IR (numba
intrinsics: `_tile_product`, `_softmax_block`, `_rotate_pairs`, `_transpose_block`, `_prefetch`),
and `gelu_` its GELU in one pass; both float32 or bfloat16 (computed in float32).

The kernels run on the calling thread: with more torch threads than one the library kernels run
in parallel instead (`applies`, `elu_applies`, `float_applies`), except for attention over the
backbone's cache, which has no product to share (`attend_applies`).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, overload

MAX_ROWS = 4
# Rows up to 512 wide: 8 of them stay in L1 beside a weight row, and the kernel beats the library
# kernels at 8 rows too (512x512: 131 against 148 us for oneDNN's packed kernel, 190 in place, 205
# for MKL; 10240x512: 1.84 against 1.99 ms). Wider rows do not fit: 3072x1024 at 8 rows 1.71 against 1.15.
NARROW_WIDTH, NARROW_MAX_ROWS = 512, 8

_F32 = np.float32
_NONE_1D = np.zeros(0, dtype=_F32)
_NONE_2D = np.zeros((0, 0), dtype=_F32)


# reassoc lets LLVM vectorise the dot products (its own summation order, like any BLAS); no other
# fast-math flag, so infinities and NaNs propagate as in torch.
_FAST = {"reassoc", "contract"}


def _kernel(fn, **options):
    """fn compiled by numba, the machine code cached on disk (beside this file, else in the user's
    cache directory, or NUMBA_CACHE_DIR): compiling all of them takes ~6 s, loading ~0.1 s."""
    try:
        return numba.njit(fastmath=_FAST, nogil=True, cache=True, **options)(fn)
    except RuntimeError:  # numba found no writable cache directory: compile in each process
        return numba.njit(fastmath=_FAST, nogil=True, **options)(fn)


def _dividing_kernel(fn):
    """`_kernel` with numpy's float division (a zero divisor gives inf or NaN, as in torch): Python's
    ZeroDivisionError check kept a loop with a division from vectorising (GELU 3.8 -> 0.33 ms)."""
    return _kernel(fn, error_model="numpy")


@_kernel
def _rows_by_weight(x, weight, bias, residual, out):  # pragma: no cover (compiled)
    """out[j, r] = residual[j, r] + x[j] . weight[r] + bias[r]; an empty bias or residual: no such term.

    Four rows at a time share each load of a weight element (8 rows of the default head's 512x512
    products: 157 -> 131 us each, against 205 for MKL and 148 for oneDNN's packed kernel).
    """
    rows, width = x.shape
    for r in range(weight.shape[0]):
        w = weight[r]
        b = bias[r] if bias.shape[0] else _F32(0.0)
        j = 0
        while j + 4 <= rows:
            x0, x1, x2, x3 = x[j], x[j + 1], x[j + 2], x[j + 3]
            a0, a1, a2, a3 = _F32(0.0), _F32(0.0), _F32(0.0), _F32(0.0)
            for c in range(width):
                wc = w[c]
                a0 += wc * x0[c]
                a1 += wc * x1[c]
                a2 += wc * x2[c]
                a3 += wc * x3[c]
            _put(out, residual, j, r, a0 + b)
            _put(out, residual, j + 1, r, a1 + b)
            _put(out, residual, j + 2, r, a2 + b)
            _put(out, residual, j + 3, r, a3 + b)
            j += 4
        for j in range(j, rows):
            xj = x[j]
            acc = _F32(0.0)
            for c in range(width):
                acc += w[c] * xj[c]
            _put(out, residual, j, r, acc + b)


@_kernel
def _put(out, residual, j, r, value):  # pragma: no cover (compiled, inlined by LLVM)
    out[j, r] = residual[j, r] + value if residual.shape[0] else value


@_kernel
def _attend_rows(queries, keys, values, first, last, out):  # pragma: no cover (compiled)
    """out[b, h, g] = softmax over t in [first[b], last[b]] of queries[b, h, g] . keys[b, t, h], times values.

    queries / out [B, KV, G, D]: the G query heads that share each key head; keys / values [B, T, KV, D],
    float32 or bfloat16 bits (uint16: each element widened as it is read). Each row's keys, then its
    values, are read once, in memory order.
    """
    batch, kv_heads, group, dim = queries.shape
    heads = kv_heads * group
    q, o = queries.reshape(batch, heads, dim), out.reshape(batch, heads, dim)
    weights = np.empty((heads, keys.shape[1]), dtype=_F32)
    # The sums in a local array, which LLVM knows no other array overlaps (out may, for all it knows):
    # with out it loaded and stored them at every key.
    total_values = np.empty((heads, dim), dtype=_F32)
    for b in range(batch):
        lo, hi = np.uint64(first[b]), np.uint64(last[b] + 1)  # unsigned: no wrap-around of negative indices
        for t in range(lo, hi):
            for head in range(heads):
                k = head // group
                acc = _F32(0.0)
                for d in range(dim):
                    acc += q[b, head, d] * _float32(keys[b, t, k, d])
                weights[head, t] = acc
        for head in range(heads):
            top = _F32(-np.inf)
            for t in range(lo, hi):
                top = max(top, weights[head, t])
            total = _F32(0.0)
            for t in range(lo, hi):
                e = _exp(weights[head, t] - top)
                weights[head, t] = e
                total += e
            scale = _F32(1.0) / total
            for t in range(lo, hi):
                weights[head, t] *= scale
        total_values[:] = 0.0
        for t in range(lo, hi):
            for head in range(heads):
                k, p = head // group, weights[head, t]
                for d in range(dim):
                    total_values[head, d] += p * _float32(values[b, t, k, d])
        o[b] = total_values


@_kernel
def _put_positions(keys, values, new, at):  # pragma: no cover (compiled)
    """keys[b, at[b]], values[b, at[b]] = new[:, b] for keys / values [B, T, KV, D] and new [2, B, KV, D]."""
    for b in range(new.shape[1]):
        keys[b, at[b]] = new[0, b]
        values[b, at[b]] = new[1, b]


@_kernel
def _layer_norm_rows(x, weight, bias, eps, out):  # pragma: no cover (compiled)
    """out = LayerNorm(x) per row of x [rows, C], float32 or bfloat16 bits (computed in float32,
    rounded once). All in float32: a mean divided by the int width was float64, and so was every
    pass after it (an 18M Mimi layer's [2048, 128] bfloat16: 270 -> 120 us; torch's 190-250)."""
    rows, width = x.shape
    w, b = np.empty(width, dtype=_F32), np.empty(width, dtype=_F32)
    for c in range(width):
        w[c], b[c] = _float32(weight[c]), _float32(bias[c])
    per_value = _F32(1.0) / _F32(width)
    for j in range(rows):
        total = _F32(0.0)
        for c in range(width):
            total += _float32(x[j, c])
        mean = total * per_value
        squares = _F32(0.0)
        for c in range(width):
            delta = _float32(x[j, c]) - mean
            squares += delta * delta
        inv = _F32(1.0) / np.sqrt(squares * per_value + eps)
        for c in range(width):
            out[j, c] = _stored((_float32(x[j, c]) - mean) * inv * w[c] + b[c], out)


@_kernel
def _layer_step(x, norm1, norm2, eps, in_proj, out_proj, linear1, linear2, rotation, keys, values, first, last, heads, out):  # pragma: no cover (compiled)
    """One pre-norm transformer layer for one new position per row (see `layer_step`)."""
    rows, width = x.shape
    kv_heads, dim = keys.shape[2], keys.shape[3]
    group, half = heads // kv_heads, dim // 2
    h = np.empty((rows, width), dtype=_F32)
    _layer_norm_rows(x, norm1[0], norm1[1], eps, h)
    qkv = np.empty((rows, in_proj.shape[0]), dtype=_F32)
    _rows_by_weight(h, in_proj, _NONE_1D, _NONE_2D, qkv)
    queries = np.empty((rows, kv_heads, group, dim), dtype=_F32)
    for j in range(rows):
        turn = rotation[j if rotation.shape[0] > 1 else 0]
        for head in range(heads + kv_heads):  # queries then keys: rotate each channel pair
            base = head * dim
            for p in range(half):
                a, b = qkv[j, base + 2 * p], qkv[j, base + 2 * p + 1]
                cos, sin = turn[head, p, 0], turn[head, p, 1]
                qkv[j, base + 2 * p] = a * cos - b * sin
                qkv[j, base + 2 * p + 1] = a * sin + b * cos
        for head in range(heads):
            for d in range(dim):
                queries[j, head // group, head % group, d] = qkv[j, head * dim + d]
        at = last[j]
        for head in range(kv_heads):
            for d in range(dim):
                keys[j, at, head, d] = qkv[j, (heads + head) * dim + d]
                values[j, at, head, d] = qkv[j, (heads + kv_heads + head) * dim + d]
    attended = np.empty((rows, kv_heads, group, dim), dtype=_F32)
    _attend_rows(queries, keys, values, first, last, attended)
    mid = np.empty((rows, width), dtype=_F32)
    _rows_by_weight(attended.reshape(rows, heads * dim), out_proj, _NONE_1D, x, mid)
    _layer_norm_rows(mid, norm2[0], norm2[1], eps, h)
    hidden = np.empty((rows, linear1.shape[0]), dtype=_F32)
    _rows_by_weight(h, linear1, _NONE_1D, _NONE_2D, hidden)
    _gelu_values(hidden.reshape(-1))
    _rows_by_weight(hidden, linear2, _NONE_1D, mid, out)


@_dividing_kernel
def _silu_rows(x):  # pragma: no cover (compiled)
    for j in range(x.shape[0]):
        for c in range(x.shape[1]):
            v = x[j, c]
            # Below -88 SiLU is below float32's smallest normal: a signed zero.
            x[j, c] = v / (_F32(1.0) + _exp(-v)) if v >= _F32(-88.0) else v * _F32(0.0)


@_kernel
def _head_velocity(y, x, modulation, input_proj, norms, inners, outers, final, eps, out):  # pragma: no cover (compiled)
    """The flow head's MLP (see `head_velocity`); each linear a (weight, bias) pair, `norms` the
    blocks' (weight, bias), the final norm affine-free."""
    rows, dim = y.shape
    act = y.copy()
    _silu_rows(act)
    mods = np.empty((rows, modulation[0].shape[0]), dtype=_F32)
    _rows_by_weight(act, modulation[0], modulation[1], _NONE_2D, mods)
    h = np.empty((rows, dim), dtype=_F32)
    _rows_by_weight(x, input_proj[0], input_proj[1], _NONE_2D, h)
    normed = np.empty((rows, dim), dtype=_F32)
    inner = np.empty((rows, dim), dtype=_F32)
    for i in range(len(inners)):
        _layer_norm_rows(h, norms[i][0], norms[i][1], eps, normed)
        for j in range(rows):
            for c in range(dim):  # shift + norm * (1 + scale)
                normed[j, c] = mods[j, 3 * i * dim + c] + normed[j, c] * mods[j, (3 * i + 1) * dim + c]
        _rows_by_weight(normed, inners[i][0], inners[i][1], _NONE_2D, inner)
        _silu_rows(inner)
        _rows_by_weight(inner, outers[i][0], outers[i][1], _NONE_2D, normed)
        for j in range(rows):
            for c in range(dim):  # x + gate * mlp
                h[j, c] += mods[j, (3 * i + 2) * dim + c] * normed[j, c]
    last = 3 * len(inners) * dim
    _layer_norm_rows(h, np.ones(dim, dtype=_F32), np.zeros(dim, dtype=_F32), eps, normed)  # affine-free
    for j in range(rows):
        for c in range(dim):
            normed[j, c] = mods[j, last + c] + normed[j, c] * mods[j, last + dim + c]
    _rows_by_weight(normed, final[0], final[1], _NONE_2D, out)


# exp(x) = 2^n e^r, x = n ln2 + r, |r| <= ln2 / 2; ln2 in two parts so that n ln2 is exact
# for the n ELU meets (n >= -126: below x = -87 ELU is -1 in float32 anyway).
_LN2_HI, _LN2_LO, _LOG2E = _F32(0.693359375), _F32(-2.12194440e-4), _F32(1.4426950408889634)
# (e^r - 1 - r) / r^2 as a polynomial in r, Horner order: 1/8!, 1/7!, ..., 1/2!.
_EXP_SERIES = tuple(_F32(1 / math.factorial(k)) for k in range(8, 1, -1))


@_kernel
def _exp_parts(x):  # pragma: no cover (compiled)
    """(2^n, e^r - 1) for x = n ln2 + r, x clamped at -87, in vectorisable arithmetic (numba's exp
    is a scalar libm call); e^r - 1 by its Taylor series to r^8 (error < 1e-9 relative)."""
    v = max(x, _F32(-87.0))
    n = np.floor(v * _LOG2E + _F32(0.5))
    r = v - n * _LN2_HI - n * _LN2_LO
    p = _EXP_SERIES[0]
    for coefficient in _EXP_SERIES[1:]:
        p = p * r + coefficient
    scale = np.int32((np.int32(n) + 127) << 23).view(np.float32)  # 2^n from its exponent bits
    return scale, r + r * r * p


@_kernel
def _elu(x):  # pragma: no cover (compiled)
    """F.elu(x) for a float32 x, within 1 ulp of the exact value (as torch's). For x < 0,
    e^x - 1 = 2^n (e^r - 1) + (2^n - 1): exact to the ulp next to 0, where 2^t - 1 would lose
    the digits of a tiny x. NaN, +-0 and +inf pass through, -inf gives -1."""
    scale, em1 = _exp_parts(x)
    return scale * em1 + (scale - _F32(1.0)) if x < 0 else x


@_kernel
def _exp(x):  # pragma: no cover (compiled)
    """e^x for a float32 x <= 88 (softmax weights, GELU), within ~1 ulp; e^-87 (~2e-38) for x below -87."""
    scale, em1 = _exp_parts(x)
    return scale + scale * em1


@_kernel
def _from_bfloat16(bits):  # pragma: no cover (compiled)
    return np.uint32(np.uint32(bits) << 16).view(np.float32)


def _float32(x):  # pragma: no cover (replaced in compiled code by its overload)
    raise NotImplementedError("only for numba kernels")


@overload(_float32)
def _float32_overload(x):
    """A float32 value, or bfloat16 bits (uint16) widened exactly: one kernel serves both caches."""
    if x == numba.types.uint16:
        return lambda x: _from_bfloat16(x)
    return lambda x: x


@_kernel
def _to_bfloat16(x):  # pragma: no cover (compiled)
    """The bfloat16 bits nearest a float32 x that is not NaN, ties to even (torch's rounding)."""
    bits = np.float32(x).view(np.uint32)
    return np.uint16((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16)


def _stored(x, like):  # pragma: no cover (replaced in compiled code by its overload)
    raise NotImplementedError("only for numba kernels")


@overload(_stored)
def _stored_overload(x, like):
    """float32 x as array `like` stores it: bfloat16 bits (uint16) rounded to nearest, or float32."""
    if like.dtype == numba.types.uint16:
        return lambda x, like: _to_bfloat16(x)
    return lambda x, like: x


@_kernel
def _elu_values(x, out):  # pragma: no cover (compiled)
    for i in range(x.shape[0]):
        out[i] = _elu(x[i])


@_kernel
def _elu_values_bfloat16(x, out):  # pragma: no cover (compiled)
    """`_elu_values` on bfloat16 bits (uint16 arrays), computed in float32 and rounded once. The
    values that ELU keeps (x >= 0, NaN) keep their bits, rounding meets no NaN."""
    for i in range(x.shape[0]):
        v = _from_bfloat16(x[i])
        out[i] = _to_bfloat16(_elu(v)) if v < 0 else x[i]


# Each row through a function of its own: 12 % faster than the same loop inlined here, and 9x
# faster than one indexing x[b * x_stride + i] (which did not vectorise).
@_kernel
def _elu_rows(x, x_stride, out, out_stride, offset, rows, size):  # pragma: no cover (compiled)
    """out[b * out_stride + offset + i] = elu(x[b * x_stride + i]) for b < rows, i < size (float32)."""
    for b in range(rows):
        _elu_values(x[b * x_stride : b * x_stride + size], out[b * out_stride + offset : b * out_stride + offset + size])


@_kernel
def _elu_rows_bfloat16(x, x_stride, out, out_stride, offset, rows, size):  # pragma: no cover (compiled)
    """`_elu_rows` on bfloat16 bits."""
    for b in range(rows):
        _elu_values_bfloat16(x[b * x_stride : b * x_stride + size], out[b * out_stride + offset : b * out_stride + offset + size])


@_kernel
def _residual_elu_conv(x, x_stride, h, h_stride, prev, taps, bias, out, kept):  # pragma: no cover (compiled)
    """For each row b: a = prev[b] ++ elu(x[b] + h[b]), the sum and the ELU each rounded as x stores
    them; out[b, t] = bias + taps . a[t : t + K] (all channels), stored as x; kept[b] = a's last n rows.

    x, h: flat time-major [T, C] rows at x_stride / h_stride (float32 or bfloat16 bits); prev, kept
    [B, n, C]; taps [K * C] float32 in a's order (tap-major); out [B, T].
    """
    batch, steps = out.shape
    n, channels = prev.shape[1], prev.shape[2]
    size, span = steps * channels, taps.shape[0]
    a = np.empty((n + steps) * channels, dtype=_F32)
    for b in range(batch):
        for i in range(n):
            for c in range(channels):
                a[i * channels + c] = _float32(prev[b, i, c])
        xb, hb, act = x[b * x_stride : b * x_stride + size], h[b * h_stride : b * h_stride + size], a[n * channels :]
        for i in range(size):
            total = _float32(_stored(_float32(xb[i]) + _float32(hb[i]), x))
            act[i] = _float32(_stored(_elu(total), x))
        for t in range(steps):
            start = np.uint64(t * channels)  # unsigned: numba wraps negative indices, a gather per load
            acc = _F32(0.0)
            for i in range(span):
                acc += taps[i] * a[start + np.uint64(i)]
            out[b, t] = _stored(acc + bias, out)
        for i in range(n):
            for c in range(channels):
                kept[b, i, c] = _stored(a[(steps + i) * channels + c], kept)


# GELU's tanh approximation: 0.5 x (1 + tanh(z)) = x sigmoid(2 z), z = sqrt(2 / pi) (x + 0.044715 x^3).
_GELU_A, _GELU_B = _F32(2 * math.sqrt(2 / math.pi)), _F32(2 * math.sqrt(2 / math.pi) * 0.044715)


@_dividing_kernel
def _gelu_values(x):  # pragma: no cover (compiled)
    """x = F.gelu(x, approximate="tanh") in place, float32 or bfloat16 bits (computed in float32, rounded once)."""
    for i in range(x.shape[0]):
        v = _float32(x[i])
        z = -v * (_GELU_A + _GELU_B * v * v)
        # Past z = 88 (x < -10.4) GELU is below float32's smallest normal: a signed zero.
        x[i] = _stored(v / (_F32(1.0) + _exp(z)) if z <= _F32(88.0) else v * _F32(0.0), x)


# A product tile: 8 rows by 32 columns, 16 accumulators of 16 float32 lanes, half of AVX-512's 32
# registers (LLVM keeps them there: they are SSA values). Scores are 8 queries by 32 keys, the
# weighted sum of values 8 queries by 32 channels.
_TILE_ROWS, _TILE_COLUMNS, _LANES = 8, 32, 16


@intrinsic
def _tile_product(typingctx, a, a_start, a_stride, b, b_start, b_stride, depth, out, out_start, out_stride):
    """out[i, c] = sum over k < depth of a[i, k] b[k, c], for i < 8 and c < 32, in float32.

    Each matrix is an array's float32 elements from flat offset `start`, rows `stride` apart. Numba
    compiles an inner loop over k with scalar or memory accumulators; this one holds them in
    registers: each k broadcasts 8 values of a and loads 2 vectors of b for 16 fused multiply-adds.
    """
    signature = types.void(a, a_start, a_stride, b, b_start, b_stride, depth, out, out_start, out_stride)

    def codegen(context, builder, signature, args):
        kinds = signature.args
        # The index arguments alone: a cast of the arrays compiled to three np.take calls a tile (~18 % of a layer).
        a_start, a_stride, b_start, b_stride, depth, out_start, out_stride = (context.cast(builder, args[i], kinds[i], types.intp) for i in (1, 2, 4, 5, 6, 8, 9))
        a_data, b_data, out_data = (context.make_array(kinds[i])(context, builder, args[i]).data for i in (0, 3, 7))
        vector = ir.VectorType(ir.FloatType(), _LANES)
        vectors = _TILE_COLUMNS // _LANES
        accumulators = [cgutils.alloca_once_value(builder, ir.Constant(vector, None)) for _ in range(_TILE_ROWS * vectors)]
        fast = ("contract", "reassoc")

        def at(data, start, row, stride, column):
            offset = builder.add(builder.add(start, builder.mul(row, stride)), ir.Constant(start.type, column))
            return builder.gep(data, [offset])

        with cgutils.for_range(builder, depth) as loop:
            k = loop.index
            columns = [builder.load(builder.bitcast(at(b_data, b_start, k, b_stride, v * _LANES), vector.as_pointer()), align=4) for v in range(vectors)]
            for i in range(_TILE_ROWS):
                row = builder.load(at(a_data, builder.add(a_start, k), ir.Constant(k.type, i), a_stride, 0))
                lanes = builder.insert_element(ir.Constant(vector, ir.Undefined), row, ir.Constant(ir.IntType(32), 0))
                lanes = builder.shuffle_vector(lanes, ir.Constant(vector, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), _LANES), [0] * _LANES))
                for v in range(vectors):
                    slot = accumulators[i * vectors + v]
                    total = builder.fadd(builder.load(slot), builder.fmul(lanes, columns[v], flags=fast), flags=fast)
                    builder.store(total, slot)
        for i in range(_TILE_ROWS):
            for v in range(vectors):
                target = builder.bitcast(at(out_data, out_start, ir.Constant(out_start.type, i), out_stride, v * _LANES), vector.as_pointer())
                builder.store(builder.load(accumulators[i * vectors + v]), target, align=4)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def _softmax_block(typingctx, a, stride, count, first, last, inverse_totals):
    """For each row j < 8 of a (float32, rows `stride` apart): a[j, k] = e^(a[j, k] - top_j) for
    first[j] <= k <= last[j] (int32 arrays) and 0 for the other k < count (a multiple of 16), top_j
    the largest of the former; inverse_totals[j] = 1 / their sum. 16 lanes at a time, e^x as `_exp`
    computes it, the 8 rows' maxima, e^x and sums interleaved (one query at a time, each waited on its
    maximum's and sum's reductions across lanes: an 18M layer's 32 rows x 64 positions 0.29 -> 0.25 ms
    of softmax; the rest is e^x's ~22 vector operations per 16 lanes). LLVM compiled every numba form
    of the maximum to a chain of dependent scalar compares."""
    signature = types.void(a, stride, count, first, last, inverse_totals)

    def codegen(context, builder, signature, args):
        kinds = signature.args
        stride, count = (context.cast(builder, args[i], kinds[i], types.intp) for i in (1, 2))
        data, firsts, lasts, inverses = (context.make_array(kinds[i])(context, builder, args[i]).data for i in (0, 3, 4, 5))
        vector, indices = ir.VectorType(ir.FloatType(), _LANES), ir.VectorType(ir.IntType(32), _LANES)
        fast = ("contract",)

        def splat(value, kind):
            one = builder.insert_element(ir.Constant(kind, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
            return builder.shuffle_vector(one, ir.Constant(kind, ir.Undefined), ir.Constant(indices, [0] * _LANES))

        def constant(value):
            return ir.Constant(vector, [float(_F32(value))] * _LANES)

        def across(lanes, combine):  # the upper half's lanes against the lower's: 4 steps, not 15
            half = _LANES // 2
            while half:
                lanes = combine(lanes, builder.shuffle_vector(lanes, lanes, ir.Constant(indices, [(i + half) % _LANES for i in range(_LANES)])))
                half //= 2
            return builder.extract_element(lanes, ir.Constant(ir.IntType(32), 0))

        def element(pointer, j):
            return builder.load(builder.gep(pointer, [ir.Constant(ir.IntType(64), j)]))

        width = ir.Constant(stride.type, _LANES)
        low, high = ([splat(element(bounds, j), indices) for j in range(_TILE_ROWS)] for bounds in (firsts, lasts))
        lanes = ir.Constant(indices, list(range(_LANES)))

        def chunks(body):  # body(j, the address of row j's 16 lanes, which of them are visible) for each chunk
            with cgutils.for_range(builder, builder.sdiv(count, width)) as loop:
                at = builder.mul(loop.index, width)
                k = builder.add(splat(builder.trunc(at, ir.IntType(32)), indices), lanes)
                for j in range(_TILE_ROWS):
                    visible = builder.and_(builder.icmp_signed(">=", k, low[j]), builder.icmp_signed("<=", k, high[j]))
                    offset = builder.add(builder.mul(stride, ir.Constant(stride.type, j)), at)
                    body(j, builder.bitcast(builder.gep(data, [offset]), vector.as_pointer()), visible)

        def larger(x, y):
            return builder.select(builder.fcmp_ordered(">", x, y), x, y)

        lowest = constant(-np.inf)
        tops = [cgutils.alloca_once_value(builder, lowest) for _ in range(_TILE_ROWS)]
        chunks(lambda j, pointer, visible: builder.store(larger(builder.select(visible, builder.load(pointer, align=4), lowest), builder.load(tops[j])), tops[j]))
        highest = [splat(across(builder.load(top), larger), vector) for top in tops]
        floor = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector]), f"llvm.floor.v{_LANES}f32")
        totals = [cgutils.alloca_once_value(builder, constant(0.0)) for _ in range(_TILE_ROWS)]

        def weigh(j, pointer, visible):
            x = builder.fsub(builder.load(pointer, align=4), highest[j])
            x = builder.select(builder.fcmp_ordered("<", x, constant(-87.0)), constant(-87.0), x)
            n = builder.call(floor, [builder.fadd(builder.fmul(x, constant(_LOG2E), flags=fast), constant(0.5), flags=fast)])
            r = builder.fsub(builder.fsub(x, builder.fmul(n, constant(_LN2_HI), flags=fast), flags=fast), builder.fmul(n, constant(_LN2_LO), flags=fast), flags=fast)
            series = constant(_EXP_SERIES[0])
            for coefficient in _EXP_SERIES[1:]:
                series = builder.fadd(builder.fmul(series, r, flags=fast), constant(coefficient), flags=fast)
            minus_one = builder.fadd(r, builder.fmul(builder.fmul(r, r, flags=fast), series, flags=fast), flags=fast)
            exponent = builder.shl(builder.add(builder.fptosi(n, indices), ir.Constant(indices, [127] * _LANES)), ir.Constant(indices, [23] * _LANES))
            scale = builder.bitcast(exponent, vector)
            weights = builder.select(visible, builder.fadd(scale, builder.fmul(scale, minus_one, flags=fast), flags=fast), constant(0.0))
            builder.store(weights, pointer, align=4)
            builder.store(builder.fadd(builder.load(totals[j]), weights), totals[j])

        chunks(weigh)
        for j in range(_TILE_ROWS):
            total = across(builder.load(totals[j]), lambda x, y: builder.fadd(x, y))
            builder.store(builder.fdiv(ir.Constant(ir.FloatType(), 1.0), total), builder.gep(inverses, [ir.Constant(ir.IntType(64), j)]))
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def _rotate_pairs(typingctx, a, a_start, cos, sin, table_start, scale, out, out_start, count, like):
    """out[k] = (a[k] cos[k] + a[k ^ 1] sin[k]) scale for k < count (whole 16-lane blocks), each
    array's elements from its flat offset `start`: RoPE of channel pairs (a, b) with tables that hold
    each pair's cosine twice and (-sine, sine). `a` float32 or bfloat16 bits (widened), the tables
    and out float32, out's values rounded to bfloat16 (as `_stored`) where the array `like` holds
    bfloat16 bits (keys as the window stores them: 0.05 ms of an 18M layer against 0.11 in a pass
    of their own). An 18M layer's queries (32 rows x 64 positions x 4 heads of 32): 0.06-0.08 ms
    against 0.26 for numba's loop over pairs."""
    signature = types.void(a, a_start, cos, sin, table_start, scale, out, out_start, count, like)

    def codegen(context, builder, signature, args):
        kinds = signature.args
        a_start, table_start, out_start, count = (context.cast(builder, args[i], kinds[i], types.intp) for i in (1, 4, 7, 8))
        a_data, cos_data, sin_data, out_data = (context.make_array(kinds[i])(context, builder, args[i]).data for i in (0, 2, 3, 6))
        factor = context.cast(builder, args[5], kinds[5], types.float32)
        vector, indices = ir.VectorType(ir.FloatType(), _LANES), ir.VectorType(ir.IntType(32), _LANES)
        width = ir.Constant(count.type, _LANES)
        factors = builder.shuffle_vector(builder.insert_element(ir.Constant(vector, ir.Undefined), factor, ir.Constant(ir.IntType(32), 0)), ir.Constant(vector, ir.Undefined), ir.Constant(indices, [0] * _LANES))

        def integers(value):
            return ir.Constant(indices, [value] * _LANES)

        def lanes(data, start, at, kind=vector):
            return builder.bitcast(builder.gep(data, [builder.add(start, at)]), kind.as_pointer())

        with cgutils.for_range(builder, builder.sdiv(count, width)) as loop:
            at = builder.mul(loop.index, width)
            if kinds[0].dtype == types.uint16:  # bfloat16 bits: the upper half of a float32's
                bits = builder.load(lanes(a_data, a_start, at, ir.VectorType(ir.IntType(16), _LANES)), align=2)
                x = builder.bitcast(builder.shl(builder.zext(bits, indices), integers(16)), vector)
            else:
                x = builder.load(lanes(a_data, a_start, at), align=4)
            swapped = builder.shuffle_vector(x, x, ir.Constant(indices, [k ^ 1 for k in range(_LANES)]))
            turned = builder.fadd(
                builder.fmul(x, builder.load(lanes(cos_data, table_start, at), align=4)),
                builder.fmul(swapped, builder.load(lanes(sin_data, table_start, at), align=4)),
                flags=("contract",),
            )
            scaled = builder.fmul(turned, factors)
            if kinds[9].dtype == types.uint16:  # to nearest, ties to even, as `_to_bfloat16`
                bits = builder.bitcast(scaled, indices)
                odd = builder.and_(builder.lshr(bits, integers(16)), integers(1))
                scaled = builder.bitcast(builder.and_(builder.add(builder.add(bits, integers(0x7FFF)), odd), integers(-65536)), vector)
            builder.store(scaled, lanes(out_data, out_start, at), align=4)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def _prefetch(typingctx, a, start, count):
    """Ask for the cache lines of a's flat elements start .. start + count - 1 (into L2), without waiting."""
    signature = types.void(a, start, count)

    def codegen(context, builder, signature, args):
        kinds = signature.args
        start, count = (context.cast(builder, args[i], kinds[i], types.intp) for i in (1, 2))
        data = context.make_array(kinds[0])(context, builder, args[0]).data
        line = ir.Constant(count.type, max(64 // context.get_abi_sizeof(context.get_data_type(kinds[0].dtype)), 1))
        pointer = ir.IntType(8).as_pointer()
        fetch = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [pointer, ir.IntType(32), ir.IntType(32), ir.IntType(32)]), "llvm.prefetch.p0")
        lines = builder.sdiv(builder.add(count, builder.sub(line, ir.Constant(count.type, 1))), line)
        with cgutils.for_range(builder, lines) as loop:
            at = builder.gep(data, [builder.add(start, builder.mul(loop.index, line))])
            i32 = ir.IntType(32)
            builder.call(fetch, [builder.bitcast(at, pointer), ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def _transpose_block(typingctx, a, a_start, a_stride, out, out_start, out_stride):
    """out[c, r] = a[r, c] for r, c < 16, float32 matrices given as in `_tile_product`: 16 rows in
    registers, then for s = 8, 4, 2, 1 each pair of rows s apart swaps its off-diagonal s-lane
    blocks (64 shuffles). Numba's element loops over a transposition ran at ~0.45 ns an element, 3.3x
    a plain copy (the default decoder's 1x1 call was 0.88x the previous kernel with them)."""
    signature = types.void(a, a_start, a_stride, out, out_start, out_stride)

    def codegen(context, builder, signature, args):
        kinds = signature.args
        a_start, a_stride, out_start, out_stride = (context.cast(builder, args[i], kinds[i], types.intp) for i in (1, 2, 4, 5))
        a_data, out_data = (context.make_array(kinds[i])(context, builder, args[i]).data for i in (0, 3))
        vector = ir.VectorType(ir.FloatType(), _LANES)

        def row_pointer(data, start, stride, row):
            return builder.bitcast(builder.gep(data, [builder.add(start, builder.mul(stride, ir.Constant(stride.type, row)))]), vector.as_pointer())

        lines = [builder.load(row_pointer(a_data, a_start, a_stride, r), align=4) for r in range(_LANES)]
        s = _LANES // 2
        while s:
            for r in range(_LANES):
                if not r & s:
                    upper, lower = lines[r], lines[r + s]
                    kept = [c if not c & s else _LANES + c - s for c in range(_LANES)]
                    taken = [c + s if not c & s else _LANES + c for c in range(_LANES)]
                    lines[r] = builder.shuffle_vector(upper, lower, ir.Constant(ir.VectorType(ir.IntType(32), _LANES), kept))
                    lines[r + s] = builder.shuffle_vector(upper, lower, ir.Constant(ir.VectorType(ir.IntType(32), _LANES), taken))
            s //= 2
        for r in range(_LANES):
            builder.store(lines[r], row_pointer(out_data, out_start, out_stride, r), align=4)
        return context.get_dummy_value()

    return signature, codegen


@_kernel
def _rotated(proj, b, i, head, d, cos, sin, r):  # pragma: no cover (compiled)
    """Channel d of proj[b, i, head] after RoPE (`_rotate_pairs`, one channel)."""
    return _float32(proj[b, i, head, d]) * cos[r, i, d] + _float32(proj[b, i, head, d ^ 1]) * sin[r, i, d]


@_kernel
def _prefetch_share(a, row, part, parts):  # pragma: no cover (compiled)
    """`_prefetch` part `part` of `parts` of a[row]'s elements."""
    size = a[0].size
    share = (size + parts - 1) // parts
    first = min(part * share, size)
    _prefetch(a, row * size + first, min(share, size - first))


@_dividing_kernel
def _window_attention(proj, window_k, window_v, cos, sin, base, context, out, kept_k, kept_v):  # pragma: no cover (compiled)
    """See `window_attention`; arrays of float32 or of bfloat16 bits, computed in float32. proj
    [B, T, H + 2 KV, D], cos / sin [B or 1, T, D], out [B, T, H, D].

    Per row, the rotated queries [H, T, D] (`_rotate_pairs`; rows up to a whole block, zeros); per KV
    head, staged in float32, its keys as rows (the new ones rotated there), then d-major [D, N] (the
    lanes of a score tile, transposed 16 x 16 by `_transpose_block`), and its values [N, D] (channels
    padded to whole tiles with zeros). Per
    block of 8 queries, `_tile_product` gives the scores over the keys any of them sees,
    `_softmax_block` turns each query's into weights (0 for the keys it does not see), and
    `_tile_product` again the weighted sums of the values.
    Loops index with what numba sees as non-negative (range counters, unsigned key indices): it
    wraps other indices around when negative, which made loads over keys gathers (~6x slower).
    """
    batch, steps, heads = proj.shape[0], proj.shape[1], out.shape[2]
    kv_heads, width, dim = window_k.shape[1], window_k.shape[2], window_k.shape[3]
    group, keep, n = heads // kv_heads, kept_k.shape[2], width + steps
    rows, columns = _TILE_ROWS, _TILE_COLUMNS
    query_scale = _F32(1.0) / np.sqrt(_F32(dim))
    padded_steps = (steps + rows - 1) // rows * rows
    padded_dim = (dim + columns - 1) // columns * columns
    # A block's keys: at most context - 1 before its first query, and its 8 queries' own.
    span_limit = min(n, context + rows - 1)
    score_width = (span_limit + columns - 1) // columns * columns
    key_width = n + columns  # a block's last score tile may read past the last key
    rotated = np.zeros((heads, padded_steps, dim), dtype=_F32)  # the queries (rows up to a whole block)
    # One KV head at a time (its keys and values stay in L1 for 18M), zeros past its keys and channels:
    # the keys as rows (new ones rotated in place), then d-major (16 x 16 blocks at a time: rows and
    # channels padded to 16).
    key_rows = np.zeros(((n + _LANES - 1) // _LANES * _LANES, (dim + _LANES - 1) // _LANES * _LANES), dtype=_F32)
    keys = np.zeros((key_rows.shape[1], key_width), dtype=_F32)
    values = np.zeros((n, padded_dim), dtype=_F32)
    scores = np.empty((rows, score_width), dtype=_F32)
    inverse_totals = np.empty(rows, dtype=_F32)
    visible_from, visible_to = np.empty(rows, dtype=np.int32), np.empty(rows, dtype=np.int32)  # each query's keys in the block
    acc = np.empty((rows, padded_dim), dtype=_F32)
    blocks = heads * padded_steps // rows  # a row's
    for b in range(batch):
        r = b if cos.shape[0] > 1 else 0
        for i in range(steps):
            for head in range(heads):
                _rotate_pairs(proj, ((b * steps + i) * proj.shape[2] + head) * dim, cos, sin, (r * steps + i) * dim, query_scale, rotated, (head * padded_steps + i) * dim, dim, rotated)
                for d in range(dim - dim % _LANES, dim):  # past the last whole 16 channels
                    rotated[head, i, d] = _rotated(proj, b, i, head, d, cos, sin, r) * query_scale
        # Query i sits at key index width + i: it sees `context` positions back, none before the row's start.
        start = max(width - base[b], 0)
        block = 0
        for h in range(kv_heads):
            for t in range(width):
                for d in range(dim):
                    key_rows[t, d] = _float32(window_k[b, h, t, d])
            for i in range(steps):
                # Keys as the window stores them.
                _rotate_pairs(proj, ((b * steps + i) * proj.shape[2] + heads + h) * dim, cos, sin, (r * steps + i) * dim, _F32(1.0), key_rows, (width + i) * key_rows.shape[1], dim, kept_k)
                for d in range(dim - dim % _LANES, dim):
                    key_rows[width + i, d] = _float32(_stored(_rotated(proj, b, i, heads + h, d, cos, sin, r), kept_k))
            # The window's newest `keep` positions, bits as they are.
            for t in range(max(keep + width - n, 0)):
                for d in range(dim):
                    kept_k[b, h, t, d], kept_v[b, h, t, d] = window_k[b, h, t + n - keep, d], window_v[b, h, t + n - keep, d]
            for t in range(max(keep + width - n, 0), keep):
                for d in range(dim):
                    kept_k[b, h, t, d] = _stored(key_rows[t + n - keep, d], kept_k)
                    kept_v[b, h, t, d] = _stored(_float32(proj[b, t + n - keep - width, heads + kv_heads + h, d]), kept_v)
            for t0 in range(0, key_rows.shape[0], _LANES):
                for d0 in range(0, key_rows.shape[1], _LANES):
                    _transpose_block(key_rows, t0 * key_rows.shape[1] + d0, key_rows.shape[1], keys, d0 * key_width + t0, key_width)
            for t in range(width):
                for d in range(dim):
                    values[t, d] = _float32(window_v[b, h, t, d])
            for i in range(steps):
                for d in range(dim):
                    values[width + i, d] = _float32(proj[b, i, heads + kv_heads + h, d])
            for head in range(h * group, (h + 1) * group):
                for i0 in range(0, steps, rows):
                    # The next row's projection, a share a block: RoPE reads it a head (64 bytes of every
                    # 768 at 18M) at a time, which the prefetchers left to memory (the queries' RoPE of
                    # an 18M layer: 0.21 ms of ~1.5, 0.05 with these).
                    if b + 1 < batch:
                        _prefetch_share(proj, b + 1, block, blocks)
                    block += 1
                    lo = max(i0 + width + 1 - context, start)
                    span = min(i0 + rows, steps) - 1 + width - lo + 1
                    for c in range(0, span, columns):
                        _tile_product(rotated, (head * padded_steps + i0) * dim, dim, keys, lo + c, key_width, dim, scores, c, score_width)
                    for j in range(rows):
                        i = min(i0 + j, steps - 1)
                        visible_from[j] = max(i + width + 1 - context, start) - lo
                        visible_to[j] = i + width - lo
                    _softmax_block(scores, score_width, (span + _LANES - 1) // _LANES * _LANES, visible_from, visible_to, inverse_totals)
                    for c in range(0, padded_dim, columns):
                        _tile_product(scores, 0, score_width, values, lo * padded_dim + c, padded_dim, span, acc, c, padded_dim)
                    for j in range(min(rows, steps - i0)):
                        for d in range(dim):
                            out[b, i0 + j, head, d] = _stored(acc[j, d] * inverse_totals[j], out)


def gelu_(x: torch.Tensor) -> torch.Tensor:
    """x = F.gelu(x, approximate="tanh") in place, in one pass, for a contiguous x (see
    `float_applies`): float32 within 1e-6 relative for finite x (-inf gives -inf, not NaN),
    bfloat16 computed in float32 and rounded once."""
    _gelu_values(_bits(x).reshape(-1))
    return x


def residual_elu_conv(x: torch.Tensor, h: torch.Tensor, prev: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """The SEANet decoder's end in one pass: (conv(prev ++ elu(x + h)) with one output channel
    [B, 1, T], the last n activated samples [B, n, C] for the next call's `prev`).

    x, h [B, C, T]: time-major signals (`elu_applies` of their [B, T, C] views); weight [1, C, K] with
    K = n + 1. The sum and the ELU round as torch's ops would (bfloat16), the conv sums in float32.
    32 rows x 4 frames of the 18M decoder, bfloat16: 6.9 ms against 10.1 for the add, the ELU's pass
    and oneDNN's conv (which fills 16 or more output channels at once: ~11 GFLOP/s on this one).
    """
    b, c, t = x.shape
    out = torch.empty(b, 1, t, dtype=x.dtype)
    kept = torch.empty(prev.shape, dtype=x.dtype)
    taps = weight.detach()[0].t().float().contiguous().view(-1).numpy()  # [K, C]: a's order
    flat = [_bits(y.transpose(1, 2).as_strided(((b - 1) * y.stride(0) + t * c,), (1,))) for y in (x, h)]
    _residual_elu_conv(flat[0], x.stride(0), flat[1], h.stride(0), _bits(prev.contiguous()), taps,
                       np.float32(0.0 if bias is None else bias.item()), _bits(out).reshape(b, t), _bits(kept))
    return out, kept


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """F.layer_norm over the last dimension of a contiguous x (see `float_applies`), weight and
    bias in x's dtype, in one kernel call."""
    out = torch.empty(x.shape, dtype=x.dtype)
    width = x.shape[-1]
    _layer_norm_rows(_bits(x).reshape(-1, width), _bits(weight), _bits(bias), np.float32(eps), _bits(out).reshape(-1, width))
    return out


def float_applies(x: torch.Tensor) -> bool:
    """Whether the float kernels (`gelu_`, `layer_norm`, `window_attention`) take x: float32 or bfloat16 on the
    CPU, one thread (with more, torch's ops run in parallel), no autograd."""
    return (
        x.dtype in (torch.float32, torch.bfloat16)
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and torch.get_num_threads() == 1
    )


def window_attention(projected: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cos: np.ndarray, sin: np.ndarray, base: np.ndarray, context: int, heads: int):
    """Sliding-window attention of T new positions per row in one pass: (output [B, T, heads * D],
    the new window's keys, values).

    `projected` [B, T, (heads + 2 KV) D]: each position's queries, keys and values (before RoPE);
    `keys` / `values` [B, KV, W, D]: the window of earlier positions (after RoPE). Row b's new
    positions are base[b] + 0..T-1, turned by `cos` / `sin` [B or 1, T, D] (as `rope_tables`
    gives them: each channel pair's cosine twice, (-sine, sine)), the queries then scaled by
    1/sqrt(D); a query sees the `context` most recent positions up to its own, none below 0. The new window
    holds the context - 1 most recent. bfloat16 is computed in float32: new keys rounded as the
    window stores them (so a key counts the same in this call and the next), outputs rounded once.
    """
    b, t, _ = projected.shape
    kv_heads, width, dim = keys.shape[1:]
    keep = min(width + t, context - 1)
    out = torch.empty(b, t, heads, dim, dtype=projected.dtype)
    kept_k, kept_v = (torch.empty(b, kv_heads, keep, dim, dtype=keys.dtype) for _ in range(2))
    arrays = (_bits(x.contiguous()) for x in (projected.view(b, t, -1, dim), keys, values))
    _window_attention(*arrays, cos, sin, base, context, _bits(out), _bits(kept_k), _bits(kept_v))
    return out.view(b, t, heads * dim), kept_k, kept_v


def elu_applies(x: torch.Tensor) -> bool:
    """Whether `elu` takes x: a float32 or bfloat16 CPU tensor [B, T, C] whose every row's [T, C] is
    contiguous (a time-major signal), where `float_applies`."""
    return x.dim() == 3 and x.stride(2) == 1 and (x.stride(1) == x.shape[2] or x.shape[1] == 1) and float_applies(x)


def elu(x: torch.Tensor, history: int = 0) -> torch.Tensor:
    """F.elu(x) for x [B, T, C] (see `elu_applies`) in one pass, as rows history.. of a new
    contiguous [B, history + T, C] tensor: its first `history` rows are left for the caller.

    bfloat16 is computed in float32 and rounded once: F.elu(x.float()).to(torch.bfloat16) bit
    for bit. A Mimi decode call of 8 rows x 4 frames (bfloat16, one core) spent ~22 ms in
    torch's five ELU passes and ~6.4 ms in the convs' `cat` of their history; these calls take
    ~9.3 ms instead (3.9M values alone: ~1.3-1.5 ms against torch's 4.5-6).
    """
    b, t, c = x.shape
    out = torch.empty(b, history + t, c, dtype=x.dtype)
    if out.numel() == 0 or t == 0:
        return out
    x = x.detach()
    span = (b - 1) * x.stride(0) + t * c
    if x.dtype == torch.bfloat16:
        src = x.view(torch.int16).as_strided((span,), (1,)).numpy().view(np.uint16)
        _elu_rows_bfloat16(src, x.stride(0), out.view(torch.int16).view(-1).numpy().view(np.uint16), (history + t) * c, history * c, b, t * c)
    else:
        _elu_rows(x.as_strided((span,), (1,)).numpy(), x.stride(0), out.view(-1).numpy(), (history + t) * c, history * c, b, t * c)
    return out


def applies(x: torch.Tensor, weight: torch.Tensor, max_rows: int = MAX_ROWS) -> bool:
    """Whether the kernels should take rows x (and their product with weight, or a whole layer over
    the cache `weight`): few float32 rows (at most `max_rows`) on one thread, no autograd."""
    return (
        x.dim() == 2
        and x.shape[0] <= max_rows
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and torch.get_num_threads() == 1
    )


def attend_applies(x: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether `attend` takes rows x over `cache`: float32 rows, a float32 or bfloat16 cache, no
    autograd, at any thread count. Rows share no keys, so more threads have no shared product to
    split, and torch's products read the contiguous cache through strided copies (2 threads, 32 rows
    at 100-300 positions, 18M int8 backbone step: 43-133 ms on torch's ops, 11-24 on the kernel)."""
    return x.dim() == 2 and x.dtype == torch.float32 and cache.dtype in (torch.float32, torch.bfloat16) and x.device.type == "cpu" and not torch.is_grad_enabled()


def row_limit(width: int) -> int:
    """How many rows `width` wide the product kernel takes (see NARROW_WIDTH)."""
    return NARROW_MAX_ROWS if width <= NARROW_WIDTH else MAX_ROWS


def as_array(t: torch.Tensor | None, empty: np.ndarray = _NONE_1D) -> np.ndarray:
    """A contiguous float32 tensor as the kernel's array (shared memory), `empty` for None."""
    return empty if t is None else t.detach().contiguous().numpy()


def _bits(t: torch.Tensor) -> np.ndarray:
    """A float32 tensor's array, or a bfloat16 one's bits as uint16 (shared memory)."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def product(x: torch.Tensor, weight: np.ndarray, bias: np.ndarray = _NONE_1D, residual: torch.Tensor | None = None) -> torch.Tensor:
    """residual + x @ weight.T + bias for x [rows, in] (see `applies`); weight [out, in]."""
    out = torch.empty(x.shape[0], weight.shape[0])
    _rows_by_weight(as_array(x, _NONE_2D), weight, bias, as_array(residual, _NONE_2D), out.numpy())
    return out


def attend(queries: torch.Tensor, cache: torch.Tensor, first: np.ndarray, last: np.ndarray, new: torch.Tensor) -> torch.Tensor:
    """Each row's queries [B, KV, G, D] (scaled) against its cached positions first..last (inclusive),
    after writing its new key and value (`new` [2, B, KV, D], the cache's dtype) at position last.

    `cache`: the [2, B, T, KV, D] keys and values (`transformer.linear_cache`, or its first rows),
    float32 or bfloat16, each half contiguous. (torch's index_put for the write cost ~160 us per
    32-row layer.)
    """
    out = torch.empty(queries.shape)
    keys, values = _bits(cache[0]), _bits(cache[1])
    _put_positions(keys, values, _bits(new.contiguous()), last)
    _attend_rows(as_array(queries), keys, values, first, last, out.numpy())
    return out


def layer_step(x: torch.Tensor, weights: tuple, rotation: np.ndarray, cache: torch.Tensor, first: np.ndarray, last: np.ndarray, heads: int) -> torch.Tensor:
    """x + attention + feed-forward of one float32 pre-norm layer (no biases, no layer scale) for x [B, d]:
    LayerNorm, projection, RoPE (`rotation` [B or 1, heads + kv_heads, head_dim / 2, (cos, sin)]),
    the new key and value written at position last[b] of `cache` (float32, as for `attend`),
    attention over positions first[b]..last[b], output projection and residual, LayerNorm, GELU
    feed-forward and residual, all in one call.

    `weights`: (norm1 (weight, bias), norm2 (weight, bias), eps, in_proj, out_proj, linear1, linear2) as arrays.
    """
    out = torch.empty(x.shape)
    _layer_step(as_array(x, _NONE_2D), *weights, rotation, cache[0].numpy(), cache[1].numpy(), first, last, heads, out.numpy())
    return out


def head_velocity(y: torch.Tensor, x: torch.Tensor, weights: tuple) -> torch.Tensor:
    """The flow head's MLP over x [B, latent_dim] under condition y [B, dim] in one call (`FlowHead.velocity`).

    `weights`: (modulation, input_proj, norms, inners, outers, final, eps) as arrays: each linear
    (weight, bias); norms, inners and outers tuples with one entry per block.
    """
    out = torch.empty(x.shape[0], weights[5][0].shape[0])
    _head_velocity(as_array(y, _NONE_2D), as_array(x, _NONE_2D), *weights, out.numpy())
    return out
