"""Missing audit: each auth action leaves exactly one record with actor, action, target, outcome and a UTC
time; denials are recorded even though the request fails; ``GET /api/v1/audit`` filters and pages newest
first and is for admins only. SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from fleet_server.models import AuditLog, utcnow
from tests.server.auth_support import PASSWORD, bearer, cookie, make_session, make_token, make_user
from tests.server.support import AUTH


def _records(engine: Engine, since_id: int) -> list[AuditLog]:
    with Session(engine) as db:
        return list(db.exec(select(AuditLog).where(col(AuditLog.id) > since_id).order_by(col(AuditLog.id))))


def _last_id(engine: Engine) -> int:
    with Session(engine) as db:
        row = db.exec(select(AuditLog).order_by(col(AuditLog.id).desc())).first()
        return row.id if row is not None and row.id is not None else 0


def _one(engine: Engine, since_id: int, before: datetime, **want: Any) -> AuditLog:
    """The action left exactly one record, with these fields and a UTC time within the action."""
    records = _records(engine, since_id)
    assert len(records) == 1, [(r.action, r.outcome) for r in records]
    rec = records[0]
    for key, value in want.items():
        assert getattr(rec, key) == value, (key, getattr(rec, key), value)
    assert rec.at.tzinfo is not None and rec.at.utcoffset() == timedelta(0)
    assert before <= rec.at <= utcnow()
    return rec


def test_each_auth_action_leaves_one_record(client: TestClient, engine: Engine) -> None:
    make_user(engine, "chief", "admin", password=PASSWORD)
    admin = make_token(engine, "chief").secret
    ann_token: list[str] = []
    steps: list[tuple[str, Any, dict[str, Any]]] = [
        ("user create", lambda: client.post("/api/v1/users", json={"username": "ann", "role": "operator",
                                                                     "password": PASSWORD}, headers=bearer(admin)),
         {"actor": "user:chief", "action": "user.create", "target": "user:ann", "outcome": "ok"}),
        ("login ok", lambda: client.post("/api/v1/auth/login", json={"username": "ann", "password": PASSWORD}),
         {"actor": "user:ann", "action": "auth.login", "target": "user:ann", "outcome": "ok"}),
        ("login failed", lambda: client.post("/api/v1/auth/login", json={"username": "ann",
                                                                         "password": "not her password"}),
         {"actor": "anonymous", "action": "auth.login", "target": "user:ann", "outcome": "failed"}),
        ("denied", lambda: client.get("/api/v1/users", headers=bearer(ann_token[0])),
         {"actor": "user:ann", "action": "access.denied", "target": "GET /api/v1/users", "outcome": "denied"}),
        ("role change", lambda: client.patch("/api/v1/users/ann", json={"role": "viewer"}, headers=bearer(admin)),
         {"actor": "user:chief", "action": "user.set_role", "target": "user:ann", "outcome": "ok"}),
        ("disable", lambda: client.patch("/api/v1/users/ann", json={"disabled": True}, headers=bearer(admin)),
         {"actor": "user:chief", "action": "user.disable", "target": "user:ann", "outcome": "ok"}),
    ]
    for name, call, want in steps:
        since, before = _last_id(engine), utcnow()
        if name == "denied":
            ann_token.append(make_token(engine, "ann").secret)  # its token.create record is not the step's
            since = _last_id(engine)
        response = call()
        assert response.status_code < 500, name
        rec = _one(engine, since, before, **want)
        if name == "role change":
            assert rec.detail["from"] == "operator" and rec.detail["to"] == "viewer"
        if name == "login failed":
            assert rec.detail["reason"] == "bad_password"
        if name == "denied":
            assert response.status_code == 403 and rec.detail["required"] == "admin"


def test_token_create_and_revoke_and_logout_records(client: TestClient, engine: Engine) -> None:
    make_user(engine, "tess", "operator")
    own = make_token(engine, "tess").secret
    since, before = _last_id(engine), utcnow()
    created = client.post("/api/v1/tokens", json={"name": "deploy bot", "role": "viewer"}, headers=bearer(own))
    token_id = created.json()["id"]
    rec = _one(engine, since, before, actor="user:tess", action="token.create", target=f"token:{token_id}",
               outcome="ok")
    assert rec.detail["role"] == "viewer" and rec.detail["name"] == "deploy bot"
    assert created.json()["token"] not in str(rec.detail)  # the secret never reaches the log

    since, before = _last_id(engine), utcnow()
    assert client.delete(f"/api/v1/tokens/{token_id}", headers=bearer(own)).status_code == 204
    _one(engine, since, before, actor="user:tess", action="token.revoke", target=f"token:{token_id}", outcome="ok")

    session = make_session(engine, "tess")
    since, before = _last_id(engine), utcnow()
    r = client.post("/api/v1/auth/logout", headers={**cookie(session.cookie_value),
                                                    "X-CSRF-Token": session.csrf_token})
    assert r.status_code == 204
    _one(engine, since, before, actor="user:tess", action="auth.logout", target="user:tess", outcome="ok")


def test_csrf_failure_is_a_recorded_denial(client: TestClient, engine: Engine) -> None:
    make_user(engine, "uma", "admin")
    session = make_session(engine, "uma")
    since, before = _last_id(engine), utcnow()
    r = client.post("/api/v1/users", json={"username": "x", "role": "viewer"}, headers=cookie(session.cookie_value))
    assert r.status_code == 403
    rec = _one(engine, since, before, actor="user:uma", action="access.denied", target="POST /api/v1/users",
               outcome="denied")
    assert "CSRF" in rec.detail["reason"]


def test_unauthenticated_requests_are_not_audited(client: TestClient, engine: Engine) -> None:
    since = _last_id(engine)
    assert client.get("/api/v1/users").status_code == 401
    assert _records(engine, since) == []


# -- the API ----------------------------------------------------------------------------------------------


def _fill(client: TestClient, engine: Engine) -> None:
    make_user(engine, "vic", "admin")
    for name in ("w1", "w2", "w3"):
        client.post("/api/v1/users", json={"username": name, "role": "viewer"}, headers=AUTH)
    client.patch("/api/v1/users/w2", json={"role": "operator"}, headers=AUTH)
    client.post("/api/v1/auth/login", json={"username": "w1", "password": "whatever it is"})


def test_audit_api_newest_first_paginated(client: TestClient, engine: Engine) -> None:
    _fill(client, engine)
    everything = client.get("/api/v1/audit", headers=AUTH).json()
    ids = [r["id"] for r in everything["items"]]
    assert ids == sorted(ids, reverse=True) and everything["next"] is None
    pages, after = [], None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"after": after} if after else {})}
        page = client.get("/api/v1/audit", params=params, headers=AUTH).json()
        pages += [r["id"] for r in page["items"]]
        after = page["next"]
        if after is None:
            break
    assert pages == ids
    first = everything["items"][0]
    assert set(first) == {"id", "at", "actor", "action", "target", "outcome", "detail"}
    assert first["at"].endswith("Z") or first["at"].endswith("+00:00")


def test_audit_api_filters(client: TestClient, engine: Engine) -> None:
    _fill(client, engine)

    def get(**params: Any) -> list[dict[str, Any]]:
        r = client.get("/api/v1/audit", params=params, headers=AUTH)
        assert r.status_code == 200, r.text
        items: list[dict[str, Any]] = r.json()["items"]
        return items

    assert [r["target"] for r in get(action="user.create", actor="token:bootstrap")] == ["user:w3", "user:w2",
                                                                                        "user:w1"]
    assert {r["action"] for r in get(target="user:w2")} == {"user.create", "user.set_role"}
    assert {r["action"] for r in get(action="user.*")} == {"user.create", "user.set_role"}
    assert [r["outcome"] for r in get(action="auth.login")] == ["failed"]
    assert get(action="user%") == []  # LIKE wildcards are literal
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert get(since=future) == []
    assert len(get(until=future)) == len(get())
    assert get(until="2000-01-01T00:00:00") == []  # no zone: UTC


@pytest.mark.parametrize("params", [{"since": "yesterday"}, {"until": "0.5"}, {"after": "x"}, {"limit": "0"},
                                    {"actor": "a\x00b"}])
def test_audit_api_rejects_bad_parameters(client: TestClient, params: dict[str, str]) -> None:
    assert client.get("/api/v1/audit", params=params, headers=AUTH).status_code == 422


def test_audit_api_is_admin_only_and_read_only(client: TestClient, engine: Engine) -> None:
    make_user(engine, "rel", "release_manager")
    secret = make_token(engine, "rel").secret
    assert client.get("/api/v1/audit", headers=bearer(secret)).status_code == 403
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        assert client.request(method, "/api/v1/audit", headers=AUTH).status_code == 405
