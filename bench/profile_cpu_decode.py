"""Where a decode step's time goes: torch.profiler over decode steps of a backend, through the engine.

    python bench/profile_cpu_decode.py [--model DIR | --shape small|issue] [--backend cpu] [--dtype bfloat16]
                                       [--batch 32] [--prompt-len 32] [--steps 6] [--rows 20] [--shapes] [--threads N]

Loads the checkpoint (default: bench_cpu_peers' random one of --shape), prefills --batch prompts in one engine step,
then profiles --steps decode steps and prints the top operators by self CPU time (with --shapes: split by input
shapes, which tells the absorb matmuls apart from the other GEMMs) and the wall time per step.
"""

from __future__ import annotations

import argparse
import random
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
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--shapes", action="store_true", help="group the table by input shapes too")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: the backend's choice)")
    args = ap.parse_args()
    model = args.model or build_checkpoint(args.shape)
    llm = LLM(model, backend=args.backend, dtype=args.dtype, tokenizer=None,
              engine=EngineConfig(max_num_seqs=args.batch,
                                  max_num_batched_tokens=max(2048, args.batch * args.prompt_len)))
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = llm.engine
    rng = random.Random(0)
    vocab = llm.model.cfg.vocab_size

    def run(profile: bool) -> tuple[float, object]:
        params = SamplingParams(temperature=0.0, max_tokens=args.steps + 1, ignore_eos=True)
        for _ in range(args.batch):
            engine.add([rng.randrange(3, vocab) for _ in range(args.prompt_len)], params)
        engine.step()  # prefill
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=args.shapes)
        t0 = time.perf_counter()
        if profile:
            prof.__enter__()
        steps = 0
        while engine.has_unfinished:
            engine.step()
            steps += 1
        if profile:
            prof.__exit__(None, None, None)
        return (time.perf_counter() - t0) / steps, prof

    run(False)  # warm-up
    plain, _ = run(False)
    profiled, prof = run(True)
    print(f"# {args.backend} {args.dtype} batch {args.batch}: {plain * 1e3:.1f} ms per decode step "
          f"({args.batch / plain:.1f} tok/s); under the profiler {profiled * 1e3:.1f} ms; "
          f"{torch.get_num_threads()} threads")
    table = prof.key_averages(group_by_input_shape=args.shapes)
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=32,
                      max_shapes_column_width=60))


if __name__ == "__main__":
    main()
