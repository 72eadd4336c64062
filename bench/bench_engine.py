"""Continuous batching against one-after-another, on the same requests in the same run.

    python bench/bench_engine.py [--backend cpu_ref] [--model DIR] [--dtype bfloat16] [--requests 64]
                                 [--input-len 8,64] [--output-len 32] [--concurrency 1,4,16,64] [--mtp]

The same requests (random prompts of lengths in --input-len, --output-len tokens each, greedy, EOS ignored) go
through the engine with --max-num-seqs = each concurrency; concurrency 1 is "one after another". Prints total
output tokens/s and its ratio to concurrency 1, time to first token and time per output token (median, p99), and
the latent cache actually used at peak against what the v1 cache (max_len reserved per sequence up front for the
whole batch) would have reserved for the same requests.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.engine.engine import EngineConfig  # noqa: E402
from core.engine.llm import LLM  # noqa: E402
from core.engine.sampling import SamplingParams  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))] if s else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cpu_ref")
    ap.add_argument("--model", type=Path)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--input-len", default="8,64", help="min,max prompt length")
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--mtp", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    lo, hi = (int(x) for x in args.input_len.split(","))
    levels = [int(x) for x in args.concurrency.split(",")]
    rng = random.Random(args.seed)
    llm = LLM(args.model, backend=args.backend, dtype=args.dtype,
              engine=EngineConfig(max_num_seqs=max(levels), max_num_batched_tokens=args.max_num_batched_tokens,
                                  mtp=args.mtp))
    vocab = llm.model.cfg.vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(args.requests)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    engine = llm.engine
    per_token = engine.bytes_per_token
    v1_reserved = len(prompts) * (max(len(p) for p in prompts) + args.output_len + 2) * per_token

    print(f"# {args.backend} on {llm.device}, {args.dtype}, {args.requests} requests, prompts {lo}-{hi} tokens, "
          f"{args.output_len} output tokens each{', MTP' if args.mtp else ''}; cache block {engine.block_size}")
    print(f"{'concurrency':>11} {'out tok/s':>10} {'vs 1':>6} {'TTFT med':>9} {'TTFT p99':>9} {'TPOT med':>9} "
          f"{'TPOT p99':>9} {'peak cache':>11} {'v1 reserve':>11}")
    base = None
    for c in levels:
        engine.scheduler.max_num_seqs = c
        engine.stats.peak_blocks_used = 0
        ids = [engine.add(p, params) for p in prompts]
        t0 = time.perf_counter()
        final = engine.run()
        wall = time.perf_counter() - t0
        outs = [final[i] for i in ids]
        tokens = sum(len(o.token_ids) for o in outs)
        tput = tokens / wall
        base = base or tput
        ttft = [o.time_to_first_token for o in outs]
        tpot = [(o.seconds - o.time_to_first_token) / (len(o.token_ids) - 1) for o in outs if len(o.token_ids) > 1]
        peak = engine.stats.peak_blocks_used * engine.block_size * per_token
        print(f"{c:>11} {tput:>10.1f} {tput / base:>5.2f}x {statistics.median(ttft):>8.3f}s "
              f"{percentile(ttft, 99):>8.3f}s {statistics.median(tpot) * 1e3:>7.1f}ms "
              f"{percentile(tpot, 99) * 1e3:>7.1f}ms {peak / 2 ** 20:>9.2f}Mi {v1_reserved / 2 ** 20:>9.2f}Mi")
        assert engine.pool.num_used == 0


if __name__ == "__main__":
    main()
