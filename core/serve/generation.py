"""Completions and chat completions: an OpenAI request -> engine requests (one per prompt and choice) -> the
response body, or the server-sent-event chunks of a stream.

An HTTP request's engine requests share one asyncio queue; the engine thread puts `(choice index, output)` on it.
Whatever ends the HTTP request early (the client disconnects, an error, server shutdown cancelling the task) aborts
the engine requests not yet finished, so their cache blocks are freed at once."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Awaitable, Callable

from core.engine.engine import RequestOutput
from core.engine.sampling import SamplingParams, TokenLogprobs
from core.errors import UserError
from core.serve import protocol as P
from core.serve.engine_loop import EngineLoop
from core.serve.errors import APIError, bad_request
from core.serve.metrics import ServerMetrics

_SEED_SPACE = 2 ** 63
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks whether its client is still there


@dataclass
class ServedModel:
    """What the HTTP side knows of the model it serves. `sampling(**overrides)` gives generation_config.json's
    defaults then the overrides; `check(prompt_ids, params)` is the engine's admission check (one-line UserError);
    `max_tokens_limit` bounds max_tokens (a request that leaves it out gets the room left in the context, at most
    this)."""

    name: str
    loop: EngineLoop
    tokenizer: Any
    sampling: Callable[..., SamplingParams]
    check: Callable[[list[int], SamplingParams], int]
    max_model_len: int
    max_tokens_limit: int
    metrics: ServerMetrics
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Job:
    """One HTTP request's work: `prompts[i]` token ids; choice k runs `params[k]` on prompt `choice_prompt[k]`."""

    kind: str  # "completion" or "chat"
    id: str
    model: str
    prompts: list[list[int]]
    prompt_texts: list[str | None]
    params: list[SamplingParams]
    choice_prompt: list[int]
    num_logprobs: int | None
    echo: bool = False
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def endpoint(self) -> str:
        return "chat" if self.kind == "chat" else "completions"

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


# -- building a job --------------------------------------------------------------------------------------------------

def _user_error(e: UserError, default_param: str | None) -> APIError:
    msg = str(e)
    for name in ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                 "frequency_penalty", "presence_penalty", "stop_token_ids", "stop", "seed", "logprobs"):
        if msg.startswith(name) or f" {name} " in msg or f"{name} (" in msg or f"{name} must" in msg:
            return bad_request(msg, name)
    return bad_request(msg, default_param)


def _check_model(served: ServedModel, model: str) -> None:
    if model != served.name:
        raise APIError(404, f"The model `{model}` does not exist (this server serves `{served.name}`).", "model",
                       "model_not_found")


def _encode(served: ServedModel, text: str) -> list[int]:
    if served.tokenizer is None:
        raise bad_request("this model has no tokenizer: send the prompt as token ids", "prompt")
    return served.tokenizer.encode(text)


def make_job(served: ServedModel, req: P.CompletionRequest | P.ChatCompletionRequest) -> Job:
    _check_model(served, req.model)
    if isinstance(req, P.ChatCompletionRequest):
        kind, param, prefix = "chat", "messages", "chatcmpl-"
        if served.tokenizer is None:
            raise bad_request("this model has no tokenizer, so no chat template: use /v1/completions with token ids",
                              "messages")
        try:
            prompts = [served.tokenizer.apply_chat_template(req.chat_messages(), add_generation_prompt=True)]
        except UserError as e:
            raise bad_request(str(e), "messages") from None
        texts: list[str | None] = [None]
        max_tokens, num_logprobs = req.max_new_tokens, req.num_logprobs
    else:
        kind, param, prefix = "completion", "prompt", "cmpl-"
        raw = req.prompts()
        try:
            prompts = [_encode(served, p) if isinstance(p, str) else p for p in raw]
        except UserError as e:
            raise bad_request(str(e), "prompt") from None
        texts = [p if isinstance(p, str) else None for p in raw]
        max_tokens, num_logprobs = req.max_tokens, req.logprobs
    try:
        base = served.sampling(**req.sampling_overrides(), logprobs=num_logprobs, max_tokens=max_tokens)
    except UserError as e:
        raise _user_error(e, None) from None
    max_tokens = max_tokens if max_tokens is not None else base.max_tokens  # generation_config's, if any
    limit = served.max_tokens_limit
    if max_tokens is not None and max_tokens > limit:
        raise bad_request(f"max_tokens ({max_tokens}) exceeds this server's limit ({limit})", "max_tokens")
    params, choice_prompt = [], []
    for i, ids in enumerate(prompts):
        mt = max_tokens if max_tokens is not None else max(1, min(limit, served.max_model_len - len(ids)))
        p = replace(base, max_tokens=mt)
        try:
            p.validate()
            served.check(ids, p)
        except UserError as e:
            raise _user_error(e, param) from None
        for j in range(req.n):
            seed = p.seed if p.seed is None or req.n == 1 else (p.seed + j) % _SEED_SPACE
            params.append(replace(p, seed=seed))
            choice_prompt.append(i)
    return Job(kind, prefix + uuid.uuid4().hex, req.model, prompts, texts, params, choice_prompt, num_logprobs,
               echo=getattr(req, "echo", False), include_usage=req.include_usage)


# -- running a job ---------------------------------------------------------------------------------------------------

class _Run:
    """A job's engine requests in flight; outputs arrive on `queue` as (choice index, RequestOutput | APIError)."""

    def __init__(self, served: ServedModel, job: Job):
        self.served, self.job = served, job
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request_ids = [f"{job.id}-{k}" for k in range(len(job.params))]
        self.pending = set(range(len(job.params)))
        self.finals: dict[int, RequestOutput] = {}

    def _sink(self, k: int):
        def put(item: RequestOutput | APIError) -> None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (k, item))
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening any more
                pass
        return put

    def start(self) -> None:
        self.served.metrics.prompt(sum(len(self.job.prompts[i]) for i in self.job.choice_prompt))
        for k, (rid, p) in enumerate(zip(self.request_ids, self.job.params)):
            self.served.loop.submit(rid, self.job.prompts[self.job.choice_prompt[k]], p, self._sink(k))

    def take(self, k: int, item: RequestOutput | APIError) -> RequestOutput:
        if isinstance(item, APIError):
            raise item
        if item.finished:
            self.pending.discard(k)
            self.finals[k] = item
        return item

    def abort_unfinished(self) -> None:
        if self.pending:
            self.served.loop.abort(*(self.request_ids[k] for k in sorted(self.pending)))
            self.pending.clear()

    def usage(self) -> dict[str, int]:
        return P.usage(self.job.prompt_tokens, sum(len(o.token_ids) for o in self.finals.values()))


class _TokenText:
    """Token id -> its text and UTF-8 bytes, for logprobs (cached)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        s = self.cache.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer is not None \
                else f"<{token_id}>"
            self.cache[token_id] = s
        return s


def completion_logprobs(lps: list[TokenLogprobs], text: _TokenText, offset: int) -> dict:
    tokens, offsets = [], []
    for lp in lps:
        offsets.append(offset)
        tokens.append(text(lp.token))
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [P.finite(lp.logprob) for lp in lps],
            "top_logprobs": [{text(t): P.finite(v) for t, v in lp.top} for lp in lps], "text_offset": offsets}


def chat_logprobs(lps: list[TokenLogprobs], text: _TokenText) -> dict:
    def entry(t: int, v: float) -> dict:
        s = text(t)
        return {"token": s, "logprob": P.finite(v), "bytes": list(s.encode("utf-8"))}

    return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps], "refusal": None}


def _echo_text(served: ServedModel, job: Job, k: int) -> str:
    i = job.choice_prompt[k]
    if job.prompt_texts[i] is not None:
        return job.prompt_texts[i]
    return served.tokenizer.decode(job.prompts[i]) if served.tokenizer is not None else ""


async def complete(served: ServedModel, job: Job, is_disconnected: Callable[[], Awaitable[bool]]) -> dict | None:
    """Run a job to the end; the response body, or None if the client went away (its requests are aborted)."""
    run = _Run(served, job)
    run.start()
    loop = asyncio.get_running_loop()
    next_check = loop.time() + DISCONNECT_POLL_S
    try:
        while run.pending:
            try:
                k, item = await asyncio.wait_for(run.queue.get(), max(0.0, next_check - loop.time()))
                run.take(k, item)
            except asyncio.TimeoutError:
                pass
            if loop.time() >= next_check:
                if await is_disconnected():
                    served.metrics.request_done(job.endpoint, "abort")
                    return None
                next_check = loop.time() + DISCONNECT_POLL_S
    except APIError:
        served.metrics.request_done(job.endpoint, "error")
        raise
    finally:
        run.abort_unfinished()
    text = _TokenText(served.tokenizer)
    choices = []
    for k in range(len(job.params)):
        out = run.finals[k]
        lp = out.logprobs if job.num_logprobs is not None else None
        if job.kind == "chat":
            choices.append(P.chat_choice(k, out.text, out.finish_reason, chat_logprobs(lp, text) if lp is not None
                                         else None))
        else:
            prefix = _echo_text(served, job, k) if job.echo else ""
            choices.append(P.completion_choice(k, prefix + out.text, out.finish_reason,
                                               completion_logprobs(lp, text, 0) if lp is not None else None))
    served.metrics.request_done(job.endpoint, run.finals[0].finish_reason or "stop")
    return P.body(job.kind, job.id, job.created, job.model, choices, run.usage())


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def stream(served: ServedModel, job: Job) -> AsyncIterator[str]:
    """The job's server-sent events: chunks in OpenAI's shape, the usage chunk if asked for, then `[DONE]`."""
    run = _Run(served, job)
    text = _TokenText(served.tokenizer)
    chunk_kind = "chat_chunk" if job.kind == "chat" else "completion_chunk"
    usage_field = job.include_usage  # OpenAI: `usage: null` on every chunk when usage is asked for

    def chunk(choice: dict) -> str:
        return _sse(P.body(chunk_kind, job.id, job.created, job.model, [choice], None, usage_field))

    offsets = [0] * len(job.params)
    outcome = "abort"
    run.start()
    try:
        for k in range(len(job.params)):
            if job.kind == "chat":
                yield chunk(P.chat_delta_choice(k, {"role": "assistant", "content": ""}, None, None))
            elif job.echo:
                prefix = _echo_text(served, job, k)
                offsets[k] = len(prefix)
                yield chunk(P.completion_choice(k, prefix, None, None))
        while run.pending:
            k, item = await run.queue.get()
            try:
                out = run.take(k, item)
            except APIError as e:
                outcome = "error"
                yield _sse(e.body())
                break
            lps = out.new_logprobs if job.num_logprobs is not None else None
            if out.new_token_ids or out.new_text or lps:  # a chunk per step with tokens, even if their text is held
                if job.kind == "chat":
                    yield chunk(P.chat_delta_choice(k, {"content": out.new_text}, None,
                                                    chat_logprobs(lps, text) if lps else None))
                else:
                    yield chunk(P.completion_choice(k, out.new_text, None, completion_logprobs(lps, text, offsets[k])
                                                    if lps else None))
                offsets[k] += len(out.new_text)
            if out.finished:
                if job.kind == "chat":
                    yield chunk(P.chat_delta_choice(k, {}, out.finish_reason, None))
                else:
                    yield chunk(P.completion_choice(k, "", out.finish_reason, None))
        else:
            outcome = run.finals[0].finish_reason or "stop"
            if job.include_usage:
                yield _sse(P.body(chunk_kind, job.id, job.created, job.model, [], run.usage()))
        yield "data: [DONE]\n\n"
    finally:
        run.abort_unfinished()  # a disconnect cancels this generator: its requests free their blocks here
        served.metrics.request_done(job.endpoint, outcome)
