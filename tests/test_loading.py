"""Loading: configs, hub and local files, strict checkpoints, voices, threads, precision, errors."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from pocket_tts.config import load_config
from pocket_tts.files import ModelFileError
from pocket_tts.models import kernels, onednn
from pocket_tts.models.tts_model import TTSModel, export_model_state
from pocket_tts.weights import CheckpointError

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
        env={**os.environ, **env},
    )  # fmt: skip


@pytest.fixture
def checkpoint_copy(parity_dir, tmp_path) -> Path:
    """The parity checkpoint in a folder of its own, to break in various ways."""
    for name in ("config.yaml", "model.safetensors", "tokenizer.model"):
        shutil.copy(parity_dir / name, tmp_path / name)
    return tmp_path


def test_shipped_english_config_matches_the_released_layout(parity_dir):
    """Every key and shape of the default English state dict, as listed in the parity folder."""
    cfg = load_config(REPO_ROOT / "pocket_tts" / "config" / "english.yaml")
    with torch.device("meta"):
        from pocket_tts.models.flow_lm import FlowLM
        from pocket_tts.models.mimi import Mimi

        parts = {"flow_lm": FlowLM(cfg.flow_lm, cfg.latent_dim, cfg.voice_dim), "mimi": Mimi.from_config(cfg.mimi)}
    ours = {f"{p}.{k}": list(v.shape) for p, m in parts.items() for k, v in m.state_dict().items()}
    expected = {}
    for line in (parity_dir / "english_state_dict.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, *_ = line.split("\t")
            expected[key] = yaml.safe_load(shape)
    assert ours == expected
    assert sum(torch.Size(s).numel() for s in ours.values()) == 109_502_146
    assert cfg.weights_path.startswith("hf://kyutai/pocket-tts/") and "@" in cfg.weights_path


def test_relative_tokenizer_and_weights_paths_resolve_against_the_config(checkpoint_copy, monkeypatch, tmp_path_factory):
    config = yaml.safe_load((checkpoint_copy / "config.yaml").read_text())
    config["weights_path"] = "model.safetensors"
    (checkpoint_copy / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    model = TTSModel.load_model(config=checkpoint_copy / "config.yaml")
    assert model.sample_rate == 24000 and model.tokenizer.encode("Hello.")


def test_json_tokenizer_gives_the_same_ids(checkpoint_copy, parity_dir, parity_model):
    config = yaml.safe_load((checkpoint_copy / "config.yaml").read_text())
    config["flow_lm"]["lookup_table"].update(tokenizer="tokenizers", tokenizer_path=str(parity_dir / "tokenizer.json"))
    (checkpoint_copy / "config.yaml").write_text(yaml.safe_dump(config))
    model = TTSModel.load_model(config=checkpoint_copy / "config.yaml", weights=checkpoint_copy / "model.safetensors")
    text = "It changes how you may copy, modify, and distribute the covered work!"
    assert model.tokenizer.encode(text) == parity_model.tokenizer.encode(text)


def test_weights_are_memory_mapped_not_copied(parity_model, parity_dir):
    maps = Path("/proc/self/maps").read_text()
    assert str(parity_dir / "model.safetensors") in maps
    assert not any(p.is_meta for p in parity_model.parameters())


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda sd: sd.pop("flow_lm.out_eos.bias"), "1 missing: flow_lm.out_eos.bias"),
        (lambda sd: sd.update({"flow_lm.extra": torch.zeros(1)}), "1 unexpected: flow_lm.extra"),
        (lambda sd: sd.update({"flow_lm.bos_emb": torch.zeros(31)}), "flow_lm.bos_emb [31] (expected [32])"),
    ],
)
def test_checkpoint_that_does_not_fit_the_config_is_refused(checkpoint_copy, breakage, message):
    weights = checkpoint_copy / "model.safetensors"
    state = load_file(str(weights))
    breakage(state)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match="does not fit the config") as info:
        TTSModel.load_model(config=checkpoint_copy / "config.yaml", weights=weights)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_and_corrupt_files_name_what_was_looked_for(checkpoint_copy, tmp_path):
    config = checkpoint_copy / "config.yaml"
    with pytest.raises(ModelFileError, match="weights file not found: .*nope.safetensors"):
        TTSModel.load_model(config=config, weights=tmp_path / "nope.safetensors")
    with pytest.raises(ModelFileError, match="names no weights_path; pass weights="):
        TTSModel.load_model(config=config)
    with pytest.raises(FileNotFoundError, match="config file not found"):
        TTSModel.load_model(config=tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="unknown language 'klingon'"):
        TTSModel.load_model(language="klingon")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        TTSModel.load_model(config=config, weights=tmp_path / "garbage.safetensors")
    (checkpoint_copy / "tokenizer.model").unlink()
    with pytest.raises(ModelFileError, match="tokenizer file not found"):
        TTSModel.load_model(config=config, weights=checkpoint_copy / "model.safetensors")


def test_invalid_config_values_are_one_line(checkpoint_copy):
    config = yaml.safe_load((checkpoint_copy / "config.yaml").read_text())
    config["flow_lm"]["transformer"]["num_heads"] = "many"
    config["surprise"] = 1
    (checkpoint_copy / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"invalid config .*config.yaml: "):
        load_config(checkpoint_copy / "config.yaml")


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("transformer", "sliding_window", 64, r"flow_lm\.transformer\.sliding_window: Extra inputs"),
        ("flow", "type", "diffusion", r"flow_lm\.flow\.type 'diffusion' is not one of lsd, flow_matching"),
        ("transformer", "num_kv_heads", 3, r"num_heads must be a multiple of num_kv_heads"),
    ],
)
def test_options_outside_kyutais_schema_fail_naming_the_key(checkpoint_copy, section, key, value, message):
    config = yaml.safe_load((checkpoint_copy / "config.yaml").read_text())
    config["flow_lm"][section][key] = value
    (checkpoint_copy / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=message) as error:
        load_config(checkpoint_copy / "config.yaml")
    assert "\n" not in str(error.value)


def test_hub_files_come_from_the_cache_offline_and_a_miss_says_how_to_fix_it(tmp_path):
    revision = "a" * 40
    snapshot = tmp_path / "hub" / "models--someone--voices" / "snapshots" / revision / "dir"
    snapshot.mkdir(parents=True)
    (snapshot / "file.bin").write_bytes(b"cached")
    code = (
        "from pocket_tts.files import resolve_file, ModelFileError\n"
        f"print(resolve_file('hf://someone/voices/dir/file.bin@{revision}', 'weights').read_bytes())\n"
        "try:\n"
        f"    resolve_file('hf://someone/voices/dir/other.bin@{revision}', 'weights')\n"
        "except ModelFileError as e:\n"
        "    print('ERROR', e)\n"
    )
    done = run_python(code, HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stderr
    assert "b'cached'" in done.stdout
    assert "ERROR weights hf://someone/voices/dir/other.bin@" + revision in done.stdout
    assert "not in the Hugging Face cache" in done.stdout


def test_voice_errors(parity_model, parity_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown voice 'nobody'"):
        parity_model.get_state_for_audio_prompt("nobody")
    with pytest.raises(ValueError, match="catalog voice 'alba' needs a model loaded by language"):
        parity_model.get_state_for_audio_prompt("alba")
    with pytest.raises(FileNotFoundError, match="voice audio file not found"):
        parity_model.get_state_for_audio_prompt(tmp_path / "missing.wav")
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF....WAVEfmt garbage")
    with pytest.raises(ValueError, match="broken.wav"):
        parity_model.get_state_for_audio_prompt(broken)
    other = tmp_path / "other.safetensors"
    save_file({"transformer.layers.0.self_attn/cache": torch.zeros(2, 1, 3, 8, 16),
               "transformer.layers.0.self_attn/offset": torch.tensor([3])}, str(other))  # fmt: skip
    with pytest.raises(ValueError, match="does not belong to this model"):
        parity_model.get_state_for_audio_prompt(other)


def test_thread_setting_is_applied_at_import_and_validated():
    code = "import torch, pocket_tts.models.tts_model; print(torch.get_num_threads())"
    assert run_python(code, POCKET_TTS_NUM_THREADS="2").stdout.strip() == "2"
    assert run_python(code, POCKET_TTS_NUM_THREADS="").stdout.strip() == "1"  # unset or empty: the default
    for bad in ("0", "-1", "two", "1.5"):
        done = run_python(code, POCKET_TTS_NUM_THREADS=bad)
        assert done.returncode != 0
        assert f"POCKET_TTS_NUM_THREADS must be a positive integer, got {bad!r}" in done.stderr


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_reduced_precision_stays_close_to_float32(parity_dir, parity_model, precision):
    model = TTSModel.load_model(config=parity_dir / "config.yaml", weights=parity_dir / "model.safetensors",
                                temp=0.0, eos_threshold=1e9, precision=precision)  # fmt: skip
    voice = parity_model.import_voice_state(parity_dir / "voice_state.safetensors")
    reduced = model.generate_audio(voice, "Hello there.")
    full = parity_model.generate_audio(voice, "Hello there.")
    assert reduced.shape == full.shape
    assert 0 < (reduced - full).abs().max().item() < 0.2  # a different rounding, not different audio


def test_reduced_precision_attends_over_a_bfloat16_cache_and_keeps_voice_states_float32(parity_dir, parity_model, monkeypatch, one_thread, tmp_path):
    model = TTSModel.load_model(config=parity_dir / "config.yaml", weights=parity_dir / "model.safetensors",
                                temp=0.0, eos_threshold=1e9, precision="int8")  # fmt: skip
    assert model.flow_lm.cache_dtype == torch.bfloat16 and parity_model.flow_lm.cache_dtype == torch.float32
    voice = model.import_voice_state(parity_dir / "voice_state.safetensors")
    before = {name: layer["cache"].clone() for name, layer in voice.items()}
    read = []
    attend = kernels.attend
    monkeypatch.setattr(kernels, "attend", lambda queries, cache, *rest: read.append(cache.dtype) or attend(queries, cache, *rest))
    reduced = model.generate_audio(voice, "Hello there.")
    model.flow_lm.cache_dtype = torch.float32
    full_cache = model.generate_audio(voice, "Hello there.")
    assert set(read) == {torch.bfloat16, torch.float32}
    for name, layer in voice.items():  # the voice state is read, not rounded
        assert layer["cache"].dtype == torch.float32 and torch.equal(layer["cache"], before[name])
    assert reduced.shape == full_cache.shape
    assert 0 < (reduced - full_cache).abs().max().item() < 0.2
    model.flow_lm.cache_dtype = torch.bfloat16
    model.generate_audio(voice, "Hi.", copy_state=False)  # the voice state takes the generation's caches
    export_model_state(voice, tmp_path / "after.safetensors")
    caches = {name: t for name, t in load_file(tmp_path / "after.safetensors").items() if name.endswith("/cache")}
    assert caches and all(t.dtype == torch.float32 for t in caches.values())  # the released format


def test_bfloat16_decoder_stays_close_to_float32(parity_dir, parity_model, monkeypatch):
    monkeypatch.setenv("POCKET_TTS_DECODER_PRECISION", "bf16")
    model = TTSModel.load_model(config=parity_dir / "config.yaml", weights=parity_dir / "model.safetensors",
                                temp=0.0, eos_threshold=1e9)  # fmt: skip
    assert (model.precision, model.decoder_precision) == ("float32", "bfloat16")
    assert model.mimi.decoder.model[0].conv.weight.dtype == torch.bfloat16
    assert model.mimi.encoder.model[0].conv.weight.dtype == torch.float32  # voice prompts stay float32
    voice = parity_model.import_voice_state(parity_dir / "voice_state.safetensors")
    reduced = model.generate_audio(voice, "Hello there.")
    full = parity_model.generate_audio(voice, "Hello there.")
    assert reduced.dtype == torch.float32 and reduced.shape == full.shape
    # Same latents (the decoder does not feed back), each sample rounded: measured max 9.2e-3.
    assert 0 < (reduced - full).abs().max().item() < 0.05


def test_bfloat16_runs_on_generic_kernels_with_a_warning_where_onednn_has_no_bfloat16(parity_dir, parity_model, monkeypatch, caplog):
    # An AVX2-only CPU: oneDNN refuses bfloat16 weights ("bf16 path needs the cpu support ..."), so
    # every decoder convolution and linear must take torch's own op instead of failing the job.
    monkeypatch.setattr(onednn, "NATIVE_BFLOAT16", False)
    packs, get = [], onednn.PackedWeight.get
    monkeypatch.setattr(onednn.PackedWeight, "get", lambda self, weight, pack: packs.append(weight.dtype) or get(self, weight, pack))
    with caplog.at_level(logging.WARNING, logger="pocket_tts.precision"):
        model = TTSModel.load_model(config=parity_dir / "config.yaml", weights=parity_dir / "model.safetensors",
                                    temp=0.0, eos_threshold=1e9, precision="bfloat16", decoder_precision="bfloat16")  # fmt: skip
    warned = [r.getMessage() for r in caplog.records if "without bfloat16 support" in r.getMessage()]
    assert len(warned) == 2 and any("backbone" in m for m in warned) and any("Mimi decoder" in m for m in warned)
    voice = parity_model.import_voice_state(parity_dir / "voice_state.safetensors")
    reduced = model.generate_audio(voice, "Hello there.")
    full = parity_model.generate_audio(voice, "Hello there.")
    assert torch.bfloat16 not in packs  # no bfloat16 weight was handed to oneDNN
    assert reduced.shape == full.shape and 0 < (reduced - full).abs().max().item() < 0.2


def test_bad_precision_is_refused(parity_dir):
    with pytest.raises(ValueError, match="precision must be one of float32, bfloat16, int8"):
        TTSModel.load_model(config=parity_dir / "config.yaml", weights=parity_dir / "model.safetensors", precision="fp8")
    with pytest.raises(ValueError, match="^'int8': decoder precision must be one of float32, bfloat16$"):
        TTSModel.load_model(config=parity_dir / "config.yaml", weights=parity_dir / "model.safetensors",
                            decoder_precision="int8")  # fmt: skip
