"""Serving benchmark, modelled on sglang.bench_serving: random prompts of given input/output lengths sent at a given
concurrency to an OpenAI-compatible server (streaming /v1/completions), then the same requests run offline on the
engine in this process, to show what the HTTP layer costs.

    python bench/bench_serving.py [--base-url URL --model NAME [--api-key KEY]] [--concurrency 1,8,32]
                                  [--num-prompts N] [--input-len 32] [--output-len 16] [--range-ratio 1.0]
                                  [--vocab-size 500] [--backend cpu_ref] [--dtype float32] [--threads N]
                                  [--no-offline] [--json FILE]

Without --base-url it starts `python -m core.serve` on the embedded default (the given --backend and --dtype) on a
free loopback port and stops it afterwards. Prompts are random token ids in [10, --vocab-size) (as sglang's
"random" dataset), lengths drawn uniformly from [len * range_ratio, len]; every request asks for exactly its output
length (max_tokens with ignore_eos, greedy). Reported per concurrency: request throughput, output tokens/s, TTFT
(send -> first streamed chunk with choices) and TPOT ((latency - TTFT) / (output tokens - 1)) median and p99, and
the offline engine's output tokens/s for the same requests with max_num_seqs = concurrency (the ratio is the HTTP
overhead).
`--threads N` gives the local server (OMP_NUM_THREADS) and the offline engine (torch.set_num_threads) the same CPU
thread count; on a shared, oversubscribed CPU one thread is often several times faster than torch's default.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass
class Req:
    prompt: list[int]
    output_len: int


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    error: str = ""


def make_requests(n: int, input_len: int, output_len: int, ratio: float, vocab: int, seed: int) -> list[Req]:
    rng = random.Random(seed)
    return [Req([rng.randrange(10, vocab) for _ in range(rng.randint(max(1, int(input_len * ratio)), input_len))],
                rng.randint(max(1, int(output_len * ratio)), output_len)) for _ in range(n)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def one(client: httpx.AsyncClient, url: str, model: str, req: Req) -> Result:
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, None
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return Result(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    return Result(False, error=str(data["error"])[:200])
                if ttft is None and data.get("choices"):  # the first chunk that carries tokens
                    ttft = time.perf_counter() - t0
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        return Result(False, error=f"{type(e).__name__}: {e}")
    latency = time.perf_counter() - t0
    return Result(True, ttft if ttft is not None else latency, latency, tokens or 0)


async def run_load(base_url: str, model: str, api_key: str | None, reqs: list[Req], concurrency: int
                   ) -> tuple[list[Result], float]:
    url = base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(600), limits=limits) as client:
        await one(client, url, model, Req(reqs[0].prompt, 2))  # warm-up, not measured

        async def limited(req: Req) -> Result:
            async with sem:
                return await one(client, url, model, req)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(limited(r) for r in reqs))
        return list(results), time.perf_counter() - t0


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    out = sum(r.output_tokens for r in ok)
    return {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
            "request_throughput": len(ok) / duration, "output_tokens_per_s": out / duration, "output_tokens": out,
            "ttft_median_ms": 1e3 * percentile(ttft, 0.5), "ttft_p99_ms": 1e3 * percentile(ttft, 0.99),
            "tpot_median_ms": 1e3 * percentile(tpot, 0.5), "tpot_p99_ms": 1e3 * percentile(tpot, 0.99),
            "e2e_median_ms": 1e3 * percentile([r.latency for r in ok], 0.5),
            "errors": sorted({r.error for r in results if not r.ok})[:3]}


def offline(llm_args: dict, reqs: list[Req], concurrency: int, threads: int | None) -> float:
    """Output tokens/s of the engine on the same requests, at most `concurrency` running at once."""
    import torch

    from core.engine.engine import EngineConfig
    from core.engine.llm import LLM

    if threads:
        torch.set_num_threads(threads)
    llm = LLM(None, engine=EngineConfig(max_num_seqs=concurrency), **llm_args)
    llm.generate(reqs[0].prompt, llm.sampling(temperature=0, max_tokens=2, ignore_eos=True))  # warm-up
    params = [llm.sampling(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in reqs]
    t0 = time.perf_counter()
    outs = llm.generate([r.prompt for r in reqs], params)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0)


class LocalServer:
    """`python -m core.serve` on a free loopback port, stopped with SIGTERM."""

    def __init__(self, backend: str, dtype: str, max_num_seqs: int, threads: int | None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        cmd = [sys.executable, "-m", "core.serve", "--backend", backend, "--dtype", dtype, "--port", str(self.port),
               "--max-num-seqs", str(max_num_seqs), "--log-level", "warning"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"the server exited: {self.log.read().decode(errors='replace')[-2000:]}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise SystemExit("the server did not become healthy in 300 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


COLUMNS = [("concurrency", "conc", "{:d}"), ("completed", "done", "{:d}"), ("request_throughput", "req/s", "{:.2f}"),
           ("output_tokens_per_s", "out tok/s", "{:.1f}"), ("ttft_median_ms", "TTFT med ms", "{:.0f}"),
           ("ttft_p99_ms", "TTFT p99 ms", "{:.0f}"), ("tpot_median_ms", "TPOT med ms", "{:.1f}"),
           ("tpot_p99_ms", "TPOT p99 ms", "{:.1f}"), ("offline_output_tokens_per_s", "offline tok/s", "{:.1f}"),
           ("http_over_offline", "HTTP/offline", "{:.2f}")]


def table(rows: list[dict]) -> str:
    head = [h for _, h, _ in COLUMNS]
    cells = [[("-" if r.get(k) is None else f.format(r[k])) for k, _, f in COLUMNS] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", help="an OpenAI-compatible server (default: start core.serve here)")
    p.add_argument("--model", default="deepseek-v3-default", help="the model id the server serves")
    p.add_argument("--api-key")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--num-prompts", type=int, default=0, help="requests per concurrency (default: 4 x conc, >= 8)")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--range-ratio", type=float, default=1.0)
    p.add_argument("--vocab-size", type=int, default=500, help="prompt token ids are drawn from [10, this)")
    p.add_argument("--backend", default="cpu_ref")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    p.add_argument("--threads", type=int, help="CPU threads of the local server and the offline engine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-offline", action="store_true", help="skip the offline engine run")
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    server = None if args.base_url else LocalServer(args.backend, args.dtype, max(levels), args.threads)
    base_url = args.base_url or server.base_url
    rows, batches = [], {}
    try:
        for c in levels:
            n = args.num_prompts or max(8, 4 * c)
            reqs = make_requests(n, args.input_len, args.output_len, args.range_ratio, args.vocab_size,
                                 args.seed + c)
            batches[c] = reqs
            results, duration = asyncio.run(run_load(base_url, args.model, args.api_key, reqs, c))
            rows.append({"concurrency": c, "num_prompts": n, **summarize(results, duration)})
            print(f"concurrency {c}: {rows[-1]['completed']}/{n} in {duration:.1f} s", file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
    if not args.no_offline:
        for row in rows:
            tok_s = offline({"backend": args.backend, "dtype": args.dtype}, batches[row["concurrency"]],
                            row["concurrency"], args.threads)
            row["offline_output_tokens_per_s"] = tok_s
            row["http_over_offline"] = row["output_tokens_per_s"] / tok_s
    print(f"bench_serving: {base_url} model {args.model}; input {args.input_len}, output {args.output_len} tokens "
          f"(range ratio {args.range_ratio}); {args.backend} {args.dtype}, threads {args.threads or 'default'}")
    print(table(rows))
    for row in rows:
        if row["errors"]:
            print(f"concurrency {row['concurrency']} errors: {row['errors']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
