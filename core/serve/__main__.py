"""`python -m core.serve`: load the model (core.engine.llm.LLM), start the engine thread and serve HTTP with uvicorn.
Options: core.serve.cli. Bad input ends with one line on stderr and exit status 2. SIGTERM: stop accepting
connections, let in-flight requests finish for up to --shutdown-timeout seconds, abort the rest (their cache blocks
are freed), stop the engine thread, exit 0 (core.serve.server).

Under torchrun (WORLD_SIZE > 1) rank 0 is to serve HTTP and drive the other ranks through an engine that has the
`core.serve.engine_loop.ServingEngine` interface; that engine belongs to the parallelism layer (core.parallel)."""

from __future__ import annotations

import logging
import os
import signal
import sys

from core.errors import UserError


def main(argv: list[str] | None = None) -> int:
    from core.engine.llm import LLM
    from core.serve.app import build_app
    from core.serve.cli import engine_config, parse_args
    from core.serve.engine_loop import EngineLoop
    from core.serve.generation import ServedModel
    from core.serve.metrics import ServerMetrics
    from core.serve.server import make_server

    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("python -m core.serve under torchrun needs the multi-rank engine of core.parallel, which "
                        "this build does not have yet; run it as one process")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    log = logging.getLogger("core.serve")
    llm = LLM(args.model, backend=args.backend, dtype=args.dtype, strict=args.strict, interpret=args.interpret,
              simulate=args.simulate, engine=engine_config(args), check_weights=not args.no_check_weights)
    engine = llm.engine
    metrics = ServerMetrics(args.served_model_name)
    served = ServedModel(name=args.served_model_name, loop=EngineLoop(engine, metrics), tokenizer=llm.tokenizer,
                         sampling=llm.sampling, check=engine.check, max_model_len=engine.max_model_len,
                         max_tokens_limit=args.max_tokens_limit or engine.max_model_len, metrics=metrics)
    app = build_app(served, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
    log.info("serving %s on %s (%s, %s): %d cache blocks of %d positions, context %d tokens", served.name,
             llm.device, llm.backend.name, args.dtype, engine.pool.num_blocks, engine.block_size,
             engine.max_model_len)
    server = make_server(app, served.loop, args.host, args.port, args.shutdown_timeout, args.log_level)
    # uvicorn re-raises SIGTERM after its graceful shutdown, under the handler that was there before it started; this
    # one makes that a clean exit (status 0) rather than death by signal.
    terminated: list[int] = []
    signal.signal(signal.SIGTERM, lambda sig, frame: terminated.append(sig))
    server.run()
    if terminated:
        log.info("stopped by SIGTERM")
    return 0 if server.started else 1


if __name__ == "__main__":
    from core.run import run_cli

    sys.exit(run_cli(main))
