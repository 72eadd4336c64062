"""MTP on the trained embedded default: draft acceptance under greedy decoding on held-out prompts, and the decode
speed-up it buys, against plain greedy decoding of the same prompts in the same process.

    python bench/bench_default_mtp.py [--backend cpu] [--dtype bfloat16] [--path generator|engine|both]
                                      [--batch 1,8] [--prompts 8] [--prompt-tokens 32] [--new-tokens 64]
                                      [--rounds 5] [--threads 1]

Prompts are the first --prompt-tokens tokens of held-out pieces (core/default_checkpoint/heldout.json: text the model
never trained on). Every round decodes every prompt greedily (EOS ignored) once without and once with MTP,
alternating which goes first, in batches of --batch prompts, through `core.generate.Generator` (what the tests use)
and/or `core.engine` (what `python -m core.run --mtp` runs). The MTP output must equal the plain one (speculative
decoding is exact under greedy); a mismatch is reported. Decode time excludes prefill (Generator: its own decode
timer; engine: the end of the run minus its first token).

On a shared machine single timings swing by 2x or more, so the table gives per-round figures as medians over the
rounds: plain and MTP tokens/s (total decode tokens / total decode seconds of a round), the speed-up as the median of
the rounds' ratios (each round times both modes over the same prompts, interleaved), and the speed-up of the best
round of each mode ("best", the least disturbed timings). One intra-op thread by default (steadier).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
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


@dataclass
class Run:
    """One batch decoded once: its outputs, decode tokens and seconds, drafts proposed and accepted."""

    outputs: list[list[int]]
    tokens: int
    seconds: float
    proposed: int = 0
    accepted: int = 0


class GeneratorPath:
    def __init__(self, model: Model):
        self.gen = Generator(model)

    def run(self, prompts: list[list[int]], new_tokens: int, mtp: bool) -> Run:
        r = self.gen.generate(prompts, new_tokens, mtp=mtp, stop_at_eos=False)
        return Run(r.output_ids, r.decode_tokens, r.decode_seconds, r.mtp_proposed, r.mtp_accepted)


class EnginePath:
    """Two engines over the same model (one with an MTP cache), as `core.run` builds them."""

    def __init__(self, model: Model, max_seqs: int, max_positions: int):
        from core.engine.engine import Engine, EngineConfig

        self.engines = {m: Engine(model, None, EngineConfig(mtp=m, max_num_seqs=max_seqs,
                                                           max_cache_positions=max_positions)) for m in (False, True)}

    def run(self, prompts: list[list[int]], new_tokens: int, mtp: bool) -> Run:
        from core.engine.sampling import SamplingParams

        engine = self.engines[mtp]
        before = (engine.stats.drafts_proposed, engine.stats.drafts_accepted)
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        ids = [engine.add(p, params) for p in prompts]
        start, first, final = time.perf_counter(), None, {}
        while engine.has_unfinished:
            for out in engine.step():
                if first is None and out.new_token_ids:
                    first = time.perf_counter()
                if out.finished:
                    final[out.request_id] = out
        end = time.perf_counter()
        outputs = [final[i].token_ids for i in ids]
        return Run(outputs, sum(max(len(o) - 1, 0) for o in outputs), end - (first or start),
                   engine.stats.drafts_proposed - before[0], engine.stats.drafts_accepted - before[1])


@dataclass
class Tally:
    plain_tps: list[float] = field(default_factory=list)
    mtp_tps: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    proposed: int = 0
    accepted: int = 0
    mismatches: int = 0


def measure(path, prompts: list[list[int]], batch: int, new_tokens: int, rounds: int) -> Tally:
    groups = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    tally = Tally()
    for r in range(rounds):
        secs = {False: 0.0, True: 0.0}
        toks = {False: 0, True: 0}
        for g in groups:
            order = (False, True) if r % 2 == 0 else (True, False)
            runs = {m: path.run(g, new_tokens, m) for m in order}
            for m, run in runs.items():
                secs[m] += max(run.seconds, 1e-9)
                toks[m] += run.tokens
            tally.proposed += runs[True].proposed
            tally.accepted += runs[True].accepted
            tally.mismatches += sum(a != b for a, b in zip(runs[True].outputs, runs[False].outputs))
        tally.plain_tps.append(toks[False] / secs[False])
        tally.mtp_tps.append(toks[True] / secs[True])
        tally.ratios.append(tally.mtp_tps[-1] / tally.plain_tps[-1])
    return tally


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--path", default="both", choices=("generator", "engine", "both"))
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (0: the backend's own choice)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    directory = trained_dir()
    backend, avail = registry.activate(args.backend)
    ops = Dispatch(backend, registry.load(registry.REFERENCE), numerics=avail.numerics)
    if args.threads:  # after activation: the cpu backend sets its own thread count (tuning.yaml) when activated
        torch.set_num_threads(args.threads)
    model = Model.load(directory, ops, avail.device, DTYPES[args.dtype], with_mtp=True)
    pieces = [list(p[:args.prompt_tokens]) for p in held_out(directory).pieces if len(p) > args.prompt_tokens]
    step = max(1, len(pieces) // args.prompts)
    prompts = pieces[::step][:args.prompts]
    paths = {}
    if args.path in ("generator", "both"):
        paths["generator"] = GeneratorPath(model)
    if args.path in ("engine", "both"):
        paths["engine"] = EnginePath(model, max(batches), max(batches) * (args.prompt_tokens + args.new_tokens + 2))
    for path in paths.values():  # warm-up: first calls allocate and pick kernels
        for m in (False, True):
            path.run(prompts[:1], 4, m)
    print(f"trained default on {backend.name} ({args.dtype}), {len(prompts)} held-out prompts of {args.prompt_tokens} "
          f"tokens, {args.new_tokens} new tokens, greedy, {args.rounds} rounds, {torch.get_num_threads()} thread(s)")
    print(f"{'path':>9} {'batch':>5} {'accept':>6} {'plain tok/s':>11} {'mtp tok/s':>9} {'speed-up':>8} "
          f"{'best':>6} {'rounds (speed-up)':<30} same")
    for name, path in paths.items():
        for batch in batches:
            t = measure(path, prompts, batch, args.new_tokens, args.rounds)
            best = max(t.mtp_tps) / max(t.plain_tps)
            per_round = " ".join(f"{x:.2f}" for x in t.ratios)
            print(f"{name:>9} {batch:5d} {t.accepted / max(t.proposed, 1):6.2f} {statistics.median(t.plain_tps):11.1f} "
                  f"{statistics.median(t.mtp_tps):9.1f} {statistics.median(t.ratios):8.2f} {best:6.2f} "
                  f"{per_round:<30} {'yes' if not t.mismatches else f'NO ({t.mismatches} outputs differ)'}",
                  flush=True)


if __name__ == "__main__":
    main()
