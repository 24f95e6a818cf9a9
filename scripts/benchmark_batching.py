"""Throughput of continuous batching in one process: audio seconds per wall second by batch size.

Builds (or reuses) the full-size architecture of a shipped model with random weights (same cost
as the released model, no download; the output is noise, not speech), submits `batch` copies of
a medium text to a `BatchedSynthesizer` at once and times them until all are done. Every
configuration (backbone precision x decoder precision x batch) runs once per round, in turn, so
that a burst of other work on a shared machine slows all of them; audio seconds per CPU second
of this process are given too (what the engine does with the core when it gets it).

    python scripts/benchmark_batching.py [--language english_18m_2026-10] [--batch 1,4,8,16]
        [--precision float32,int8] [--decoder-precision float32,bfloat16] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import _bench_common as bench
from run_local import default_cache_dir

TEXT = "The quick brown fox jumps over the lazy dog near the river bank, then rests in the shade."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--language", type=bench.shipped_language, default="english",
                        help="random weights in this shipped model's architecture (default english)")  # fmt: skip
    parser.add_argument("--batch", default="1,4,8,16", help="comma-separated batch sizes (default 1,4,8,16)")
    parser.add_argument("--precision", default="float32,int8", help="comma-separated backbone precisions")
    parser.add_argument("--decoder-precision", default="float32", help="comma-separated Mimi decoder precisions")
    parser.add_argument("--rounds", type=bench.positive_int, default=1, help="runs of every configuration (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--checkpoint-dir", type=Path, help="reuse or write the random checkpoint here")
    args = parser.parse_args()
    os.environ["POCKET_TTS_NUM_THREADS"] = str(args.threads)  # read when the engine is imported

    import torch

    from pocket_tts.batching import BatchedSynthesizer
    from pocket_tts.models.tts_model import TTSModel

    logging.getLogger("pocket_tts").setLevel(logging.ERROR)  # random weights never reach EOS
    config = bench.random_checkpoint(args.checkpoint_dir or default_cache_dir(args.language), args.language)
    batches = [int(b) for b in args.batch.split(",")]
    models = {}
    for precision in args.precision.split(","):
        for decoder in args.decoder_precision.split(","):
            model = TTSModel.load_model(config=config, eos_threshold=1e9, precision=precision, decoder_precision=decoder)
            voice = model.get_state_for_audio_prompt(torch.zeros(1, 2 * model.sample_rate))
            models[precision, decoder] = model, voice

    print(f"{args.language}, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f} at start", file=sys.stderr)
    print("| backbone | decoder | batch | audio s | wall s | xRT (audio s / wall s) | audio s per CPU s | load (1 min) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for _ in range(args.rounds):
        for (precision, decoder), (model, voice) in models.items():
            for batch in batches:
                synthesizer = BatchedSynthesizer(model, max_batch=batch)
                synthesizer.submit(voice, "Warm up.", temp=0.3).result()
                started, cpu_started = time.perf_counter(), time.process_time()
                futures = [synthesizer.submit(voice, TEXT, temp=0.3) for _ in range(batch)]
                samples = sum(f.result().numel() for f in futures)
                wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
                synthesizer.close()
                audio = samples / model.sample_rate
                print(f"| {precision} | {decoder} | {batch} | {audio:.1f} | {wall:.2f} | {audio / wall:.2f} | "
                      f"{audio / cpu:.2f} | {os.getloadavg()[0]:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
