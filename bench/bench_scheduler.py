"""The scheduler's own cost per step (schedule + update, no model), so it can be set against a forward pass.

    python bench/bench_scheduler.py [--requests 16,64,256] [--prompt 512] [--new 128] [--blocks 0] [--mtp]

Each row submits N requests at once (prompt length and output length drawn up to the given maxima) and runs them
to completion with a runner that returns a random token (and a draft accepted half the time with --mtp). Reported:
steps, tokens per step, microseconds of scheduler time per step (median and p99), preemptions. `--blocks` sets the
cache size in 16-position blocks (0: room for every request at once).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.engine.blocks import BlockPool, blocks_for  # noqa: E402
from core.engine.request import Request  # noqa: E402
from core.engine.scheduler import Scheduler, StepPlan, StepResult  # noqa: E402

BLOCK = 16


def fake_results(plan: StepPlan, k: int, rng: random.Random) -> dict[str, StepResult]:
    out = {}
    for seq in plan.seqs:
        if not seq.samples:
            continue
        drafts = seq.token_ids[1:] if seq.decode else []
        accepted = sum(1 for _ in iter(lambda: rng.random() < 0.5, False))
        emitted = drafts[:min(accepted, len(drafts))] + [rng.randrange(1, 1000)]
        out[seq.request_id] = StepResult(emitted, [rng.randrange(1, 1000) for _ in range(k)])
    return out


def run(n: int, prompt: int, new: int, blocks: int, k: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    reqs = [Request(f"r{i}", [rng.randrange(1, 1000) for _ in range(rng.randint(1, prompt))], rng.randint(1, new))
            for i in range(n)]
    need = sum(blocks_for(len(r.prompt_token_ids) + r.max_tokens + k, BLOCK) for r in reqs)
    sched = Scheduler(BlockPool(blocks or need, BLOCK), max_num_batched_tokens=max(2048, n * (1 + k)),
                      max_num_seqs=n, num_spec_tokens=k)
    for r in reqs:
        sched.add(r)
    times, tokens, preempted = [], 0, 0
    while sched.has_unfinished:
        t0 = time.perf_counter()
        plan = sched.schedule()
        t1 = time.perf_counter()
        results = fake_results(plan, k, rng)
        t2 = time.perf_counter()
        sched.update(plan, results)
        times.append((t1 - t0) + (time.perf_counter() - t2))
        tokens += plan.num_tokens
        preempted += len(plan.preempted)
    times.sort()
    return {"requests": n, "steps": len(times), "tokens/step": tokens / len(times),
            "median_us": statistics.median(times) * 1e6, "p99_us": times[int(0.99 * (len(times) - 1))] * 1e6,
            "preemptions": preempted}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", default="16,64,256", help="comma-separated numbers of concurrent requests")
    ap.add_argument("--prompt", type=int, default=512, help="longest prompt (tokens)")
    ap.add_argument("--new", type=int, default=128, help="most output tokens per request")
    ap.add_argument("--blocks", type=int, default=0, help="cache blocks of 16 positions (0: room for all)")
    ap.add_argument("--mtp", action="store_true", help="one MTP draft per decode (verify steps of S = 2)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cols = ["requests", "steps", "tokens/step", "median_us", "p99_us", "preemptions"]
    print(" | ".join(f"{c:>11}" for c in cols))
    for n in (int(x) for x in args.requests.split(",")):
        row = run(n, args.prompt, args.new, args.blocks, 1 if args.mtp else 0, args.seed)
        print(" | ".join(f"{row[c]:>11.1f}" if isinstance(row[c], float) else f"{row[c]:>11}" for c in cols))


if __name__ == "__main__":
    main()
