"""Prometheus metrics of the server (`GET /metrics`), in a registry of its own (so several servers may live in one
process, as in tests).

Counters: requests by endpoint and outcome (stop, length, abort, error), prompt and generation tokens. Gauges (set by
the engine thread after every step and every abort): requests waiting and running, cache blocks in use and in all.
Histograms: time to first token, time per output token after the first, end-to-end request latency (seconds)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from core.engine.engine import RequestOutput

PREFIX = "dsv3_"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = {"model_name": model_name}
        self.requests = Counter(PREFIX + "requests", "Requests answered, by endpoint and outcome",
                                ["model_name", "endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of accepted requests",
                                     ["model_name"], registry=r).labels(**labels)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated",
                                         ["model_name"], registry=r).labels(**labels)
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Requests queued, not yet admitted to the batch",
                             ["model_name"], registry=r).labels(**labels)
        self.running = Gauge(PREFIX + "num_requests_running", "Requests in the running batch",
                             ["model_name"], registry=r).labels(**labels)
        self.blocks_used = Gauge(PREFIX + "cache_blocks_used", "Paged latent cache blocks in use",
                                 ["model_name"], registry=r).labels(**labels)
        self.blocks_total = Gauge(PREFIX + "cache_blocks_total", "Paged latent cache blocks in all",
                                  ["model_name"], registry=r).labels(**labels)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time from arrival to the first token",
                              ["model_name"], buckets=LATENCY_BUCKETS, registry=r).labels(**labels)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds", "Mean time per output token after the first",
                              ["model_name"], buckets=LATENCY_BUCKETS, registry=r).labels(**labels)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Time from arrival to the last token",
                             ["model_name"], buckets=LATENCY_BUCKETS, registry=r).labels(**labels)
        self.model_name = model_name

    # -- from the HTTP side ----------------------------------------------------------------------------------------

    def request_done(self, endpoint: str, outcome: str) -> None:
        self.requests.labels(self.model_name, endpoint, outcome).inc()

    def prompt(self, num_tokens: int) -> None:
        self.prompt_tokens.inc(num_tokens)

    # -- from the engine thread (core.serve.engine_loop.EngineObserver) ---------------------------------------------

    def on_engine_state(self, engine) -> None:
        self.waiting.set(engine.scheduler.num_waiting)
        self.running.set(engine.scheduler.num_running)
        self.blocks_used.set(engine.pool.num_used)
        self.blocks_total.set(engine.pool.num_blocks)

    def on_output(self, out: RequestOutput) -> None:
        self.generation_tokens.inc(len(out.new_token_ids))
        if not out.finished:
            return
        self.e2e.observe(out.seconds)
        if out.time_to_first_token is not None:
            self.ttft.observe(out.time_to_first_token)
            if len(out.token_ids) > 1:
                self.tpot.observe((out.seconds - out.time_to_first_token) / (len(out.token_ids) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
