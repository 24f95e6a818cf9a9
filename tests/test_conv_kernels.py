"""The SEANet's one-pass ELU (`kernels.elu`) against F.elu, the convolutions that take it, and bfloat16 upsampling."""

import math

import pytest
import torch
import torch.nn.functional as F

from pocket_tts.config import SEANetConfig
from pocket_tts.models import kernels, onednn
from pocket_tts.models.conv import ResidualBlock, SEANetDecoder, SEANetEncoder, StreamingConv1d, _depthwise_transposed


# The kernels serve one-thread processes (`kernels.applies`), the engine's default.
pytestmark = pytest.mark.usefixtures("one_thread")


def ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """float32 bit patterns as integers that count ulps across zero."""
    bits = x.view(torch.int32).long()
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


@torch.no_grad()
def test_float32_elu_within_one_ulp_including_extremes():
    torch.manual_seed(0)
    values = torch.cat([torch.randn(20000) * scale for scale in (1e-7, 1e-3, 0.1, 1.0, 10.0, 100.0)])
    extremes = [0.0, -0.0, math.inf, -math.inf, math.nan, -1e-45, -1e-40, -1e-38, -86.5, -87.0, -88.0, -104.0, -1e30, 1e30, -3.4e38]
    values = torch.cat([values, torch.tensor(extremes)])
    # Rows of [T, C] taken out of a larger tensor: the batch stride is not T * C.
    x = torch.zeros(3, values.numel() // 48 + 1, 48).view(-1)
    x[: values.numel()] = values
    x = torch.cat([x.view(3, -1, 48), torch.zeros(3, 5, 48)], dim=1)[:, :-5]
    assert kernels.elu_applies(x) and not x.is_contiguous()
    got = kernels.elu(x, history=2)
    assert got.shape == (3, x.shape[1] + 2, 48)
    got = got[:, 2:]
    exact = F.elu(x.double()).float()
    assert torch.equal(got.isnan(), exact.isnan())
    finite = ~exact.isnan()
    assert (ordered_bits(got[finite]) - ordered_bits(exact[finite])).abs().max() <= 1
    flat = got.reshape(-1)[: values.numel()]
    assert math.copysign(1.0, flat[-14].item()) == -1.0  # -0.0 keeps its sign
    assert flat[-13].item() == math.inf and flat[-12].item() == -1.0  # +inf, -inf


@torch.no_grad()
def test_bfloat16_elu_rounds_once_like_torch_on_every_pattern():
    """All 65536 bfloat16 values: the float32 ELU rounded to nearest even, bit for bit."""
    x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).view(1, 1024, 64)
    got = kernels.elu(x)
    want = F.elu(x.float()).to(torch.bfloat16)
    nan = x.isnan()
    assert torch.equal(got.isnan(), nan)  # NaN in, NaN out (payload bits aside)
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])


def test_elu_applies_only_to_time_major_one_thread_inference():
    x = torch.randn(2, 16, 8)
    with torch.no_grad():
        assert kernels.elu_applies(x) and kernels.elu_applies(x.bfloat16())
        assert not kernels.elu_applies(x.transpose(1, 2).contiguous().transpose(1, 2))  # channel-major memory
        assert not kernels.elu_applies(x.double())
        torch.set_num_threads(2)
        assert not kernels.elu_applies(x)
    torch.set_num_threads(1)
    assert not kernels.elu_applies(x)  # autograd on: torch's ops


def small_seanet(pad_mode: str) -> SEANetConfig:
    return SEANetConfig(
        dimension=16, channels=1, n_filters=4, n_residual_layers=1, ratios=[4, 3], kernel_size=7,
        residual_kernel_size=3, last_kernel_size=3, dilation_base=2, pad_mode=pad_mode, compress=2,
    )


def decode_in_pieces(decoder: SEANetDecoder, x: torch.Tensor, pieces: list[int]) -> torch.Tensor:
    state = decoder.init_state(x.shape[0])
    out, at = [], 0
    for n in pieces:
        out.append(decoder(x[:, :, at : at + n], state))
        at += n
    return torch.cat(out, dim=-1)


def time_major(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("pad_mode", ["constant", "replicate"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_decoder_on_the_kernel_streams_and_matches_torchs_path(monkeypatch, pad_mode, dtype, tol):
    torch.manual_seed(1)
    decoder = SEANetDecoder(small_seanet(pad_mode)).eval().to(dtype)
    x = time_major(torch.randn(3, 16, 7).to(dtype))
    calls = []
    elu = kernels.elu
    monkeypatch.setattr(kernels, "elu", lambda *args, **kw: calls.append(kw.get("history", 0)) or elu(*args, **kw))
    # oneDNN for every float32 conv: it keeps the time-major layout, while a conv that torch's kernel won
    # by timing (as on a loaded machine) returns channel-major memory, whose ELU takes torch's ops.
    monkeypatch.setattr(onednn, "_best_times", lambda fns: [0.0, 1.0])
    with torch.no_grad():
        once = decoder(x, decoder.init_state(3))
        # Every ELU and the k=3 convs' history fused; with zero padding the last ELU is the final conv's.
        # (Where oneDNN has no bfloat16, torch's bfloat16 convs return channel-major memory, whose ELUs
        # take torch's ops: only the numbers below are checked there.)
        if dtype == torch.float32 or onednn.NATIVE_BFLOAT16:
            fused_end = pad_mode == "constant"
            assert len(calls) == 7 - fused_end and sum(1 for n in calls if n) == 3 - fused_end
        pieces = decode_in_pieces(decoder, x, [1, 2, 4])
        monkeypatch.setattr(kernels, "elu_applies", lambda x: False)
        plain = decoder(x, decoder.init_state(3))
    assert once.shape == (3, 1, 7 * 12)
    # Pieces and the one call run the same arithmetic per sample, up to the convolutions' summation order.
    torch.testing.assert_close(pieces, once, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(once.float(), plain.float(), rtol=0, atol=tol)


def test_encoder_on_the_kernel_matches_torchs_path(monkeypatch):
    torch.manual_seed(3)
    encoder = SEANetEncoder(small_seanet("replicate")).eval()
    wav = torch.randn(2, 1, 12 * 20)
    with torch.no_grad():
        fused = encoder(wav)
        monkeypatch.setattr(kernels, "elu_applies", lambda x: False)
        plain = encoder(wav)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5)


def test_bfloat16_depthwise_upsampling_rounds_once():
    """Mimi's upsampling in bfloat16: computed in float32, the exact result rounded once."""
    torch.manual_seed(5)
    x, weight = time_major(torch.randn(3, 16, 4)).bfloat16(), torch.randn(16, 1, 8).bfloat16()
    exact = F.conv_transpose1d(x.float(), weight.float(), stride=4, groups=16)
    got = _depthwise_transposed(x, weight, 4)  # time-major [B, T_out, C]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.transpose(1, 2), exact.to(torch.bfloat16))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2**-8)])
def test_decoder_end_in_one_pass_streams_like_the_separate_ops(dtype, tol):
    """x + h, the ELU and the conv to one channel (`kernels.residual_elu_conv`) against the three
    ops, over three calls that carry the conv's history."""
    torch.manual_seed(6)
    conv = StreamingConv1d(24, 1, 3).eval().to(dtype)
    x = torch.randn(3, 3 * 50 + 4, 24).to(dtype)[:, :-4].transpose(1, 2)  # rows 4 samples apart, as the decoder's
    h = time_major(torch.randn(3, 24, 150)).to(dtype)
    fused_state, plain_state = conv.init_state(3), conv.init_state(3)
    with torch.no_grad():
        assert conv.ends_on(ResidualBlock(24, 3, 1, 2, "constant"), x) and not x.is_contiguous()
        for piece in (slice(0, 50), slice(50, 51), slice(51, 150)):
            fused = conv.after_residual(x[..., piece], h[..., piece], fused_state)
            plain = conv(x[..., piece] + h[..., piece], plain_state, activate=True)
            assert fused.dtype == dtype and fused.shape == plain.shape
            torch.testing.assert_close(fused.float(), plain.float(), rtol=tol, atol=1e-5)
            assert torch.equal(fused_state["prev"], plain_state["prev"])  # the activated history, bit for bit
