"""The command line of `python -m core.serve`: options, and the engine configuration they make.

    python -m core.serve [--backend NAME] [--model DIR] [--host 127.0.0.1] [--port 30000] [--api-key KEY]
                         [--served-model-name NAME] [--dtype bfloat16|float32] [--mtp] [--block-size N]
                         [--kv-cache-memory BYTES] [--max-num-seqs N] [--max-num-batched-tokens N]
                         [--max-model-len N] [--max-tokens-limit N] [--max-body-bytes N] [--shutdown-timeout S]
                         [--interpret] [--simulate] [--strict] [--log-level LEVEL] [--moe-combine MODE]
    torchrun --nproc-per-node N -m core.serve [...]      # rank 0 serves HTTP and drives the others (core.serve.ranks)
"""

from __future__ import annotations

import argparse

from core.engine.options import (OneLineParser, add_engine_options, add_model_options,  # noqa: F401
                                 check_engine_options, engine_config, parse_bytes, resolve_backend)
from core.errors import UserError
from core.serve.app import DEFAULT_MAX_BODY_BYTES

DEFAULT_MODEL_NAME = "deepseek-v3-default"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m core.serve",
                      description="Serve a DeepSeek-V3-class model over the OpenAI HTTP API.")
    add_model_options(p)
    p.add_argument("--served-model-name", help="the model id clients send (default: --model as given, or "
                                               f"{DEFAULT_MODEL_NAME!r})")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/*")
    add_engine_options(p)
    p.add_argument("--max-tokens-limit", type=int, help="the largest max_tokens a request may ask for "
                                                         "(default: --max-model-len)")
    p.add_argument("--max-body-bytes", default=str(DEFAULT_MAX_BODY_BYTES),
                   help="the largest request body accepted (413 beyond it)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let in-flight requests finish before aborting them")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--moe-combine", default="all_reduce", choices=["all_reduce", "all_to_all"],
                   help="under torchrun: combine routed experts by all_reduce of partial sums or all_to_all dispatch")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {args.port}")
    check_engine_options(args)
    resolve_backend(args)
    if args.max_tokens_limit is not None and args.max_tokens_limit < 1:
        raise UserError(f"--max-tokens-limit must be >= 1, got {args.max_tokens_limit}")
    if args.shutdown_timeout < 0:
        raise UserError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.api_key is not None and not args.api_key:
        raise UserError("--api-key must not be empty")
    args.max_body_bytes = parse_bytes(args.max_body_bytes, "--max-body-bytes")
    if args.served_model_name is None:
        args.served_model_name = str(args.model) if args.model is not None else DEFAULT_MODEL_NAME
    return args
