"""Authentication: API tokens (stored hashed; role capped; revoked, expired, disabled refused), the bootstrap
token, password login, the users and tokens API, and the ``fleet-server user`` CLI, on SQLite and PostgreSQL."""

from __future__ import annotations

import argparse
import hashlib
import io
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from fleet_server.auth import cli as user_cli
from fleet_server.auth.passwords import verify_password
from fleet_server.auth.tokens import LAST_USED_RESOLUTION_S
from fleet_server.db import create_db_engine
from fleet_server.models import ApiToken, User, utcnow
from tests.server.auth_support import PASSWORD, bearer, make_token, make_user
from tests.server.support import AUTH

# -- tokens -----------------------------------------------------------------------------------------------


def test_bootstrap_token_is_admin(client: TestClient) -> None:
    me = client.get("/api/v1/auth/me", headers=AUTH).json()
    assert me == {"actor": "token:bootstrap", "username": None, "role": "admin",
                  "roles": ["viewer", "operator", "release_manager", "admin"], "via": "bootstrap",
                  "csrf_token": None, "expires_at": None}
    assert client.get("/api/v1/users", headers=AUTH).status_code == 200


def test_missing_or_wrong_credentials_answer_401_with_challenge(client: TestClient, engine: Engine) -> None:
    for headers in ({}, bearer("fleet_not-a-real-token"), bearer("test-token-0123456789abcdeX"),
                    {"Authorization": "Basic YWRtaW46YWRtaW4="}, {"Authorization": "Bearer"}):
        r = client.get("/api/v1/auth/me", headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["detail"]


def test_invalid_bearer_does_not_fall_back_to_the_session_cookie(client: TestClient, engine: Engine) -> None:
    from tests.server.auth_support import cookie, make_session

    make_user(engine, "carol", "admin")
    session = make_session(engine, "carol")
    assert client.get("/api/v1/auth/me", headers=cookie(session.cookie_value)).status_code == 200
    r = client.get("/api/v1/auth/me", headers={**cookie(session.cookie_value), **bearer("fleet_wrong")})
    assert r.status_code == 401


def test_token_stored_only_as_sha256_and_shown_once(client: TestClient, engine: Engine) -> None:
    make_user(engine, "dave", "operator")
    admin = make_token(engine, "dave").secret
    r = client.post("/api/v1/tokens", json={"name": "ci pipeline"}, headers=bearer(admin))
    assert r.status_code == 201
    created = r.json()
    secret = created["token"]
    assert secret.startswith("fleet_") and len(secret) >= 40
    with Session(engine) as db:
        row = db.get(ApiToken, created["id"])
        assert row is not None
        assert row.token_hash == hashlib.sha256(secret.encode()).hexdigest()
        assert secret not in {row.token_hash, row.prefix, row.name}
        assert secret.startswith(row.prefix)
    listed = client.get("/api/v1/tokens", headers=bearer(secret)).json()["items"]
    assert {t["id"] for t in listed} >= {created["id"]}
    assert all("token" not in t for t in listed)


def test_token_role_is_min_of_user_role_and_cap(client: TestClient, engine: Engine) -> None:
    make_user(engine, "erin", "release_manager")
    capped = make_token(engine, "erin", role="viewer").secret
    full = make_token(engine, "erin").secret
    assert client.get("/api/v1/auth/me", headers=bearer(capped)).json()["role"] == "viewer"
    assert client.get("/api/v1/auth/me", headers=bearer(full)).json()["role"] == "release_manager"
    # the user is demoted: every token follows at once (a cap never lifts a role)
    assert client.patch("/api/v1/users/erin", json={"role": "operator"}, headers=AUTH).status_code == 200
    assert client.get("/api/v1/auth/me", headers=bearer(full)).json()["role"] == "operator"
    assert client.get("/api/v1/auth/me", headers=bearer(capped)).json()["role"] == "viewer"


def test_token_cannot_exceed_creator_role(client: TestClient, engine: Engine) -> None:
    make_user(engine, "frank", "operator")
    own = make_token(engine, "frank").secret
    r = client.post("/api/v1/tokens", json={"name": "x", "role": "admin"}, headers=bearer(own))
    assert r.status_code == 422 and "cannot exceed" in r.json()["detail"]
    # a capped token cannot mint an uncapped one: the new token inherits the cap
    capped = make_token(engine, "frank", role="viewer").secret
    r = client.post("/api/v1/tokens", json={"name": "y", "role": "operator"}, headers=bearer(capped))
    assert r.status_code == 422
    minted = client.post("/api/v1/tokens", json={"name": "z"}, headers=bearer(capped)).json()
    assert minted["role"] == "viewer"
    assert client.get("/api/v1/auth/me", headers=bearer(minted["token"])).json()["role"] == "viewer"


def test_bootstrap_token_cannot_create_tokens_for_nobody(client: TestClient) -> None:
    r = client.post("/api/v1/tokens", json={"name": "x"}, headers=AUTH)
    assert r.status_code == 409 and "belongs to no user" in r.json()["detail"]


def test_expired_token_refused(client: TestClient, engine: Engine) -> None:
    make_user(engine, "gina", "viewer")
    long_ago = utcnow() - timedelta(days=2)
    expired = make_token(engine, "gina", expires_in_s=3600, now=long_ago).secret
    fresh = make_token(engine, "gina", expires_in_s=3600).secret
    assert client.get("/api/v1/auth/me", headers=bearer(expired)).status_code == 401
    assert client.get("/api/v1/auth/me", headers=bearer(fresh)).status_code == 200


def test_revoked_token_refused_at_once(client: TestClient, engine: Engine) -> None:
    make_user(engine, "hank", "viewer")
    issued = make_token(engine, "hank")
    assert client.get("/api/v1/auth/me", headers=bearer(issued.secret)).status_code == 200
    assert client.delete(f"/api/v1/tokens/{issued.row.id}", headers=bearer(issued.secret)).status_code == 204
    assert client.get("/api/v1/auth/me", headers=bearer(issued.secret)).status_code == 401
    # revoking again changes nothing
    assert client.delete(f"/api/v1/tokens/{issued.row.id}", headers=AUTH).status_code == 204


def test_cannot_see_or_revoke_another_users_token(client: TestClient, engine: Engine) -> None:
    make_user(engine, "ivan", "operator")
    make_user(engine, "judy", "operator")
    ivan = make_token(engine, "ivan")
    judy = make_token(engine, "judy").secret
    assert client.delete(f"/api/v1/tokens/{ivan.row.id}", headers=bearer(judy)).status_code == 404
    assert client.get("/api/v1/auth/me", headers=bearer(ivan.secret)).status_code == 200
    r = client.get("/api/v1/tokens", params={"user": "ivan"}, headers=bearer(judy))
    assert r.status_code == 403
    # an admin may do both
    listed = client.get("/api/v1/tokens", params={"user": "ivan"}, headers=AUTH).json()["items"]
    assert [t["id"] for t in listed] == [ivan.row.id]
    assert client.delete(f"/api/v1/tokens/{ivan.row.id}", headers=AUTH).status_code == 204
    assert client.get("/api/v1/auth/me", headers=bearer(ivan.secret)).status_code == 401


def test_disabled_users_tokens_refused(client: TestClient, engine: Engine) -> None:
    make_user(engine, "kate", "operator")
    secret = make_token(engine, "kate").secret
    assert client.patch("/api/v1/users/kate", json={"disabled": True}, headers=AUTH).status_code == 200
    assert client.get("/api/v1/auth/me", headers=bearer(secret)).status_code == 401
    assert client.patch("/api/v1/users/kate", json={"disabled": False}, headers=AUTH).status_code == 200
    assert client.get("/api/v1/auth/me", headers=bearer(secret)).status_code == 200


def test_last_used_at_is_refreshed_coarsely(client: TestClient, engine: Engine) -> None:
    make_user(engine, "liam", "viewer")
    issued = make_token(engine, "liam")
    client.get("/api/v1/auth/me", headers=bearer(issued.secret))
    with Session(engine) as db:
        first = db.get(ApiToken, issued.row.id).last_used_at  # type: ignore[union-attr]
    assert first is not None
    client.get("/api/v1/auth/me", headers=bearer(issued.secret))
    with Session(engine) as db:
        assert db.get(ApiToken, issued.row.id).last_used_at == first  # type: ignore[union-attr]
        # pretend the last use was long ago: the next request writes again
        db.execute(sa.update(ApiToken).where(ApiToken.id == issued.row.id)  # type: ignore[arg-type]
                   .values(last_used_at=first - timedelta(seconds=LAST_USED_RESOLUTION_S + 1)))
        db.commit()
    client.get("/api/v1/auth/me", headers=bearer(issued.secret))
    with Session(engine) as db:
        assert db.get(ApiToken, issued.row.id).last_used_at > first  # type: ignore[union-attr,operator]


# -- login ------------------------------------------------------------------------------------------------


def test_login_with_password(client: TestClient, engine: Engine) -> None:
    make_user(engine, "mia", "operator", password=PASSWORD)
    r = client.post("/api/v1/auth/login", json={"username": "mia", "password": PASSWORD})
    assert r.status_code == 200
    body = r.json()
    assert body["username"] == "mia" and body["role"] == "operator" and len(body["csrf_token"]) >= 32
    assert body["expires_at"].endswith("Z") or body["expires_at"].endswith("+00:00")


def test_login_failures_look_alike(client: TestClient, engine: Engine) -> None:
    make_user(engine, "nina", "viewer", password=PASSWORD)
    make_user(engine, "tokenonly", "viewer")
    make_user(engine, "gone", "viewer", password=PASSWORD)
    client.patch("/api/v1/users/gone", json={"disabled": True}, headers=AUTH)
    answers = [client.post("/api/v1/auth/login", json={"username": u, "password": p})
               for u, p in (("nina", "wrong password!!"), ("nobody", PASSWORD), ("tokenonly", PASSWORD),
                            ("gone", PASSWORD))]
    assert {r.status_code for r in answers} == {401}
    assert {r.json()["detail"] for r in answers} == {"invalid username or password"}
    assert all("set-cookie" not in r.headers for r in answers)


def test_password_stored_as_scrypt_hash(engine: Engine) -> None:
    make_user(engine, "omar", "viewer", password=PASSWORD)
    with Session(engine) as db:
        user = db.exec(select(User).where(User.username == "omar")).one()
    assert user.password_hash is not None and PASSWORD not in user.password_hash
    assert user.password_hash.startswith("scrypt$") and verify_password(PASSWORD, user.password_hash)


# -- users API --------------------------------------------------------------------------------------------


def test_users_api_create_get_list_patch(client: TestClient, engine: Engine) -> None:
    r = client.post("/api/v1/users", json={"username": "pat", "role": "viewer", "password": PASSWORD},
                    headers=AUTH)
    assert r.status_code == 201 and r.json()["has_password"] is True
    assert client.post("/api/v1/users", json={"username": "pat", "role": "admin"}, headers=AUTH).status_code == 409
    assert client.post("/api/v1/users", json={"username": "Bad Name", "role": "admin"},
                       headers=AUTH).status_code == 422
    assert client.post("/api/v1/users", json={"username": "short", "role": "viewer", "password": "short"},
                       headers=AUTH).status_code == 422
    assert client.post("/api/v1/users", json={"username": "x", "role": "root"}, headers=AUTH).status_code == 422
    assert client.get("/api/v1/users/pat", headers=AUTH).json()["role"] == "viewer"
    assert client.get("/api/v1/users/nobody", headers=AUTH).status_code == 404
    r = client.patch("/api/v1/users/pat", json={"role": "operator", "password": PASSWORD + "!"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["role"] == "operator"
    assert client.patch("/api/v1/users/pat", json={"role": "operator", "admin": True},
                        headers=AUTH).status_code == 422


def test_users_list_is_paginated(client: TestClient, engine: Engine) -> None:
    for i in range(5):
        make_user(engine, f"page{i}", "viewer")
    seen: list[str] = []
    after = None
    while True:
        params: dict[str, object] = {"limit": 2, **({"after": after} if after else {})}
        page = client.get("/api/v1/users", params=params, headers=AUTH).json()
        seen += [u["username"] for u in page["items"]]
        after = page["next"]
        if after is None:
            break
    assert seen == [f"page{i}" for i in range(5)]
    assert client.get("/api/v1/users", params={"limit": 0}, headers=AUTH).status_code == 422
    assert client.get("/api/v1/users", params={"limit": 1001}, headers=AUTH).status_code == 422
    assert client.get("/api/v1/users", params={"after": "abc"}, headers=AUTH).status_code == 422


def test_last_enabled_admin_cannot_be_demoted_or_disabled(client: TestClient, engine: Engine) -> None:
    make_user(engine, "root1", "admin")
    for change in ({"role": "operator"}, {"disabled": True}):
        r = client.patch("/api/v1/users/root1", json=change, headers=AUTH)
        assert r.status_code == 409 and "last enabled admin" in r.json()["detail"]
    make_user(engine, "root2", "admin")
    assert client.patch("/api/v1/users/root1", json={"role": "operator"}, headers=AUTH).status_code == 200


def test_users_api_is_admin_only(client: TestClient, engine: Engine) -> None:
    make_user(engine, "rm", "release_manager")
    secret = make_token(engine, "rm").secret
    assert client.get("/api/v1/users", headers=bearer(secret)).status_code == 403
    assert client.post("/api/v1/users", json={"username": "evil", "role": "admin"},
                       headers=bearer(secret)).status_code == 403
    assert client.patch("/api/v1/users/rm", json={"role": "admin"}, headers=bearer(secret)).status_code == 403
    with Session(engine) as db:
        assert db.exec(select(User).where(User.username == "rm")).one().role == "release_manager"


# -- CLI --------------------------------------------------------------------------------------------------


def _cli(db_url: str, *argv: str, stdin: str = "") -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="fleet-server")
    user_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["user", *argv, "--database-url", db_url] if argv else ["user"])
    if not argv:
        args.database_url = db_url
        args.config = None
    out, err = io.StringIO(), io.StringIO()
    code = user_cli.run(args, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_creates_first_admin_and_token(db_url: str, engine: Engine, client: TestClient) -> None:
    code, _, err = _cli(db_url, "add", "boss", "--role", "admin", "--password-stdin", stdin=PASSWORD + "\n")
    assert code == 0, err
    code, out, err = _cli(db_url, "token", "boss", "--name", "automation", "--role", "operator")
    assert code == 0, err
    secret = out.strip()
    me = client.get("/api/v1/auth/me", headers=bearer(secret)).json()
    assert me["username"] == "boss" and me["role"] == "operator"
    login = client.post("/api/v1/auth/login", json={"username": "boss", "password": PASSWORD})
    assert login.status_code == 200 and login.json()["role"] == "admin"
    code, out, _ = _cli(db_url, "list")
    assert code == 0 and out.startswith("boss\tadmin\t-\t")


def test_cli_set_role_disable_enable(db_url: str, engine: Engine, client: TestClient) -> None:
    assert _cli(db_url, "add", "ops", "--role", "operator", "--no-password")[0] == 0
    assert _cli(db_url, "add", "ops", "--role", "operator", "--no-password")[0] == 1  # exists
    secret = make_token(engine, "ops").secret
    assert _cli(db_url, "set-role", "ops", "viewer")[0] == 0
    assert client.get("/api/v1/auth/me", headers=bearer(secret)).json()["role"] == "viewer"
    assert _cli(db_url, "disable", "ops")[0] == 0
    assert client.get("/api/v1/auth/me", headers=bearer(secret)).status_code == 401
    assert _cli(db_url, "enable", "ops")[0] == 0
    assert client.get("/api/v1/auth/me", headers=bearer(secret)).status_code == 200
    code, _, err = _cli(db_url, "disable", "ghost")
    assert code == 1 and "no user 'ghost'" in err
    code, out, _ = _cli(db_url, "list")
    assert "ops\tviewer\tno-password" in out


def test_cli_refuses_short_password_and_missing_terminal(db_url: str, engine: Engine) -> None:
    code, _, err = _cli(db_url, "add", "weak", "--role", "viewer", "--password-stdin", stdin="short\n")
    assert code == 1 and "12" in err
    code, _, err = _cli(db_url, "add", "weak", "--role", "viewer", stdin=PASSWORD)  # stdin is no terminal
    assert code == 2 and "--password-stdin" in err


def test_cli_needs_a_migrated_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/empty.db"
    create_db_engine(url).dispose()
    code, _, err = _cli(url, "list")
    assert code == 1 and "fleet-server db upgrade" in err


def test_cli_without_action_is_usage_error(db_url: str) -> None:
    code, _, err = _cli(db_url)
    assert code == 2 and "choose an action" in err
