"""Deny by default: every route of the app must declare who may call it.

A route's policy is read from its dependency tree: a ``require_role(role)`` dependency (the role; the strongest
if several) or the :func:`fleet_server.api.deps.public` marker (``"public"``). :func:`check_route_policies`,
called at the end of ``create_app``, raises :class:`RoutePolicyError` naming every route that has neither (or
both), so a route added without a policy stops the server from starting, and the test suite with it.

FastAPI's own documentation routes (``/openapi.json``, ``/docs``, ``/docs/oauth2-redirect``, ``/redoc``) are
public: the schema describes the API's shape, which is open source anyway, and holds no data. Routes that are
not FastAPI routes (``app.mount(...)``, plain Starlette routes) have no dependencies: mark them with
:func:`mark_public` or they are refused too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from starlette.routing import BaseRoute, Route

from fleet_server.api.deps import public
from fleet_server.auth.roles import ROLES

__all__ = ["PUBLIC", "RouteInfo", "RoutePolicyError", "check_route_policies", "iter_routes", "mark_public",
           "route_policy"]

PUBLIC = "public"
_MARK = "fleet_policy"


class RoutePolicyError(RuntimeError):
    """Routes without a policy (or with contradicting ones); ``routes`` lists them as ``"GET /path"``."""

    def __init__(self, routes: list[str]) -> None:
        super().__init__("routes without an access policy (add Depends(require_role(...)) or "
                         "dependencies=[Depends(public)]): " + "; ".join(routes))
        self.routes = routes


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """One route as the app serves it: its full path, methods and policy (``None``: none declared)."""

    path: str
    methods: frozenset[str]
    policy: str | None
    route: BaseRoute
    """The original route object (``APIRoute`` for FastAPI routes)."""
    dependant: Dependant | None
    conflict: bool = False
    """Both ``public`` and a role were declared."""


def mark_public(route: BaseRoute) -> BaseRoute:
    """Declare a non-FastAPI route (a mount, a plain Starlette route) public; returns it."""
    setattr(route, _MARK, PUBLIC)
    return route


def _policies(dependant: Dependant, seen: set[int] | None = None) -> set[str]:
    seen = set() if seen is None else seen
    found: set[str] = set()
    for dep in dependant.dependencies:
        if id(dep) in seen:
            continue
        seen.add(id(dep))
        call: Any = dep.call
        if call is public:
            found.add(PUBLIC)
        role = getattr(call, "required_role", None)
        if isinstance(role, str) and role in ROLES:
            found.add(role)
        found |= _policies(dep, seen)
    return found


def route_policy(dependant: Dependant) -> tuple[str | None, bool]:
    """``(policy, conflict)`` of a route's dependency tree: the strongest role required, else ``"public"``
    if marked so, else ``None``; ``conflict`` when both a role and ``public`` are declared."""
    found = _policies(dependant)
    roles = [r for r in ROLES if r in found]
    if roles:
        return roles[-1], PUBLIC in found
    return (PUBLIC if PUBLIC in found else None), False


def _flatten(app: FastAPI) -> Iterator[tuple[BaseRoute, Any]]:
    """(original route, effective route) pairs, with included routers expanded (FastAPI >= 0.16x keeps
    them lazily as ``_IncludedRouter``; older versions copy their routes into ``app.routes``)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # pragma: no cover - older FastAPI: app.routes are the effective routes
        for route in app.routes:
            yield route, route
        return
    for ctx in iter_route_contexts(app.routes):
        yield ctx.original_route, ctx


def iter_routes(app: FastAPI) -> Iterator[RouteInfo]:
    """Every route the app serves, with its policy (FastAPI's documentation routes are ``public``)."""
    docs = {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url} - {None}
    for original, effective in _flatten(app):
        path = str(getattr(effective, "path", None) or getattr(original, "path", ""))
        methods = frozenset(getattr(effective, "methods", None) or ())
        dependant = getattr(effective, "dependant", None)
        if dependant is not None:
            policy, conflict = route_policy(dependant)
            yield RouteInfo(path, methods, policy, original, dependant, conflict)
            continue
        marked = getattr(original, _MARK, None) or getattr(effective, _MARK, None)
        is_doc = type(original) is Route and path in docs
        yield RouteInfo(path, methods, PUBLIC if marked == PUBLIC or is_doc else None, original, None)


def check_route_policies(app: FastAPI) -> None:
    """Raise :class:`RoutePolicyError` if any route has no policy, or both ``public`` and a role."""
    bad = []
    for info in iter_routes(app):
        if info.policy is None or info.conflict:
            methods = ",".join(sorted(info.methods)) or type(info.route).__name__
            bad.append(f"{methods} {info.path}" + (" (both public and a role)" if info.conflict else ""))
    if bad:
        raise RoutePolicyError(bad)
