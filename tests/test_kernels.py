"""The numba kernels of a generated frame's rows against torch's own ops."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pocket_tts.models import kernels
from pocket_tts.models.flow_lm import FlowHead
from pocket_tts.models.onednn import Projection
from pocket_tts.models.transformer import Transformer, linear_cache


# The kernels serve one-thread processes (`kernels.applies`), the engine's default.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("rows", [1, 2, 4, 7, 8])  # 7 and 8: blocks of four rows, then single rows
def test_product_matches_linear_with_bias_and_residual(rows):
    torch.manual_seed(0)
    x, weight, bias, residual = torch.randn(rows, 96), torch.randn(160, 96), torch.randn(160), torch.randn(rows, 160)
    arrays = kernels.as_array(weight), kernels.as_array(bias)
    with torch.no_grad():
        assert kernels.applies(x, weight, kernels.row_limit(96))
        torch.testing.assert_close(kernels.product(x, *arrays), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
        got = kernels.product(x, *arrays, residual=residual)
        torch.testing.assert_close(got, residual + F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
        # Non-finite inputs propagate as in torch (no fast-math assumption about them).
        x[0, 3] = math.inf
        assert torch.isinf(kernels.product(x, arrays[0])[0]).any()


def test_projection_takes_the_kernel_only_where_it_applies():
    torch.manual_seed(1)
    weight, bias = torch.randn(64, 32), torch.randn(64)
    projection = Projection(weight, bias)
    with torch.no_grad():
        for rows in (1, 4, 8, 9, 16):  # narrow rows: up to 8 take the kernel
            x, residual = torch.randn(rows, 32), torch.randn(rows, 64)
            assert kernels.applies(x, weight, kernels.row_limit(32)) == (rows <= 8)
            torch.testing.assert_close(projection(x, residual=residual), residual + F.linear(x, weight, bias))
    assert kernels.row_limit(kernels.NARROW_WIDTH + 1) == kernels.MAX_ROWS == 4  # wide rows: 5 no longer fit
    x = torch.randn(1, 32)
    assert not kernels.applies(x, weight)  # autograd on: torch's ops
    assert not kernels.applies(x.double(), weight.double())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.no_grad():
            assert not kernels.applies(x, weight)  # several threads: the library kernels run in parallel
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_matches_softmax_attention_over_each_rows_visible_keys(dtype):
    """A bfloat16 cache (reduced-precision backbones) is read as its exact float32 values."""
    torch.manual_seed(2)
    batch, kv_heads, group, dim, capacity = 3, 2, 4, 16, 40
    cache = linear_cache(batch, capacity, kv_heads, dim, dtype)
    cache.normal_()
    queries = torch.randn(batch, kv_heads, group, dim)
    first, last = torch.tensor([0, 5, 12]), torch.tensor([30, 17, 12])  # the last row sees one key
    new = torch.randn(2, batch, kv_heads, dim).to(dtype)  # each row's key and value at its last position
    want_cache = cache.clone()
    want_cache[:, torch.arange(batch), last] = new
    with torch.no_grad():
        got = kernels.attend(queries, cache, first.numpy(), last.numpy(), new)
    assert torch.equal(cache, want_cache)
    keys, values = cache.transpose(2, 3).float().unbind(0)  # [B, KV, T, D]
    positions = torch.arange(capacity)
    hidden = (positions < first[:, None]) | (positions > last[:, None])
    scores = torch.matmul(queries, keys.transpose(2, 3)).masked_fill(hidden[:, None, None], -math.inf)
    torch.testing.assert_close(got, torch.matmul(torch.softmax(scores, dim=-1), values), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_step_attention_takes_the_kernel_for_more_rows_than_the_products(monkeypatch, cache_dtype):
    """Attention has no weight shared by rows: 6 rows at their own offsets and pads take the kernel
    (the products take the library kernels), with one thread or two, and match torch's ops
    (autograd on), over either cache."""
    torch.manual_seed(3)
    model = Transformer(d_model=32, num_heads=4, num_layers=2, dim_feedforward=64).eval()
    rows = kernels.MAX_ROWS + 2
    states = [layer.self_attn.init_linear_state(rows, 16, cache_dtype) for layer in model.layers]
    x = torch.randn(rows, 32)
    calls = []
    attend = kernels.attend
    monkeypatch.setattr(kernels, "attend", lambda *args: calls.append(1) or attend(*args))
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            model(torch.randn(rows, 7, 32), states)
            for state in states:
                state["offset"] -= torch.arange(rows) % 3  # rows at positions 5..7
                state["pad"][1] = 2  # a row whose first keys are hidden
            copies = [[{key: t.clone() for key, t in state.items()} for state in states] for _ in range(2)]
            torch.set_num_threads(1)
            got = model.step(x, states)
            assert len(calls) == len(model.layers)
            torch.set_num_threads(2)
            got_two_threads = model.step(x, copies[0])
            assert len(calls) == 2 * len(model.layers)
        want = model.step(x, copies[1]).detach()
        assert len(calls) == 2 * len(model.layers)  # autograd: torch's ops
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_two_threads, want, rtol=1e-5, atol=1e-5)


def test_step_attention_takes_the_kernel_on_the_first_rows_of_a_larger_cache(monkeypatch):
    """The batcher steps views of its caches' first rows: not contiguous as a whole, but the keys
    and the values each are, so the kernel takes them (it once gave them to torch's ops)."""
    torch.manual_seed(4)
    model = Transformer(d_model=32, num_heads=4, num_layers=2, dim_feedforward=64).eval()
    rows = kernels.MAX_ROWS + 1
    batch = [layer.self_attn.init_linear_state(rows + 3, 16) for layer in model.layers]
    views = [{key: (t[:, :rows] if key == "cache" else t[:rows]) for key, t in state.items()} for state in batch]
    calls = []
    attend = kernels.attend
    monkeypatch.setattr(kernels, "attend", lambda *args: calls.append(1) or attend(*args))
    x = torch.randn(rows, 32)
    with torch.no_grad():
        model(torch.randn(rows, 7, 32), views)
        copies = [{key: t.clone() for key, t in state.items()} for state in views]
        got = model.step(x, views)
    assert not views[0]["cache"].is_contiguous() and len(calls) == len(model.layers)
    want = model.step(x, copies).detach()  # autograd on: torch's ops
    assert len(calls) == len(model.layers)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for view, copy in zip(views, copies):
        torch.testing.assert_close(view["cache"], copy["cache"].detach())  # the new keys and values, in the batch's memory


@pytest.mark.parametrize("rows", [1, 3])
def test_fused_layer_step_equals_torchs_ops(rows, monkeypatch):
    """The one-call layer (`kernels.layer_step`) against torch's ops (no kernel), grouped-query attention
    with attn_dim != d_model, rows at different positions and one with hidden leading keys."""
    torch.manual_seed(3)
    transformer = Transformer(d_model=48, num_heads=4, num_layers=2, dim_feedforward=80, attn_dim=64, num_kv_heads=2)
    for p in transformer.parameters():
        p.data.normal_(0, 0.2)
    transformer.eval()

    def states():
        made = [layer.self_attn.init_linear_state(rows, 32) for layer in transformer.layers]
        for s in made:
            s["cache"].normal_()
            s["offset"].copy_(torch.tensor([9, 4, 17][:rows]))
            s["pad"].copy_(torch.tensor([0, 2, 5][:rows]))
        return made

    x = torch.randn(rows, 48)
    with torch.no_grad():
        fused_states, plain_states = states(), states()
        torch.manual_seed(4)  # same caches for both
        for a, b in zip(fused_states, plain_states):
            b["cache"].copy_(a["cache"])
        layers = transformer._step_layers()
        assert all(layer.fused is not None for layer in layers)
        fused = [transformer.step(x, fused_states) for _ in range(3)]
        monkeypatch.setattr(kernels, "applies", lambda *args, **kwargs: False)
        plain = [transformer.step(x, plain_states) for _ in range(3)]
    for f, p in zip(fused, plain):
        torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused_states, plain_states):
        torch.testing.assert_close(a["cache"], b["cache"], rtol=1e-5, atol=1e-5)
        assert torch.equal(a["offset"], b["offset"])


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_fused_head_velocity_equals_torchs_ops(rows, monkeypatch):
    """`kernels.head_velocity` (the flow head's MLP in one call) against torch's ops."""
    torch.manual_seed(5)
    head = FlowHead(latent_dim=8, dim=24, cond_dim=16, depth=3, kind="lsd")
    for p in head.parameters():
        p.data.normal_(0, 0.3)
    for name, buffer in head.named_buffers():
        buffer.copy_(torch.rand_like(buffer))
    y, x = torch.randn(rows, 24), torch.randn(rows, 8)
    with torch.no_grad():
        tables = head.tables(2)
        calls = []
        head_velocity = kernels.head_velocity
        monkeypatch.setattr(kernels, "head_velocity", lambda *args: calls.append(1) or head_velocity(*args))
        fused = head.velocity(y, x, tables)
        assert calls  # a head 24 wide takes the kernel up to 8 rows
        monkeypatch.setattr(kernels, "applies", lambda *args, **kwargs: False)
        plain = head.velocity(y, x, tables)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_bfloat16_convolutions_take_onednn_without_timing_and_float32_ones_are_timed(monkeypatch):
    """A bfloat16 decoder meeting a new row or frame count must not stall on timing both kernels
    (torch's own bfloat16 convolutions never won); float32 ones are timed once per layout."""
    from pocket_tts.models import onednn
    from pocket_tts.models.conv import StreamingConv1d

    timed = []
    best_times = onednn._best_times
    monkeypatch.setattr(onednn, "_best_times", lambda fns: timed.append(1) or best_times(fns))
    torch.manual_seed(7)
    conv = StreamingConv1d(16, 8, 3).eval()
    x = torch.randn(2, 40, 16).transpose(1, 2)  # time-major, as the decoder's signals
    with torch.no_grad():
        want = conv(x)
        assert timed == [1]
        conv(x)
        assert timed == [1]  # once per layout
        conv.to(torch.bfloat16)
        got = conv(x.to(torch.bfloat16))
        conv(torch.randn(5, 24, 16).transpose(1, 2).to(torch.bfloat16))
    assert timed == [1]
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


def test_softmax_exp_is_within_two_ulp_of_exp():
    """The attention kernel's vectorisable exp (numba's np.exp is a scalar libm call)."""
    x = np.concatenate((-np.logspace(-8, np.log10(87), 100_000), [0.0, -1e-30])).astype(np.float32)
    got = np.array([kernels._exp(v) for v in x[::50]] + [kernels._exp(v) for v in x[-2:]], dtype=np.float32)
    want = np.exp(x[::50].astype(np.float64).tolist() + x[-2:].astype(np.float64).tolist())
    assert np.all(np.abs(got - want) <= 2 * np.spacing(want.astype(np.float32)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_kernel_matches_the_exact_norm(dtype):
    """The Mimi transformer's norms (`kernels.layer_norm`): float32 to rounding, bfloat16 rounded once."""
    torch.manual_seed(7)
    x = (torch.randn(3, 40, 128) * 4 + 2).to(dtype)  # an offset mean: cancellation would show
    weight, bias = (torch.rand(128) + 0.5).to(dtype), torch.randn(128).to(dtype)
    with torch.no_grad():
        got = kernels.layer_norm(x, weight, bias, 1e-5)
    exact = F.layer_norm(x.double(), (128,), weight.double(), bias.double(), 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    tol = dict(rtol=0, atol=4e-6) if dtype == torch.float32 else dict(rtol=2**-8, atol=1e-6)  # bfloat16: half an ulp
    torch.testing.assert_close(got.double(), exact, **tol)
