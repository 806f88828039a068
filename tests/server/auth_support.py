"""Helpers of the auth tests: real users, API tokens and sessions in the real database, and the app's routes
discovered from a real ``create_app`` (so routes other engineers add are covered without editing a list)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from fastapi import FastAPI
from sqlalchemy.engine import Engine
from sqlmodel import Session

from fleet_server.api.deps import UNSAFE_METHODS
from fleet_server.auth import sessions, tokens, users
from fleet_server.auth.policy import PUBLIC, iter_routes
from fleet_server.auth.roles import ROLES
from fleet_server.models import User, utcnow

PASSWORD = "correct horse battery staple"
ORIGIN = "http://testserver"  # TestClient's base URL: the request's own origin
EVIL = "https://evil.example"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def cookie(value: str) -> dict[str, str]:
    return {"Cookie": f"{sessions.COOKIE_NAME}={value}"}


def make_user(engine: Engine, username: str, role: str, *, password: str | None = None,
              actor: str = "test") -> User:
    with Session(engine, expire_on_commit=False) as db:
        user = users.create_user(db, username=username, role=role, password=password, actor=actor, now=utcnow())
        db.commit()
        return user


def make_token(engine: Engine, username: str, *, role: str | None = None, expires_in_s: float | None = None,
               now: datetime | None = None) -> tokens.IssuedToken:
    with Session(engine, expire_on_commit=False) as db:
        user = users.get_user(db, username)
        assert user is not None
        issued = tokens.create_token(db, user, name="test", now=now or utcnow(), actor="test", role=role,
                                     expires_in_s=expires_in_s)
        db.commit()
        return issued


def make_session(engine: Engine, username: str, *, ttl_s: float = 3600.0,
                 now: datetime | None = None) -> sessions.LoginResult:
    """A console session started directly (no scrypt: the password path is tested on its own)."""
    with Session(engine, expire_on_commit=False) as db:
        user = users.get_user(db, username)
        assert user is not None
        result = sessions.start_session(db, user, now=now or utcnow(), ttl_s=ttl_s)
        db.commit()
        return result


def role_tokens(engine: Engine) -> dict[str, str]:
    """A user and an API token per role: ``{role: token}``."""
    out = {}
    for role in ROLES:
        make_user(engine, f"u-{role.replace('_', '-')}", role)
        out[role] = make_token(engine, f"u-{role.replace('_', '-')}").secret
    return out


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    """With path parameters filled with plausible dummies."""
    template: str
    policy: str

    @property
    def label(self) -> str:
        return f"{self.method} {self.template}"

    @property
    def unsafe(self) -> bool:
        return self.method in UNSAFE_METHODS


_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")
_CANDIDATES: tuple[object, ...] = ("999999", "dummy-1", "0" * 64, "a", "m", "1")


def _dummy(field: object) -> str:
    """The first candidate that the path parameter's own validation accepts (else a generic one)."""
    validate = getattr(field, "validate", None)
    for candidate in _CANDIDATES:
        if validate is None:
            break
        _, errors = validate(candidate, {}, loc=("path",))
        if not errors:
            return str(candidate)
    return "dummy-1"


def endpoints(app: FastAPI) -> list[Endpoint]:
    """Every (method, route) the app serves, with its declared policy (``None`` policies are left out: the
    app would not have been built)."""
    out: list[Endpoint] = []
    for info in iter_routes(app):
        if info.policy is None:
            continue
        params = info.dependant.path_params if info.dependant is not None else []
        fields: dict[str, object] = {f.name: f for f in params}

        def fill(m: re.Match[str], fields: dict[str, object] = fields) -> str:
            return _dummy(fields.get(m.group(1)))

        path = _PARAM.sub(fill, info.path)
        methods = info.methods - {"HEAD"} if "GET" in info.methods and info.dependant is None else info.methods
        out.extend(Endpoint(m, path, info.path, info.policy) for m in sorted(methods))
    return out


def protected(app: FastAPI) -> list[Endpoint]:
    return [e for e in endpoints(app) if e.policy != PUBLIC]
