"""Batched Mimi decoding: streams join and leave a shared decoder state and each
row's audio stays what that stream decodes alone."""

from __future__ import annotations

import pytest
import torch

from pocket_tts.config import config_path_for_language, load_config
from pocket_tts.models.mimi import Mimi, concat_decoder_states, select_decoder_rows
from pocket_tts.models.transformer import Attention

TOL = 1e-5
CONTEXT = 40  # a 39-position window fills after 3 frames (16 steps each): joins meet full, sliding windows


@pytest.fixture(scope="module")
def mimi() -> Mimi:
    """The English architecture at a small width, random weights, large layer scales (attention matters)."""
    cfg = load_config(config_path_for_language("english")).mimi
    seanet = cfg.seanet.model_copy(update={"n_filters": 4, "dimension": 32})
    widths = {"d_model": 32, "input_dimension": 32, "output_dimensions": (32,), "dim_feedforward": 64}
    transformer = cfg.transformer.model_copy(update={**widths, "num_heads": 4, "context": CONTEXT})
    quantizer = cfg.quantizer.model_copy(update={"output_dimension": 32})
    cfg = cfg.model_copy(update={"seanet": seanet, "transformer": transformer, "quantizer": quantizer, "outer_dim": 32})
    torch.manual_seed(0)
    model = Mimi.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_scale" in name:
                p.uniform_(0.5, 1.0)
    return model


def latents(seed: int, frames: int) -> torch.Tensor:
    return torch.randn(1, frames, 32, generator=torch.Generator().manual_seed(seed))


def solo(mimi: Mimi, lat: torch.Tensor) -> torch.Tensor:
    state = mimi.init_decoder_state(1)
    return torch.cat([mimi.decode(lat[:, i : i + 1], state) for i in range(lat.shape[1])], dim=-1)


def run_batch(mimi: Mimi, streams: dict[str, torch.Tensor], joins: dict[str, int], frames: int = 1):
    """Decode all active streams in one call per step (`frames` latents each); a stream
    joins at step `joins[name]` with a fresh state and leaves when its latents run out."""
    active: list[str] = []
    state = None
    done = {name: 0 for name in streams}
    pieces: dict[str, list[torch.Tensor]] = {name: [] for name in streams}
    step = 0
    while any(done[n] < s.shape[1] for n, s in streams.items()):
        keep = [i for i, n in enumerate(active) if done[n] < streams[n].shape[1]]
        if state is not None and len(keep) < len(active):
            state = select_decoder_rows(state, torch.tensor(keep, dtype=torch.long))
            active = [active[i] for i in keep]
        new = [n for n in streams if joins[n] == step]
        if new:
            fresh = mimi.init_decoder_state(len(new))
            state = concat_decoder_states([state, fresh]) if state is not None else fresh
            active += new
        if active:
            batch = torch.cat([streams[n][:, done[n] : done[n] + frames] for n in active])
            audio = mimi.decode(batch, state)
            for row, name in enumerate(active):
                pieces[name].append(audio[row : row + 1])
                done[name] += frames
        step += 1
    return {name: torch.cat(p, dim=-1) for name, p in pieces.items()}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def test_rows_joining_later_decode_as_alone(mimi):
    streams = {"a": latents(1, 14), "b": latents(2, 10), "c": latents(3, 9)}
    joins = {"a": 0, "b": 0, "c": 7}  # c joins once the others' windows are full and sliding
    got = run_batch(mimi, streams, joins)
    for name, lat in streams.items():
        assert max_diff(got[name], solo(mimi, lat)) <= TOL, name


def test_rows_leaving_and_joining_reuse_the_batch(mimi):
    streams = {"a": latents(4, 12), "b": latents(5, 4), "c": latents(6, 6), "d": latents(7, 3), "e": latents(15, 2)}
    # b leaves after step 3; d joins a and c at step 6; e joins the emptied batch at step 12
    joins = {"a": 0, "b": 0, "c": 2, "d": 6, "e": 12}
    got = run_batch(mimi, streams, joins)
    for name, lat in streams.items():
        assert max_diff(got[name], solo(mimi, lat)) <= TOL, name


def test_several_frames_per_call(mimi):
    streams = {"a": latents(8, 12), "b": latents(9, 8)}
    got = run_batch(mimi, streams, {"a": 0, "b": 1}, frames=4)
    for name, lat in streams.items():
        assert max_diff(got[name], solo(mimi, lat)) <= TOL, name


def test_reordering_rows_and_merging_streams_at_the_same_position(mimi):
    a, b = latents(10, 8), latents(11, 8)
    sa, sb = mimi.init_decoder_state(1), mimi.init_decoder_state(1)
    head = [mimi.decode(a[:, :3], sa), mimi.decode(b[:, :3], sb)]  # both decoded alone up to frame 3
    state = select_decoder_rows(concat_decoder_states([sa, sb]), [1, 0])
    tail = mimi.decode(torch.cat((b[:, 3:], a[:, 3:])), state)
    assert max_diff(torch.cat((head[0], tail[1:]), dim=-1), solo(mimi, a)) <= TOL
    assert max_diff(torch.cat((head[1], tail[:1]), dim=-1), solo(mimi, b)) <= TOL


def test_a_row_with_history_cannot_join_at_another_position(mimi):
    ahead, behind = mimi.init_decoder_state(1), mimi.init_decoder_state(1)
    mimi.decode(latents(12, 2), ahead)
    mimi.decode(latents(13, 1), behind)
    with pytest.raises(ValueError, match="cannot join"):
        concat_decoder_states([ahead, behind])


def test_selected_rows_do_not_share_the_position_counter(mimi):
    state = concat_decoder_states([mimi.init_decoder_state(1), mimi.init_decoder_state(1)])
    kept = select_decoder_rows(state, [0])
    mimi.decode(latents(14, 1), kept)
    assert int(state.transformer[0]["offset"]) == 0 and int(kept.transformer[0]["offset"]) == 16


def test_context_one_keeps_no_window():
    attn = Attention(16, 2, 10000.0, context=1).eval()
    x = torch.randn(1, 5, 16)
    state = attn.init_window_state(1)
    with torch.no_grad():
        pieces = [attn(x[:, :3], state)]
        state["offset"] += 3  # Transformer.forward advances it
        pieces.append(attn(x[:, 3:], state))
        assert state["k"].shape[2] == 0
        assert torch.allclose(torch.cat(pieces, dim=1), attn(x, None), atol=1e-6)


def test_a_late_row_sees_its_own_positions_however_long_the_batch_ran(mimi):
    """Rows count attention positions from their own start: no drift after a long-running batch."""
    streams = {"long": latents(16, 260), "late": latents(17, 4)}
    got = run_batch(mimi, streams, {"long": 0, "late": 255}, frames=1)
    assert max_diff(got["late"], solo(mimi, streams["late"])) <= TOL
    state = mimi.init_decoder_state(1)
    state.transformer[0]["offset"] += 10**7  # ~6 days of frames at 200 Hz steps
    fresh = concat_decoder_states([state, mimi.init_decoder_state(1)])
    fresh = select_decoder_rows(fresh, [1])
    lat = streams["late"]
    audio = torch.cat([mimi.decode(lat[:, i : i + 1], fresh) for i in range(lat.shape[1])], dim=-1)
    assert max_diff(audio, solo(mimi, lat)) <= TOL


def test_warm_up_times_every_layout_a_batch_meets(mimi, monkeypatch):
    """After `BatchedSynthesizer.warm_up`, no row count up to max_batch and no frame count per call
    makes a float32 convolution stop to time its kernels in the middle of a stream."""
    from types import SimpleNamespace

    from pocket_tts import batching
    from pocket_tts.models import onednn

    timed = []
    best_times = onednn._best_times
    monkeypatch.setattr(onednn, "_best_times", lambda fns: timed.append(1) or best_times(fns))
    for module in mimi.modules():  # forget what earlier tests timed
        if isinstance(getattr(module, "packed", None), onednn.PackedWeight):
            module.packed.onednn_wins.clear()
    batching.BatchedSynthesizer(SimpleNamespace(mimi=mimi), max_batch=5).warm_up()
    assert timed
    warmed = len(timed)
    with torch.no_grad():
        for rows in (1, 3, 5):
            state = mimi.init_decoder_state(rows)
            for frames in range(1, batching.DECODE_FRAMES + 1):
                mimi.decode(torch.randn(rows, frames, 32), state)
    assert len(timed) == warmed
