#!/usr/bin/env python
"""Streaming through the HTTP gateway vs the engine in-process: time to first audio, throughput, errors.

    python scripts/benchmark_gateway.py                          # prefork: 1 idle worker, 1 client, TTFB
    python scripts/benchmark_gateway.py --mode batching --clients 16 --threads 2
    python scripts/benchmark_gateway.py --mode batching --clients 16 --workers 2 --precision int8 --decoder-precision bfloat16
    python scripts/benchmark_gateway.py --quick --parity-dir ../shared/parity   # small checkpoint: a smoke test

Starts a private redis-server, --workers workers (prefork `-c 1`, or batching `--pool=threads -c N` with
POCKET_TTS_MAX_BATCH=N) and one gateway (`python -m gateway`) on loopback, on the full-size
English architecture with random weights (scripts/run_local.py --random-weights writes it once;
its EOS never fires, so every job speaks its text's longest audio). Then, for --rounds rounds:

1. in-process: this process's engine, same checkpoint, voice and thread count as the worker,
   times `generate_audio_stream` to its first piece;
2. --clients concurrent `POST /tts` streams through the gateway (httpx), each timed from the
   request to its first audio byte (TTFB) and to its end, and with the start-up buffer a player
   needs so that it never runs out of audio before the next piece arrives.

Reports p50/p95 of both first-audio times, audio seconds per wall second of all streams, the
slowest stream's real-time factor, that buffer, errors, and the machine's CPU load during the
run (the machine may be shared: compare the two rows of one run, repeat, report ranges).
The random weights make noise, never speech; only the timings mean something.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading
import time
from pathlib import Path

import _bench_common as bench
import httpx
from run_local import RANDOM_VOICE, default_cache_dir, random_weights_checkpoint

from tasks import local_stack

WAV_HEADER_BYTES = 44
SAMPLE_RATE = 24000
# One chunk (< 50 tokens): with random weights it runs to its longest audio, 6.4 s here.
TEXT = "The gateway relays every piece of audio as soon as the worker makes it."


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("prefork", "batching"), default="prefork")
    parser.add_argument("--clients", type=bench.positive_int, default=1, help="concurrent streams per round (1)")
    parser.add_argument("--rounds", type=bench.positive_int, default=5, help="rounds (5)")
    parser.add_argument("--threads", type=bench.positive_int, default=1, help="torch threads of each worker (1)")
    parser.add_argument(
        "--workers", type=bench.positive_int, default=1,
        help="worker processes (1); batching: each takes up to ceil(clients / workers) streams in its batch",
    )  # fmt: skip
    parser.add_argument("--precision", default="float32", help="POCKET_TTS_PRECISION of both sides (float32)")
    parser.add_argument(
        "--decoder-precision", default="float32", help="POCKET_TTS_DECODER_PRECISION of both sides (float32)"
    )
    parser.add_argument("--text", default=TEXT)
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="the random checkpoint's folder")
    parser.add_argument("--quick", action="store_true", help="the small --parity-dir checkpoint, 2 rounds: a smoke test")
    parser.add_argument("--parity-dir", type=Path, default=Path("../shared/parity"), help="with --quick")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser.parse_args()


def checkpoint_settings(args: argparse.Namespace) -> dict[str, str]:
    if args.quick:
        parity = args.parity_dir.resolve()
        config, weights, voices, voice = parity / "config.yaml", parity / "model.safetensors", parity, "voice_24k.wav"
    else:
        folder = random_weights_checkpoint(args.cache_dir)
        config, weights, voices, voice = folder / "config.yaml", "", folder, RANDOM_VOICE
    return {
        "POCKET_TTS_CONFIG": str(config),
        "POCKET_TTS_WEIGHTS": str(weights),
        "POCKET_TTS_VOICES_DIR": str(voices),
        "POCKET_TTS_DEFAULT_VOICE": voice,
        "POCKET_TTS_PRECISION": args.precision,
        "POCKET_TTS_DECODER_PRECISION": args.decoder_precision,
    }


def in_process_first_chunk(settings: dict[str, str], text: str, threads: int):
    """A function timing the engine's first streamed piece in this process (loaded once)."""
    import torch

    from pocket_tts.models.tts_model import TTSModel

    torch.set_num_threads(threads)
    model = TTSModel.load_model(
        config=settings["POCKET_TTS_CONFIG"], weights=settings["POCKET_TTS_WEIGHTS"] or None, precision=settings["POCKET_TTS_PRECISION"],
        decoder_precision=settings["POCKET_TTS_DECODER_PRECISION"],
    )
    voice = model.get_state_for_audio_prompt(str(Path(settings["POCKET_TTS_VOICES_DIR"]) / settings["POCKET_TTS_DEFAULT_VOICE"]))
    model.generate_audio(voice, "Warm up.")

    def measure() -> float:
        started = time.perf_counter()
        stream = model.generate_audio_stream(voice, text)
        next(stream)
        elapsed = time.perf_counter() - started
        stream.close()
        return elapsed

    return measure


def stream_once(client: httpx.Client, url: str, text: str) -> dict:
    """One /tts stream: first audio byte, end, and the worst shortfall of a player started at the first byte.

    `client` is made beforehand (as a web app keeps one): building one costs tens of ms.
    """
    started = time.perf_counter()
    first = None
    received = 0
    shortfall = 0.0
    try:
        with client.stream("POST", f"{url}/tts", data={"text": text}, timeout=120) as response:
            if response.status_code != 200:
                return {"error": f"HTTP {response.status_code}: {response.read().decode(errors='replace')[:200]}"}
            for chunk in response.iter_raw():
                now = time.perf_counter()
                audio_before = max(0, received - WAV_HEADER_BYTES) / 2 / SAMPLE_RATE
                received += len(chunk)
                if first is None and received > WAV_HEADER_BYTES:
                    first = now
                elif first is not None:
                    shortfall = max(shortfall, (now - first) - audio_before)
    except httpx.HTTPError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    ended = time.perf_counter()
    audio_s = max(0, received - WAV_HEADER_BYTES) / 2 / SAMPLE_RATE
    if first is None:
        return {"error": "no audio"}
    return {"ttfb_s": first - started, "wall_s": ended - started, "audio_s": audio_s, "shortfall_s": shortfall}


def stop_after_disconnect(client: httpx.Client, url: str, text: str, app) -> tuple[float, str]:
    """Read a stream's first audio, disconnect; (seconds until the job ended, its final state)."""
    with client.stream("POST", f"{url}/tts", data={"text": text}, timeout=120) as response:
        job_id = response.headers["x-job-id"]
        next(response.iter_raw())
    left = time.perf_counter()
    while (state := app.AsyncResult(job_id).state) not in ("REVOKED", "SUCCESS", "FAILURE"):
        time.sleep(0.005)
    return time.perf_counter() - left, state


def concurrent_streams(clients: list[httpx.Client], url: str, text: str) -> tuple[list[dict], float]:
    results: list[dict] = [{} for _ in clients]
    barrier = threading.Barrier(len(clients))

    def run(index: int) -> None:
        barrier.wait()
        results[index] = stream_once(clients[index], url, text)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clients))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def measure(args: argparse.Namespace, workdir: Path) -> dict:
    settings = checkpoint_settings(args)
    bench.log("loading the engine in this process ...")
    first_chunk = in_process_first_chunk(settings, args.text, args.threads)
    (workdir / "audio").mkdir(exist_ok=True)  # workers refuse a missing storage root
    worker_settings = {**settings, "POCKET_TTS_NUM_THREADS": str(args.threads), "POCKET_TTS_STORAGE_DIR": str(workdir / "audio")}
    worker_args = ["-c", "1"]
    pool = "prefork"
    if args.mode == "batching":
        per_worker = max(2, -(-args.clients // args.workers))
        worker_settings["POCKET_TTS_MAX_BATCH"] = str(per_worker)
        worker_args, pool = ["-c", str(per_worker)], "threads"
    in_process, ttfb, rounds, stops = [], [], [], []
    with local_stack.redis_server() as redis:
        broker = f"{redis.url}/0"
        env = local_stack.worker_env(broker, worker_settings)
        app = local_stack.client_app(broker)
        bench.log(f"starting {args.workers} {args.mode} worker(s) and the gateway ...")
        with contextlib.ExitStack() as stack:
            workers = [
                stack.enter_context(local_stack.running_worker(
                    app, env, workdir / f"worker{i}.log", f"bench{i}", *worker_args, pool=pool
                ))  # fmt: skip
                for i in range(args.workers)
            ]
            gateway = stack.enter_context(local_stack.running_gateway(env, workdir / "gateway.log"))
            for worker in workers:
                worker.wait_children_ready(app)
            clients = [httpx.Client() for _ in range(args.clients)]
            concurrent_streams(clients, gateway.url, "Warm up.")
            load_before = bench.machine_cpu_seconds()
            for index in range(args.rounds):
                in_process.append(first_chunk())
                results, wall = concurrent_streams(clients, gateway.url, args.text)
                rounds.append({"results": results, "wall_s": wall})
                # Long enough to be still generating when the client leaves, on any checkpoint.
                stops.append(stop_after_disconnect(clients[0], gateway.url, " ".join([args.text] * 8), app))
                round_ttfb = [r["ttfb_s"] for r in results if "ttfb_s" in r]
                ttfb += round_ttfb
                worst = f"{max(round_ttfb) * 1000:.0f} ms" if round_ttfb else "no audio"
                bench.log(f"round {index + 1}/{args.rounds}: in-process first chunk {in_process[-1] * 1000:.0f} ms, "
                          f"gateway first audio byte (slowest of {args.clients}) {worst}")  # fmt: skip
            load_after = bench.machine_cpu_seconds()
            for client in clients:
                client.close()
            log_tails = {"gateway": gateway.log_tail(1500), **{f"worker{i}": w.log_tail(1500) for i, w in enumerate(workers)}}
    streams = [r for round_ in rounds for r in round_["results"]]
    ok = [r for r in streams if "error" not in r]
    busy = None
    if load_before and load_after:
        busy = (load_after[0] - load_before[0]) / max(1e-9, load_after[1] - load_before[1])
    return {
        "mode": args.mode,
        "clients": args.clients,
        "rounds": args.rounds,
        "threads": args.threads,
        "workers": args.workers,
        "precision": args.precision,
        "checkpoint": "parity (small)" if args.quick else "full-size random",
        "in_process_first_chunk_ms": _quantiles(in_process),
        "gateway_ttfb_ms": _quantiles(ttfb),
        "gateway_ttfb_max_ms": round(max(ttfb) * 1000, 1) if ttfb else None,
        "audio_s_per_wall_s": round(sum(r["audio_s"] for r in ok) / sum(r["wall_s"] for r in rounds), 2),
        "slowest_stream_rtf": round(min(r["audio_s"] / (r["wall_s"] - r["ttfb_s"]) for r in ok), 2) if ok else None,
        # The start-up buffer a player needs so that no stream ever runs dry (0: none).
        "player_buffer_needed_ms": round(max((r["shortfall_s"] for r in ok), default=0) * 1000, 1),
        "errors": [r["error"] for r in streams if "error" in r],
        # A client that disconnects after its first audio: how long until its job ended (REVOKED).
        "disconnect_stop_ms": [round(seconds * 1000, 1) for seconds, _ in stops],
        "disconnect_final_states": sorted({state for _, state in stops}),
        "log_tails": log_tails if any("error" in r for r in streams) else None,
        "streams": len(streams),
        "machine_cpu_busy": None if busy is None else round(busy, 2),
        "machine": bench.machine_info(),
    }


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {}
    return {"p50": round(statistics.median(values) * 1000, 1), "p95": round(percentile(values, 95) * 1000, 1)}


def print_table(report: dict) -> None:
    print(
        f"{report['workers']} {report['mode']} worker(s) x {report['threads']} thread(s), {report['precision']}, {report['checkpoint']}; "
        f"{report['clients']} concurrent stream(s) x {report['rounds']} rounds; machine CPU busy "
        f"{report['machine_cpu_busy']:.0%} of {report['machine']['cpus']} CPUs during the run"
    )
    rows = [
        ["in-process first chunk", report["in_process_first_chunk_ms"].get("p50"), report["in_process_first_chunk_ms"].get("p95"), "-", "-", "-", "-", "-"],
        [
            "gateway first audio byte",
            report["gateway_ttfb_ms"].get("p50"),
            report["gateway_ttfb_ms"].get("p95"),
            report["gateway_ttfb_max_ms"],
            report["audio_s_per_wall_s"],
            report["slowest_stream_rtf"],
            report["player_buffer_needed_ms"],
            f"{len(report['errors'])} errors of {report['streams']}",
        ],
    ]  # fmt: skip
    headers = ["path", "p50 ms", "p95 ms", "max ms", "audio s / wall s", "slowest stream xRT", "buffer needed ms", "streams"]
    print(bench.format_table(headers, [[("-" if c is None else c) for c in row] for row in rows]))
    print(
        f"client disconnected after its first audio: job ended {report['disconnect_final_states']} "
        f"{min(report['disconnect_stop_ms']):.0f}-{max(report['disconnect_stop_ms']):.0f} ms later"
    )
    for error in report["errors"][:5]:
        print(f"error: {error}")
    for name, tail in (report["log_tails"] or {}).items():
        print(f"--- last lines of the {name} log:\n{tail}")


def main() -> int:
    args = parse_args()
    if args.quick:
        args.rounds = min(args.rounds, 2)
    report = bench.run_and_report(args, measure, print_table, errors=(bench.BenchError, local_stack.StackError, OSError))
    return 0 if report is not None and not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
