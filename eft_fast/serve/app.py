"""The FastAPI application: OpenAI-compatible endpoints over an :class:`AsyncEFTEngine`.

    GET  /health               200 while the engine runs, else 503
    GET  /v1/models            the one served model
    POST /v1/completions       see completions.py
    POST /v1/chat/completions  see chat.py
    GET  /metrics              Prometheus text (metrics.py)

With an API key, the /v1 endpoints need ``Authorization: Bearer <key>`` (401 otherwise).
Every error is the OpenAI envelope; an unknown field is a 400 naming it.
"""
from __future__ import annotations

import hmac

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.async_engine import AsyncEFTEngine
from .chat import create_chat_completion
from .completions import create_completion
from .errors import (APIError, BodyLimit, api_error_handler, http_error_handler, internal_error_handler,
                     validation_error_handler)
from .metrics import PROMETHEUS_CONTENT_TYPE, render_metrics
from .protocol import ChatCompletionRequest, CompletionRequest
from .state import ServerState

DEFAULT_MAX_BODY_BYTES = 16 << 20


def build_app(engine: AsyncEFTEngine, *, served_model_name: str, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The server's ASGI application (run it with uvicorn, or use :func:`eft_fast.serve.cli.serve`).

    Args:
        engine: the engine; the application does not own it (shut it down after the server).
        served_model_name: the name clients pass as ``model``.
        api_key: if set, the /v1 endpoints need it as a bearer token.
        max_body_bytes: larger request bodies get 413 before they are parsed.
    """
    state = ServerState(engine, served_model_name, api_key)
    app = FastAPI(title="eft_fast", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, internal_error_handler)

    def authorized(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise APIError(401, "a valid API key is needed: Authorization: Bearer <key>", code="invalid_api_key")

    @app.get("/health")
    async def health():
        if not engine.is_running or state.shutting_down:
            raise APIError(503, "the engine is not running", code="engine_stopped")
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "eft_fast", "max_model_len": state.max_model_len}]}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        return await create_completion(state, body, request)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await create_chat_completion(state, body, request)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(engine.stats(), state.model_name),
                                 media_type=PROMETHEUS_CONTENT_TYPE)

    return app
