"""Parity of text preparation, the FlowLM backbone and the flow head with Kyutai's pocket-tts 4.0.1.

Numbers come from ../shared/parity (see its README); tolerance 1e-4 absolute in float32.
"""

from __future__ import annotations

import pytest
import torch

from pocket_tts.text import Tokenizer, prepare_text, split_into_chunks

TOL = 1e-4


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("key, tokenizer_file", [("text_prep", "tokenizer.model"), ("text_prep_json_tokenizer", "tokenizer.json")])
def test_text_preparation_and_chunking(parity_model, parity_dir, parity_cases, key, tokenizer_file):
    tokenizer = Tokenizer(parity_dir / tokenizer_file, "sentencepiece" if tokenizer_file.endswith(".model") else "tokenizers", 512)
    options = parity_model.text_options
    for case in parity_cases[key]:
        prepared, _ = prepare_text(case["input"], options)
        assert prepared == case["prepared_full_text"]
        assert tokenizer.encode(prepared) == case["full_token_ids"]
        chunks = split_into_chunks(case["input"], tokenizer, case["max_tokens"], options)
        assert chunks == [c["chunk_text"] for c in case["chunks"]]
        for chunk, expected in zip(chunks, case["chunks"]):
            chunk_text, guess = prepare_text(chunk, options)
            assert chunk_text == expected["prepared_text"]
            assert guess == expected["frames_after_eos_guess"]
            ids = tokenizer.encode(chunk_text)
            assert ids == expected["token_ids"]
            assert parity_model.max_frames(len(ids)) == expected["max_gen_len"]


def test_split_probes_match_reference(parity_model, parity_cases):
    tok = parity_cases["tokenizer"]
    assert parity_model.tokenizer.encode(tok["sentence_end_probe_text"]) == tok["sentence_end_probe_ids"]
    assert parity_model.tokenizer.encode(tok["fallback_probe_text"]) == tok["fallback_probe_ids"]


def test_empty_text_is_rejected(parity_model):
    with pytest.raises(ValueError, match="empty"):
        prepare_text("   \n ", parity_model.text_options)


@torch.inference_mode()
def test_backbone_stateless(parity_model, parity_tensors):
    flow_lm = parity_model.flow_lm
    text = flow_lm.conditioner(parity_tensors["backbone.text_tokens"])
    assert max_diff(text, parity_tensors["backbone.text_embeddings"]) < TOL
    latents = flow_lm.embed_latents(parity_tensors["backbone.latents_in"])
    assert max_diff(latents, parity_tensors["backbone.input_linear"]) < TOL

    x = torch.cat((text, latents), dim=1)
    for i, layer in enumerate(flow_lm.transformer.layers):
        x = layer(x, None)
        assert max_diff(x, parity_tensors[f"backbone.layer_out.{i}"]) < TOL
    out = flow_lm.backbone(torch.cat((text, latents), dim=1), None)[:, -latents.shape[1]:]
    assert max_diff(out, parity_tensors["backbone.out"]) < TOL
    assert max_diff(flow_lm.eos_logit(out), parity_tensors["backbone.eos_logits"]) < TOL


@torch.inference_mode()
def test_backbone_with_voice_through_kv_cache(parity_model, parity_tensors):
    """Generation's call pattern: voice prompt, then text, then one latent per call."""
    flow_lm = parity_model.flow_lm
    prompt = parity_tensors["voice.voice_24k.prompt"]
    text = flow_lm.conditioner(parity_tensors["backbone.text_tokens"])
    latents = flow_lm.embed_latents(parity_tensors["backbone.latents_in"])
    state = flow_lm.init_state(1, prompt.shape[1] + text.shape[1] + latents.shape[1])
    flow_lm.prompt(prompt, state)
    flow_lm.prompt(text, state)
    outs = [flow_lm.backbone(latents[:, i : i + 1], state) for i in range(latents.shape[1])]
    out = torch.cat(outs, dim=1)
    assert max_diff(out, parity_tensors["backbone_voice.out"]) < TOL
    assert max_diff(flow_lm.eos_logit(out), parity_tensors["backbone_voice.eos_logits"]) < TOL


@torch.inference_mode()
def test_flow_head(parity_model, parity_tensors):
    head = parity_model.flow_lm.flow_net
    cond, s, t, x = (parity_tensors[f"flow.{k}"] for k in ("cond", "s", "t", "x"))
    assert max_diff(head.cond_embed(cond), parity_tensors["flow.cond_embed"]) < TOL
    assert max_diff(head.time_embed[0](s), parity_tensors["flow.time_embed_s"]) < TOL
    assert max_diff(head.time_embed[1](t), parity_tensors["flow.time_embed_t"]) < TOL
    assert max_diff(head.input_proj(x), parity_tensors["flow.input_proj"]) < TOL
    assert max_diff(head(cond, s, t, x), parity_tensors["flow.out"]) < TOL


@torch.inference_mode()
def test_lsd_decode(parity_model, parity_tensors):
    flow_lm = parity_model.flow_lm
    cond, noise = parity_tensors["lsd.cond"], parity_tensors["lsd.noise"]
    one, four = flow_lm.head_tables(1), flow_lm.head_tables(4)
    assert max_diff(flow_lm.sample(cond, noise.clone(), one), parity_tensors["lsd.out_steps1"]) < TOL
    assert max_diff(flow_lm.sample(cond, noise.clone(), four), parity_tensors["lsd.out_steps4"]) < TOL
    zero = flow_lm.sample(cond, torch.zeros_like(noise), one)
    assert max_diff(zero, parity_tensors["lsd.out_steps1_zero_noise"]) < TOL
