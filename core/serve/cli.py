"""The command line of `python -m core.serve`: options, and the engine configuration they make.

    python -m core.serve [--backend NAME] [--model DIR] [--host 127.0.0.1] [--port 30000] [--api-key KEY]
                         [--served-model-name NAME] [--dtype bfloat16|float32] [--mtp] [--block-size N]
                         [--kv-cache-memory BYTES] [--max-num-seqs N] [--max-num-batched-tokens N]
                         [--max-model-len N] [--max-tokens-limit N] [--max-body-bytes N] [--shutdown-timeout S]
                         [--interpret] [--simulate] [--strict] [--log-level LEVEL]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from core.engine.engine import EngineConfig
from core.errors import UserError
from core.serve.app import DEFAULT_MAX_BODY_BYTES

DEFAULT_MODEL_NAME = "deepseek-v3-default"
_UNITS = {"": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}")


def parse_bytes(text: str, option: str) -> int:
    """'1073741824', '512MiB', '2G', '1.5GiB' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"{option}: expected a size in bytes such as 2147483648, 512MiB or 2GiB, got {text!r}")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 1:
        raise UserError(f"{option} must be at least 1 byte, got {text!r}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m core.serve",
                      description="Serve a DeepSeek-V3-class model over the OpenAI HTTP API.")
    p.add_argument("--backend", default="cpu_ref", help="backend name (python -m core.run --list-backends)")
    p.add_argument("--model", type=Path, help="Hugging Face checkpoint directory (default: the embedded model)")
    p.add_argument("--served-model-name", help="the model id clients send (default: --model as given, or "
                                               f"{DEFAULT_MODEL_NAME!r})")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/*")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--mtp", action="store_true", help="speculative decoding with the MTP module")
    p.add_argument("--block-size", type=int, help="cache positions per block (default: the backend's choice)")
    p.add_argument("--kv-cache-memory", help="bytes for the latent cache, e.g. 4GiB (default: a share of free memory)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences in the running batch at most")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per forward pass at most")
    p.add_argument("--max-model-len", type=int, help="prompt + output tokens at most (default: the model's)")
    p.add_argument("--max-tokens-limit", type=int, help="the largest max_tokens a request may ask for "
                                                         "(default: --max-model-len)")
    p.add_argument("--max-body-bytes", default=str(DEFAULT_MAX_BODY_BYTES),
                   help="the largest request body accepted (413 beyond it)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let in-flight requests finish before aborting them")
    p.add_argument("--strict", action="store_true", help="refuse a backend that leaves operators to cpu_ref")
    p.add_argument("--interpret", action="store_true", help="run Triton kernels on the CPU (Triton interpreter)")
    p.add_argument("--simulate", action="store_true", help="run a vendor library's emulation (CI without hardware)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {args.port}")
    for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "max_tokens_limit"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.shutdown_timeout < 0:
        raise UserError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.api_key is not None and not args.api_key:
        raise UserError("--api-key must not be empty")
    args.max_body_bytes = parse_bytes(args.max_body_bytes, "--max-body-bytes")
    args.kv_cache_memory = parse_bytes(args.kv_cache_memory, "--kv-cache-memory") \
        if args.kv_cache_memory is not None else None
    if args.served_model_name is None:
        args.served_model_name = str(args.model) if args.model is not None else DEFAULT_MODEL_NAME
    return args


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(block_size=args.block_size, kv_cache_memory=args.kv_cache_memory,
                        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        max_model_len=args.max_model_len, mtp=args.mtp)
