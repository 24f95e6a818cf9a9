#!/usr/bin/env python
"""Speed of our engine, and optionally of Kyutai's reference package, on one fixed utterance.

Both run the same checkpoint: the full-size architecture of a shipped model
(`--language`, default english) or of any config YAML (`--config`, e.g. one of
Kyutai's) with random weights (same cost as the released model, no download, no speech), at
temperature 0 with an unreachable EOS threshold, so every run produces the same
number of frames. Each (engine, thread count) runs in a fresh process.

    python scripts/benchmark_engine.py                         # ours, 1 and 2 threads
    python scripts/benchmark_engine.py --language english_7m_2026-10 --threads 1   # another shipped layout
    python scripts/benchmark_engine.py --kyutai-python /work/kyutai-venv/bin/python --kyutai-int8
    python scripts/benchmark_engine.py --config english_2m_2026-10.yaml --threads 1 --pin-cores --kyutai-python ...

xRT is audio seconds per wall second (higher is faster), "audio s per CPU s" the same per
second of this process's CPU time (what it gets with a core to itself); first chunk is the time
from the generation call to the first audio piece; CPU s/s is the process's CPU
time per wall second (below the thread count: it waited for a core); others CPU
s/s is what the rest of the machine used meanwhile (a shared machine's noise).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _bench_common as bench

# With no EOS a chunk lasts (tokens / 3 + 2) s, rounded up to a 12.5 Hz frame: the 34 tokens
# of this sentence in the random checkpoint's tokenizer give 167 frames, 13.36 s of audio.
UTTERANCE = "Every day we walk along the quiet river bank."


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        help="write the random checkpoint here, or reuse the config.yaml + model.safetensors found here "
        "(default: a temporary directory)",
    )
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument(
        "--language",
        type=bench.shipped_language,
        default="english",
        help="shipped model whose architecture the random checkpoint takes (default: english)",
    )
    layout.add_argument("--config", type=Path, help="config YAML whose architecture to take instead (any layout)")
    bench.add_run_options(parser, default_threads=[1, 2])
    parser.add_argument("--kyutai-python", help="interpreter that has Kyutai's pocket-tts; adds its runs")
    parser.add_argument("--kyutai-int8", action="store_true", help="also run Kyutai's int8 (quantize=True) model")
    parser.add_argument("--ours-int8", action="store_true", help="also run our engine with precision='int8'")
    parser.add_argument(
        "--pin-cores",
        action="store_true",
        help="restrict each process to as many CPUs as it has threads (Kyutai decodes in a second "
        "Python thread, which otherwise runs on another core)",
    )
    args = parser.parse_args()
    if args.kyutai_int8 and not args.kyutai_python:
        parser.error("--kyutai-int8 needs --kyutai-python")
    return args


def engines(args, config: Path, weights: Path, workdir: Path) -> list[dict]:
    """(label, interpreter, load_model arguments) of every engine to run."""
    fixed_length = {"temp": 0.0, "eos_threshold": bench.NEVER_EOS_THRESHOLD}
    ours_load = {"config": str(config), "weights": str(weights), **fixed_length}
    # Explicit precision: POCKET_TTS_PRECISION in the environment must not change the float32 row.
    result = [{"engine": "ours", "label": "ours float32", "python": sys.executable,
               "load": {**ours_load, "precision": "float32"}}]  # fmt: skip
    if args.ours_int8:
        result.append({"engine": "ours", "label": "ours int8", "python": sys.executable,
                       "load": {**ours_load, "precision": "int8"}})  # fmt: skip
    if args.kyutai_python:
        kyutai_load = {"config": str(bench.kyutai_config(config, weights, workdir)), **fixed_length}
        result.append(
            {"engine": "kyutai", "label": "kyutai float32", "python": args.kyutai_python, "load": kyutai_load}
        )
        if args.kyutai_int8:
            result.append({"engine": "kyutai", "label": "kyutai int8", "python": args.kyutai_python,
                           "load": {**kyutai_load, "quantize": True}})  # fmt: skip
    return result


def measure(args, workdir: Path) -> dict:
    config = bench.random_checkpoint(args.checkpoint_dir or workdir / "checkpoint", args.config or args.language)
    weights = config.parent / "model.safetensors"
    voice = bench.write_synthetic_voice(workdir / "voice.wav")
    results = []
    for threads in args.threads:
        for engine in engines(args, config, weights, workdir):
            bench.log(f"{engine['label']}, {threads} thread(s): fresh process ...")
            spec = {
                **{key: engine[key] for key in ("engine", "label", "load")},
                "threads": threads,
                "voice": str(voice),
                "warmup_text": bench.WARMUP_TEXT,
                "texts": [["utterance", UTTERANCE]],
                "iterations": args.iterations,
                "max_tokens": 50,
                "cpus": bench.first_cpus(threads) if args.pin_cores else None,
                "redo_disturbed": args.wait_idle,
            }
            worker = bench.run_worker(spec, python=engine["python"], cwd=workdir, wait_idle=args.wait_idle)
            results.append({"engine": engine["label"], "threads": threads, **bench.summarize(worker["runs"])})
    add_ratios(results)
    return {
        "machine": bench.machine_info(),
        "checkpoint": str(config),
        "language": str(args.config) if args.config else args.language,
        "text": UTTERANCE,
        "pinned_cores": args.pin_cores,
        "results": results,
    }


def add_ratios(results: list[dict]) -> None:
    """On each Kyutai row, ours over Kyutai at the same precision (our float32 where ours did not
    run in it): xRT ratio (>1: ours faster), the same per CPU second, and first-chunk ratio (<1: ours faster)."""
    ours = {(row["threads"], row["engine"]): row for row in results if row["engine"].startswith("ours")}
    for row in results:
        if row["engine"].startswith("kyutai"):
            precision = row["engine"].split()[1]
            mine = ours.get((row["threads"], f"ours {precision}")) or ours[(row["threads"], "ours float32")]
            row["xrt_ours_over_this"] = round(mine["rtf"] / row["rtf"], 2)
            row["cpu_xrt_ours_over_this"] = round(mine["audio_per_cpu_s"] / row["audio_per_cpu_s"], 2)
            row["first_chunk_ours_over_this"] = round(mine["first_chunk_s"] / row["first_chunk_s"], 2)


def print_table(report: dict) -> None:
    machine = report["machine"]
    pinned = "; each process pinned to <threads> cores" if report["pinned_cores"] else ""
    print(f"machine: {machine['cpu']}, {machine['cpus']} CPUs; {report['language']} layout, checkpoint: "
          f"{report['checkpoint']}{pinned}")  # fmt: skip
    headers = ["threads", "engine", "audio s", "wall s median (min-max)", "xRT", "audio s per CPU s", "first chunk s",
               "CPU s/s", "others CPU s/s", "xRT ours/this", "per CPU s ours/this", "first chunk ours/this"]  # fmt: skip
    rows = [
        [row["threads"], row["engine"], f"{row['audio_s']:.2f}", bench.wall_cell(row), f"{row['rtf']:.2f}",
         f"{row['audio_per_cpu_s']:.2f}", f"{row['first_chunk_s']:.3f}", *bench.cpu_cells(row),
         row.get("xrt_ours_over_this", ""), row.get("cpu_xrt_ours_over_this", ""), row.get("first_chunk_ours_over_this", "")]
        for row in report["results"]
    ]  # fmt: skip
    print(bench.format_table(headers, rows))
    if len({row["audio_s"] for row in report["results"]}) > 1:
        print("note: the engines produced different audio lengths; compare xRT, not wall time")


def main() -> int:
    return 0 if bench.run_and_report(parse_args(), measure, print_table) is not None else 1


if __name__ == "__main__":
    sys.exit(main())
