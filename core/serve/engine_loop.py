"""The one thread that owns the engine. The engine is not thread-safe, so HTTP handlers never touch it: they put
commands (add, abort, stop) on a queue, and this thread applies them between steps, steps while there is work, and
blocks on the queue when idle. Each request's outputs go to the `sink` its handler gave (a callable that moves them
onto the handler's event loop, `loop.call_soon_threadsafe`).

`ServingEngine` is the whole interface the server needs of an engine: `core.engine.engine.Engine` has it, and so
does rank 0's `core.serve.ranks.LeaderEngine` under torchrun, which is also the loop's `Driver`: while idle the thread
calls its `heartbeat()` every `heartbeat_s` seconds (so the other ranks, blocked waiting for the next step, never hit
a collective timeout).
"""

from __future__ import annotations

import logging
import queue
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from core.engine.engine import RequestOutput
from core.engine.sampling import SamplingParams
from core.errors import UserError
from core.serve.errors import APIError

log = logging.getLogger("core.serve")

Sink = Callable[["RequestOutput | APIError"], None]


class ServingEngine(Protocol):
    """What the server calls on an engine, only ever from the engine thread (except `check` and the read-only
    attributes, which depend on configuration alone).

    pool: `num_used`, `num_blocks` (cache blocks); scheduler: `num_waiting`, `num_running`."""

    max_model_len: int
    pool: Any
    scheduler: Any

    @property
    def has_unfinished(self) -> bool: ...

    def check(self, prompt_ids: list[int], params: SamplingParams) -> int: ...

    def add(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str: ...

    def abort(self, request_id: str) -> bool: ...

    def step(self) -> list[RequestOutput]: ...


class EngineObserver(Protocol):
    """Told what the engine thread sees (the metrics implement it)."""

    def on_engine_state(self, engine: ServingEngine) -> None: ...

    def on_output(self, output: RequestOutput) -> None: ...


class Driver(Protocol):
    """Processes that take every step with the engine (the other ranks under torchrun): while the engine is idle,
    the engine thread calls `heartbeat()` every `heartbeat_s` seconds."""

    heartbeat_s: float

    def heartbeat(self) -> None: ...


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink


@dataclass
class _Abort:
    request_ids: Sequence[str]


class _Stop:
    pass


@dataclass
class _AbortAll:
    error: APIError


class EngineLoop:
    """Runs `engine` in a daemon thread. `submit`, `abort` and `stop` may be called from any thread."""

    def __init__(self, engine: ServingEngine, observer: EngineObserver | None = None, driver: Driver | None = None):
        self.engine = engine
        self.observer = observer
        self.driver = driver
        self._commands: queue.Queue = queue.Queue()
        self._sinks: dict[str, Sink] = {}
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._stopped = threading.Event()
        self.steps = 0

    # -- called from the HTTP side ---------------------------------------------------------------------------------

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped.is_set()

    @property
    def ended(self) -> bool:
        """The engine thread is not running (never started, or finished)."""
        return not self._thread.is_alive()

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, sink: Sink) -> None:
        """Queue a request; every `RequestOutput` for it (the last has `finished`), or one `APIError`, goes to
        `sink`, called on the engine thread."""
        if self._stopped.is_set():
            sink(APIError(503, "the server is shutting down"))
            return
        self._commands.put(_Add(request_id, prompt_ids, params, sink))

    def abort(self, *request_ids: str) -> None:
        """Cancel requests (a client went away); their cache blocks are freed before the next step."""
        if request_ids:
            self._commands.put(_Abort(request_ids))

    def abort_all(self, message: str = "the server is shutting down") -> None:
        """Abort every request in flight; each one's sink gets a 503 APIError with `message`."""
        self._commands.put(_AbortAll(APIError(503, message)))

    def stop(self, timeout: float = 10.0) -> None:
        """Abort whatever is still running, end the thread and wait for it (at most `timeout` seconds)."""
        if self._thread.is_alive():
            self._commands.put(_Stop())
            self._thread.join(timeout)
        self._stopped.set()

    # -- the engine thread -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                idle = not self.engine.has_unfinished
                try:
                    wait = self.driver.heartbeat_s if idle and self.driver is not None else None
                    command = self._commands.get(block=idle, timeout=wait)
                except queue.Empty:
                    command = None
                    if idle and self.driver is not None:
                        self.driver.heartbeat()
                while command is not None:
                    if isinstance(command, _Stop):
                        self._abort_all(APIError(503, "the server is shutting down"))
                        return
                    self._apply(command)
                    try:
                        command = self._commands.get_nowait()
                    except queue.Empty:
                        command = None
                if self.engine.has_unfinished:
                    self._step()
                self._observe_state()
        finally:
            self._stopped.set()
            self._observe_state()

    def _apply(self, command: _Add | _Abort | _AbortAll) -> None:
        if isinstance(command, _AbortAll):
            self._abort_all(command.error)
            return
        if isinstance(command, _Abort):
            for rid in command.request_ids:
                self._sinks.pop(rid, None)
                self.engine.abort(rid)
            return
        try:
            self.engine.add(command.prompt_ids, command.params, request_id=command.request_id)
        except UserError as e:
            command.sink(APIError(400, str(e)))
            return
        except Exception as e:  # a bug, not bad input: the request fails, the server goes on
            log.error("engine.add failed:\n%s", traceback.format_exc())
            command.sink(APIError(500, f"the engine refused the request: {type(e).__name__}: {e}"))
            return
        self._sinks[command.request_id] = command.sink

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # fail what is in flight, keep serving
            log.error("engine step failed; aborting %d requests:\n%s", len(self._sinks), traceback.format_exc())
            self._abort_all(APIError(500, f"the engine failed: {type(e).__name__}: {e}"))
            return
        self.steps += 1
        for out in outputs:
            sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
            if self.observer is not None:
                self.observer.on_output(out)
            if sink is not None:
                sink(out)

    def _abort_all(self, error: APIError) -> None:
        sinks, self._sinks = self._sinks, {}
        for rid, sink in sinks.items():
            self.engine.abort(rid)
            sink(error)

    def _observe_state(self) -> None:
        if self.observer is not None:
            try:
                self.observer.on_engine_state(self.engine)
            except Exception:  # metrics must never stop the engine
                log.error("metrics update failed:\n%s", traceback.format_exc())
