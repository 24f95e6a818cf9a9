"""Continuous batching: many utterances share every FlowLM forward pass.

One stream of generation reads all backbone weights for every 80 ms frame, so a
single stream is bound by memory traffic. Generating B streams in one forward
reads the weights once for all of them. `BatchedSynthesizer` runs a loop thread
that keeps up to `max_batch` text chunks in flight: chunks of any request join
as soon as a row is free and leave when they reach their end of speech, and each
request's future resolves as soon as all of its chunks are done.

Scheduling favours a new request's first audio: every step first admits whatever
arrived meanwhile (no waiting to fill the batch), first chunks ahead of the later
chunks of requests already playing (`_Stream.priority`), and the joining rows'
text prompts run as one forward per (voice length, token count) group instead of
one per row. A failure
inside one request fails only that request's future. A request can also hand
out its audio as it is produced (`on_audio`, in order) and be cancelled through
its future: its rows are freed at the next step.

Rows are kept compact (active streams occupy rows 0..n-1 of one batched KV
cache and of one batched Mimi decoder state) so a step only touches live rows;
a leaving stream's row is refilled by moving the last row into it.

The Mimi decoder runs once per `DECODE_FRAMES` steps, on every row's latents of those steps
(any grouping gives the same audio). All rows always wait on the same number of latents, so
streams join where none wait. A stream with a listener (`on_audio`) has its first frame decoded
at once (first audio as soon as possible) and its last at its last step, and joins at once (what
waits is decoded first); a stream without one ends and joins with the decoder's groups.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from pocket_tts.models.flow_lm import VoiceState
from pocket_tts.models.mimi import MimiDecoderState, concat_decoder_states, select_decoder_rows
from pocket_tts.models.sampling import ChunkProgress
from pocket_tts.models.tts_model import MAX_TOKENS_PER_CHUNK, TTSModel, chunk_generators

logger = logging.getLogger(__name__)

# Four frames per decoder call: the default Mimi decoder in bfloat16 over 8 rows costs 5.0-5.8 ms per
# stream and frame, against 5.4-5.5 at two and 6.4-6.8 at one frame per call (fewer per-call costs:
# convolution histories, overlaps, window reads); 8 streams through the gateway on one core: 8.1
# audio s per wall s against 7.8-7.9 at two. A stream's audio then comes in 320 ms pieces.
DECODE_FRAMES = 4


@dataclass
class _Request:
    future: Future
    pieces: list[list[torch.Tensor]]
    remaining: int
    failed: bool = False
    on_audio: Callable[[torch.Tensor], None] | None = None
    chunks_done: list[bool] = field(default_factory=list)
    emitted: tuple[int, int] = (0, 0)  # (chunk, piece) of the next piece handed to on_audio

    def emit_ready_pieces(self) -> None:
        """Hand `on_audio` the pieces produced since the last call, in utterance order: a later
        chunk's pieces wait until every earlier chunk has ended."""
        chunk, piece = self.emitted
        while chunk < len(self.pieces):
            pieces = self.pieces[chunk]
            for ready in pieces[piece:]:
                self.on_audio(ready)
            piece = len(pieces)
            if not self.chunks_done[chunk]:
                break
            chunk, piece = chunk + 1, 0
        self.emitted = (chunk, piece)


@dataclass
class _Stream:
    request: _Request
    chunk_index: int
    voice: VoiceState
    ids: list[int]
    temp: float
    progress: ChunkProgress
    generator: torch.Generator | None  # the chunk's own noise source (a seeded request); None: the global one
    arrival: int = 0  # submission order, set by the synthesizer
    latent: torch.Tensor | None = None  # last emitted latent, the next step's input (flow space)
    kept: int = 0  # latents waiting for the decoder whose audio is kept (the first ones of those waiting)
    started: bool = False  # some audio was produced
    done: bool = False

    @property
    def priority(self) -> tuple[bool, int, int]:
        """Waiting chunks take free rows in this order: first chunks (a listener waits for their
        first audio) before later ones (their request is already playing), then by arrival."""
        return (self.chunk_index > 0, self.arrival, self.chunk_index)

    def __lt__(self, other: _Stream) -> bool:
        return self.priority < other.priority


class BatchedSynthesizer:
    def __init__(self, model: TTSModel, max_batch: int = 16):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.model = model
        self.max_batch = max_batch
        self._inbox: queue.Queue[_Stream | None] = queue.Queue()
        self._waiting: list[_Stream] = []  # heap by priority; only the loop thread touches it
        self._arrivals = itertools.count()
        self._streams: list[_Stream] = []
        self._caches: list[dict[str, torch.Tensor]] = []
        self._decoder: MimiDecoderState | None = None  # one row per stream, same order
        self._undecoded: list[torch.Tensor] = []  # each step's latents [rows, latent_dim] not decoded yet
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ public API
    def submit(self, voice_state: VoiceState, text: str, temp: float | None = None,
               max_tokens: int = MAX_TOKENS_PER_CHUNK, frames_after_eos: int | None = None,
               seed: int | None = None, on_audio: Callable[[torch.Tensor], None] | None = None) -> Future:  # fmt: skip
        """Queue one utterance; the future's result is its 1-D float32 audio.

        With `seed`, each chunk draws its noise from its own generator, as `generate_audio`
        does: the same seed gives the same audio whatever else shares the batch.

        `on_audio(piece)`, if given, receives the audio pieces in order as they are produced,
        on the loop thread (keep it short, e.g. a queue's put). `future.cancel()` stops the
        request: its rows leave the batch at the next step and the future stays cancelled.
        Text errors (empty text, bad options) raise here, in the caller's thread.
        """
        model = self.model
        temp = model.checked_temperature(temp)
        chunks = model.text_chunks(text, max_tokens, frames_after_eos)
        request = _Request(
            Future(), [[] for _ in chunks], len(chunks), on_audio=on_audio, chunks_done=[False] * len(chunks)
        )
        arrival = next(self._arrivals)
        streams = [
            _Stream(request, index, voice_state, ids, temp, ChunkProgress(after_eos, model.max_frames(len(ids))),
                    generator, arrival)  # fmt: skip
            for index, ((ids, after_eos), generator) in enumerate(zip(chunks, chunk_generators(seed, len(chunks))))
        ]
        self._ensure_running()
        for stream in streams:
            self._inbox.put(stream)
        return request.future

    def warm_up(self) -> None:
        """Decode silence at every row-count bucket and frame count the loop will use, before serving.

        A float32 decoder times oneDNN against torch's kernels once per new convolution layout
        (`onednn._use_onednn`): met mid-stream, that stalled every row of the batch (default
        decoder, 1-8 rows and 1-4 frames: ~10 s over a worker's first streams). Here it is paid
        at start-up instead; a bfloat16 decoder has nothing to time and only builds its primitives.
        """
        mimi = self.model.mimi
        sizes = sorted({*(1 << i for i in range(self.max_batch.bit_length())), self.max_batch})
        with torch.inference_mode():
            for rows in sizes:
                state = mimi.init_decoder_state(rows)
                for frames in range(1, DECODE_FRAMES + 1):
                    mimi.decode(torch.zeros(rows, frames, mimi.latent_dim), state)

    def close(self) -> None:
        """Stop the loop after the streams in flight finish; queued work is still served."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._inbox.put(None)
            thread.join()

    def _ensure_running(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the synthesizer is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="pocket-tts-batcher", daemon=True)
                self._thread.start()

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        stopping = False
        while not (stopping and not self._streams and not self._waiting and self._inbox.empty()):
            stopping |= self._admit(block=not self._streams and not self._waiting)
            if not self._streams:
                continue
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as exc:  # an engine failure fails the requests in flight, not the loop
                logger.exception("batched generation step failed")
                for stream in list(self._streams):
                    self._fail(stream.request, exc)
                self._streams.clear()
                self._caches, self._decoder, self._undecoded = [], None, []

    def _admit(self, block: bool) -> bool:
        """Move everything that arrived into the waiting heap, then the best waiting streams into
        free rows; returns True when asked to stop. Blocks only while there is nothing to do."""
        stopping = False
        while True:
            try:
                stream = self._inbox.get() if block else self._inbox.get_nowait()
            except queue.Empty:
                break
            block = False
            if stream is None:
                stopping = True
            else:
                heapq.heappush(self._waiting, stream)
        if self._undecoded and not any(s.request.on_audio is not None for s in self._waiting):
            return stopping  # no listener waits: join where no row has latents waiting (`_decode_now`)
        joining = []
        while self._waiting and len(self._streams) + len(joining) < self.max_batch:
            stream = heapq.heappop(self._waiting)
            if not (stream.request.failed or stream.request.future.cancelled()):
                joining.append(stream)
        if joining:
            with torch.inference_mode():
                self._join(joining)
        return stopping

    def _join(self, streams: list[_Stream]) -> None:
        """Give the streams rows, prompting their texts with one forward per group of rows at the
        same offset with the same token count (16 one-chunk requests arriving together: one call,
        not 16). A stream that fails fails its request alone (or with its group if the forward does)."""
        if self._undecoded:  # the rows in flight catch up first: then every row waits on the same frames
            self._decode()
            self._drop_finished()
        groups: dict[tuple[int, int], list[_Stream]] = {}
        for stream in streams:
            try:
                key = (_state_length(stream.voice), len(stream.ids))
            except Exception as exc:  # not a voice state
                self._fail(stream.request, exc)
                continue
            groups.setdefault(key, []).append(stream)
        for group in groups.values():
            first = len(self._streams)
            placed = []
            for stream in group:
                try:
                    self._reserve(first + len(placed) + 1, _rows_needed(stream))
                    self._place_voice(stream, first + len(placed))
                except Exception as exc:  # e.g. a voice state of the wrong shape
                    self._fail(stream.request, exc)
                    continue
                placed.append(stream)
            if not placed:
                continue
            rows = slice(first, first + len(placed))
            generators = [s.generator for s in placed]
            try:
                self.model.sampler.prompt_text(
                    torch.tensor([s.ids for s in placed], dtype=torch.long), self._views(rows), [s.temp for s in placed],
                    generators if any(g is not None for g in generators) else None,
                )  # fmt: skip
            except Exception as exc:
                for stream in placed:
                    self._fail(stream.request, exc)
                continue
            fresh = self.model.mimi.init_decoder_state(len(placed))
            self._decoder = fresh if self._decoder is None else concat_decoder_states([self._decoder, fresh])
            self._streams.extend(placed)

    def _place_voice(self, stream: _Stream, row: int) -> None:
        voice_len = _state_length(stream.voice)
        for name, cache in zip(self.model.flow_lm.layer_names(), self._caches):
            voice = stream.voice[name]
            cache["cache"][:, row].zero_()
            cache["cache"][:, row, :voice_len] = voice["cache"][:, 0, :voice_len]
            cache["offset"][row] = voice_len
            cache["pad"][row] = voice["pad"].view(-1)[0]

    def _reserve(self, rows: int, length: int) -> None:
        """Grow the batched caches (rare: only when a longer or an extra row is needed)."""
        flow_lm = self.model.flow_lm
        have_rows = self._caches[0]["cache"].shape[1] if self._caches else 0
        have_len = self._caches[0]["cache"].shape[2] if self._caches else 0
        if rows <= have_rows and length <= have_len:
            return
        new_rows = max(rows, min(self.max_batch, max(2 * have_rows, 1)))
        new_len = max(length, have_len)
        grown = flow_lm.init_state(new_rows, new_len, flow_lm.cache_dtype)
        for new, old in zip(grown.values(), self._caches):
            n, t = old["cache"].shape[1], old["cache"].shape[2]
            new["cache"][:, :n, :t] = old["cache"]
            new["offset"][:n] = old["offset"]
            new["pad"][:n] = old["pad"]
        self._caches = list(grown.values())

    def _views(self, rows: slice) -> VoiceState:
        """The batched caches restricted to `rows`, as a FlowLM state (views: writes go to the batch)."""
        names = self.model.flow_lm.layer_names()
        return {
            name: {key: (t[:, rows] if key == "cache" else t[rows]) for key, t in cache.items()}
            for name, cache in zip(names, self._caches)
        }

    def _step(self) -> None:
        model, sampler = self.model, self.model.sampler
        streams = self._streams
        n = len(streams)
        inputs = torch.cat([sampler.bos if s.latent is None else s.latent for s in streams])
        generators = [s.generator for s in streams]
        frame = sampler.step(inputs, self._views(slice(0, n)), [s.temp for s in streams], model.eos_threshold,
                             generators if any(g is not None for g in generators) else None)  # fmt: skip
        for row, stream in enumerate(streams):
            if stream.done:
                continue  # ended at an earlier step: its row waits for the decoder, its latents are dropped
            if stream.progress.accept(frame.eos[row]):
                stream.latent = frame.latents[row : row + 1, None]
                stream.kept += 1
                stream.done = stream.progress.exhausted
            else:
                stream.done = True  # this step's latent is dropped
        self._undecoded.append(frame.latents)
        if len(self._undecoded) >= DECODE_FRAMES or any(_decode_now(s) for s in streams):
            self._decode()
            self._drop_finished()
        for request in {id(s.request): s.request for s in streams if s.request.on_audio is not None}.values():
            self._emit(request)

    def _decode(self) -> None:
        """Every row's waiting latents in one decoder call; each stream keeps the audio of its kept ones."""
        model = self.model
        latents = torch.stack(self._undecoded, dim=1)  # [rows, frames, latent_dim]
        self._undecoded = []
        audio = model.mimi.decode(model.flow_lm.to_mimi_space(latents), self._decoder)[:, 0]
        for row, stream in enumerate(self._streams):
            kept, stream.kept = stream.kept, 0
            if stream.request.future.cancelled():
                stream.done = True
                continue
            if kept:
                piece = audio[row, : kept * model.mimi.frame_size].clone()  # a view would keep the batch's audio alive
                if not stream.started:
                    model.sampler.fade_in(piece)
                    stream.started = True
                stream.request.pieces[stream.chunk_index].append(piece)

    def _drop_finished(self) -> None:
        """Remove finished rows, moving the last row into each freed one, and complete their requests."""
        finished = [row for row, stream in enumerate(self._streams) if stream.done]
        if not finished:
            return
        order = list(range(len(self._streams)))
        for row in reversed(finished):
            stream = self._streams[row]
            last = len(self._streams) - 1
            if row != last:
                for cache in self._caches:
                    cache["cache"][:, row] = cache["cache"][:, last]
                    cache["offset"][row] = cache["offset"][last]
                    cache["pad"][row] = cache["pad"][last]
                self._streams[row], order[row] = self._streams[last], order[last]
            self._streams.pop()
            order.pop()
            self._complete_chunk(stream)
        self._decoder = select_decoder_rows(self._decoder, order) if self._streams else None

    def _complete_chunk(self, stream: _Stream) -> None:
        request = stream.request
        request.remaining -= 1
        request.chunks_done[stream.chunk_index] = True
        if request.future.cancelled():
            return
        if request.on_audio is not None:
            self._emit(request)
        if request.remaining == 0 and not request.failed:
            audio = torch.cat([piece for chunk in request.pieces for piece in chunk] or [torch.zeros(0)])
            request.future.set_result(audio)

    def _emit(self, request: _Request) -> None:
        if request.failed or request.future.cancelled():
            return
        try:
            request.emit_ready_pieces()
        except Exception as exc:  # a failing consumer fails its own request only
            self._fail(request, exc)

    @staticmethod
    def _fail(request: _Request, exc: BaseException) -> None:
        if request.future.cancelled():
            return
        if not request.failed:
            request.failed = True
            request.future.set_exception(exc)


def _state_length(voice: VoiceState) -> int:
    return int(next(iter(voice.values()))["offset"].view(-1)[0])


def _rows_needed(stream: _Stream) -> int:
    """KV cache positions the stream may fill: voice, text, every frame it may generate, and the
    steps its row may run on after it ends, waiting for the decoder (`_decode_now`)."""
    return _state_length(stream.voice) + len(stream.ids) + stream.progress.max_frames + DECODE_FRAMES - 1


def _decode_now(stream: _Stream) -> bool:
    """Whether the batch's waiting latents are decoded at this step rather than with the next
    DECODE_FRAMES: for a listener's first or last audio (`on_audio`), or a cancelled request's rows.
    A stream without a listener ends, and new ones join, where the rows' latents are decoded anyway:
    each decoder call split off costs its fixed part again (one frame for 30 rows: 1.6 ms per row and
    frame against 1.25-1.3 for four; jobs that refill their rows as they end, 18M, one core: 3-6 %
    more audio per CPU second)."""
    listener = stream.request.on_audio is not None
    return stream.request.future.cancelled() or (listener and (not stream.started or stream.done))
