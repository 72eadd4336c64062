"""MTP on the trained embedded default: draft acceptance under greedy decoding on held-out prompts, and the decode
speed-up it buys, against plain greedy decoding of the same prompts in the same run.

    python bench/bench_default_mtp.py [--backend cpu_ref] [--dtype bfloat16] [--prompts 8] [--prompt-tokens 32]
                                      [--new-tokens 64] [--threads N]

Prompts are the first --prompt-tokens tokens of held-out pieces (core/default_checkpoint/heldout.json: text the model
never trained on). Each prompt is decoded greedily with and without --mtp (EOS ignored); the MTP output must equal the
plain one (speculative decoding is exact under greedy), and a row whose outputs differ is marked. Decode time is the
Generator's own decode time (prefill excluded). Prints one row per prompt and a total.
"""

from __future__ import annotations

import argparse
import sys
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cpu_ref")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    directory = trained_dir()
    backend, avail = registry.activate(args.backend)
    ops = Dispatch(backend, registry.load(registry.REFERENCE), numerics=avail.numerics)
    model = Model.load(directory, ops, avail.device, DTYPES[args.dtype], with_mtp=True)
    pieces = [list(p[:args.prompt_tokens]) for p in held_out(directory).pieces if len(p) > args.prompt_tokens]
    step = max(1, len(pieces) // args.prompts)
    prompts = pieces[::step][:args.prompts]
    gen = Generator(model)
    gen.generate([prompts[0]], 4, stop_at_eos=False)  # warm-up
    print(f"trained default on {backend.name} ({args.dtype}), {len(prompts)} held-out prompts of "
          f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy")
    print(f"{'prompt':>6} {'proposed':>8} {'accepted':>8} {'rate':>6} {'plain tok/s':>11} {'mtp tok/s':>9} "
          f"{'speed-up':>8}  same")
    total = {"proposed": 0, "accepted": 0, "plain": 0.0, "mtp": 0.0}
    for i, prompt in enumerate(prompts):
        plain = gen.generate([prompt], args.new_tokens, stop_at_eos=False)
        spec = gen.generate([prompt], args.new_tokens, mtp=True, stop_at_eos=False)
        d_plain, d_mtp = max(plain.decode_seconds, 1e-9), max(spec.decode_seconds, 1e-9)
        n = plain.decode_tokens
        same = spec.output_ids == plain.output_ids
        rate = spec.mtp_accepted / max(spec.mtp_proposed, 1)
        print(f"{i:6d} {spec.mtp_proposed:8d} {spec.mtp_accepted:8d} {rate:6.2f} {n / d_plain:11.1f} "
              f"{n / d_mtp:9.1f} {d_plain / d_mtp:8.2f}  {'yes' if same else 'NO'}")
        total["proposed"] += spec.mtp_proposed
        total["accepted"] += spec.mtp_accepted
        total["plain"] += d_plain
        total["mtp"] += d_mtp
    n = len(prompts) * plain.decode_tokens
    print(f"{'total':>6} {total['proposed']:8d} {total['accepted']:8d} "
          f"{total['accepted'] / max(total['proposed'], 1):6.2f} {n / total['plain']:11.1f} {n / total['mtp']:9.1f} "
          f"{total['plain'] / total['mtp']:8.2f}")


if __name__ == "__main__":
    main()
