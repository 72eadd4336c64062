"""core.serve's request handling without a server: generation_config.json defaults under request fields, n choices
with consecutive seeds, chat text parts, the max_tokens bound, and error shapes of parsing."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")

from core.engine.sampling import SamplingParams  # noqa: E402
from core.errors import UserError  # noqa: E402
from core.serve import protocol as P  # noqa: E402
from core.serve.errors import APIError  # noqa: E402
from core.serve.generation import ServedModel, make_job  # noqa: E402
from core.serve.metrics import ServerMetrics  # noqa: E402
from core.tokenizer import for_checkpoint  # noqa: E402

GEN_CONFIG = {"temperature": 0.6, "top_p": 0.95, "top_k": 40, "max_new_tokens": 7}
CONTEXT = 64


def check(ids: list[int], p: SamplingParams) -> int:
    if len(ids) + p.max_tokens > CONTEXT:
        raise UserError(f"the prompt ({len(ids)} tokens) + max_tokens ({p.max_tokens}) exceed the context length "
                        f"({CONTEXT} tokens)")
    return p.max_tokens


@pytest.fixture(scope="module")
def served():
    return ServedModel(name="m", loop=None, tokenizer=for_checkpoint(None),
                       sampling=lambda **o: SamplingParams.from_generation_config(dict(GEN_CONFIG), **o), check=check,
                       max_model_len=CONTEXT, max_tokens_limit=32, metrics=ServerMetrics("m"))


def job(served, body: dict, model=P.CompletionRequest):
    return make_job(served, P.parse_body(json.dumps(body).encode(), model))


def test_generation_config_defaults_then_request_fields(served):
    (p,) = job(served, {"model": "m", "prompt": "hello"}).params
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.6, 0.95, 40, 7)
    (p,) = job(served, {"model": "m", "prompt": "hello", "temperature": 0, "max_tokens": 3, "top_k": -1,
                        "min_p": 0.1, "repetition_penalty": 1.2, "frequency_penalty": 0.5, "presence_penalty": -0.5,
                        "min_tokens": 2, "stop": "xy", "stop_token_ids": [9], "ignore_eos": True, "seed": 11,
                        "logprobs": 2}).params
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.min_p, p.repetition_penalty) == (0, 0.95, -1, 3, 0.1, 1.2)
    assert (p.frequency_penalty, p.presence_penalty, p.min_tokens, p.stop, p.stop_token_ids) == (0.5, -0.5, 2, ["xy"],
                                                                                                 [9])
    assert (p.ignore_eos, p.seed, p.logprobs) == (True, 11, 2)


def test_n_choices_get_consecutive_seeds_and_prompts_in_order(served):
    j = job(served, {"model": "m", "prompt": ["a", "bb"], "n": 3, "seed": 2 ** 63 - 2})
    assert j.choice_prompt == [0, 0, 0, 1, 1, 1]
    assert [p.seed for p in j.params] == [2 ** 63 - 2, 2 ** 63 - 1, 0] * 2
    assert j.prompts == [served.tokenizer.encode("a"), served.tokenizer.encode("bb")]


def test_chat_text_parts_and_logprobs(served):
    parts = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "ab"},
                                                                     {"type": "text", "text": "cd"}]}],
             "logprobs": True, "top_logprobs": 3, "max_completion_tokens": 4}
    plain = {"model": "m", "messages": [{"role": "user", "content": "abcd"}]}
    a, b = job(served, parts, P.ChatCompletionRequest), job(served, plain, P.ChatCompletionRequest)
    assert a.prompts == b.prompts == [served.tokenizer.apply_chat_template([{"role": "user", "content": "abcd"}])]
    assert a.params[0].logprobs == 3 and a.params[0].max_tokens == 4 and b.params[0].logprobs is None


@pytest.mark.parametrize("body, status, param", [
    ({"model": "m", "prompt": "a", "max_tokens": 33}, 400, "max_tokens"),  # over --max-tokens-limit
    ({"model": "m", "prompt": "a" * 60, "max_tokens": 30}, 400, "max_tokens"),  # beyond the context
    ({"model": "m", "prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ({"model": "m", "prompt": "a", "logit_bias": {"5": 1.0}}, 400, "logit_bias"),
    ({"model": "m", "prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": "m", "prompt": "a", "stop": ["", "x"]}, 400, "stop"),
    ({"model": "m", "prompt": []}, 400, "prompt"),
    ({"model": "m", "prompt": "a", "echo": True, "logprobs": 1}, 400, "echo"),
    ({"model": "other", "prompt": "a"}, 404, "model"),
])
def test_refusals(served, body, status, param):
    with pytest.raises(APIError) as e:
        job(served, body)
    assert (e.value.status, e.value.param) == (status, param)
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"} and "\n" not in e.value.message


def test_beyond_context_names_both_numbers(served):
    with pytest.raises(APIError) as e:
        job(served, {"model": "m", "prompt": "a" * 60, "max_tokens": 30})
    assert "30" in e.value.message and str(CONTEXT) in e.value.message
