"""`python -m core.serve`: an OpenAI-compatible HTTP server on the engine (FastAPI + uvicorn).

One thread owns the engine (`engine_loop`); HTTP handlers (`app`, `generation`) validate requests in OpenAI's shapes
(`protocol`), submit them to that thread and stream its outputs back; errors are OpenAI's JSON error body
(`errors`); `/metrics` is Prometheus text (`metrics`). The server reaches the engine only through the small
`ServingEngine` interface, so under torchrun rank 0's `ranks.LeaderEngine` (which sends every step, and rank 0's
sampled tokens, to the other ranks running `ranks.follow`) plugs in unchanged."""
