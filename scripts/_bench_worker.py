"""One benchmark process: load a model, warm up, time streamed generations, print JSON.

Run by `_bench_common.run_worker` as `python _bench_worker.py '<spec json>'`, with
our interpreter for our engine or Kyutai's for its reference package (both are
imported as `pocket_tts`). The spec holds: engine ("ours" or "kyutai"), label,
threads, load (keyword arguments of TTSModel.load_model), voice, warmup_text,
texts ([name, text] pairs), iterations, max_tokens, cpus (CPU ids to pin the
process to, or null) and redo_disturbed (repeat runs that other processes slowed).

stdout's last line is the result: {"torch_threads": n, "runs": [{text, audio_s,
wall_s, cpu_s, others_cpu_s, first_chunk_s}, ...]}; progress goes to stderr.
"""

import json
import logging
import os
import sys
import time

from _bench_common import DISTURBED_CPU_PER_WALL, log, machine_cpu_seconds, wait_for_idle_cpus

MAX_REDOS = 5


def timed_generation(model, voice_state, text: str, max_tokens: int) -> dict:
    """Consume one streamed generation; wall time and first-chunk latency from the call.

    CPU time covers all threads of this process: about 1 s per wall second for one
    thread that is never preempted. `others_cpu_s` is what the rest of the machine
    used meanwhile (None off Linux).
    """
    samples = 0
    first_chunk_s = None
    machine_before = machine_cpu_seconds()
    cpu_started = time.process_time()
    started = time.perf_counter()
    for chunk in model.generate_audio_stream(voice_state, text, max_tokens=max_tokens):
        if first_chunk_s is None:
            first_chunk_s = time.perf_counter() - started
        samples += chunk.shape[-1]
    wall_s = time.perf_counter() - started
    cpu_s = time.process_time() - cpu_started
    machine_after = machine_cpu_seconds()
    others_cpu_s = None if machine_before is None else max(0.0, machine_after[0] - machine_before[0] - cpu_s)
    return {
        "audio_s": samples / model.sample_rate,
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "others_cpu_s": others_cpu_s,
        "first_chunk_s": first_chunk_s,
    }


def undisturbed_generation(model, voice_state, text: str, spec: dict, where: str) -> dict:
    """A timed run; with redo_disturbed, repeated while other processes took CPU during it."""
    for _ in range(MAX_REDOS):
        run = timed_generation(model, voice_state, text, spec["max_tokens"])
        others = None if run["others_cpu_s"] is None else run["others_cpu_s"] / run["wall_s"]
        if not spec["redo_disturbed"] or others is None or others <= DISTURBED_CPU_PER_WALL:
            return run
        log(f"{where} other processes used {others:.2f} CPU s/s during the run: measuring it again")
        wait_for_idle_cpus(max_wait_s=120)
    return timed_generation(model, voice_state, text, spec["max_tokens"])


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec["cpus"]:
        os.sched_setaffinity(0, spec["cpus"])  # before torch starts any thread
    import torch

    # Our engine applies POCKET_TTS_NUM_THREADS (set by the parent) when this is first imported.
    from pocket_tts.models.tts_model import TTSModel

    if spec["engine"] == "kyutai":
        torch.set_num_threads(spec["threads"])
    # Random weights hit the length limit of every chunk, and both engines warn about it.
    logging.getLogger("pocket_tts").setLevel(logging.ERROR)

    where = f"[{spec['label']}, {spec['threads']} thread(s)]"
    model = TTSModel.load_model(**spec["load"])
    voice_state = model.get_state_for_audio_prompt(spec["voice"])
    timed_generation(model, voice_state, spec["warmup_text"], spec["max_tokens"])

    runs = []
    for name, text in spec["texts"]:
        for iteration in range(1, spec["iterations"] + 1):
            run = undisturbed_generation(model, voice_state, text, spec, where)
            runs.append({"text": name, **run})
            log(
                f"{where} {name} {iteration}/{spec['iterations']}: {run['audio_s']:.2f} s of audio "
                f"in {run['wall_s']:.2f} s ({run['cpu_s'] / run['wall_s']:.2f} CPU s/s), "
                f"first chunk {run['first_chunk_s']:.3f} s"
            )
    print(json.dumps({"torch_threads": torch.get_num_threads(), "runs": runs}))


if __name__ == "__main__":
    main()
