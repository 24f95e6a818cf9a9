"""Workers serve model families other than the default one, in prefork and batching modes.

Each worker loads a family folder of ../shared/parity/families (random weights: noise, never
speech) through POCKET_TTS_CONFIG / POCKET_TTS_WEIGHTS, at the precision under test.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from service_helpers import REPO_ROOT, assert_audio_matches

pytestmark = pytest.mark.service

FAMILIES_DIR = REPO_ROOT.parent / "shared" / "parity" / "families"
JOB_TIMEOUT = 120
TEXTS = ["A family job.", "Another one, a little longer than the first."]


@pytest.mark.parametrize(
    "family, precision, batching",
    [("tiny_pointwise", "float32", False), ("tiny_drifting", "int8", True), ("legacy_2026_01", "bfloat16", False)],
)
def test_worker_serves_a_family(launch_worker, client_app, service_files, family, precision, batching):
    import soundfile as sf

    from pocket_tts.models.tts_model import TTSModel

    folder = FAMILIES_DIR / family
    if not folder.is_dir():
        pytest.skip(f"family fixtures not found in {FAMILIES_DIR}")
    voice = f"family_{family}.wav"
    shutil.copy(folder / "voice.wav", service_files.voices / voice)
    env = {
        "POCKET_TTS_CONFIG": str(folder / "config.yaml"),
        "POCKET_TTS_WEIGHTS": str(folder / "model.safetensors"),
        "POCKET_TTS_DEFAULT_VOICE": voice,
        "POCKET_TTS_PRECISION": precision,
    }
    args = ("--pool=threads", "-c", "2") if batching else ("-c", "1")
    if batching:
        env["POCKET_TTS_MAX_BATCH"] = "2"
    queue = f"family-{family}"
    launch_worker(queue, *args, env=env, queue=queue)
    results = [
        client_app.send_task("pocket_tts.synthesize", args=(text,), kwargs={"temperature": 0}, queue=queue)
        for text in TEXTS
    ]
    paths = [Path(result.get(timeout=JOB_TIMEOUT)) for result in results]

    model = TTSModel.load_model(config=folder / "config.yaml", weights=folder / "model.safetensors", precision=precision)
    state = model.get_state_for_audio_prompt(folder / "voice.wav")
    for text, path in zip(TEXTS, paths):
        expected = model.generate_audio(state, text, temp=0.0).numpy()
        if precision == "int8" and batching:
            # int8 activations are quantised per call, over all rows of the batch: not bit-equal to one stream.
            samples, rate = sf.read(str(path))
            assert rate == 24000 and samples.size > 0 and np.isfinite(samples).all()
        else:
            assert_audio_matches(path, expected)
