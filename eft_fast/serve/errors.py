"""Errors in the OpenAI envelope ``{"error": {"message", "type", "param", "code"}}``, and the
guard that keeps a huge request body from reaching the JSON parser."""
from __future__ import annotations

import json
import logging
import re

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

logger = logging.getLogger(__name__)
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 405: "invalid_request_error", 500: "internal_server_error", 503: "service_unavailable"}
_LEADING_NAME = re.compile(r"^(?:params\.)?([a-z_]+)(\[\d+\])?\b")


class APIError(Exception):
    """An error answered with ``status`` and the OpenAI error envelope."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    @classmethod
    def from_value_error(cls, exc: Exception, fields: set[str]) -> "APIError":
        """A 400 for a TypeError / ValueError of the engine's checks, whose message starts with
        the offending field's name (``param`` when it is one of the request's ``fields``)."""
        message = str(exc)
        match = _LEADING_NAME.match(message)
        param = match.group(1) if match and match.group(1) in fields else None
        return cls(400, message, param=param)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code if code is not None else status}}


async def api_error_handler(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def http_error_handler(_: Request, exc) -> JSONResponse:
    """Starlette's own errors (an unknown path: 404, a wrong method: 405) in the envelope."""
    return APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)).response()


async def internal_error_handler(_: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error in a request", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()


async def validation_error_handler(_: Request, exc: RequestValidationError) -> JSONResponse:
    """The first problem of a body that does not parse or fit the schema, as a 400."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('msg')}", code="invalid_json").response()
    # a union's branch names (e.g. "list[int]") are not fields: keep the field path only
    path = [x for x in loc if not any(c in x for c in "[]") and x not in ("str", "int", "float", "bool")]
    param = ".".join(path) or None
    if first.get("type") == "extra_forbidden":
        message = f"unknown field {param!r}"
    elif first.get("type") == "missing":
        message = f"{param} is required"
    else:
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return APIError(400, message, param=param).response()


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` (declared or streamed) is answered
    with 413 before the application sees it. The body is read here (at most ``max_bytes``)
    and replayed to the application: a limit raised inside the application's own read would
    reach FastAPI's body parser, which answers 400."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break                          # the client left: let the application see it
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                return await self._refuse(send)
            if not message.get("more_body", False):
                break
        replay = iter(messages)

        async def replayed_receive():
            message = next(replay, None)
            return message if message is not None else await receive()

        await self.app(scope, replayed_receive, send)

    async def _refuse(self, send) -> None:
        body = json.dumps(error_body(413, f"the request body is larger than {self.max_bytes} bytes")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

