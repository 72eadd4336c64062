"""`python -m core.run`: load a checkpoint (or the embedded default) on a backend and generate.

    python -m core.run [--backend NAME] [--model DIR] [--dtype bfloat16|float32] [--prompt TEXT | --prompt-ids 1,2,3]
                       [--max-new-tokens N] [--temperature T] [--seed S] [--mtp] [--strict] [--interpret]
                       [--simulate] [--prefill-chunk N] [--json] [--logits-out FILE.safetensors] [--list-backends]
                       [--moe-combine all_reduce|all_to_all]
    torchrun --nproc-per-node N -m core.run ...      (tensor + expert parallel over N ranks; see core.parallel)

Bad input ends with one line on stderr naming what is wrong and exit status 2; set DSV3_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from core import registry
from core.backend import RunMode
from core.dispatch import Dispatch
from core.errors import ContractError, UserError
from core.parallel import launch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_PROMPT = "DeepSeek-V3 runs on every accelerator"


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m core.run", description="Generate with a DeepSeek-V3-class model.")
    p.add_argument("--backend", default="cpu_ref", help="backend name (see --list-backends)")
    p.add_argument("--model", type=Path, help="Hugging Face checkpoint directory (default: the embedded model)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", help="prompt text")
    g.add_argument("--prompt-ids", help="comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mtp", action="store_true", help="speculative decoding with the MTP module")
    p.add_argument("--strict", action="store_true", help="refuse a backend that leaves operators to cpu_ref")
    p.add_argument("--interpret", action="store_true", help="run Triton kernels on the CPU (Triton interpreter)")
    p.add_argument("--simulate", action="store_true", help="run a vendor library's emulation (CI without hardware)")
    p.add_argument("--prefill-chunk", type=int, help="prefill in chunks of N tokens")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--logits-out", type=Path, help="write float32 teacher-forced prompt logits [S, V] here")
    p.add_argument("--list-backends", action="store_true", help="list discovered backends and whether they run here")
    p.add_argument("--moe-combine", default="all_reduce", choices=["all_reduce", "all_to_all"],
                   help="under torchrun: combine routed experts by all_reduce of partial sums or all_to_all dispatch")
    args = p.parse_args(argv)
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 <= args.seed < 2 ** 63:
        raise UserError(f"--seed must be in [0, 2^63), got {args.seed}")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise UserError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    if args.logits_out is not None and args.logits_out.suffix != ".safetensors":
        raise UserError(f"--logits-out: {args.logits_out} must end in .safetensors")
    return args


def list_backends(mode: RunMode) -> str:
    lines = []
    for name, found in sorted(registry.discover().items()):
        try:
            avail = registry.load(name).probe(mode)
            state = f"available on {avail.device}" if avail.ok else f"unavailable: {avail.reason}"
        except (UserError, ContractError, ImportError) as e:
            state = f"broken: {e}"
        lines.append(f"{name:10s} {state}  [{found.origin}]")
    return "\n".join(lines)


def parse_prompt_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise UserError(f"--prompt-ids: expected comma-separated integers, got {text!r}") from None


def write_logits(path: Path, logits: torch.Tensor) -> None:
    """Write atomically: a temporary file in the same directory, renamed into place."""
    from safetensors.torch import save_file

    if not path.parent.is_dir():
        raise UserError(f"--logits-out: directory {path.parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    except OSError as e:
        raise UserError(f"--logits-out: cannot write in {path.parent} ({e.strerror or e})") from None
    os.close(fd)
    try:
        save_file({"logits": logits.contiguous().cpu()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = RunMode(interpret=args.interpret, simulate=args.simulate)
    if args.list_backends:
        print(list_backends(mode))
        return 0
    backend, avail = registry.activate(args.backend, mode)
    reference = registry.load(registry.REFERENCE)
    ops = Dispatch(backend, reference, strict=args.strict, numerics=avail.numerics)
    dtype = DTYPES[args.dtype]
    par = launch.from_environment(backend, avail.device, args.moe_combine, args.strict)  # one process: no-op
    try:
        return run(args, backend, avail, ops, dtype, par)
    finally:
        launch.shutdown()


def run(args: argparse.Namespace, backend, avail, ops, dtype, par) -> int:
    from core.default_model import load_default
    from core.model import Model

    t0 = time.perf_counter()
    source = load_default() if args.model is None else args.model
    progress = launch.load_progress(par)
    model = par.agree("loading", lambda: Model.load(source, ops, par.device, dtype, with_mtp=args.mtp, parallel=par,
                                                    progress=progress))
    if progress is not None:
        progress(f"done in {time.perf_counter() - t0:.1f} s")
        sys.stderr.write("\n")
    load_seconds = time.perf_counter() - t0
    return par.agree("generation", lambda: generate(args, backend, avail, ops, dtype, par, model, load_seconds))


def generate(args, backend, avail, ops, dtype, par, model, load_seconds: float) -> int:
    from core.generate import Generator
    from core.tokenizer import for_checkpoint

    cfg = model.cfg
    tokenizer = for_checkpoint(args.model, cfg.bos_token_id)
    if args.prompt_ids is not None:
        prompt_ids = parse_prompt_ids(args.prompt_ids)
    else:
        if tokenizer is None:
            raise UserError(f"--prompt: {args.model} has no tokenizer.json; pass --prompt-ids")
        prompt_ids = tokenizer.encode(args.prompt if args.prompt is not None else DEFAULT_PROMPT)

    gen = Generator(model, args.prefill_chunk)
    gen.check([prompt_ids], args.max_new_tokens)
    if args.logits_out is not None:
        logits = gen.teacher_forced_logits(prompt_ids)  # every rank: the forward pass is collective
        if par.is_first:
            write_logits(args.logits_out, logits)
    result = gen.generate([prompt_ids], args.max_new_tokens, args.temperature, args.seed, mtp=args.mtp,
                          stop_at_eos=not args.ignore_eos)
    output = result.output_ids[0]
    text = tokenizer.decode(output) if tokenizer is not None else None

    report = {
        "backend": backend.name,
        "device": str(par.device),
        "world_size": par.world_size,
        "communicator": par.comm.describe(),
        "moe_combine": args.moe_combine,
        "dtype": args.dtype,
        "model": str(args.model) if args.model else "embedded default",
        "dispatch": ops.table(),
        "prompt_ids": prompt_ids,
        "output_ids": output,
        "text": text,
        "prefill_tokens_per_s": round(result.prefill_tokens_per_s, 2),
        "decode_tokens_per_s": round(result.decode_tokens_per_s, 2),
        "load_seconds": round(load_seconds, 3),
        "latent_cache_bytes_per_token_per_layer": cfg.latent_width * torch.finfo(dtype).bits // 8,
        "interpret": args.interpret,
        "simulate": args.simulate,
        "notes": model.w.notes,
    }
    if args.mtp:
        report["mtp"] = {"proposed": result.mtp_proposed, "accepted": result.mtp_accepted,
                         "acceptance": round(result.mtp_accepted / result.mtp_proposed, 4)
                         if result.mtp_proposed else None}
    if args.logits_out is not None:
        report["logits_out"] = str(args.logits_out)

    print(f"backend {backend.name} on {par.device} ({args.dtype}); model: {report['model']}")
    print(ops.format_table())
    if par.world_size > 1:
        print(f"parallel: {par.comm.describe()}, MoE combine {args.moe_combine}")
    for note in model.w.notes:
        print(f"note: {note}")
    print(f"prompt: {len(prompt_ids)} tokens; generated {len(output)} tokens")
    print(f"output ids: {output}")
    if text is not None:
        print(f"text: {text!r}")
    line = f"prefill {result.prefill_tokens_per_s:.1f} tokens/s, decode {result.decode_tokens_per_s:.1f} tokens/s"
    if args.mtp:
        line += f", MTP accepted {result.mtp_accepted}/{result.mtp_proposed} drafts"
    print(line)
    if args.json:
        print(json.dumps(report))
    return 0


def run_cli(main_fn, argv: list[str] | None = None) -> int:
    """Run a CLI entry point: user errors become one line on stderr and exit status 2."""
    try:
        return main_fn(argv)
    except (UserError, ContractError) as e:
        if os.environ.get("DSV3_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run_cli(main))
