"""`python -m core.serve`: load the model (core.engine.llm.LLM), start the engine thread and serve HTTP with uvicorn.
Options: core.serve.cli. Bad input ends with one line on stderr and exit status 2. SIGTERM: stop accepting
connections, let in-flight requests finish for up to --shutdown-timeout seconds, abort the rest (their cache blocks
are freed), stop the engine thread, exit 0 (core.serve.server).

Under torchrun (WORLD_SIZE > 1) every rank loads its shard; rank 0 serves HTTP and drives the other ranks, which
take every engine step with it and never open a port (core.serve.ranks). A rank that fails to load ends every rank
with the same one line; a rank lost while serving ends rank 0's server with one line (exit status 2); at shutdown
every rank exits with rank 0's status."""

from __future__ import annotations

import logging
import signal
import sys

from core.errors import UserError


def main(argv: list[str] | None = None) -> int:
    from core.engine.llm import LLM
    from core.parallel.launch import world_size_from_env
    from core.serve.cli import engine_config, parse_args

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    if world_size_from_env() > 1:
        return main_ranks(args)
    llm = LLM(args.model, backend=args.backend, dtype=args.dtype, strict=args.strict, interpret=args.interpret,
              simulate=args.simulate, engine=engine_config(args), check_weights=not args.no_check_weights)
    return serve(args, llm, llm.engine)


def main_ranks(args) -> int:
    """Every rank under torchrun: load this rank's shard, agree on the cache size, then serve (rank 0) or follow."""
    from core import registry
    from core.backend import RunMode, choose_block_size
    from core.engine.llm import LLM
    from core.parallel import launch
    from core.serve.cli import engine_config
    from core.serve.ranks import (LeaderEngine, StepChannel, agree_cache_blocks, follow, heartbeat_seconds,
                                  ignore_stop_signals)

    backend, avail = registry.activate(args.backend, RunMode(interpret=args.interpret, simulate=args.simulate))
    choose_block_size(backend, args.block_size)  # a block size the backend refuses fails here, before the weights
    par = launch.from_environment(backend, avail.device, args.moe_combine, args.strict)
    try:
        llm = par.agree("loading", lambda: LLM(
            args.model, backend=args.backend, dtype=args.dtype, strict=args.strict, interpret=args.interpret,
            simulate=args.simulate, engine=engine_config(args), check_weights=not args.no_check_weights,
            parallel=par))
        if not par.is_first:
            ignore_stop_signals()  # before rank 0 can serve (it waits for the channel); torchrun signals all ranks
        timeout = launch.timeout_seconds()
        channel = StepChannel(timeout)
        par.agree("sizing the latent cache", lambda: agree_cache_blocks(llm, channel))
        if not par.is_first:
            return follow(llm.engine, channel)
        leader = LeaderEngine(llm.engine, channel, heartbeat_seconds(timeout))
        return serve(args, llm, leader, leader, f", {par.comm.describe()}, MoE combine {args.moe_combine}")
    finally:
        launch.shutdown()


def serve(args, llm, engine, leader=None, where: str = "") -> int:
    """Serve `engine` over HTTP until SIGTERM (or, with `leader`, until another rank is lost); the exit status."""
    from core.serve.app import build_app
    from core.serve.engine_loop import EngineLoop
    from core.serve.generation import ServedModel
    from core.serve.metrics import ServerMetrics
    from core.serve.server import make_server

    log = logging.getLogger("core.serve")
    metrics = ServerMetrics(args.served_model_name)
    loop = EngineLoop(engine, metrics, driver=leader)
    served = ServedModel(name=args.served_model_name, loop=loop, tokenizer=llm.tokenizer, sampling=llm.sampling,
                         check=engine.check, max_model_len=engine.max_model_len,
                         max_tokens_limit=args.max_tokens_limit or engine.max_model_len, metrics=metrics)
    app = build_app(served, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
    log.info("serving %s on %s (%s, %s%s): %d cache blocks of %d positions, context %d tokens", served.name,
             llm.device, llm.backend.name, args.dtype, where, engine.pool.num_blocks, llm.engine.block_size,
             engine.max_model_len)
    server = make_server(app, loop, args.host, args.port, args.shutdown_timeout, args.log_level)
    if leader is not None:  # a lost rank stops the server (uvicorn polls should_exit); main then reports it
        leader.on_lost = lambda message: setattr(server, "should_exit", True)
    # uvicorn re-raises SIGTERM after its graceful shutdown, under the handler that was there before it started; this
    # one makes that a clean exit (status 0) rather than death by signal.
    terminated: list[int] = []
    signal.signal(signal.SIGTERM, lambda sig, frame: terminated.append(sig))
    status = 1
    try:
        server.run()
        status = 0 if server.started else 1
    except KeyboardInterrupt:  # Ctrl-C: run_cli's status, on every rank
        status = 130
        raise
    except SystemExit as e:  # uvicorn's own exit (the port could not be bound): its status, on every rank
        status = e.code if isinstance(e.code, int) else 1
        raise
    finally:
        if leader is not None and loop.ended:  # the engine thread is done with the other ranks: release them
            leader.close(status)
        elif leader is not None and leader.failure is None:  # it is stuck inside a step, in a collective
            leader.failure = "an engine step did not finish (a collective waiting for a rank that is gone?)"
    if terminated:
        log.info("stopped by SIGTERM")
    if leader is not None and leader.failure is not None:
        raise UserError(f"rank 0 lost the other ranks: {leader.failure}")
    return status


if __name__ == "__main__":
    from core.run import run_cli

    sys.exit(run_cli(main))
