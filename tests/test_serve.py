"""`python -m core.serve` through the official `openai` client (sync and async) against a server this module starts
on loopback: greedy outputs equal the engine's offline output (`LLM.generate` / `LLM.chat` on the same embedded
default, float32), streamed chunks concatenate to the non-streamed text, usage counts are right, 64 concurrent
streams each get their own text, disconnected clients free their cache blocks, every error is OpenAI's error body
with the right status and the server keeps serving, and SIGTERM ends the process cleanly."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import string
import time

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

from core.engine.engine import EngineConfig  # noqa: E402
from core.engine.llm import LLM  # noqa: E402
from tests.helpers import fresh_seed  # noqa: E402
from tests.serve_support import MODEL, ServerProcess, metric  # noqa: E402

KEY = "test-key-" + string.ascii_lowercase[:6]
MAX_MODEL_LEN, TOKENS_LIMIT, BODY_LIMIT = 512, 256, 64 * 1024
OPTIONS = ("--dtype", "float32", "--api-key", KEY, "--max-model-len", str(MAX_MODEL_LEN), "--max-tokens-limit",
           str(TOKENS_LIMIT), "--max-body-bytes", str(BODY_LIMIT), "--kv-cache-memory", "32MiB",
           "--log-level", "warning")


@pytest.fixture(scope="module")
def server():
    with ServerProcess(*OPTIONS) as s:
        yield s


@pytest.fixture(scope="module")
def llm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server process runs beside it on the same cores
    try:
        yield LLM(dtype="float32", engine=EngineConfig(max_model_len=MAX_MODEL_LEN, kv_cache_memory=32 << 20))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def rng():
    return random.Random(fresh_seed())


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url("/v1"), api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


def aclient(server) -> "openai.AsyncOpenAI":
    return openai.AsyncOpenAI(base_url=server.url("/v1"), api_key=KEY, max_retries=0, timeout=300)


def words(rng: random.Random, n: int = 4) -> str:
    return " ".join("".join(rng.choices(string.ascii_letters, k=rng.randint(2, 7))) for _ in range(n))


def offline(llm, prompt: str, **sampling):
    return llm.generate(prompt, llm.sampling(**sampling))[0]


def offline_chat(llm, content: str, **sampling):
    return llm.chat([{"role": "user", "content": content}], llm.sampling(**sampling))[0]


def metrics_text(server) -> str:
    return httpx.get(server.url("/metrics"), timeout=10).text


def wait_idle(server, timeout: float = 60.0) -> str:
    """Poll /metrics until no cache block is in use and nothing runs or waits; return the last text."""
    deadline = time.monotonic() + timeout
    while True:
        text = metrics_text(server)
        busy = [metric(text, f"dsv3_{n}") for n in ("cache_blocks_used", "num_requests_running",
                                                    "num_requests_waiting")]
        if busy == [0, 0, 0] or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


# -- endpoints -------------------------------------------------------------------------------------------------------

def test_health_and_models(server, client):
    assert httpx.get(server.url("/health"), timeout=10).json() == {"status": "ok"}
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_greedy_equals_offline(client, llm, rng):
    prompt = words(rng)
    want = offline(llm, prompt, temperature=0, max_tokens=7)
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=7, temperature=0)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == len(want.prompt_token_ids) == len(llm.tokenizer.encode(prompt))
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_completion_token_id_prompts_and_n(client, llm, rng):
    prompts = [llm.tokenizer.encode(words(rng)) for _ in range(2)]
    want = [offline(llm, p, temperature=0, max_tokens=5) for p in prompts]
    got = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert [c.text for c in got.choices] == [want[0].text] * 2 + [want[1].text] * 2
    assert got.usage.prompt_tokens == sum(len(p) for p in prompts)
    assert got.usage.completion_tokens == 2 * sum(len(w.token_ids) for w in want)


def test_chat_greedy_equals_offline_with_text_parts(client, llm, rng):
    a, b = words(rng, 2), words(rng, 2)
    want = offline_chat(llm, a + b, temperature=0, max_tokens=6)
    got = client.chat.completions.create(
        model=MODEL, max_tokens=6, temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": a}, {"type": "text", "text": b}]}])
    choice = got.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.token_ids)


def test_seeded_sampling_equals_offline(client, llm, rng):
    prompt, seed = words(rng), rng.randrange(2 ** 31)
    fields = dict(temperature=0.9, top_p=0.9, top_k=50, seed=seed, max_tokens=8)
    want = offline(llm, prompt, **fields)
    got = client.completions.create(model=MODEL, prompt=prompt, temperature=0.9, top_p=0.9, seed=seed, max_tokens=8,
                                    extra_body={"top_k": 50})
    assert got.choices[0].text == want.text
    assert got.usage.completion_tokens == len(want.token_ids)


def test_stop_string_and_max_tokens_bound(client, llm, rng):
    prompt = words(rng)
    free = offline(llm, prompt, temperature=0, max_tokens=12, ignore_eos=True)
    text = free.text
    stop = next((text[i:i + 2] for i in range(2, len(text) - 1) if text[i:i + 2].strip() and "\ufffd" not in
                 text[i:i + 2]), None)
    if stop is None:
        pytest.skip(f"no usable stop string in {text!r}")
    want = offline(llm, prompt, temperature=0, max_tokens=12, ignore_eos=True, stop=[stop])
    got = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12, stop=stop,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == want.text == text[:text.index(stop)]
    assert got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens == len(want.token_ids)


def test_logprobs_equal_offline(client, llm, rng):
    prompt = words(rng)
    want = offline(llm, prompt, temperature=0, max_tokens=4, logprobs=3)
    got = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=4, logprobs=3)
    lp = got.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([x.logprob for x in want.logprobs], abs=1e-4)
    assert [len(t) for t in lp.top_logprobs] == [len({llm.tokenizer.decode([i], skip_special_tokens=False)
                                                     for i, _ in x.top}) for x in want.logprobs]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                          temperature=0, max_tokens=4, logprobs=True, top_logprobs=2)
    want_chat = offline_chat(llm, prompt, temperature=0, max_tokens=4, logprobs=2)
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([x.logprob for x in want_chat.logprobs], abs=1e-4)
    assert all(len(c.top_logprobs) == 2 for c in content)


# -- streaming -------------------------------------------------------------------------------------------------------

def test_completion_stream_concatenates_with_usage(client, llm, rng):
    prompt = words(rng)
    want = offline(llm, prompt, temperature=0, max_tokens=9)
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=9, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=9, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [want.finish_reason]
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_chat_stream_concatenates_with_usage(client, llm, rng):
    content = words(rng)
    want = offline_chat(llm, content, temperature=0, max_tokens=8)
    messages = [{"role": "user", "content": content}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content == want.text
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert chunks[-1].usage.prompt_tokens == len(want.prompt_token_ids)
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_async_client_completion_and_chat(server, llm, rng):
    prompt = words(rng)
    want = offline(llm, prompt, temperature=0, max_tokens=6)
    want_chat = offline_chat(llm, prompt, temperature=0, max_tokens=6)

    async def go():
        async with aclient(server) as c:
            full = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
            parts = [ch.choices[0].text async for ch in
                     await c.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True)]
            chat = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=6, temperature=0)
            return full, "".join(parts), chat

    full, streamed, chat = asyncio.run(go())
    assert full.choices[0].text == streamed == want.text
    assert chat.choices[0].message.content == want_chat.text
    assert chat.usage.completion_tokens == len(want_chat.token_ids)


def test_64_concurrent_streams(server, llm, rng):
    prompts = [f"{i} {words(rng, rng.randint(1, 4))}" for i in range(64)]
    max_tokens = [rng.randint(3, 10) for _ in prompts]
    is_chat = [i % 2 == 1 for i in range(64)]  # half completions, half chat
    params = [llm.sampling(temperature=0, max_tokens=m) for m in max_tokens]
    plain = llm.generate([p for p, c in zip(prompts, is_chat) if not c], [q for q, c in zip(params, is_chat) if not c])
    chats = llm.chat([[{"role": "user", "content": p}] for p, c in zip(prompts, is_chat) if c],
                     [q for q, c in zip(params, is_chat) if c])
    want = [chats.pop(0) if c else plain.pop(0) for c in is_chat]

    async def one(c, prompt: str, m: int, chat: bool) -> tuple[str, str | None]:
        if chat:
            s = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=m, temperature=0, stream=True)
            pieces = [(ch.choices[0].delta.content or "", ch.choices[0].finish_reason) async for ch in s]
        else:
            s = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=m, temperature=0, stream=True)
            pieces = [(ch.choices[0].text, ch.choices[0].finish_reason) async for ch in s]
        return "".join(p for p, _ in pieces), next((f for _, f in pieces if f), None)

    async def go():
        async with aclient(server) as c:
            return await asyncio.gather(*(one(c, p, m, ch) for p, m, ch in zip(prompts, max_tokens, is_chat)))

    results = asyncio.run(go())
    for i, ((text, reason), w) in enumerate(zip(results, want)):
        assert (text, reason) == (w.text, w.finish_reason), f"client {i} ({prompts[i]!r})"
    text = wait_idle(server)
    assert metric(text, "dsv3_cache_blocks_used") == 0
    assert metric(text, "dsv3_cache_blocks_total") > 0
    assert metric(text, "dsv3_time_to_first_token_seconds_count") >= 64


def test_disconnects_free_blocks_and_others_complete(server, llm, rng):
    prompt = words(rng)
    want = offline(llm, prompt, temperature=0, max_tokens=10)
    cut_after = [rng.randint(1, 6) for _ in range(12)]

    async def quitter(c, k: int, n: int) -> int:
        s = await c.completions.create(model=MODEL, prompt=f"{k} {words(rng)}", max_tokens=200, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
        seen = 0
        async with s:
            async for _ in s:
                seen += 1
                if seen >= n:
                    break  # leaving the block closes the connection mid-stream
        return seen

    async def impatient(k: int) -> None:  # a non-streaming client that gives up
        body = {"model": MODEL, "prompt": f"{k} {words(rng)}", "max_tokens": TOKENS_LIMIT, "ignore_eos": True}
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as h:
            with pytest.raises(httpx.ReadTimeout):
                # no byte comes before all 256 tokens are done: one thread here decodes ~100-150 tok/s on a quiet
                # machine, so 1.5 s was within reach; 0.75 s needs 340 tok/s, and still lets the server admit it
                await h.post(server.url("/v1/completions"), json=body, timeout=httpx.Timeout(30, read=0.75))

    async def stayer(c) -> str:
        s = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True)
        return "".join([ch.choices[0].text async for ch in s])

    async def go():
        async with aclient(server) as c:
            return await asyncio.gather(stayer(c), *(quitter(c, k, n) for k, n in enumerate(cut_after)),
                                        impatient(100), impatient(101))

    stayed, *seen = asyncio.run(go())
    assert stayed == want.text
    assert seen[:12] == cut_after
    text = wait_idle(server, timeout=15)
    assert metric(text, "dsv3_cache_blocks_used") == 0 and metric(text, "dsv3_num_requests_running") == 0
    aborted = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith("dsv3_requests_total{") and 'outcome="abort"' in line)
    assert aborted >= 14
    # and it keeps serving
    again = httpx.post(server.url("/v1/completions"), headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": MODEL, "prompt": prompt, "max_tokens": 10, "temperature": 0}, timeout=60)
    assert again.json()["choices"][0]["text"] == want.text


# -- errors ----------------------------------------------------------------------------------------------------------

AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
LONG_PROMPT = "x" * 300  # ~300 tokens with the embedded byte-level tokenizer

ERROR_CASES = [
    # (name, path, body (dict or raw bytes), headers, status, param, words the message must contain)
    ("malformed json", "/v1/completions", b'{"model": "m", "prompt": ', AUTH, 400, None, ["JSON"]),
    ("not an object", "/v1/chat/completions", b'[1, 2]', AUTH, 400, None, ["JSON object"]),
    ("NaN", "/v1/completions", b'{"model": "deepseek-v3-default", "prompt": "a", "temperature": NaN}', AUTH, 400,
     None, ["NaN"]),
    ("unknown field", "/v1/completions", {"model": MODEL, "prompt": "a", "bogus": 1}, AUTH, 400, "bogus", ["bogus"]),
    ("wrong type", "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": "9"}, AUTH, 400, "max_tokens",
     ["max_tokens"]),
    ("missing model", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]}, AUTH, 400, "model",
     ["model"]),
    ("bad prompt", "/v1/completions", {"model": MODEL, "prompt": [1, "a"]}, AUTH, 400, "prompt", ["prompt"]),
    ("bad temperature", "/v1/completions", {"model": MODEL, "prompt": "a", "temperature": -1}, AUTH, 400,
     "temperature", ["temperature"]),
    ("bad top_p", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a"}],
                                          "top_p": 0}, AUTH, 400, "top_p", ["top_p"]),
    ("zero max_tokens", "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 0}, AUTH, 400,
     "max_tokens", ["max_tokens"]),
    ("max_tokens beyond limit", "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": TOKENS_LIMIT + 1},
     AUTH, 400, "max_tokens", [str(TOKENS_LIMIT + 1), str(TOKENS_LIMIT)]),
    ("beyond context", "/v1/completions", {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 250}, AUTH, 400,
     "max_tokens", ["250", str(MAX_MODEL_LEN), "301"]),
    ("token id outside vocab", "/v1/completions", {"model": MODEL, "prompt": [5, 100000]}, AUTH, 400, "prompt",
     ["100000"]),
    ("n too large", "/v1/completions", {"model": MODEL, "prompt": "a", "n": 1000}, AUTH, 400, "n", ["n must"]),
    ("image part", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     AUTH, 400, "messages[0].content", ["image_url"]),
    ("no role", "/v1/chat/completions", {"model": MODEL, "messages": [{"content": "a"}]}, AUTH, 400, "messages",
     ["role"]),
    ("top_logprobs alone", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, AUTH, 400, "top_logprobs",
     ["logprobs"]),
    ("too many logprobs", "/v1/completions", {"model": MODEL, "prompt": "a", "logprobs": 50}, AUTH, 400, "logprobs",
     ["logprobs"]),
    ("unknown model", "/v1/completions", {"model": "gpt-4", "prompt": "a"}, AUTH, 404, "model", ["gpt-4"]),
    ("unknown model id", "/v1/models/gpt-4", None, AUTH, 404, "model", ["gpt-4"]),
    ("unknown url", "/v1/nothing", {"model": MODEL}, AUTH, 404, None, ["/v1/nothing"]),
    ("missing key", "/v1/completions", {"model": MODEL, "prompt": "a"}, {}, 401, None, ["API key"]),
    ("wrong key", "/v1/chat/completions", {"model": MODEL, "messages": []}, {"Authorization": "Bearer nope"}, 401,
     None, ["API key"]),
    ("wrong key on models", "/v1/models", None, {"Authorization": "Bearer nope"}, 401, None, ["API key"]),
    ("oversized body", "/v1/completions", {"model": MODEL, "prompt": "y" * (BODY_LIMIT + 10)}, AUTH, 413, None,
     [str(BODY_LIMIT)]),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_error_bodies(server, case):
    name, path, body, headers, status, param, needles = case
    with httpx.Client(timeout=60) as h:
        if body is None:
            r = h.get(server.url(path), headers=headers)
        else:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = h.post(server.url(path), headers={"Content-Type": "application/json", **headers}, content=content)
        assert r.status_code == status, r.text
        data = r.json()
        assert list(data) == ["error"] and set(data["error"]) == {"message", "type", "param", "code"}, data
        err = data["error"]
        assert isinstance(err["message"], str) and "\n" not in err["message"] and err["message"]
        assert err["type"] == "invalid_request_error"
        assert err["param"] == param, err
        for needle in needles:
            assert needle in err["message"], err["message"]
        ok = h.post(server.url("/v1/completions"), headers=AUTH,
                    content=json.dumps({"model": MODEL, "prompt": "ok", "max_tokens": 2}).encode())
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_errors_through_openai_client(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=250)
    assert e.value.status_code == 400 and "250" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "a"}])
    with openai.OpenAI(base_url=server.url("/v1"), api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}], stream=True,
                                       temperature=-3)
    assert client.completions.create(model=MODEL, prompt="still here", max_tokens=2).usage.completion_tokens >= 1


# -- shutdown --------------------------------------------------------------------------------------------------------

def test_sigterm_aborts_in_flight_and_exits_cleanly():
    # 2000 tokens take several seconds even on a fast machine: the 1 s grace period cuts the stream before its end
    with ServerProcess("--dtype", "float32", "--max-model-len", "2048", "--kv-cache-memory", "16MiB",
                       "--shutdown-timeout", "1", "--log-level", "warning") as server:
        async def go():
            async with openai.AsyncOpenAI(base_url=server.url("/v1"), api_key="x", max_retries=0, timeout=60) as c:
                s = await c.completions.create(model=MODEL, prompt="long", max_tokens=2000, stream=True,
                                               extra_body={"ignore_eos": True})
                n, t0 = 0, None
                try:
                    async for _ in s:
                        n += 1
                        if n == 2:
                            server.proc.send_signal(signal.SIGTERM)
                            t0 = time.monotonic()
                except (openai.APIError, httpx.HTTPError):
                    pass  # the stream is cut when the grace period ends
                return n, t0

        n, t0 = asyncio.run(go())
        status = server.proc.wait(30)
        elapsed = time.monotonic() - t0
        assert status == 0, server.log()[-2000:]
        assert n < 2000 and elapsed < 20, (n, elapsed)
        assert "Traceback" not in server.log(), server.log()[-2000:]


def test_chunked_oversized_body_is_refused(server):
    def chunks():
        for _ in range(BODY_LIMIT // 1024 + 8):
            yield b" " * 1024  # no Content-Length: the server must count as it reads

    r = httpx.post(server.url("/v1/completions"), headers=AUTH, content=chunks(), timeout=60)
    assert r.status_code == 413 and str(BODY_LIMIT) in r.json()["error"]["message"]


@pytest.mark.parametrize("argv, needle", [(["--port", "70000"], "--port"), (["--max-num-seqs", "0"], "--max-num-seqs"),
                                          (["--kv-cache-memory", "lots"], "--kv-cache-memory"),
                                          (["--bogus"], "--bogus")])
def test_cli_bad_options_are_one_line(argv, needle):
    import subprocess
    import sys

    from tests.serve_support import ROOT

    r = subprocess.run([sys.executable, "-m", "core.serve", *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
