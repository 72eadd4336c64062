"""Where an MTP decode step's time goes on the trained embedded default, against a plain step, at batch 1:
the pieces timed alone over the same cached prompt, alternating, many times.

    python bench/bench_mtp_step.py [--backend cpu] [--dtype bfloat16] [--repeats 200] [--threads 1]

plain:   main model, S = 1, + lm_head + argmax (one plain greedy step)
verify:  main model, S = 2, + lm_head on both rows + argmax (the verify half of an MTP step)
draft1:  MTP layer, S = 1 (the draft after a rejected draft), + lm_head + argmax
draft2:  MTP layer, S = 2 (the draft after an accepted draft), + lm_head + argmax

An MTP step costs verify + draft and emits 1 + acceptance tokens, so with acceptance a the speed-up is at most
(1 + a) * plain / (verify + a * draft2 + (1 - a) * draft1); the table prints that bound for the measured costs.
Times are per-process CPU seconds (time.process_time: what this process ran, not what others did meanwhile); min
and median over --repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conformance.perplexity_checks import held_out  # noqa: E402
from core import registry  # noqa: E402
from core.dispatch import Dispatch  # noqa: E402
from core.embedded import trained_dir  # noqa: E402
from core.generate import Generator  # noqa: E402
from core.model import Model  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--acceptance", type=float, default=0.64, help="for the bound (default: the default's 0.64)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (0: the backend's own choice)")
    args = ap.parse_args()
    directory = trained_dir()
    backend, avail = registry.activate(args.backend)
    ops = Dispatch(backend, registry.load(registry.REFERENCE), numerics=avail.numerics)
    if args.threads:  # after activation: the cpu backend sets its own thread count when activated
        torch.set_num_threads(args.threads)
    model = Model.load(directory, ops, avail.device, DTYPES[args.dtype], with_mtp=True)
    prompt = next(list(p[:32]) for p in held_out(directory).pieces if len(p) > 32)
    gen = Generator(model)
    paging = gen.new_paging([prompt], 8)
    mtp_cache = model.new_cache(paging.pool.num_blocks, gen.block_size, mtp=True)
    paging.add_cache(mtp_cache)
    hidden = gen.prefill([prompt], paging)[0]
    n = len(prompt)
    a, b = prompt[-2], prompt[-1]

    def main_step(s: int) -> None:
        batch = gen._batch(paging, [0], [[a, b][:s]], [n], decode=True)
        model.logits(model.forward(batch, paging.caches[0])).argmax(dim=-1).tolist()

    def draft(s: int) -> None:
        batch = gen._batch(paging, [0], [[a, b][:s]], [n - s], decode=True, position_offset=1)
        g = model.mtp_forward(batch, hidden[-s:], mtp_cache)
        model.logits(g[-1:]).argmax(dim=-1).tolist()

    pieces = {"plain": lambda: main_step(1), "verify": lambda: main_step(2), "draft1": lambda: draft(1),
              "draft2": lambda: draft(2)}
    for f in pieces.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in pieces}
    for _ in range(args.repeats):
        for k, f in pieces.items():
            t = time.process_time()
            f()
            times[k].append(time.process_time() - t)
    print(f"trained default on {backend.name} ({args.dtype}), batch 1, {args.repeats} repeats, "
          f"{torch.get_num_threads()} thread(s); CPU ms per piece")
    print(f"{'piece':>7} {'min':>7} {'median':>7} {'x plain':>7}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:>7} {min(v) * 1e3:7.3f} {med[k] * 1e3:7.3f} {med[k] / med['plain']:7.2f}")
    acc = args.acceptance
    bound = (1 + acc) * med["plain"] / (med["verify"] + acc * med["draft2"] + (1 - acc) * med["draft1"])
    print(f"bound on the MTP speed-up at acceptance {acc:.2f} (medians): {bound:.2f}")


if __name__ == "__main__":
    main()
