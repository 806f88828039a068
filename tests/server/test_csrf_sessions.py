"""CSRF and session theft: server-side console sessions, on SQLite and PostgreSQL.

CSRF: every unsafe route that a session can call (discovered from the real app, so routes added by others are
covered) x {no token, another session's token, a cross-site Origin, valid} -> 403/403/403/not 403. Sessions:
logout, role change, disabling and a new password end them at once; an expired session is refused; the cookie
is HttpOnly, SameSite=Strict, Path=/ and Secure; only hashes of the session id and CSRF token are stored.
"""

from __future__ import annotations

from datetime import timedelta
from http.cookies import SimpleCookie

import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from fleet_server.app import create_app
from fleet_server.auth.sessions import COOKIE_NAME, session_csrf_token
from fleet_server.auth.tokens import hash_secret
from fleet_server.models import AuditLog, SessionRecord, User, utcnow
from fleet_server.settings import FleetSettings
from tests.server.auth_support import (
    EVIL,
    ORIGIN,
    PASSWORD,
    bearer,
    cookie,
    make_session,
    make_token,
    make_user,
    protected,
)
from tests.server.support import AUTH


def _denied(engine: Engine) -> int:
    with Session(engine) as db:
        return len(db.exec(select(AuditLog).where(AuditLog.action == "access.denied")).all())


def test_every_unsafe_route_needs_the_sessions_csrf_token(client: TestClient, engine: Engine) -> None:
    make_user(engine, "csrf-admin", "admin")
    make_user(engine, "other-admin", "admin")
    mine = make_session(engine, "csrf-admin")
    other = make_session(engine, "other-admin")
    unsafe = [e for e in protected(client.app) if e.unsafe]  # type: ignore[arg-type]
    assert {"POST /api/v1/users", "PATCH /api/v1/users/{username}", "POST /api/v1/tokens",
            "DELETE /api/v1/tokens/{token_id}", "POST /api/v1/auth/logout"} <= {e.label for e in unsafe}
    problems = []
    before = _denied(engine)
    for ep in unsafe:
        attacks = {
            "no token": {**cookie(mine.cookie_value)},
            "other session's token": {**cookie(mine.cookie_value), "X-CSRF-Token": other.csrf_token},
            "cross-site origin": {**cookie(mine.cookie_value), "X-CSRF-Token": mine.csrf_token, "Origin": EVIL},
            "Sec-Fetch-Site cross-site": {**cookie(mine.cookie_value), "X-CSRF-Token": mine.csrf_token,
                                          "Sec-Fetch-Site": "cross-site"},
        }
        for name, headers in attacks.items():
            got = client.request(ep.method, ep.path, headers=headers).status_code
            if got != 403:
                problems.append(f"{ep.label} with {name}: {got}, expected 403")
        fresh = make_session(engine, "csrf-admin")  # logout would end a shared session
        got = client.request(ep.method, ep.path, headers={**cookie(fresh.cookie_value),
                                                          "X-CSRF-Token": fresh.csrf_token, "Origin": ORIGIN,
                                                          "Sec-Fetch-Site": "same-origin"}).status_code
        if got in (401, 403):
            problems.append(f"{ep.label} with a valid token: {got}")
    assert not problems, "\n".join(problems)
    assert _denied(engine) - before == 4 * len(unsafe)  # each refusal audited once


def test_safe_methods_need_no_csrf_token(client: TestClient, engine: Engine) -> None:
    make_user(engine, "reader", "viewer")
    s = make_session(engine, "reader")
    assert client.get("/api/v1/auth/me", headers={**cookie(s.cookie_value), "Origin": EVIL}).status_code == 200


def test_csrf_token_in_a_form_field(client: TestClient, engine: Engine) -> None:
    """Server-rendered forms post ``csrf_token`` as a urlencoded field."""
    make_user(engine, "former", "viewer")
    bad = make_session(engine, "former")
    r = client.post("/api/v1/auth/logout", content=f"csrf_token={bad.csrf_token}x",
                    headers={**cookie(bad.cookie_value), "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 403
    r = client.post("/api/v1/auth/logout", content=f"csrf_token={bad.csrf_token}",
                    headers={**cookie(bad.cookie_value), "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 204
    assert client.get("/api/v1/auth/me", headers=cookie(bad.cookie_value)).status_code == 401


def test_bearer_requests_are_exempt_from_csrf(client: TestClient, engine: Engine) -> None:
    make_user(engine, "robot", "viewer")
    secret = make_token(engine, "robot").secret
    r = client.post("/api/v1/tokens", json={"name": "x"}, headers={**bearer(secret), "Origin": EVIL})
    assert r.status_code == 201


def test_login_from_another_site_is_refused(client: TestClient, engine: Engine) -> None:
    make_user(engine, "victim", "viewer", password=PASSWORD)
    r = client.post("/api/v1/auth/login", json={"username": "victim", "password": PASSWORD},
                    headers={"Origin": EVIL})
    assert r.status_code == 403 and "set-cookie" not in r.headers
    r = client.post("/api/v1/auth/login", json={"username": "victim", "password": PASSWORD},
                    headers={"Origin": ORIGIN})
    assert r.status_code == 200


def test_origin_of_public_url_is_accepted(engine: Engine, db_url: str) -> None:
    """Behind a proxy the request's own origin may differ; the configured public_url is the server's too."""
    settings = FleetSettings(database_url=db_url, public_url="https://fleet.example.com:8443")
    with TestClient(create_app(settings, engine=engine)) as c:
        make_user(engine, "proxied", "viewer")
        s = make_session(engine, "proxied")
        for origin, want in (("https://fleet.example.com:8443", 204), ("https://fleet.example.com", 403),
                             ("null", 403)):
            fresh = make_session(engine, "proxied")
            r = c.post("/api/v1/auth/logout", headers={**cookie(fresh.cookie_value), "Origin": origin,
                                                       "X-CSRF-Token": fresh.csrf_token})
            assert r.status_code == want, origin
        assert c.get("/api/v1/auth/me", headers=cookie(s.cookie_value)).status_code == 200


# -- sessions ---------------------------------------------------------------------------------------------


def _login(client: TestClient, username: str) -> tuple[str, str, SimpleCookie]:
    r = client.post("/api/v1/auth/login", json={"username": username, "password": PASSWORD})
    assert r.status_code == 200
    jar: SimpleCookie = SimpleCookie()
    jar.load(r.headers["set-cookie"])
    return jar[COOKIE_NAME].value, r.json()["csrf_token"], jar


def test_session_cookie_flags(client: TestClient, engine: Engine) -> None:
    make_user(engine, "flags", "viewer", password=PASSWORD)
    _, _, jar = _login(client, "flags")
    morsel = jar[COOKIE_NAME]
    assert morsel["httponly"] is True
    assert morsel["secure"] is True
    assert morsel["samesite"].lower() == "strict"
    assert morsel["path"] == "/"
    assert int(morsel["max-age"]) == int(FleetSettings().session_ttl_s)


def test_session_cookie_not_secure_only_when_configured(engine: Engine, db_url: str) -> None:
    settings = FleetSettings(database_url=db_url, session_cookie_secure=False)
    with TestClient(create_app(settings, engine=engine)) as c:
        make_user(engine, "demo", "viewer", password=PASSWORD)
        _, _, jar = _login(c, "demo")
        assert not jar[COOKIE_NAME]["secure"]
        assert jar[COOKIE_NAME]["httponly"] is True


def test_only_hashes_are_stored(client: TestClient, engine: Engine) -> None:
    make_user(engine, "hashes", "viewer", password=PASSWORD)
    value, csrf, _ = _login(client, "hashes")
    assert csrf == session_csrf_token(value)
    with Session(engine) as db:
        rows = db.exec(select(SessionRecord)).all()
    assert len(rows) == 1
    assert rows[0].id_hash == hash_secret(value) and rows[0].csrf_hash == hash_secret(csrf)
    assert value not in rows[0].id_hash and csrf not in rows[0].csrf_hash


def test_logout_ends_the_session_at_once(client: TestClient, engine: Engine) -> None:
    make_user(engine, "leaver", "viewer", password=PASSWORD)
    value, csrf, _ = _login(client, "leaver")
    assert client.get("/api/v1/auth/me", headers=cookie(value)).json()["csrf_token"] == csrf
    r = client.post("/api/v1/auth/logout", headers={**cookie(value), "X-CSRF-Token": csrf})
    assert r.status_code == 204
    assert f'{COOKIE_NAME}=""' in r.headers["set-cookie"] and "Max-Age=0" in r.headers["set-cookie"]
    assert client.get("/api/v1/auth/me", headers=cookie(value)).status_code == 401  # a stolen copy is dead


def test_role_change_ends_sessions_at_once(client: TestClient, engine: Engine) -> None:
    make_user(engine, "promoted", "operator", password=PASSWORD)
    value, _, _ = _login(client, "promoted")
    assert client.patch("/api/v1/users/promoted", json={"role": "viewer"}, headers=AUTH).status_code == 200
    assert client.get("/api/v1/auth/me", headers=cookie(value)).status_code == 401
    with Session(engine) as db:
        assert db.exec(select(SessionRecord)).all() == []


def test_role_changed_behind_the_apis_back_still_refuses_the_session(client: TestClient, engine: Engine) -> None:
    """The role recorded at login is the backstop when a role is changed without ending sessions."""
    make_user(engine, "sneaky", "admin", password=PASSWORD)
    make_user(engine, "spare-admin", "admin")
    value, _, _ = _login(client, "sneaky")
    with Session(engine) as db:
        db.execute(sa.update(User).where(User.username == "sneaky").values(role="viewer"))  # type: ignore[arg-type]
        db.commit()
    assert client.get("/api/v1/auth/me", headers=cookie(value)).status_code == 401


def test_disabling_ends_sessions_at_once(client: TestClient, engine: Engine) -> None:
    make_user(engine, "fired", "operator", password=PASSWORD)
    value, _, _ = _login(client, "fired")
    assert client.patch("/api/v1/users/fired", json={"disabled": True}, headers=AUTH).status_code == 200
    assert client.get("/api/v1/auth/me", headers=cookie(value)).status_code == 401
    assert client.post("/api/v1/auth/login", json={"username": "fired", "password": PASSWORD}).status_code == 401


def test_new_password_ends_sessions(client: TestClient, engine: Engine) -> None:
    make_user(engine, "rotated", "viewer", password=PASSWORD)
    value, _, _ = _login(client, "rotated")
    assert client.patch("/api/v1/users/rotated", json={"password": PASSWORD + "2"}, headers=AUTH).status_code == 200
    assert client.get("/api/v1/auth/me", headers=cookie(value)).status_code == 401


def test_expired_session_refused(client: TestClient, engine: Engine) -> None:
    make_user(engine, "late", "viewer")
    live = make_session(engine, "late", ttl_s=300)
    old = make_session(engine, "late", ttl_s=300, now=utcnow() - timedelta(seconds=301))  # row kept: refused by time
    with Session(engine) as db:
        assert len(db.exec(select(SessionRecord)).all()) == 2
    assert client.get("/api/v1/auth/me", headers=cookie(old.cookie_value)).status_code == 401
    assert client.get("/api/v1/auth/me", headers=cookie(live.cookie_value)).status_code == 200
    make_session(engine, "late")  # a new login clears the user's expired sessions
    with Session(engine) as db:
        assert len(db.exec(select(SessionRecord)).all()) == 2


def test_unknown_session_cookie_refused(client: TestClient) -> None:
    r = client.get("/api/v1/auth/me", headers=cookie("forged-session-id"))
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")


def test_session_acts_with_the_users_role(client: TestClient, engine: Engine) -> None:
    make_user(engine, "watcher", "viewer")
    s = make_session(engine, "watcher")
    r = client.post("/api/v1/users", json={"username": "x", "role": "admin"},
                    headers={**cookie(s.cookie_value), "X-CSRF-Token": s.csrf_token})
    assert r.status_code == 403 and "'admin'" in r.json()["detail"]
