"""Broken access control: the role x route matrix over every route of a real app, and deny by default.

Routes are discovered from ``create_app(...)`` itself (:func:`fleet_server.auth.policy.iter_routes`), so a
route another engineer adds is in the matrix without editing this file. Each is called anonymously and with a
real user's API token for every role (path parameters filled with plausible dummies, no body):

* anonymous: 401 with ``WWW-Authenticate`` (public routes: never 401/403);
* a role weaker than the route's: 403, and the denial is in the audit log;
* the route's role or a stronger one: neither 401 nor 403 (404/422 for the dummy values are fine).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from fleet_server import app as app_module
from fleet_server.api.deps import public, require_role
from fleet_server.app import create_app
from fleet_server.auth.policy import PUBLIC, RoutePolicyError, check_route_policies, iter_routes, mark_public
from fleet_server.auth.roles import ROLES, role_at_least
from fleet_server.models import AuditLog
from fleet_server.settings import FleetSettings
from tests.server.auth_support import bearer, endpoints, role_tokens
from tests.server.support import TOKEN


def _denials(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(AuditLog)
                                .where(AuditLog.action == "access.denied")).scalar_one())  # type: ignore[arg-type]


def test_role_route_matrix(client: TestClient, engine: Engine) -> None:
    tokens = role_tokens(engine)
    routes = endpoints(client.app)  # type: ignore[arg-type]
    assert len({e.label for e in routes}) >= 20, "route discovery found too few routes"
    problems: list[str] = []
    denied_expected = 0
    for ep in routes:
        anon = client.request(ep.method, ep.path)
        if ep.policy == PUBLIC:
            if anon.status_code in (401, 403):
                problems.append(f"{ep.label} is public but answered {anon.status_code} anonymously")
        elif anon.status_code != 401 or "bearer" not in anon.headers.get("www-authenticate", "").lower():
            problems.append(f"{ep.label} ({ep.policy}) answered {anon.status_code} anonymously, expected 401")
        for role in ROLES:
            got = client.request(ep.method, ep.path, headers=bearer(tokens[role])).status_code
            if ep.policy == PUBLIC or role_at_least(role, ep.policy):
                if got in (401, 403):
                    problems.append(f"{ep.label} ({ep.policy}) refused {role} with {got}")
            else:
                denied_expected += 1
                if got != 403:
                    problems.append(f"{ep.label} ({ep.policy}) answered {got} to {role}, expected 403")
    assert not problems, "\n".join(problems)
    assert _denials(engine) == denied_expected  # every 403 left exactly one access.denied record


def test_matrix_covers_every_route_of_the_app(client: TestClient) -> None:
    """The matrix's route list is the app's: every route the app serves has a policy and is enumerated."""
    app: FastAPI = client.app  # type: ignore[assignment]
    infos = list(iter_routes(app))
    assert all(i.policy is not None for i in infos)
    labels = {e.label for e in endpoints(app)}
    for info in infos:
        for method in info.methods - {"HEAD"} if info.dependant is None else info.methods:
            assert f"{method} {info.path}" in labels


def test_every_api_route_requires_a_role_except_login() -> None:
    """Under /api/v1 only login is public (the bundle download lives outside /api)."""
    app = create_app(FleetSettings(database_url="sqlite://", api_token=TOKEN))
    public_api = {f"{sorted(i.methods)} {i.path}" for i in iter_routes(app)
                  if i.path.startswith("/api/") and i.policy == PUBLIC}
    assert public_api == {"['POST'] /api/v1/auth/login"}


def _app_with(extra: APIRouter) -> FastAPI:
    app = create_app(FleetSettings(database_url="sqlite://", api_token=TOKEN))
    app.include_router(extra)
    return app


def test_route_without_policy_is_refused() -> None:
    router = APIRouter()

    @router.get("/api/v1/forgotten")
    def forgotten() -> dict[str, str]:
        return {}

    with pytest.raises(RoutePolicyError) as err:
        check_route_policies(_app_with(router))
    assert err.value.routes == ["GET /api/v1/forgotten"]


def test_route_added_directly_without_policy_is_refused() -> None:
    app = create_app(FleetSettings(database_url="sqlite://", api_token=TOKEN))

    @app.post("/api/v1/sneaky")
    def sneaky() -> None:
        return None

    with pytest.raises(RoutePolicyError, match="POST /api/v1/sneaky"):
        check_route_policies(app)


def test_create_app_refuses_to_build_with_an_unprotected_route(monkeypatch: pytest.MonkeyPatch) -> None:
    router = APIRouter()

    @router.delete("/api/v1/everything")
    def delete_everything() -> None:
        return None

    monkeypatch.setattr(app_module, "audit", SimpleNamespace(router=router))
    with pytest.raises(RoutePolicyError, match="DELETE /api/v1/everything"):
        create_app(FleetSettings(database_url="sqlite://", api_token=TOKEN))


def test_public_and_role_together_is_refused() -> None:
    router = APIRouter()

    @router.get("/api/v1/confused", dependencies=[Depends(public)])
    def confused(_: object = Depends(require_role("viewer"))) -> None:
        return None

    with pytest.raises(RoutePolicyError, match="both public and a role"):
        check_route_policies(_app_with(router))


def test_router_level_and_nested_policies_are_found() -> None:
    """A role declared on the router, or inside a sub-dependency, counts; the strongest one is the policy."""
    router = APIRouter(dependencies=[Depends(require_role("operator"))])

    def nested(_: object = Depends(require_role("admin"))) -> None:
        return None

    @router.get("/api/v1/router-level")
    def router_level() -> None:
        return None

    @router.get("/api/v1/nested")
    def nested_route(_: None = Depends(nested)) -> None:
        return None

    app = _app_with(router)
    check_route_policies(app)
    policies = {i.path: i.policy for i in iter_routes(app)}
    assert policies["/api/v1/router-level"] == "operator"
    assert policies["/api/v1/nested"] == "admin"


def test_mount_needs_an_explicit_public_mark(tmp_path: object) -> None:
    app = create_app(FleetSettings(database_url="sqlite://", api_token=TOKEN))
    mount = Mount("/files", app=StaticFiles(directory=str(tmp_path)))
    app.router.routes.append(mount)
    with pytest.raises(RoutePolicyError, match="/files"):
        check_route_policies(app)
    mark_public(mount)
    check_route_policies(app)


def test_unknown_role_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown role"):
        require_role("superuser")
