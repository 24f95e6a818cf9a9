"""The Mimi transformer's float kernels (sliding-window attention, GELU) against references."""

import math

import pytest
import torch
import torch.nn.functional as F

from pocket_tts.models import kernels
from pocket_tts.models.transformer import Transformer, apply_rope, concat_window_states, gelu_, rope_tables

pytestmark = pytest.mark.usefixtures("one_thread")  # the kernels serve one-thread processes


def rotations(base: torch.Tensor, steps: int, dim: int):
    """`window_attention`'s cos / sin for rows starting at positions `base`."""
    return tuple(table.squeeze(2).numpy() for table in rope_tables(base[:, None] + torch.arange(steps), dim, 10000.0))


def expected(projected, window_k, window_v, base, context, heads):
    """Attention in float64 from the same inputs: new keys rounded as the window stores them,
    each query over the `context` latest positions that are not before its row's start."""
    b, t, _ = projected.shape
    kv_heads, width, dim = window_k.shape[1:]
    cos, sin = rope_tables(base[:, None] + torch.arange(t), dim, 10000.0)
    x = projected.float().view(b, t, -1, dim)
    qk = apply_rope(x[:, :, : heads + kv_heads].double(), (cos.double(), sin.double()))
    q, k = qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2).to(window_k.dtype)
    keys = torch.cat((window_k, k), dim=2).double()
    values = torch.cat((window_v, x[:, :, heads + kv_heads :].transpose(1, 2).to(window_v.dtype)), dim=2).double()
    key_pos = base[:, None] - width + torch.arange(width + t)  # [B, N]
    query_pos = base[:, None] + torch.arange(t)  # [B, T]
    delta = query_pos[:, :, None] - key_pos[:, None, :]
    visible = (delta >= 0) & (delta < context) & (key_pos[:, None, :] >= 0)
    group = heads // kv_heads
    scores = q @ keys.repeat_interleave(group, dim=1).transpose(2, 3) / math.sqrt(dim)
    scores = scores.masked_fill(~visible[:, None], -math.inf)
    out = torch.softmax(scores, dim=-1) @ values.repeat_interleave(group, dim=1)
    keep = min(width + t, context - 1)
    return out.transpose(1, 2).reshape(b, t, heads * dim), keys[:, :, width + t - keep :], values[:, :, width + t - keep :]


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float32, 2e-6, 1e-6), (torch.bfloat16, 2**-8, 1e-3)])
@pytest.mark.parametrize(
    "steps,width,context,heads,kv_heads,dim",
    [
        (64, 49, 50, 4, 4, 16),  # the 18M decoder: 4 frames of 16 positions, a full window
        (1, 7, 8, 2, 2, 16),  # one position
        (7, 3, 50, 4, 2, 16),  # a context longer than all keys; grouped heads; a partial block of queries
        (13, 4, 5, 2, 1, 16),  # a context shorter than the call
        (20, 45, 40, 2, 1, 24),  # channels and keys padded to whole 16-lane blocks; two score tiles a block
    ],
)
def test_window_attention_matches_float64_reference(dtype, rtol, atol, steps, width, context, heads, kv_heads, dim):
    torch.manual_seed(steps)
    rows = 3
    projected = torch.randn(rows, steps, (heads + 2 * kv_heads) * dim).to(dtype)
    window_k, window_v = (torch.randn(rows, kv_heads, width, dim).to(dtype) for _ in range(2))
    # Row 0 has run long; rows 1 and 2 joined later (their first positions 2 and 0: the window
    # holds keys from before they started, which they must not see).
    base = torch.tensor([100, 2, 0])
    with torch.no_grad():
        got, kept_k, kept_v = kernels.window_attention(
            projected, window_k, window_v, *rotations(base, steps, dim), base.numpy(), context, heads
        )
    want, want_k, want_v = expected(projected, window_k, window_v, base, context, heads)
    assert got.dtype == dtype and got.shape == (rows, steps, heads * dim)
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)
    # The window keeps the context - 1 latest keys and values, in its dtype.
    assert kept_k.dtype == dtype and kept_k.shape == (rows, kv_heads, min(width + steps, context - 1), dim)
    torch.testing.assert_close(kept_k.double(), want_k, rtol=2**-7 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)  # 1 ulp
    assert torch.equal(kept_v.double(), want_v)


def decode(model, x, states, pieces, kernel, monkeypatch):
    with monkeypatch.context() as patch, torch.no_grad():
        if not kernel:
            patch.setattr(kernels, "float_applies", lambda x: False)
        out, at = [], 0
        for n in pieces:
            out.append(model(x[:, at : at + n], states))
            at += n
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_transformer_on_the_kernels_streams_and_matches_torchs_path(dtype, tol, monkeypatch):
    torch.manual_seed(0)
    model = Transformer(d_model=64, num_heads=4, num_layers=2, dim_feedforward=96, context=10, layer_scale=0.1).eval().to(dtype)
    x = torch.randn(2, 40, 64).to(dtype)

    def fresh():
        return [layer.self_attn.init_window_state(2, dtype) for layer in model.layers]

    calls = []
    attend = kernels.window_attention
    monkeypatch.setattr(kernels, "window_attention", lambda *a: calls.append(a[0].shape[1]) or attend(*a))
    once = decode(model, x, fresh(), [40], True, monkeypatch)
    assert calls == [40, 40]  # both layers on the kernel
    pieces = decode(model, x, fresh(), [1, 16, 3, 20], True, monkeypatch)
    plain = decode(model, x, fresh(), [1, 16, 3, 20], False, monkeypatch)
    torch.testing.assert_close(pieces, once, rtol=0, atol=1e-5 if dtype == torch.float32 else 0.02)
    torch.testing.assert_close(once.float(), plain.float(), rtol=0, atol=tol)


def test_a_row_joining_a_batch_on_the_kernels_decodes_as_alone(monkeypatch):
    torch.manual_seed(1)
    model = Transformer(d_model=32, num_heads=2, num_layers=2, dim_feedforward=48, context=6, layer_scale=0.1).eval()
    x = torch.randn(2, 24, 32)

    def fresh(rows=1):
        return [layer.self_attn.init_window_state(rows) for layer in model.layers]

    early, late = fresh(), fresh()
    decode(model, x[:1], early, [16], True, monkeypatch)  # row 0 has run 16 positions
    batch = [concat_window_states([a, b]) for a, b in zip(early, late)]
    joined = decode(model, x, batch, [4, 4], True, monkeypatch)
    alone = decode(model, x[1:], fresh(), [8], True, monkeypatch)
    torch.testing.assert_close(joined[1:], alone, rtol=0, atol=1e-6)


def test_float32_gelu_within_1e_6_of_float64():
    """Within 1e-6 of x (in the tails the float32 exponent alone is off by ~1e-5 relative; torch's
    float32 F.gelu by up to 100 % there, from 1 + tanh(z) near 0)."""
    x = torch.cat([torch.randn(10000) * 4, torch.linspace(-12, 12, 24001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3e38, -3e38, math.inf])])
    want = F.gelu(x.double(), approximate="tanh")
    with torch.no_grad():
        got = kernels.gelu_(x.clone()).double()
    finite = torch.isfinite(x)
    assert ((got - want).abs() <= 1e-6 * x.double().abs() + 1e-37)[finite].all()
    assert torch.equal(got[-7:], want[-7:].float().double())  # zeros, tiny, huge and inf values exact
    assert math.isnan(kernels.gelu_(torch.tensor([math.nan])).item())


def test_bfloat16_gelu_rounds_the_float32_result_once():
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    finite = torch.isfinite(bits)
    with torch.no_grad():
        got = kernels.gelu_(bits.clone())
        want = kernels.gelu_(bits.float()).to(torch.bfloat16)
    assert torch.equal(got[finite], want[finite])


def test_kernels_take_only_one_thread_float_inference(monkeypatch):
    x = torch.randn(2, 3, 8)
    calls = []
    gelu_kernel = kernels.gelu_
    monkeypatch.setattr(kernels, "gelu_", lambda t: calls.append(t.dtype) or gelu_kernel(t))
    with torch.no_grad():
        gelu_(x.clone())
        gelu_(x.double())  # no kernel for float64
        gelu_(x.transpose(1, 2))  # nor for a strided view
    gelu_(x.clone())  # autograd on
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.no_grad():
            gelu_(x.clone())  # several threads: torch's ops run in parallel
    finally:
        torch.set_num_threads(threads)
    assert calls == [torch.float32]
