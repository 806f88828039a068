"""The error body every route returns, and the ``responses=`` entries that document it in the OpenAPI schema
(so schemathesis and API clients know every status a route can answer)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

__all__ = ["ErrorBody", "error_responses"]


class ErrorBody(BaseModel):
    """``{"detail": "what was wrong and what to do"}`` (FastAPI's ``HTTPException`` shape)."""

    detail: Any


_TEXT = {
    400: "The request cannot be used as sent (the detail says why).",
    401: "Not authenticated: send a valid bearer token or log in.",
    403: "Authenticated, but the role does not allow this (or the CSRF check failed).",
    404: "No such resource.",
    409: "Conflicts with the resource's current state (the detail says which).",
    413: "The request body is larger than allowed.",
    416: "The requested byte range cannot be served.",
    422: "The request's values are invalid (the detail names the field).",
    503: "A dependency (database, broker) is unavailable; retry later.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route that can answer ``codes`` (401 and 403 are added: every API route is
    authenticated)."""
    return {code: {"model": ErrorBody, "description": _TEXT[code]} for code in sorted({401, 403, *codes})}
