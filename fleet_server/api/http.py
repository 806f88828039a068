"""HTTP conformance the framework leaves out, so answers match the OpenAPI schema (schemathesis checks it):

* **405 lists every method of the path.** FastAPI keeps one route per method, and Starlette's 405 names only
  the methods of the first route whose path matched (``Allow: GET`` for ``/api/v1/users``, which also takes
  POST). :class:`AllowHeaderMiddleware` rewrites ``Allow`` on 405 answers to the union of the methods of every
  route matching the path (RFC 9110 §15.5.6).
* **An undecodable request body is a 422 like any other invalid JSON.** FastAPI answers invalid JSON with 422
  (``json_invalid``) but a body that is not even text (bad UTF-8) with an undocumented 400; it becomes a 422
  of the same shape.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["AllowHeaderMiddleware", "install"]


def _method_map(app: FastAPI) -> list[tuple[re.Pattern[str], int, frozenset[str]]]:
    from fleet_server.auth.policy import iter_routes

    cached: list[tuple[re.Pattern[str], int, frozenset[str]]] | None = getattr(app.state, "_allow_map", None)
    if cached is None:
        cached = [(compile_path(info.path)[0], info.path.count("{"), info.methods)
                  for info in iter_routes(app) if info.methods]
        app.state._allow_map = cached
    return cached


def allowed_methods(app: FastAPI, path: str) -> set[str]:
    """Every method the routes of ``app`` most specific for ``path`` serve: the matching path templates with
    the fewest parameters (``/bundles/gc`` is its own resource, not a ``/bundles/{digest}``)."""
    matches = [(params, methods) for regex, params, methods in _method_map(app) if regex.match(path)]
    if not matches:
        return set()
    fewest = min(params for params, _ in matches)
    return {m for params, methods in matches if params == fewest for m in methods}


class AllowHeaderMiddleware:
    """On a 405 answer, ``Allow`` lists every method the path supports (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_allow(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                methods = allowed_methods(scope["app"], scope["path"])
                if methods:
                    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
                    headers.append((b"allow", ", ".join(sorted(methods)).encode()))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_allow)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
        detail: list[dict[str, Any]] = [{"type": "json_invalid", "loc": ["body"], "msg": "JSON decode error",
                                         "input": {}, "ctx": {"error": "the body is not UTF-8 text"}}]
        return JSONResponse({"detail": detail}, status_code=422)
    return await http_exception_handler(request, exc)


def install(app: FastAPI) -> None:
    """Add the middleware and the exception handler to ``app``."""
    app.add_middleware(AllowHeaderMiddleware)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
