"""The command-line options `core.run` and `core.serve` share (model and backend, engine layout), defined once.

Both CLIs build an `argparse` parser whose errors are one line (`OneLineParser`), add these groups, and turn the
parsed options into an `EngineConfig` with `engine_config`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from core.engine.engine import EngineConfig
from core.errors import UserError

DTYPE_NAMES = ("bfloat16", "float32")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one-line UserErrors (printed by `run_cli`, exit status 2)."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}")


def parse_bytes(text: str, option: str) -> int:
    """'1073741824', '512MiB', '2G', '1.5GiB' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"{option}: expected a size in bytes such as 2147483648, 512MiB or 2GiB, got {text!r}")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 1:
        raise UserError(f"{option} must be at least 1 byte, got {text!r}")
    return value


def add_model_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--backend", help="backend name (see python -m core.run --list-backends); default: cpu on a "
                   "machine without an accelerator")
    p.add_argument("--model", type=Path, help="Hugging Face checkpoint directory (default: the embedded model)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES, help="working dtype")
    p.add_argument("--mtp", action="store_true", help="speculative decoding with the MTP module")
    p.add_argument("--strict", action="store_true", help="refuse a backend that leaves operators to cpu_ref")
    p.add_argument("--interpret", action="store_true", help="run Triton kernels on the CPU (Triton interpreter)")
    p.add_argument("--simulate", action="store_true", help="run a vendor library's emulation (CI without hardware)")
    p.add_argument("--no-check-weights", action="store_true", help="skip the check for NaN and infinite weights at "
                   "load")


def add_engine_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--block-size", type=int, help="cache positions per block (default: the backend's preferred; its "
                   "manifest lists the sizes it takes)")
    p.add_argument("--kv-cache-memory", help="latent-cache budget, e.g. 2GiB (default: half of the free device "
                   "memory, at most what --max-num-seqs full-length sequences need)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences running at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per forward pass (prefill "
                   "chunks fill what decodes leave)")
    p.add_argument("--max-model-len", type=int, help="prompt + output limit (default: max_position_embeddings)")


def resolve_backend(args: argparse.Namespace) -> None:
    """Fill in --backend when it was not given (core.registry.default_backend), keeping why in `backend_choice`."""
    from core import registry

    args.backend_choice = None
    if args.backend is None:
        args.backend, args.backend_choice = registry.default_backend()


def check_engine_options(args: argparse.Namespace) -> None:
    """Range checks in one line naming the option; turns --kv-cache-memory into bytes."""
    for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if isinstance(args.kv_cache_memory, str):
        args.kv_cache_memory = parse_bytes(args.kv_cache_memory, "--kv-cache-memory")


def engine_config(args: argparse.Namespace, token_budget: int | None = None) -> EngineConfig:
    """The EngineConfig of parsed options; `token_budget` (core.run's --prefill-chunk) caps tokens per step, and
    the running sequences with it (every running sequence's decode step must fit in one pass)."""
    width = 2 if args.mtp else 1
    budget, seqs = args.max_num_batched_tokens, args.max_num_seqs
    if token_budget is not None:
        if token_budget < width:
            raise UserError(f"--prefill-chunk must be >= {width} with{'' if args.mtp else 'out'} --mtp, "
                            f"got {token_budget}")
        budget, seqs = token_budget, min(seqs, token_budget // width)
    return EngineConfig(block_size=args.block_size, kv_cache_memory=args.kv_cache_memory, max_num_seqs=seqs,
                        max_num_batched_tokens=max(budget, seqs * width), max_model_len=args.max_model_len,
                        mtp=args.mtp)
