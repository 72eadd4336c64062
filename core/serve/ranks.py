"""`torchrun ... -m core.serve`: rank 0 serves HTTP and drives the other ranks, which take every engine step with it.

Every rank holds its shard of the model and a whole engine (scheduler, block pool, paged latent cache, samplers).
Rank 0's engine is wrapped in `LeaderEngine`, the `ServingEngine` its HTTP server drives; the other ranks run
`follow()` and never open a port. All of it goes over `StepChannel`, a gloo group of its own on which rank 0
broadcasts small pickled messages (CPU objects: no device synchronisation under NCCL or HCCL, and a few hundred
bytes next to a forward pass's collectives):

    ("step", commands)   before each of rank 0's engine steps: the adds (request id, prompt ids, sampling
                         parameters) and aborts rank 0 applied since the last step, in order; every rank applies
                         them and takes the step. Same requests, same order, same block pool (`agree_cache_blocks`)
                         and the same tokens give the same scheduler plan on every rank, so the forward passes'
                         collectives match.
    ("samples", value)   inside a step, after sampling (and after drafting, with MTP): rank 0's sampled tokens,
                         which every rank uses instead of its own (`Engine.share_samples`).
    ("heartbeat",)       while the server is idle, every `heartbeat_s` seconds.
    ("stop", status)     at shutdown: every rank exits with rank 0's status.

Why rank 0's tokens rather than the same seeded generator on every rank: the logits are all-gathered, so they are
normally equal everywhere, but nothing in the operator contract promises bit-equal results across devices (a kernel
that reduces with atomics may round differently on two GPUs); one differing token would give two ranks different
plans and their next collective would hang or fail. A broadcast of a few ints per step rules that out for any
backend and any sampling setting; the followers' own samples are simply discarded (and they skip logprobs).

Idle: followers block inside the broadcast (gloo waits on a socket, it does not spin), and rank 0's heartbeat keeps
that wait shorter than the collective timeout (DSV3_DIST_TIMEOUT, default 300 s; the heartbeat comes every quarter
of it, at most every 30 s). So the timeout stays meaningful (a follower whose rank 0 hangs ends after it) instead of
being set to forever, and an idle rank 0 learns within one heartbeat that a follower died (the broadcast fails on
the closed connection): it stops serving and exits with one line. A follower that dies during a step fails the
step's collectives the same way.

Signals: followers ignore SIGTERM and SIGINT (torchrun and a terminal's Ctrl-C send them to every rank); they end on
rank 0's "stop", after rank 0 has drained its in-flight requests, or when rank 0 is gone.
"""

from __future__ import annotations

import logging
import pickle
import re
import signal
from dataclasses import replace
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from core.engine.engine import Engine, RequestOutput
from core.engine.sampling import SamplingParams
from core.errors import UserError
from core.safe_files import one_line

log = logging.getLogger("core.serve")

MAX_HEARTBEAT_S = 30.0


def heartbeat_seconds(timeout_s: float) -> float:
    """How often an idle rank 0 tells the others it is alive: well inside their collective timeout."""
    return min(MAX_HEARTBEAT_S, timeout_s / 4)


def _reason(e: BaseException) -> str:
    """A collective's error in one short line: its first line, without gloo's source location and advice."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    return one_line(text.split(". This is typically")[0])


class StepChannel:
    """Rank 0 -> every rank, over a gloo group of its own (created collectively: every rank must construct it).

    A message is pickled into a fixed `frame_bytes` frame (8 bytes of length, then the pickle): one broadcast for
    the usual step, sample or heartbeat message, a second one for the rest of a longer message (long prompts).
    (torch's broadcast_object_list always takes two: the size, then the data.)"""

    def __init__(self, timeout_s: float, frame_bytes: int = 4096):
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.frame_bytes = frame_bytes

    def send(self, message: tuple) -> None:
        """Rank 0 only."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        fits = min(len(data), self.frame_bytes - 8)
        frame = bytearray(self.frame_bytes)
        frame[:8] = len(data).to_bytes(8, "little")
        frame[8:8 + fits] = data[:fits]
        dist.broadcast(torch.frombuffer(frame, dtype=torch.uint8), src=0, group=self.group)
        if fits < len(data):
            dist.broadcast(torch.frombuffer(bytearray(data[fits:]), dtype=torch.uint8), src=0, group=self.group)

    def receive(self) -> tuple:
        """Every rank but 0: blocks until rank 0 sends (at most the group's timeout)."""
        frame = torch.empty(self.frame_bytes, dtype=torch.uint8)
        dist.broadcast(frame, src=0, group=self.group)
        raw = frame.numpy().tobytes()
        size = int.from_bytes(raw[:8], "little")
        data = raw[8:8 + size]
        if size > len(data):
            rest = torch.empty(size - len(data), dtype=torch.uint8)
            dist.broadcast(rest, src=0, group=self.group)
            data += rest.numpy().tobytes()
        return pickle.loads(data)  # noqa: S301 -- from rank 0 of this job, as broadcast_object_list would

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.group)
        return values


def agree_cache_blocks(llm, channel: StepChannel) -> int:
    """Give every rank's engine the same number of cache blocks (the fewest any rank could afford): the scheduler's
    plans (admission, preemption) depend on it, and they must be equal everywhere. Each engine sized its cache from
    its own device's free memory, which differs between ranks; an engine with more blocks is rebuilt with fewer."""
    engine: Engine = llm.engine
    fewest = min(channel.gather(engine.pool.num_blocks))
    if engine.pool.num_blocks != fewest:
        config = replace(engine.config, kv_cache_memory=fewest * engine.block_size * engine.bytes_per_token)
        eos = engine.eos_token_ids
        llm.engine = engine = None  # free this cache before allocating the smaller one
        llm.engine = Engine(llm.model, llm.tokenizer, config, eos)
    return fewest


class LeaderEngine:
    """Rank 0's engine: what the server drives (`core.serve.engine_loop.ServingEngine`) and the engine loop's
    `Driver`. Adds and aborts apply to the local engine at once and are sent with the next step. A failure to reach
    the other ranks, or any failure inside a step (the ranks may no longer agree), is fatal: `failure` says why in
    one line, `on_lost(failure)` is called once (the server stops), and every later step or add raises."""

    def __init__(self, engine: Engine, channel: StepChannel, heartbeat_s: float,
                 on_lost: Callable[[str], None] | None = None):
        self.engine, self.channel, self.heartbeat_s, self.on_lost = engine, channel, heartbeat_s, on_lost
        self.max_model_len = engine.max_model_len
        self.pool, self.scheduler = engine.pool, engine.scheduler
        self.failure: str | None = None
        self._pending: list[tuple] = []
        self._closed = False
        engine.share_samples = self._share_samples

    @property
    def has_unfinished(self) -> bool:
        return self.failure is None and self.engine.has_unfinished

    def check(self, prompt_ids: list[int], params: SamplingParams) -> int:
        return self.engine.check(prompt_ids, params)

    def add(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        self._refuse_if_lost()
        rid = self.engine.add(prompt_ids, params, request_id=request_id)  # a UserError here queues nothing
        self._pending.append(("add", rid, list(prompt_ids), params))
        return rid

    def abort(self, request_id: str) -> bool:
        found = self.engine.abort(request_id)
        if found:
            self._pending.append(("abort", request_id))
        return found

    def step(self) -> list[RequestOutput]:
        self._refuse_if_lost()
        commands, self._pending = self._pending, []
        try:
            self.channel.send(("step", commands))
            return self.engine.step()
        except Exception as e:
            self._lose(f"an engine step across {self.channel.world_size} ranks failed ({_reason(e)})")
            raise

    def heartbeat(self) -> None:
        if self.failure is not None or self._closed:
            return
        try:
            self.channel.send(("heartbeat",))
        except Exception as e:
            self._lose(f"the other ranks stopped answering while idle ({_reason(e)})")

    def close(self, status: int = 0) -> None:
        """Tell the other ranks to exit with `status` (once; nothing if they are already lost)."""
        if self._closed:
            return
        self._closed = True
        if self.failure is None:
            try:
                self.channel.send(("stop", status))
            except Exception as e:
                self.failure = f"the other ranks could not be told to stop ({_reason(e)})"

    def _share_samples(self, value: Any) -> Any:
        self.channel.send(("samples", value))
        return value

    def _refuse_if_lost(self) -> None:
        if self.failure is not None:
            raise RuntimeError(self.failure)

    def _lose(self, message: str) -> None:
        if self.failure is not None:
            return
        self.failure = message
        log.error("%s; stopping the server", message)
        if self.on_lost is not None:
            self.on_lost(message)


class _Stop(Exception):
    def __init__(self, status: int):
        super().__init__(f"stop with status {status}")
        self.status = status


def _expect(message: tuple, kind: str) -> tuple:
    if message[0] == "stop":
        raise _Stop(int(message[1]))
    if message[0] != kind:
        raise RuntimeError(f"rank 0 sent {message[0]!r} where {kind!r} was due")
    return message


def ignore_stop_signals() -> None:
    """A follower ignores SIGTERM and SIGINT from here on: rank 0 decides when the ranks stop (module docstring)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def follow(engine: Engine, channel: StepChannel,
           on_outputs: Callable[[list[RequestOutput]], None] | None = None) -> int:
    """A follower's whole life: apply rank 0's commands and take its steps until it says stop; returns rank 0's
    exit status. Each step's outputs go to `on_outputs` (tests compare them with rank 0's), else nowhere. Losing
    rank 0 (its connection closes, or it is silent past the timeout) is a one-line UserError."""
    engine.share_samples = lambda mine: _expect(_receive(channel), "samples")[1]
    try:
        while True:
            message = _receive(channel)
            if message[0] == "heartbeat":
                continue
            _, commands = _expect(message, "step")
            for command in commands:
                if command[0] == "add":
                    _, rid, prompt_ids, params = command
                    engine.add(prompt_ids, replace(params, logprobs=None), request_id=rid)  # not reported here
                else:
                    engine.abort(command[1])
            try:
                outputs = engine.step()
            except UserError:
                raise
            except (RuntimeError, ValueError) as e:  # a collective failed: rank 0 or another follower is gone
                raise UserError(f"rank {channel.rank}: an engine step failed ({_reason(e)})") from None
            if on_outputs is not None:
                on_outputs(outputs)
    except _Stop as stop:
        return stop.status


def _receive(channel: StepChannel) -> tuple:
    try:
        return channel.receive()
    except RuntimeError as e:
        raise UserError(f"rank {channel.rank}: lost rank 0 ({_reason(e)})") from None
