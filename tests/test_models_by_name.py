"""Every shipped model by name: the catalog, its configs and hub paths, default voices, loading
through an offline Hugging Face cache, and Kyutai's load_model options (quantize, checkpoint)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pocket_tts import catalog
from pocket_tts.config import CONFIGS_DIR, available_languages, config_path_for_language, load_config
from pocket_tts.models.tts_model import TTSModel
from pocket_tts.weights import CheckpointError

REPO_ROOT = Path(__file__).resolve().parents[1]
REVISION = r"@[0-9a-f]{40}$"


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env})  # fmt: skip


def raw_config(name: str) -> dict:
    return yaml.safe_load(config_path_for_language(name).read_text(encoding="utf-8"))


def test_the_catalog_names_every_shipped_config_and_nothing_else():
    assert len(catalog.LANGUAGES) == len(set(catalog.LANGUAGES)) == 27
    assert sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")) == available_languages() == sorted(catalog.LANGUAGES)
    assert {catalog.spoken_language(n) for n in catalog.LANGUAGES} == set(catalog.SPOKEN_LANGUAGES)
    with pytest.raises(ValueError, match=r"unknown language 'klingon'; available: dutch, dutch_24l, english, "):
        config_path_for_language("klingon")


@pytest.mark.parametrize("name", catalog.LANGUAGES)
def test_each_config_points_at_its_own_pinned_hub_files(name):
    raw = raw_config(name)
    assert re.fullmatch(rf"hf://kyutai/pocket-tts/languages/{name}/model\.safetensors{REVISION}", raw["weights_path"])
    assert re.fullmatch(
        rf"hf://kyutai/pocket-tts-without-voice-cloning/languages/{name}/model\.safetensors{REVISION}",
        raw["weights_path_without_voice_cloning"],
    )
    tokenizer = raw["flow_lm"]["lookup_table"]["tokenizer_path"]
    assert re.fullmatch(rf"hf://kyutai/pocket-tts-without-voice-cloning/\S+\.(json|model){REVISION}", tokenizer)
    layers = raw["flow_lm"]["transformer"]["num_layers"]
    assert layers == 24 if name.endswith("_24l") else layers in (6, 8)


# Parameters of each shipped layout (FlowLM with its voice projection, and Mimi) in Kyutai's package 4.0.1,
# counted on the meta device; docs/models.md lists them.
KYUTAI_PARAMETERS = {
    "english_2026-01": 117_856_962,
    "english_drifting_26-09": 108_712_386,
    "english_18m": 27_923_058,
    "english_7m": 16_611_666,
    "english_2m": 11_671_934,
    "_24l": 336_068_290,
}


@pytest.mark.parametrize("name", catalog.LANGUAGES)
def test_each_shipped_layout_has_kyutais_parameter_count(name):
    from pocket_tts.models.flow_lm import FlowLM
    from pocket_tts.models.mimi import Mimi

    cfg = load_config(config_path_for_language(name))
    with torch.device("meta"):
        parts = (FlowLM(cfg.flow_lm, cfg.latent_dim, cfg.voice_dim), Mimi.from_config(cfg.mimi))
    count = sum(t.numel() for part in parts for t in part.state_dict().values())
    assert count == next((n for key, n in KYUTAI_PARAMETERS.items() if key in name), 109_502_146)


def test_english_is_the_2026_10_model_under_another_folder():
    english, dated = raw_config("english"), raw_config("english_2026-10")
    for raw in (english, dated):
        del raw["weights_path"], raw["weights_path_without_voice_cloning"], raw["flow_lm"]["lookup_table"]["tokenizer_path"]
    assert english == dated


def test_each_language_has_its_native_default_voice():
    expected = {"french": "estelle", "german": "juergen", "spanish": "lola", "italian": "giovanni",
                "portuguese": "rafael", "dutch": "daan", "english": "alba"}  # fmt: skip
    for name in catalog.LANGUAGES:
        assert catalog.default_voice(name) == expected[catalog.spoken_language(name)]
        assert catalog.default_voice(name) in catalog.PREDEFINED_VOICES
    assert catalog.default_voice(None) == "alba"
    assert catalog.voice_state_path("french_24l", "estelle").startswith(
        "hf://kyutai/pocket-tts-without-voice-cloning/languages/french_24l/embeddings/estelle.safetensors@"
    )


def test_the_catalog_module_does_not_import_torch():
    done = run_python("import sys, pocket_tts.catalog, worker_config; print('torch' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_every_name_loads_its_own_files_through_an_empty_offline_cache(tmp_path):
    """Offline with nothing cached, each name gets as far as its first hub file and names it; a layout
    this engine does not implement yet is refused with the config keys instead."""
    code = (
        "import json\n"
        "from pocket_tts import catalog\n"
        "from pocket_tts.models.tts_model import TTSModel\n"
        "out = {}\n"
        "for name in catalog.LANGUAGES:\n"
        "    try:\n"
        "        TTSModel.load_model(language=name)\n"
        "        out[name] = 'loaded'\n"
        "    except Exception as exc:\n"
        "        out[name] = f'{type(exc).__name__}: {exc}'\n"
        "print(json.dumps(out))\n"
    )
    done = run_python(code, HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stderr
    for name, outcome in json.loads(done.stdout).items():
        assert "\n" not in outcome
        try:
            load_config(config_path_for_language(name))
        except ValueError as exc:
            assert outcome == f"ValueError: {exc}" and "does not implement the config option(s)" in outcome
            continue
        tokenizer = raw_config(name)["flow_lm"]["lookup_table"]["tokenizer_path"]
        assert outcome.startswith(f"ModelFileError: tokenizer {tokenizer} is not in the Hugging Face cache"), outcome


# ---------------------------------------------------------------- a named model from the hub cache

OFFLINE_FRENCH = """
import json, sys
from pathlib import Path
import torch
import pocket_tts.config
from safetensors.torch import load_file
pocket_tts.config.CONFIGS_DIR = Path(sys.argv[1])
from pocket_tts.catalog import default_voice
from pocket_tts.cli import main
from pocket_tts.models.tts_model import TTSModel

case = json.loads(sys.argv[3])
model = TTSModel.load_model(language="french", temp=case["temperature"], eos_threshold=case["eos_threshold"])
audio = model.generate_audio(model.get_state_for_audio_prompt(default_voice("french")), case["text"], max_tokens=case["max_tokens"])
expected = load_file(sys.argv[2])[case["audio"]]

# A worker serving POCKET_TTS_LANGUAGE=french: a job without a voice speaks with estelle.
from tasks.engine import Engine
from tasks.validation import validate_job
from worker_config import load_settings
settings = load_settings({"POCKET_TTS_LANGUAGE": "french"})
job = validate_job(case["text"], None, 0.0, "wav", settings)
worker_audio = Engine.load(settings, num_threads=1).synthesize(job)
again = TTSModel.load_model(language="french").generate_audio(model.get_state_for_audio_prompt("estelle"), case["text"], temp=0.0)

print(json.dumps({"voice_cloning": model.has_voice_cloning, "shape": list(audio.shape), "expected": list(expected.shape),
                  "diff": (audio - expected).abs().max().item() if audio.shape == expected.shape else None,
                  "job_voice": job.voice, "worker_diff": (worker_audio - again).abs().max().item() if worker_audio.shape == again.shape else None}))
sys.exit(main(["generate", case["text"], "--language", "french", "--temperature", "0",
               "--eos-threshold", str(case["eos_threshold"]), "--output", sys.argv[4]]))
"""


def hub_file(cache: Path, spec: str, source: Path) -> None:
    """Put `source` in a Hugging Face cache where `hf://owner/repo/path@revision` resolves offline."""
    rest, revision = spec.removeprefix("hf://").rsplit("@", 1)
    owner, repo, path = rest.split("/", 2)
    target = cache / "hub" / f"models--{owner}--{repo}" / "snapshots" / revision / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source)


def test_a_named_model_and_its_default_voice_come_from_the_hub_cache(tmp_path):
    """`language="french"` through the hub cache, offline: the config's tokenizer, the ungated weights
    (the gated ones are absent) and French's default catalog voice, estelle, in the Python API, the CLI
    and a worker's engine. The French family fixture stands in for the released files, under the
    shipped hub paths; its audio is Kyutai's."""
    family = REPO_ROOT.parent / "shared" / "parity" / "families" / "french"
    if not (family / "cases.json").is_file():
        pytest.skip("family fixtures not found in ../shared/parity/families")
    shipped = raw_config("french")
    configs = tmp_path / "configs"
    configs.mkdir()
    fixture = yaml.safe_load((family / "config.yaml").read_text(encoding="utf-8"))
    fixture["weights_path"] = shipped["weights_path"]
    fixture["weights_path_without_voice_cloning"] = shipped["weights_path_without_voice_cloning"]
    fixture["flow_lm"]["lookup_table"]["tokenizer_path"] = shipped["flow_lm"]["lookup_table"]["tokenizer_path"]
    (configs / "french.yaml").write_text(yaml.safe_dump(fixture, allow_unicode=True), encoding="utf-8")
    cache = tmp_path / "hf"
    hub_file(cache, shipped["flow_lm"]["lookup_table"]["tokenizer_path"], family / "tokenizer.json")
    hub_file(cache, shipped["weights_path_without_voice_cloning"], family / "model.safetensors")
    hub_file(cache, catalog.voice_state_path("french", "estelle"), family / "voice_state.safetensors")
    case = next(c for c in json.loads((family / "cases.json").read_text())["cases"] if c["name"] == "voice_state")
    output = tmp_path / "out.wav"

    done = subprocess.run(
        [sys.executable, "-c", OFFLINE_FRENCH, str(configs), str(family / "cases.safetensors"), json.dumps(case),
         str(output)],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HOME": str(cache), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[0])
    assert report["voice_cloning"] is False  # only the catalog-voice weights were there
    assert report["shape"] == report["expected"] and report["diff"] < 1e-4
    assert report["job_voice"] == "estelle" and report["worker_diff"] is not None and report["worker_diff"] < 1e-4
    assert f"wrote {output}" in done.stdout  # the CLI found estelle too
    samples = load_wav_samples(output)
    assert samples.numel() == case["n_samples"] and samples.abs().max() > 0


def load_wav_samples(path: Path) -> torch.Tensor:
    import soundfile

    data, rate = soundfile.read(str(path), dtype="float32")
    assert rate == 24000
    return torch.from_numpy(data)


# ---------------------------------------------------------------- Kyutai's load_model options


def test_quantize_is_int8(parity_dir):
    model = TTSModel.load_model(config=parity_dir / "config.yaml", weights=parity_dir / "model.safetensors", quantize=True)
    assert model.precision == "int8"
    with pytest.raises(ValueError, match="quantize=True means int8 precision; it contradicts precision='bfloat16'"):
        TTSModel.load_model(config=parity_dir / "config.yaml", weights=parity_dir / "model.safetensors",
                            quantize=True, precision="bfloat16")  # fmt: skip


def training_checkpoint(parity_dir: Path, path: Path, with_mimi: bool, perturb_model: bool = True) -> dict:
    """A training run's .pt: trained weights under "model" (perturbed) and their EMA under "ema" (the real
    values), plus optimizer state; Mimi only when `with_mimi`."""
    weights = load_file(str(parity_dir / "model.safetensors"))
    flow_lm = {k: v for k, v in weights.items() if k.startswith("flow_lm.")}
    trained = [k for k in flow_lm if "transformer" in k]
    model = {k: (v + 0.5 if perturb_model and k in trained else v) for k, v in flow_lm.items()}
    if with_mimi:
        model.update({k: v for k, v in weights.items() if k.startswith("mimi.")})
    payload = {"model": model, "ema": {k: flow_lm[k] for k in trained}, "optimizer": {"step": torch.tensor(3)}}
    torch.save(payload, path)
    return payload


@pytest.mark.parametrize("with_mimi", [True, False])
def test_a_training_checkpoint_loads_its_ema_weights(parity_dir, parity_model, tmp_path, with_mimi):
    checkpoint = tmp_path / "step_1000.pt"
    training_checkpoint(parity_dir, checkpoint, with_mimi)
    # Without Mimi in the checkpoint, the codec comes from `weights` (else the config's weights_path).
    model = TTSModel.load_model(config=parity_dir / "config.yaml", checkpoint=checkpoint, temp=0.0,
                                eos_threshold=parity_model.eos_threshold,
                                weights=None if with_mimi else parity_dir / "model.safetensors")  # fmt: skip
    voice = parity_model.import_voice_state(parity_dir / "voice_state.safetensors")

    audio = model.generate_audio(voice, "Hello there.")
    expected = parity_model.generate_audio(voice, "Hello there.", temp=0.0)

    assert audio.shape == expected.shape and (audio - expected).abs().max() < 1e-5
    with pytest.raises(ValueError, match="catalog voice 'alba' was computed with the released weights"):
        model.get_state_for_audio_prompt("alba")


def test_without_ema_the_model_weights_are_used(parity_dir, parity_model, tmp_path):
    checkpoint = tmp_path / "run.pt"
    payload = training_checkpoint(parity_dir, checkpoint, with_mimi=True)
    del payload["ema"]
    torch.save(payload, checkpoint)
    model = TTSModel.load_model(config=parity_dir / "config.yaml", checkpoint=checkpoint)
    name = next(k for k in payload["model"] if "transformer" in k and k.endswith("weight"))
    assert torch.equal(model.state_dict()[name], payload["model"][name])


class NotATensor:
    pass


@pytest.mark.parametrize(
    "content, message",
    [
        ({"model": {}}, "holds no 'model' weights"),
        ({"state": {"flow_lm.x": torch.zeros(1)}}, "holds no 'model' weights"),
        ({"model": {"mimi.x": torch.zeros(1)}}, "holds no flow_lm.* weights"),
        ({"model": {"flow_lm.x": NotATensor()}}, "cannot be read as a training checkpoint \\(UnpicklingError"),
        (b"not a checkpoint", "cannot be read as a training checkpoint"),
        ({"model": {"flow_lm.bos_emb": torch.zeros(3)}}, "does not fit the config's architecture"),
    ],
)
def test_bad_training_checkpoints_fail_with_one_line(parity_dir, tmp_path, content, message):
    checkpoint = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        checkpoint.write_bytes(content)
    else:
        torch.save(content, checkpoint)
    with pytest.raises(CheckpointError, match=message) as refused:
        TTSModel.load_model(config=parity_dir / "config.yaml", checkpoint=checkpoint,
                            weights=parity_dir / "model.safetensors")  # fmt: skip
    assert "\n" not in str(refused.value)


def test_a_safetensors_file_is_not_a_training_checkpoint(parity_dir):
    with pytest.raises(CheckpointError, match="is a safetensors file, not a training checkpoint: pass it as weights"):
        TTSModel.load_model(config=parity_dir / "config.yaml", checkpoint=parity_dir / "model.safetensors")


# ---------------------------------------------------------------- seeded generation


def test_a_seed_reproduces_the_audio_of_torch_manual_seed(parity_dir, parity_model):
    voice = parity_model.import_voice_state(parity_dir / "voice_state.safetensors")
    text = "Hello there."
    assert len(parity_model.text_chunks(text)) == 1
    torch.manual_seed(11)
    global_rng = parity_model.generate_audio(voice, text, temp=0.7)
    torch.manual_seed(0)  # a call's own seed ignores the global generator
    seeded = parity_model.generate_audio(voice, text, temp=0.7, seed=11)
    other = parity_model.generate_audio(voice, text, temp=0.7, seed=12)
    assert torch.equal(seeded, global_rng)
    assert seeded.shape != other.shape or not torch.allclose(seeded, other)


def test_a_seeded_request_sounds_the_same_in_the_batcher(parity_dir, parity_model):
    """Each chunk has its own generator: chunks side by side in a batch draw what one stream draws."""
    from pocket_tts.batching import BatchedSynthesizer

    voice = parity_model.import_voice_state(parity_dir / "voice_state.safetensors")
    text, max_tokens = "Hello there. How are you today? Fine, thanks.", 6
    assert len(parity_model.text_chunks(text, max_tokens)) > 1
    single = parity_model.generate_audio(voice, text, max_tokens, temp=0.7, seed=2026)
    batcher = BatchedSynthesizer(parity_model, max_batch=4)
    try:
        futures = [batcher.submit(voice, text, temp=0.7, max_tokens=max_tokens, seed=2026),
                   batcher.submit(voice, "Noise next door.", temp=0.7)]  # fmt: skip
        batched = futures[0].result(timeout=120)
        futures[1].result(timeout=120)
    finally:
        batcher.close()
    assert batched.shape == single.shape and (batched - single).abs().max() < 1e-4


def test_random_checkpoint_writes_a_shipped_small_layout_at_full_size(tmp_path):
    name = "english_2m_2026-10"
    try:
        load_config(config_path_for_language(name))
    except ValueError as exc:
        pytest.skip(f"the engine does not implement {name} yet: {exc}")
    from pocket_tts.random_checkpoint import write_random_checkpoint

    config = write_random_checkpoint(tmp_path, name)
    written = yaml.safe_load(config.read_text())
    assert written["flow_lm"]["transformer"] == raw_config(name)["flow_lm"]["transformer"]
    model = TTSModel.load_model(config=config, temp=0.0)
    assert sum(p.numel() for p in model.flow_lm.parameters()) < 3_000_000
