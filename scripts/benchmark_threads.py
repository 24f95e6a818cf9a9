#!/usr/bin/env python
"""How POCKET_TTS_NUM_THREADS changes the speed of one generation stream.

For each thread count a fresh process loads the model, warms up, then times
`--iterations` streamed generations of each text (short, medium, and a long text
of several sentences that is split into chunks).

    python scripts/benchmark_threads.py --random-weights       # full-size architecture, no download
    python scripts/benchmark_threads.py --language english     # released weights (hub or HF cache)
    python scripts/benchmark_threads.py --config small/config.yaml --weights small/model.safetensors \\
        --voice small/voice.wav --threads 1 --iterations 1 --json

RTF is audio seconds per wall second (higher is faster); first chunk is the time
from the generation call to the first audio piece; CPU s/s is the process's CPU
time per wall second (below the thread count: it waited for a core); others CPU
s/s is what the rest of the machine used meanwhile (a shared machine's noise). With random weights the
generation runs at temperature 0 with an unreachable EOS threshold, so the audio
length depends on the text only (it is not speech).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _bench_common as bench

# Audio lengths with random weights (random checkpoint tokenizer): about 5, 11 and 26 s, the
# long text in two chunks.
TEXTS = {
    "short": "Good morning.",
    "medium": "She sells sea shells by the sea shore.",
    "long": "Good morning. We walked along the river. The water was calm and cold. Then we went home.",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--language", help="a packaged model config (default: english, released weights)")
    model.add_argument("--config", type=Path, help="a model config .yaml")
    model.add_argument("--random-weights", action="store_true", help="full-size English architecture, random weights")
    parser.add_argument("--weights", type=Path, help="model .safetensors for --config")
    parser.add_argument("--checkpoint-dir", type=Path, help="with --random-weights: write or reuse the checkpoint here")
    parser.add_argument("--voice", help="voice name, audio file or voice state (default: alba, or a synthetic prompt)")
    parser.add_argument("--texts", default="short,medium,long", help=f"comma-separated subset of {', '.join(TEXTS)}")
    parser.add_argument("--temperature", type=float, help="default: 0 with random weights, else the model's")
    parser.add_argument(
        "--eos-threshold", type=float, help="default: unreachable with random weights, else the model's"
    )
    bench.add_run_options(parser, default_threads=[1, 2, 4])
    args = parser.parse_args()
    unknown = [name for name in args.texts.split(",") if name not in TEXTS]
    if unknown:
        parser.error(f"unknown text(s) {', '.join(unknown)}; choose from {', '.join(TEXTS)}")
    if args.checkpoint_dir and not args.random_weights:
        parser.error("--checkpoint-dir goes with --random-weights")
    return args


def model_spec(args, workdir: Path) -> tuple[dict, str, str]:
    """load_model arguments, voice, and a description of the model."""
    if args.random_weights:
        config = bench.random_checkpoint(args.checkpoint_dir or workdir / "checkpoint")
        load = {"config": str(config), "weights": str(config.parent / "model.safetensors"),
                "temp": 0.0, "eos_threshold": bench.NEVER_EOS_THRESHOLD}  # fmt: skip
        described = "full-size English architecture, random weights (not speech)"
    elif args.config:
        load = {"config": str(args.config.resolve()), "weights": str(args.weights.resolve()) if args.weights else None}
        described = f"config {args.config}"
    else:
        load = {
            "language": args.language or "english",
            "weights": str(args.weights.resolve()) if args.weights else None,
        }
        described = f"released {load['language']} model"
    if args.temperature is not None:
        load["temp"] = args.temperature
    if args.eos_threshold is not None:
        load["eos_threshold"] = args.eos_threshold
    voice = args.voice
    if voice is not None and Path(voice).exists():
        voice = str(Path(voice).resolve())  # the worker runs in a scratch directory
    elif voice is None:
        # Catalog voices only fit the released weights of a language.
        voice = "alba" if "language" in load else str(bench.write_synthetic_voice(workdir / "voice.wav"))
    return load, voice, described


def measure(args, workdir: Path) -> dict:
    load, voice, described = model_spec(args, workdir)
    texts = [[name, TEXTS[name]] for name in args.texts.split(",")]
    results = []
    for threads in args.threads:
        bench.log(f"{threads} thread(s): fresh process ...")
        spec = {"engine": "ours", "label": "ours", "threads": threads, "load": load, "voice": voice,
                "warmup_text": bench.WARMUP_TEXT, "texts": texts, "iterations": args.iterations,
                "max_tokens": 50, "cpus": None,
                "redo_disturbed": args.wait_idle}  # fmt: skip
        runs = bench.run_worker(spec, cwd=workdir, wait_idle=args.wait_idle)["runs"]
        for name, _ in texts:
            summary = bench.summarize([run for run in runs if run["text"] == name])
            results.append({"threads": threads, "text": name, **summary})
    return {"machine": bench.machine_info(), "model": described, "voice": voice, "results": results}


def print_table(report: dict) -> None:
    machine = report["machine"]
    print(f"machine: {machine['cpu']}, {machine['cpus']} CPUs; model: {report['model']}")
    headers = ["threads", "text", "audio s", "generation s median (min-max)", "RTF", "first chunk s", "CPU s/s",
               "others CPU s/s"]  # fmt: skip
    rows = [
        [row["threads"], row["text"], f"{row['audio_s']:.2f}", bench.wall_cell(row), f"{row['rtf']:.2f}",
         f"{row['first_chunk_s']:.3f}", *bench.cpu_cells(row)]
        for row in report["results"]
    ]  # fmt: skip
    print(bench.format_table(headers, rows))


def main() -> int:
    return 0 if bench.run_and_report(parse_args(), measure, print_table) is not None else 1


if __name__ == "__main__":
    sys.exit(main())
