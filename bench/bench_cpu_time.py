"""CPU seconds per decode step of our CPU backends, for a machine that others load: process time, not wall time.

    python bench/bench_cpu_time.py [--model DIR | --shape small|issue] [--dtype bfloat16|float32]
                                   [--backends cpu,cpu_ref] [--batches 1,8,32] [--steps 8] [--rounds 3]

On a shared 2-core machine wall-clock decode times swing with other users' load (and OpenMP threads wait on
descheduled siblings); the CPU time one thread spends is far steadier. So: one intra-op thread, every backend loaded
in this process, the same prompts (bench_cpu_peers' checkpoint and prompt rule), one prefill step then --steps decode
steps timed with time.process_time, backends alternating inside every round, medians printed with the ratio to the
first backend. Complements bench_cpu_peers.py (wall clock, peers in their own processes, prefill, peak memory).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from bench.bench_cpu_peers import SHAPES, build_checkpoint
    from core.engine.engine import EngineConfig
    from core.engine.llm import LLM
    from core.engine.sampling import SamplingParams

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--backends", default="cpu,cpu_ref")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    names, batches = args.backends.split(","), [int(b) for b in args.batches.split(",")]
    model = args.model or build_checkpoint(args.shape)
    config = EngineConfig(max_num_seqs=max(batches), max_num_batched_tokens=max(2048, max(batches) * args.prompt_len))
    engines = {n: LLM(model, backend=n, dtype=args.dtype, tokenizer=None, engine=config).engine for n in names}
    torch.set_num_threads(1)  # after loading: a backend's probe may set its own
    vocab = next(iter(engines.values())).model.cfg.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(max(batches))]

    def decode_step_seconds(engine, b: int, steps: int) -> float:
        engine.scheduler.max_num_seqs = b
        params = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
        for p in prompts[:b]:
            engine.add(p, params)
        engine.step()  # prefill: the whole batch in one step
        t0, n = time.process_time(), 0
        while engine.has_unfinished:
            engine.step()
            n += 1
        return (time.process_time() - t0) / n

    for engine in engines.values():
        decode_step_seconds(engine, 1, 2)  # warm-up
    seconds: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for b in batches:
            for n in names:
                seconds.setdefault((n, b), []).append(decode_step_seconds(engines[n], b, args.steps))
    print(f"# {model}, {args.dtype}, 1 thread, CPU ms per decode step (median of {args.rounds} rounds of "
          f"{args.steps} steps); ratio = this backend's time / {names[0]}'s")
    print(f"{'batch':>5} " + " ".join(f"{n + ' ms':>12} {'ratio':>6} {'tok/s':>7}" for n in names))
    for b in batches:
        base = statistics.median(seconds[(names[0], b)])
        cells = []
        for n in names:
            s = statistics.median(seconds[(n, b)])
            cells.append(f"{s * 1e3:>12.1f} {s / base:>5.2f}x {b / s:>7.1f}")
        print(f"{b:>5} " + " ".join(cells))


if __name__ == "__main__":
    main()
