"""The admin web console: a static single-page app served under ``/console/``.

The console is plain HTML, CSS and ES modules (no build step, no third-party code, nothing fetched from
elsewhere). It holds no data: every page reads and every button acts through the JSON API under ``/api/v1``
with the console session cookie, sending the session's CSRF token in ``X-CSRF-Token`` on unsafe requests. So
every operation has one definition (the API route), with its role check, validation and audit record; the
console adds none.

Routes (the console's own files are public: they contain no data; the API behind them authenticates every
call):

* ``GET /`` and ``GET /console``: redirect to ``/console/``.
* ``GET /console/``: the app's page (``index.html``).
* ``GET /console/{asset}``: one of the files of :data:`ASSETS` (anything else is 404).
* ``GET /api/v1/summary`` (viewer; :mod:`fleet_server.console.summary`): devices by state and rollouts by
  status for the dashboard, counted by the registry's own state rules.
* ``GET /console/policy.json``: which role each rollout action needs (read from the API routes' own
  ``require_role`` declarations) and the rollout states it is allowed from (:data:`ROLLOUT_ACTION_STATES`),
  so the console shows only the buttons that can work. The API still decides.

Every console response carries :data:`SECURITY_HEADERS`: a strict Content-Security-Policy (only this origin's
scripts and styles, no inline code, no framing, Trusted Types required with no policy, so the browser refuses
every string-to-HTML or string-to-script sink), ``X-Frame-Options: DENY``, ``X-Content-Type-Options: nosniff``
and ``Referrer-Policy: no-referrer``. See docs/console.md and ADR 0017.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from functools import cache
from importlib import resources

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse, RedirectResponse

from fleet_server.api.deps import ROLES, public
from fleet_server.auth.policy import PUBLIC, iter_routes
from fleet_server.console import summary
from fleet_server.rollouts.operations import ALLOWED_FROM

__all__ = ["ASSETS", "ROLLOUT_ACTION_STATES", "SECURITY_HEADERS", "rollout_action_roles", "router"]

SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; "
        "require-trusted-types-for 'script'; trusted-types 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}
"""Sent with every console response (pages, assets, redirects)."""

ASSETS: Mapping[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "dom.js": "text/javascript; charset=utf-8",
    "views.js": "text/javascript; charset=utf-8",
    "rollouts.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
"""The files under ``static/`` the console serves, with their media types (an allow-list: nothing else is
reachable, so no path can escape the directory)."""

ROLLOUT_ACTION_STATES: Mapping[str, tuple[str, ...]] = {
    action: tuple(s.value for s in states) for action, states in ALLOWED_FROM.items()}
"""The rollout states each action is allowed from (``fleet_server.rollouts.operations.ALLOWED_FROM``). Only
decides which buttons the console shows."""

_static = APIRouter(include_in_schema=False, dependencies=[Depends(public)])


def _headers(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {**SECURITY_HEADERS, **(extra or {})}


@cache
def _asset(name: str) -> tuple[bytes, str]:
    """The bytes of a static file and their strong ETag (read once per process)."""
    data = resources.files(__package__).joinpath("static", name).read_bytes()
    return data, '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


def _serve(request: Request, name: str) -> Response:
    data, etag = _asset(name)
    headers = _headers({"ETag": etag, "Cache-Control": "no-cache"})
    if etag in {t.strip() for t in request.headers.get("if-none-match", "").split(",")}:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return Response(data, media_type=ASSETS[name], headers=headers)


@_static.get("/")
@_static.get("/console")
def console_redirect() -> RedirectResponse:
    """The console lives at ``/console/``."""
    return RedirectResponse("/console/", status_code=status.HTTP_302_FOUND, headers=_headers())


@_static.get("/console/")
def console_index(request: Request) -> Response:
    """The single page of the console (its views are chosen by the URL fragment: ``#/devices``...)."""
    return _serve(request, "index.html")


def rollout_action_roles(app: FastAPI) -> dict[str, str | None]:
    """Action -> the role its ``POST /api/v1/rollouts/{id}/<action>`` route requires, read from the app's own
    route declarations (``None``: the app has no such route)."""
    found: dict[str, str | None] = dict.fromkeys(ROLLOUT_ACTION_STATES)
    for info in iter_routes(app):
        if "POST" not in info.methods or not info.path.startswith("/api/v1/rollouts/{"):
            continue
        action = info.path.rsplit("/", 1)[-1]
        if action in found and info.path.count("/") == 5 and info.policy not in (None, PUBLIC):
            found[action] = info.policy
    return found


@_static.get("/console/policy.json")
def console_policy(request: Request) -> JSONResponse:
    """``{"roles": [...weakest first], "rollout_actions": {action: {"role": r, "states": [...]}}}``."""
    roles = rollout_action_roles(request.app)
    body = {
        "roles": list(ROLES),
        "rollout_actions": {a: {"role": roles[a], "states": list(s)} for a, s in ROLLOUT_ACTION_STATES.items()},
    }
    return JSONResponse(body, headers=_headers({"Cache-Control": "no-cache"}))


@_static.get("/console/{asset}")
def console_asset(request: Request, asset: str) -> Response:
    """One static file of the console (HTML, CSS, ES modules); any other name is 404."""
    if asset not in ASSETS:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such console asset", headers=_headers())
    return _serve(request, asset)


router = APIRouter()
"""Everything the console serves: the static app (public) and ``GET /api/v1/summary`` (viewer)."""
router.include_router(_static)
router.include_router(summary.router)
