"""Continuous batching gives each request the audio it would get alone."""

from __future__ import annotations

import pytest
import torch

from pocket_tts.batching import DECODE_FRAMES, BatchedSynthesizer

TOL = 1e-4


@pytest.fixture(scope="module")
def voices(parity_model, parity_dir):
    return {name: parity_model.get_state_for_audio_prompt(parity_dir / f"{name}.wav") for name in ("voice_24k", "voice_16k")}


def test_concurrent_requests_match_reference_audio(parity_model, parity_cases, parity_tensors, voices):
    batcher = BatchedSynthesizer(parity_model, max_batch=4)
    try:
        futures = [
            batcher.submit(voices["voice_24k"], case["text"], temp=0.0, max_tokens=case["max_tokens"])
            for case in parity_cases["e2e"]
        ]
        for index, future in enumerate(futures):
            audio = future.result(timeout=120)
            expected = parity_tensors[f"e2e.{index}.audio"]
            assert audio.shape == expected.shape
            assert (audio - expected).abs().max().item() < TOL
    finally:
        batcher.close()


def test_streams_joining_and_leaving_at_different_times(parity_model, voices):
    jobs = [
        ("voice_24k", "Hello there.", 50),
        ("voice_16k", "The quick brown fox jumps over the lazy dog. Then it rests.", 8),
        ("voice_24k", "Yes.", 50),
        ("voice_16k", "One more sentence, with a comma, to finish!", 50),
    ]
    expected = [parity_model.generate_audio(voices[v], text, max_tokens=m, temp=0.0) for v, text, m in jobs]
    batcher = BatchedSynthesizer(parity_model, max_batch=3)  # fewer rows than chunks: rows are reused
    try:
        futures = [batcher.submit(voices[v], text, temp=0.0, max_tokens=m) for v, text, m in jobs]
        for future, want in zip(futures, expected):
            got = future.result(timeout=120)
            assert got.shape == want.shape
            assert (got - want).abs().max().item() < TOL
    finally:
        batcher.close()


def test_a_bad_request_fails_alone(parity_model, voices):
    batcher = BatchedSynthesizer(parity_model, max_batch=4)
    try:
        with pytest.raises(ValueError, match="empty"):
            batcher.submit(voices["voice_24k"], "   ")
        broken = {name: dict(layer, cache=layer["cache"][..., :3]) for name, layer in voices["voice_24k"].items()}
        bad = batcher.submit(broken, "Hello there.", temp=0.0)
        good = batcher.submit(voices["voice_24k"], "Hello there.", temp=0.0)
        with pytest.raises(RuntimeError):
            bad.result(timeout=120)
        assert good.result(timeout=120).numel() > 0
    finally:
        batcher.close()


def test_streamed_pieces_come_in_order_and_a_cancelled_request_leaves_alone(parity_model, voices):
    text = "The quick brown fox jumps over the lazy dog. Then it rests."  # several chunks at max_tokens=8
    expected = parity_model.generate_audio(voices["voice_16k"], text, max_tokens=8, temp=0.0)
    batcher = BatchedSynthesizer(parity_model, max_batch=4)
    try:
        pieces, cancelled_pieces = [], []
        streamed = batcher.submit(voices["voice_16k"], text, temp=0.0, max_tokens=8, on_audio=pieces.append)

        def cancel_after_first(piece):
            cancelled_pieces.append(piece)
            cancelled.cancel()

        cancelled = batcher.submit(voices["voice_24k"], "Hello there. " * 6, temp=0.0, max_tokens=8, on_audio=cancel_after_first)
        other = batcher.submit(voices["voice_24k"], "Yes.", temp=0.0)

        audio = streamed.result(timeout=120)
        assert other.result(timeout=120).numel() > 0
        assert cancelled.cancelled() and len(cancelled_pieces) == 1
        assert (torch.cat(pieces) - audio).abs().max().item() == 0  # in order, nothing missing
        assert (audio - expected).abs().max().item() < TOL
        # The cancelled request's rows were freed: the batcher ends empty.
        batcher.close()
        assert batcher._streams == []
    finally:
        batcher.close()


def test_a_new_request_joins_at_the_next_step_ahead_of_later_chunks(parity_model, voices):
    """A request arriving while another's chunks fill the batch gets the first free row (not the
    playing request's next chunk), and a free row at the very next step."""
    long_text = "The quick brown fox jumps over the lazy dog. Then it rests. " * 2  # many chunks at max_tokens=8
    texts = ["Hello there.", "Yes, indeed."]
    expected = [parity_model.generate_audio(voices["voice_24k"], t, temp=0.0) for t in texts]
    batcher = BatchedSynthesizer(parity_model, max_batch=2)
    steps: list[list[tuple[str, int]]] = []  # per step: (request, chunk) of each row
    names: dict[int, str] = {}
    step = batcher._step

    def recorded_step():
        steps.append([(names.get(id(s.request.future), "?"), s.chunk_index) for s in batcher._streams])
        step()

    batcher._step = recorded_step
    late: list = []

    def submit_late(piece):  # on the loop thread, after the long request's first step
        if not late:
            late.extend(batcher.submit(voices["voice_24k"], t, temp=0.0) for t in texts)
            for name, future in zip(("b", "c"), late):
                names[id(future)] = name

    try:
        first = batcher.submit(voices["voice_24k"], long_text, temp=0.0, max_tokens=8, on_audio=submit_late)
        names[id(first)] = "a"
        first.result(timeout=120)
        for future, want in zip(late, expected):  # prompted together (same voice, same token count or not)
            got = future.result(timeout=120)
            assert got.shape == want.shape and (got - want).abs().max().item() < TOL
    finally:
        batcher.close()
    joined = {}
    for index, rows in enumerate(steps):
        for row in rows:
            joined.setdefault(row, index)
    later_chunks = [index for (name, chunk), index in joined.items() if name == "a" and chunk >= 2]
    assert later_chunks and joined[("b", 0)] < min(later_chunks) and joined[("c", 0)] < min(later_chunks)


def test_requests_arriving_together_are_prompted_in_one_forward(parity_model, voices, monkeypatch):
    texts = ["Hello there.", "Hello there.", "Yes, indeed, it is."]
    expected = [parity_model.generate_audio(voices["voice_24k"], t, temp=0.0) for t in texts]
    prompted_rows = []
    prompt_text = parity_model.sampler.prompt_text

    def recorded_prompt_text(ids, *args, **kwargs):
        prompted_rows.append(ids.shape[0])
        return prompt_text(ids, *args, **kwargs)

    monkeypatch.setattr(parity_model.sampler, "prompt_text", recorded_prompt_text)
    batcher = BatchedSynthesizer(parity_model, max_batch=4)
    together: list = []

    def submit_together(piece):  # on the loop thread: all three are waiting at the next step
        if not together:
            together.extend(batcher.submit(voices["voice_24k"], t, temp=0.0) for t in texts)

    try:
        batcher.submit(voices["voice_24k"], "Go.", temp=0.0, on_audio=submit_together).result(timeout=120)
        for future, want in zip(together, expected):
            got = future.result(timeout=120)
            assert got.shape == want.shape and (got - want).abs().max().item() < TOL
    finally:
        batcher.close()
    assert prompted_rows == [1, 2, 1]  # "Go.", then the two same-length texts in one call, then the other


def test_the_decoder_runs_on_groups_of_frames_after_a_streams_first_frame(parity_model, voices, monkeypatch):
    """A lone stream: its first frame decoded at once, then DECODE_FRAMES per decoder call (the
    rest at its end), and the same audio as one call per frame."""
    calls = []
    decode = parity_model.mimi.decode

    def recorded_decode(latents, state):
        calls.append(latents.shape[1])
        return decode(latents, state)

    expected = parity_model.generate_audio(voices["voice_24k"], "Hello there.", temp=0.0)
    monkeypatch.setattr(parity_model.mimi, "decode", recorded_decode)
    batcher = BatchedSynthesizer(parity_model, max_batch=2)
    pieces = []
    try:
        audio = batcher.submit(voices["voice_24k"], "Hello there.", temp=0.0, on_audio=pieces.append).result(timeout=120)
    finally:
        batcher.close()
    assert audio.shape == expected.shape and (audio - expected).abs().max().item() < TOL
    frames = sum(calls)  # every generated frame once, the last step's dropped latent included
    groups, rest = divmod(frames - 1, DECODE_FRAMES)
    assert calls == [1] + [DECODE_FRAMES] * groups + [rest] * (rest > 0)
    frame_size = parity_model.mimi.frame_size
    assert [p.numel() for p in pieces[:2]] == [frame_size, DECODE_FRAMES * frame_size]


def test_streams_without_a_listener_join_and_end_with_the_decoders_groups(parity_model, voices, monkeypatch):
    """No `on_audio`: no first frame decoded alone, a stream that ends waits for its row's group, and
    a request arriving meanwhile joins where no latents wait, so every decoder call has
    DECODE_FRAMES frames; each request's audio is still the one it gets alone."""
    texts = ["Hello there.", "The quick brown fox jumps over the lazy dog. Then it rests.", "Yes, indeed."]
    expected = [parity_model.generate_audio(voices["voice_24k"], t, temp=0.0) for t in texts]
    calls = []
    decode = parity_model.mimi.decode

    def recorded_decode(latents, state):
        calls.append(latents.shape[1])
        return decode(latents, state)

    monkeypatch.setattr(parity_model.mimi, "decode", recorded_decode)
    batcher = BatchedSynthesizer(parity_model, max_batch=2)
    late: list = []
    try:
        first, second = (batcher.submit(voices["voice_24k"], t, temp=0.0) for t in texts[:2])
        # on the loop thread as the first ends, while the second's row runs on
        first.add_done_callback(lambda _: late.append(batcher.submit(voices["voice_24k"], texts[2], temp=0.0)))
        results = [first.result(timeout=120), second.result(timeout=120)]
        results.append(late[0].result(timeout=120))
    finally:
        batcher.close()
    for got, want in zip(results, expected):
        assert got.shape == want.shape and (got - want).abs().max().item() < TOL
    assert calls and set(calls) == {DECODE_FRAMES}
