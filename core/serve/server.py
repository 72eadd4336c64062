"""uvicorn's server with a draining shutdown: on SIGTERM (or Ctrl-C) it stops accepting connections, gives in-flight
requests `grace` seconds to finish, then aborts the rest through the engine loop (streams end with an error event
and `[DONE]`, waiting requests get a 503, their cache blocks are freed) so every response ends on its own; uvicorn
then runs the app's lifespan shutdown, which stops the engine thread."""

from __future__ import annotations

import asyncio

import uvicorn

from core.serve.engine_loop import EngineLoop

SHUTDOWN_BACKSTOP_S = 5.0  # after the abort, how long uvicorn still waits for responses before cancelling them


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine_loop: EngineLoop, grace: float):
        super().__init__(config)
        self.engine_loop, self.grace = engine_loop, grace

    async def shutdown(self, sockets=None) -> None:
        handle = asyncio.get_running_loop().call_later(self.grace, self.engine_loop.abort_all)
        try:
            await super().shutdown(sockets)
        finally:
            handle.cancel()


def make_server(app, engine_loop: EngineLoop, host: str, port: int, grace: float, log_level: str) -> DrainingServer:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=grace + SHUTDOWN_BACKSTOP_S)
    return DrainingServer(config, engine_loop, grace)
