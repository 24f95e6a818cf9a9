"""Throughput of continuous batching in one process: audio seconds per wall second by batch size.

Builds (or reuses) the full-size English architecture with random weights (same cost as the
released model, no download; the output is noise, not speech), submits `batch` copies of a
medium text to a `BatchedSynthesizer` at once and times them until all are done.

    python scripts/benchmark_batching.py [--batch 1,4,8,16] [--precision float32,int8] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

TEXT = "The quick brown fox jumps over the lazy dog near the river bank, then rests in the shade."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1,4,8,16", help="comma-separated batch sizes (default 1,4,8,16)")
    parser.add_argument("--precision", default="float32,int8", help="comma-separated backbone precisions")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--checkpoint-dir", type=Path, help="reuse or write the random checkpoint here")
    args = parser.parse_args()
    os.environ["POCKET_TTS_NUM_THREADS"] = str(args.threads)  # read when the engine is imported

    import torch

    from pocket_tts.batching import BatchedSynthesizer
    from pocket_tts.models.tts_model import TTSModel
    from pocket_tts.random_checkpoint import write_random_checkpoint

    logging.getLogger("pocket_tts").setLevel(logging.ERROR)  # random weights never reach EOS
    folder = args.checkpoint_dir or Path(tempfile.mkdtemp(prefix="pocket-tts-bench-"))
    config = folder / "config.yaml"
    if not (config.is_file() and (folder / "model.safetensors").is_file()):
        print(f"writing a random full-size checkpoint to {folder}", file=sys.stderr)
        config = write_random_checkpoint(folder)

    print("| precision | batch | audio s | wall s | xRT (audio s / wall s) |\n| --- | --- | --- | --- | --- |")
    for precision in args.precision.split(","):
        model = TTSModel.load_model(config=config, eos_threshold=1e9, precision=precision)
        voice = model.get_state_for_audio_prompt(torch.zeros(1, 2 * model.sample_rate))
        for batch in (int(b) for b in args.batch.split(",")):
            synthesizer = BatchedSynthesizer(model, max_batch=batch)
            synthesizer.submit(voice, "Warm up.", temp=0.3).result()
            started = time.perf_counter()
            futures = [synthesizer.submit(voice, TEXT, temp=0.3) for _ in range(batch)]
            samples = sum(f.result().numel() for f in futures)
            wall = time.perf_counter() - started
            synthesizer.close()
            audio = samples / model.sample_rate
            print(f"| {precision} | {batch} | {audio:.1f} | {wall:.2f} | {audio / wall:.2f} |", flush=True)


if __name__ == "__main__":
    main()
