"""TTSModel: loading a released checkpoint, building voice states, and generating speech.

Importing this module applies POCKET_TTS_NUM_THREADS (default 1) to torch once
per process; see docs/threading.md.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pocket_tts import audio as audio_io
from pocket_tts.catalog import DEFAULT_LANGUAGE, PREDEFINED_VOICES, voice_state_path
from pocket_tts.config import ModelConfig, config_path_for_language, load_config
from pocket_tts.files import ModelFileError, is_hub_path, resolve_file
from pocket_tts.models.flow_lm import FlowLM, VoiceState
from pocket_tts.models.mimi import Mimi
from pocket_tts.models.sampling import ChunkProgress, FrameSampler
from pocket_tts.models.transformer import linear_cache
from pocket_tts.precision import check_precision, lower_backbone_precision, lower_decoder_precision
from pocket_tts.precision_env import DECODER_PRECISIONS, precision_from_env, precision_name
from pocket_tts.text import TextOptions, Tokenizer, prepare_text, split_into_chunks
from pocket_tts.threads import threads_from_env
from pocket_tts.weights import assign_checkpoint, read_safetensors, read_training_checkpoint

torch.set_num_threads(threads_from_env())

logger = logging.getLogger(__name__)

MAX_TOKENS_PER_CHUNK = 50
TOKENS_PER_SECOND = 3.0  # speaking-rate estimate that bounds the length of a chunk
EXTRA_SECONDS = 2.0
MAX_PROMPT_SECONDS = 30.0
# Latents per Mimi call after the first frame of a chunk. Much of a call's cost does not grow with
# its length (small matmuls and convolutions run far below peak): 2M decoding took 2.4-2.7 ms
# per frame in groups of 4, 1.9-2.0 in groups of 8, 2.3 in groups of 16 (L2 spills); 7M 4.5-4.7 ->
# 4.0 (1 thread, 2026-12-01). Streaming pieces after the first are 640 ms of audio.
STREAM_DECODE_FRAMES = 8
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


@dataclass
class LatentStep:
    """One autoregressive step: the latent (flow space), its EOS logit, the backbone output."""

    latent: torch.Tensor
    eos_logit: float
    hidden: torch.Tensor


class TTSModel(nn.Module):
    def __init__(self, config: ModelConfig, tokenizer: Tokenizer, temp: float, sampler_decode_steps: int,
                 noise_clamp: float | None, eos_threshold: float, language: str | None = None):  # fmt: skip
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.flow_lm = FlowLM(config.flow_lm, config.latent_dim, config.voice_dim)
        self.mimi = Mimi.from_config(config.mimi)
        self.temp = temp
        self.sampler_decode_steps = sampler_decode_steps
        self.noise_clamp = noise_clamp
        self.eos_threshold = eos_threshold
        self.language = language
        self.has_voice_cloning = True
        self.has_custom_weights = False  # a training checkpoint: the catalog's voice states do not fit it
        self.precision = self.decoder_precision = "float32"
        self.text_options = TextOptions(
            replace_characters=dict(config.replace_characters),
            remove_semicolons=config.remove_semicolons,
            append_terminal_punctuation=config.append_terminal_punctuation,
            capitalize_first_letter=config.capitalize_first_letter,
            pad_with_spaces_for_short_inputs=config.pad_with_spaces_for_short_inputs,
        )

    @property
    def sample_rate(self) -> int:
        return self.config.mimi.sample_rate

    @property
    def device(self) -> torch.device:
        return self.flow_lm.bos_emb.device

    # ------------------------------------------------------------------ loading
    @classmethod
    def load_model(
        cls,
        language: str | None = None,
        config: str | Path | None = None,
        weights: str | Path | None = None,
        temp: float | None = None,
        sampler_decode_steps: int = 1,
        noise_clamp: float | None = None,
        eos_threshold: float | None = None,
        lsd_decode_steps: int | None = None,
        precision: str | None = None,
        quantize: bool = False,
        decoder_precision: str | None = None,
        checkpoint: str | Path | None = None,
    ) -> "TTSModel":
        """Build the model of a config and load its weights.

        `language` picks a shipped config (default "english"); `config` is a YAML
        path instead (local or hf://). `weights` is a local model.safetensors that
        replaces the config's `weights_path`. None means the config's default for
        `temp` and `eos_threshold`. `lsd_decode_steps` is the older name of
        `sampler_decode_steps`. `precision` ("float32", "bfloat16" or "int8") sets the
        backbone's weight format; None reads POCKET_TTS_PRECISION (default float32);
        `quantize=True` is Kyutai's name for "int8". `decoder_precision` ("float32" or
        "bfloat16") sets the Mimi decoder's; None reads POCKET_TTS_DECODER_PRECISION (default
        float32). `checkpoint` is a training checkpoint
        (.pt) whose weights (its EMA ones when present) replace the FlowLM's, and Mimi's
        when it holds them; the others come from `weights` or the config.
        """
        if config is not None and language is not None:
            raise ValueError("pass either language or config, not both")
        if lsd_decode_steps is not None:
            sampler_decode_steps = lsd_decode_steps
        if sampler_decode_steps < 1:
            raise ValueError("sampler_decode_steps must be at least 1")
        if quantize:
            if precision is not None and check_precision(precision) != "int8":
                raise ValueError(f"quantize=True means int8 precision; it contradicts precision={precision!r}")
            precision = "int8"
        precision = check_precision(precision_from_env() if precision is None else precision)
        if decoder_precision is None:
            decoder_precision = precision_from_env(decoder=True)
        decoder_precision = precision_name(decoder_precision, DECODER_PRECISIONS)
        if config is None:
            language = language or DEFAULT_LANGUAGE
            config_path = config_path_for_language(language)
        else:
            config_path = resolve_file(config, "config") if is_hub_path(config) else Path(config)
        cfg = load_config(config_path)
        tokenizer = Tokenizer(
            resolve_file(cfg.flow_lm.lookup_table.tokenizer_path, "tokenizer", relative_to=config_path.parent),
            cfg.flow_lm.lookup_table.tokenizer,
            cfg.flow_lm.lookup_table.n_bins,
        )
        with torch.device("meta"):
            model = cls(
                cfg,
                tokenizer,
                temp=cfg.default_temperature if temp is None else float(temp),
                sampler_decode_steps=sampler_decode_steps,
                noise_clamp=noise_clamp,
                eos_threshold=cfg.default_eos_threshold if eos_threshold is None else float(eos_threshold),
                language=language if config is None else None,
            )
        if checkpoint is None:
            weights_file = model._resolve_weights(weights, config_path)
            tensors, source = read_safetensors(weights_file), str(weights_file)
        else:
            tensors, source = model._training_checkpoint_tensors(checkpoint, weights, config_path)
        assign_checkpoint(model, tensors, source)
        model.eval()
        model.requires_grad_(False)
        lower_backbone_precision(model.flow_lm.transformer, precision)
        if precision != "float32":
            # Attention reads every cached key and value each step, at this core's memory bandwidth:
            # bfloat16 halves the bytes (32 rows x 300 positions, one 18M layer: 2.26 -> 1.40 ms; the
            # 32-row int8 step 82.7 -> 75.1 ms), a rounding far below the backbone's own.
            model.flow_lm.cache_dtype = torch.bfloat16
        model.precision = precision
        lower_decoder_precision(model.mimi, decoder_precision)
        model.decoder_precision = decoder_precision
        model.sampler = FrameSampler(model.flow_lm, sampler_decode_steps, noise_clamp, model.sample_rate)
        logger.info("loaded %s with weights %s", config_path, source)
        return model

    def _training_checkpoint_tensors(self, checkpoint: str | Path, weights: str | Path | None,
                                     config_path: Path) -> tuple[dict[str, torch.Tensor], str]:  # fmt: skip
        tensors = read_training_checkpoint(resolve_file(checkpoint, "checkpoint"))
        self.has_custom_weights = True
        source = f"training checkpoint {checkpoint}"
        if any(k.startswith("mimi.") and k not in tensors for k in self.state_dict()):
            # Training keeps the codec frozen and usually leaves it out of the checkpoint.
            weights_file = self._resolve_weights(weights, config_path)
            codec = {k: t for k, t in read_safetensors(weights_file).items() if k.startswith("mimi.")}
            tensors = {**codec, **tensors}
            source += f" (Mimi from {weights_file})"
        return tensors, source

    def _resolve_weights(self, weights: str | Path | None, config_path: Path) -> Path:
        if weights is not None:
            return resolve_file(weights, "weights")
        cfg = self.config
        if cfg.weights_path is None:
            raise ModelFileError(
                f"config {config_path} names no weights_path; pass weights=<model.safetensors> "
                "(CLI: --weights, workers: POCKET_TTS_WEIGHTS)"
            )
        try:
            return resolve_file(cfg.weights_path, "weights", relative_to=config_path.parent)
        except ModelFileError:
            if cfg.weights_path_without_voice_cloning is None:
                raise
            # The voice-cloning weights are gated on the hub; the catalog-voice weights are not.
            self.has_voice_cloning = False
            logger.warning("voice-cloning weights unavailable, using %s", cfg.weights_path_without_voice_cloning)
            return resolve_file(cfg.weights_path_without_voice_cloning, "weights", relative_to=config_path.parent)

    # ------------------------------------------------------------------ voices
    @torch.inference_mode()
    def get_state_for_audio_prompt(self, audio_conditioning: str | Path | torch.Tensor, truncate: bool = False) -> VoiceState:
        """Voice state from a catalog voice name, an audio file, a voice-state .safetensors, or a 24 kHz waveform."""
        if isinstance(audio_conditioning, torch.Tensor):
            return self._state_from_waveform(audio_conditioning.reshape(1, -1).float())
        source = str(audio_conditioning)
        if source.split("@")[0].endswith(".safetensors"):
            return self.import_voice_state(resolve_file(source, "voice state"))
        if isinstance(audio_conditioning, str) and source in PREDEFINED_VOICES:
            return self.import_voice_state(resolve_file(self._catalog_voice_path(source), f"voice {source!r}"))
        if not is_hub_path(source) and not Path(source).suffix and not Path(source).exists():
            raise ValueError(
                f"unknown voice {source!r}: use a catalog voice ({', '.join(PREDEFINED_VOICES[:8])}, ...), "
                "an audio file or a voice-state .safetensors"
            )
        if not self.has_voice_cloning:
            raise ValueError(
                "voice cloning needs the gated kyutai/pocket-tts weights (accept the terms on the hub and "
                "log in with `hf auth login`); without them use a catalog voice"
            )
        wav, rate = audio_io.read_audio(resolve_file(source, "voice audio"))
        if truncate:
            wav = wav[..., : int(MAX_PROMPT_SECONDS * rate)]
        return self._state_from_waveform(audio_io.resample(wav, rate, self.sample_rate))

    def _catalog_voice_path(self, name: str) -> str:
        if self.has_custom_weights:
            raise ValueError(
                f"catalog voice {name!r} was computed with the released weights and does not fit a training "
                "checkpoint's; use an audio file instead"
            )
        if self.language is None:
            raise ValueError(
                f"catalog voice {name!r} needs a model loaded by language (its voice states were computed "
                "with the released weights); with a custom config use an audio file or a voice-state file"
            )
        return voice_state_path(self.language, name)

    def _state_from_waveform(self, wav: torch.Tensor) -> VoiceState:
        wav = audio_io.end_on_pause(wav, self.sample_rate)
        latents = self.mimi.encode(wav[None])
        prompt = self.flow_lm.speaker_prompt(latents)
        state = self.flow_lm.init_state(1, prompt.shape[1])
        self.flow_lm.prompt(prompt, state)
        return state

    def import_voice_state(self, path: str | Path) -> VoiceState:
        """Read a voice state written by `export_model_state` (or the older `current_end` layout)."""
        state: VoiceState = {}
        for key, tensor in read_safetensors(path).items():
            module, _, field = key.rpartition("/")
            layer = state.setdefault(module, {})
            if field == "current_end":  # older files stored the length of this tensor as the offset
                layer["offset"] = torch.full((1,), tensor.shape[0], dtype=torch.long)
            else:
                layer[field] = tensor.clone()
        self._check_voice_state(state, str(path))
        for layer in state.values():
            layer.setdefault("pad", torch.zeros_like(layer["offset"]))
        return state

    def _check_voice_state(self, state: VoiceState, source: str) -> None:
        names = self.flow_lm.layer_names()
        attn = self.flow_lm.transformer.layers[0].self_attn
        problem = None
        if sorted(state) != sorted(names):
            problem = f"it has modules {sorted(state)[:3]}..., the model expects {names[:3]}..."
        else:
            for name in names:
                layer = state[name]
                cache = layer.get("cache")
                if cache is None or "offset" not in layer:
                    problem = f"{name} lacks cache/offset"
                elif cache.dim() != 5 or cache.shape[0] != 2 or cache.shape[3:] != (attn.num_kv_heads, attn.head_dim):
                    problem = f"{name}/cache has shape {list(cache.shape)}, expected [2, B, T, {attn.num_kv_heads}, {attn.head_dim}]"
                elif int(layer["offset"].view(-1)[0]) > cache.shape[2]:
                    problem = f"{name}/offset exceeds its cache length"
                if problem:
                    break
        if problem:
            raise ValueError(f"voice state {source} does not belong to this model: {problem}")

    # ------------------------------------------------------------------ generation
    def generate_audio(self, model_state: VoiceState, text_to_generate: str, max_tokens: int = MAX_TOKENS_PER_CHUNK,
                       frames_after_eos: int | None = None, copy_state: bool = True, temp: float | None = None,
                       seed: int | None = None) -> torch.Tensor:  # fmt: skip
        """The whole utterance as a 1-D float32 tensor at `sample_rate`.

        The sampling noise comes from torch's global generator (`torch.manual_seed`), or with
        `seed` from generators of the call's own (`chunk_generators`): the same seed gives
        the same audio whatever other threads draw, here and in the batcher.
        """
        pieces = list(self.generate_audio_stream(model_state, text_to_generate, max_tokens, frames_after_eos,
                                                 copy_state, temp, seed))  # fmt: skip
        return torch.cat(pieces) if pieces else torch.zeros(0)

    def generate_audio_stream(self, model_state: VoiceState, text_to_generate: str, max_tokens: int = MAX_TOKENS_PER_CHUNK,
                              frames_after_eos: int | None = None, copy_state: bool = True,
                              temp: float | None = None, seed: int | None = None) -> Iterator[torch.Tensor]:  # fmt: skip
        """Yield 1-D audio pieces as frames are produced; their concatenation is `generate_audio`'s output."""
        temp = self.checked_temperature(temp)
        chunks = self.text_chunks(text_to_generate, max_tokens, frames_after_eos)
        for (ids, after_eos), generator in zip(chunks, chunk_generators(seed, len(chunks))):
            yield from self._speak_chunk(model_state, ids, after_eos, copy_state, temp, generator)

    def checked_temperature(self, temp: float | None) -> float:
        """`temp`, or the model's default for None; a negative or non-finite value raises ValueError."""
        temp = self.temp if temp is None else float(temp)
        if temp < 0 or not math.isfinite(temp):
            raise ValueError(f"temperature must be a finite number >= 0, got {temp}")
        return temp

    def text_chunks(self, text: str, max_tokens: int = MAX_TOKENS_PER_CHUNK,
                    frames_after_eos: int | None = None) -> list[tuple[list[int], int]]:  # fmt: skip
        """(token ids, frames to generate after EOS) of each chunk of `text`, in order.

        Text errors raise ValueError here, before any generation.
        """
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if frames_after_eos is None:
            frames_after_eos = self.config.model_recommended_frames_after_eos
        chunks = []
        for chunk in split_into_chunks(text, self.tokenizer, max_tokens, self.text_options):
            prepared, guess = prepare_text(chunk, self.text_options)
            chunks.append((self.tokenizer.encode(prepared), guess + 2 if frames_after_eos is None else frames_after_eos))
        return chunks

    def max_frames(self, token_count: int) -> int:
        return math.ceil((token_count / TOKENS_PER_SECOND + EXTRA_SECONDS) * self.config.mimi.frame_rate)

    @torch.inference_mode()
    def _speak_chunk(self, voice_state: VoiceState, ids: list[int], frames_after_eos: int, copy_state: bool,
                     temp: float, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:  # fmt: skip
        """Decode the chunk's latents as they come: the first frame at once (latency), then
        STREAM_DECODE_FRAMES per Mimi call (fewer calls; any grouping gives the same audio)."""
        started = time.perf_counter()
        decoder_state = self.mimi.init_decoder_state(1)
        pending: list[torch.Tensor] = []
        n_samples = 0

        def decode() -> torch.Tensor:
            audio = self.mimi.decode(self.flow_lm.to_mimi_space(torch.cat(pending, dim=1)), decoder_state)[0, 0]
            pending.clear()
            return self.sampler.fade_in(audio) if n_samples == 0 else audio

        for step in self.generate_latents(voice_state, ids, frames_after_eos, copy_state, temp, generator):
            pending.append(step.latent)
            if n_samples == 0 or len(pending) == STREAM_DECODE_FRAMES:
                audio = decode()
                n_samples += audio.numel()
                yield audio
        if pending:
            audio = decode()
            n_samples += audio.numel()
            yield audio
        elapsed = time.perf_counter() - started
        logger.debug("chunk: %.2f s of audio in %.2f s", n_samples / self.sample_rate, elapsed)

    @torch.inference_mode()
    def generate_latents(self, voice_state: VoiceState, ids: list[int], frames_after_eos: int,
                         copy_state: bool = True, temp: float = 0.0,
                         generator: torch.Generator | None = None) -> Iterator[LatentStep]:  # fmt: skip
        """The autoregressive loop of one chunk: prompt the text, then one latent per step until EOS."""
        progress = ChunkProgress(frames_after_eos, self.max_frames(len(ids)))
        state = self._chunk_state(voice_state, len(ids) + progress.max_frames, copy_state)
        sampler, temps, generators = self.sampler, [temp], None if generator is None else [generator]
        sampler.prompt_text(torch.tensor([ids], dtype=torch.long), state, temps, generators)
        latent = sampler.bos
        while not progress.exhausted:
            frame = sampler.step(latent, state, temps, self.eos_threshold, generators)
            if not progress.accept(frame.eos[0]):
                return
            latent = frame.latents[:, None]
            yield LatentStep(latent, float(frame.eos_logits[0]), frame.hidden)
        logger.warning("no end of speech detected within %d frames; the chunk was cut", progress.max_frames)

    def _chunk_state(self, voice_state: VoiceState, extra_positions: int, copy_state: bool) -> VoiceState:
        """A state whose caches hold the voice prompt and room for `extra_positions` more."""
        state = {} if copy_state else voice_state
        for name, layer in voice_state.items():
            offset = int(layer["offset"].view(-1)[0])
            old = layer["cache"]
            cache = linear_cache(old.shape[1], offset + extra_positions, *old.shape[3:], dtype=self.flow_lm.cache_dtype)
            cache[:, :, :offset] = old[:, :, :offset]
            state[name] = {"offset": layer["offset"].clone(), "pad": layer["pad"].clone(), "cache": cache}
        return state

    @torch.inference_mode()
    def warmup(self, encoder: bool = False) -> None:
        """One short generation, so the first real job does not pay for lazy initialisation.

        The voice is a neutral one-position state rather than an encoded prompt, so the Mimi
        encoder (and its ~40 MB of packed weights) stays cold unless `encoder` is set: worth it
        where the packed copy is shared, e.g. in a process that forks workers.
        """
        if encoder:
            self.mimi.encode(torch.zeros(1, self.mimi.channels, self.mimi.frame_size))
        state = self.flow_lm.init_state(1, 1)
        self.flow_lm.prompt(torch.zeros(1, 1, self.flow_lm.dim), state)
        for _ in zip(range(2), self.generate_audio_stream(state, "Hi.", temp=0.0)):
            pass


def chunk_generators(seed: int | None, n_chunks: int) -> list[torch.Generator | None]:
    """The noise source of each chunk of a seeded utterance (None for all without a seed).

    One generator per chunk, so the batcher, which runs an utterance's chunks side by side,
    draws what the single-stream loop draws. The first is seeded with `seed` itself: a
    one-chunk text gets the audio of `torch.manual_seed(seed)`; the others with seeds drawn from it.
    """
    if seed is None:
        return [None] * n_chunks
    later = torch.randint(0, 2**62, (max(n_chunks - 1, 0),), generator=torch.Generator().manual_seed(seed))
    return [torch.Generator().manual_seed(s) for s in [seed, *later.tolist()][:n_chunks]]


def export_model_state(model_state: VoiceState, dest: str | Path) -> None:
    """Write a voice state as `<module>/<field>` tensors, the layout of the released voice files."""
    import safetensors.torch

    flat = {}
    for module, layer in model_state.items():
        offset = int(layer["offset"].view(-1)[0])
        for field, tensor in layer.items():
            if field == "cache":  # float32, the released format, also from a bfloat16 generation cache
                tensor = tensor[:, :, :offset].float()
            flat[f"{module}/{field}"] = tensor.contiguous()
    safetensors.torch.save_file(flat, str(dest))
