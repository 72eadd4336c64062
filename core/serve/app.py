"""The FastAPI application: routes, API-key check, request body bound, and every error in OpenAI's shape.

    GET  /health                 200 {"status": "ok"} while the engine thread runs, else 503
    GET  /metrics                Prometheus text (core.serve.metrics)
    GET  /v1/models              the served model;  GET /v1/models/{name}
    POST /v1/completions         OpenAI completions (stream: server-sent events ending with [DONE])
    POST /v1/chat/completions    OpenAI chat completions, through the checkpoint's chat template

With an API key set, /v1/* require `Authorization: Bearer KEY` (401 otherwise); /health and /metrics stay open."""

from __future__ import annotations

import hmac
import logging
import traceback
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from core.serve import protocol as P
from core.serve.errors import APIError
from core.serve.generation import ServedModel, complete, make_job, stream
from core.serve.metrics import CONTENT_TYPE

log = logging.getLogger("core.serve")

DEFAULT_MAX_BODY_BYTES = 8 << 20
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def build_app(served: ServedModel, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The app for one served model. Its lifespan starts the engine thread and, at shutdown, stops it (aborting
    whatever is still in flight)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        served.loop.start()
        try:
            yield
        finally:
            served.loop.stop()

    app = FastAPI(title="deepseek-v3-portable", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = {404: f"Unknown request URL: {request.method} {request.url.path}.",
                   405: f"Method {request.method} is not allowed on {request.url.path}."}.get(e.status_code,
                                                                                           str(e.detail))
        return APIError(e.status_code, message, code="unknown_url" if e.status_code == 404 else None).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(p) for p in err.get("loc", ()))
        return APIError(400, f"Invalid value for '{loc}': {err.get('msg')}", loc or None).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception) -> JSONResponse:
        log.error("internal error on %s:\n%s", request.url.path, traceback.format_exc())
        return APIError(500, f"internal server error: {type(e).__name__}: {e}").response()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not header:
            raise APIError(401, "You didn't provide an API key. You need to provide your API key in an Authorization "
                                "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                           code="invalid_api_key")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        too_big = APIError(413, f"the request body exceeds this server's limit of {max_body_bytes} bytes",
                           code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise APIError(400, f"invalid Content-Length header {length[:40]!r}")
            if int(length) > max_body_bytes:
                raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    async def generate(request: Request, model: type, endpoint: str) -> Response:
        authorize(request)
        try:
            req = P.parse_body(await read_body(request), model)
            job = make_job(served, req)
        except APIError:
            served.metrics.request_done(endpoint, "error")
            raise
        if req.stream:
            return StreamingResponse(stream(served, job), media_type="text/event-stream", headers=SSE_HEADERS)
        result = await complete(served, job, request.is_disconnected)
        if result is None:  # the client is gone; nobody reads this
            return Response(status_code=499)
        return JSONResponse(result)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not served.loop.alive:
            return APIError(503, "the engine is not running").response()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(served.metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict:
        return {"id": served.name, "object": "model", "created": served.created, "owned_by": "deepseek-v3-portable",
                "max_model_len": served.max_model_len}

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> JSONResponse:
        authorize(request)
        if name != served.name:
            raise APIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")
        return JSONResponse(model_card())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, P.CompletionRequest, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, P.ChatCompletionRequest, "chat")

    return app
