"""OpenAI's request shapes (pydantic, strict: a string where a number belongs is a 400, not a coercion) and the
response and chunk bodies (plain dicts in OpenAI's field order).

Requests carry OpenAI's fields plus the engine's extra sampling fields under vLLM's / SGLang's names (top_k, min_p,
repetition_penalty, min_tokens, stop_token_ids, ignore_eos). A field left out means "not given": the checkpoint's
generation_config.json default applies. Fields OpenAI has that this server does not implement (tools,
response_format other than text, logit_bias, suffix, echo with logprobs) are refused with a 400 naming them."""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from core.serve.errors import APIError, bad_request

MAX_N = 16  # choices per request


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationRequest(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # the engine's extra sampling fields (vLLM / SGLang names)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None

    def check_common(self) -> None:
        if not 1 <= self.n <= MAX_N:
            raise bad_request(f"n must be an integer in [1, {MAX_N}], got {self.n}", "n")
        if self.logit_bias:
            raise bad_request("logit_bias is not supported by this server", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        if self.stop is not None:
            stops = [self.stop] if isinstance(self.stop, str) else self.stop
            if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
                raise bad_request("stop must be a non-empty string or a list of non-empty strings", "stop")

    def stop_list(self) -> list[str] | None:
        return None if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling_overrides(self) -> dict[str, Any]:
        """The request's sampling fields by SamplingParams name (None = not given)."""
        return dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                    repetition_penalty=self.repetition_penalty, frequency_penalty=self.frequency_penalty,
                    presence_penalty=self.presence_penalty, min_tokens=self.min_tokens, stop=self.stop_list(),
                    stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, seed=self.seed)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationRequest):
    prompt: Any
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check(self) -> None:
        self.check_common()
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request(f"best_of ({self.best_of}) different from n ({self.n}) is not supported", "best_of")
        if self.suffix:
            raise bad_request("suffix is not supported by this server", "suffix")
        if self.echo and self.logprobs is not None:
            raise bad_request("echo with logprobs is not supported by this server", "echo")

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of texts or token-id lists (OpenAI: a string, strings, token ids, lists of ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p, list) and p:
            if all(isinstance(x, str) for x in p):
                return list(p)
            if all(_is_int(x) for x in p):
                return [list(p)]
            if all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in p):
                return [list(x) for x in p]
        raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                          "token ids (none empty)", "prompt")


class ChatCompletionRequest(_GenerationRequest):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    def check(self) -> None:
        self.check_common()
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise bad_request("max_tokens and max_completion_tokens differ; give one", "max_completion_tokens")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        if self.tools:
            raise bad_request("tools are not supported by this server", "tools")
        if self.tool_choice not in (None, "none"):
            raise bad_request("tool_choice is not supported by this server", "tool_choice")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise bad_request("response_format other than {\"type\": \"text\"} is not supported by this server",
                              "response_format")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat_messages(self) -> list[dict[str, Any]]:
        """Messages for the chat template: `content` given as OpenAI's list of text parts becomes one string."""
        out = []
        for i, m in enumerate(self.messages):
            content = m.get("content")
            if isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    is_text = isinstance(part, dict) and part.get("type") == "text"
                    if not is_text or not isinstance(part.get("text"), str):
                        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                        raise bad_request(f"messages[{i}].content[{j}]: only text parts "
                                          f"({{\"type\": \"text\", \"text\": ...}}) are supported, got {kind!r}",
                                          f"messages[{i}].content")
                    texts.append(part["text"])
                m = {**m, "content": "".join(texts)}
            out.append(m)
        return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# -- parsing ---------------------------------------------------------------------------------------------------------

def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def parse_body(body: bytes, model: type[_Strict]) -> Any:
    """JSON bytes -> the request model; every failure is one 400 naming the field."""
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"We could not parse the JSON body of your request ({e}). The body must be a JSON object.",
                          code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        request = model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None
    request.check()
    return request


def validation_error(e: ValidationError) -> APIError:
    err = e.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {loc}", loc)
    if err["type"] == "missing":
        return bad_request(f"Missing required parameter: '{loc}'.", loc, "missing_required_parameter")
    value = err.get("input")
    shown = json.dumps(value)[:60] if _jsonable(value) else type(value).__name__
    return bad_request(f"Invalid value for '{loc}': {err['msg'].lower()}, got {shown}", loc, "invalid_value")


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


# -- responses -------------------------------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": logprobs, "finish_reason": finish_reason}


def chat_delta_choice(index: int, delta: dict, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def body(kind: Literal["completion", "chat", "completion_chunk", "chat_chunk"], rid: str, created: int, model: str,
         choices: list[dict], usage_: dict | None, with_usage: bool = True) -> dict:
    obj = {"completion": "text_completion", "completion_chunk": "text_completion",
           "chat": "chat.completion", "chat_chunk": "chat.completion.chunk"}[kind]
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if kind.startswith("chat"):
        out["system_fingerprint"] = None
    if with_usage:
        out["usage"] = usage_
    return out


def finite(x: float) -> float:
    """A logprob as JSON can carry it (-inf becomes OpenAI's floor, -9999.0)."""
    return x if math.isfinite(x) else -9999.0
