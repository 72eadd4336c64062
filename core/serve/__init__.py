"""`python -m core.serve`: an OpenAI-compatible HTTP server on the engine (FastAPI + uvicorn).

One thread owns the engine (`engine_loop`); HTTP handlers (`app`, `generation`) validate requests in OpenAI's shapes
(`protocol`), submit them to that thread and stream its outputs back; errors are OpenAI's JSON error body
(`errors`); `/metrics` is Prometheus text (`metrics`). The server reaches the engine only through the small
`ServingEngine` interface, so a multi-rank engine (rank 0 serving HTTP and driving the others) plugs in unchanged."""
