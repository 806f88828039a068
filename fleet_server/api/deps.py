"""Who is calling, and may they: the per-route policy dependencies, and the settings.

Every route declares exactly one policy (deny by default; :func:`fleet_server.auth.policy.check_route_policies`
refuses to build an app with a route that has none):

* ``Depends(require_role("operator"))``: the caller must hold that role (roles ``viewer`` < ``operator`` <
  ``release_manager`` < ``admin``; each holds the rights of the weaker ones). The dependency returns the
  :class:`Principal` (``actor`` goes into the audit log).
* ``dependencies=[Depends(public)]``: no authentication (probes, login, the bundle download that carries its
  own download token).

Credentials, in this order:

1. ``Authorization: Bearer <token>``: a user's API token (role = min(user's role, token's cap)), or the
   settings' bootstrap ``api_token`` (``admin``, actor ``token:bootstrap``). A bearer header that does not
   verify is refused (no fall-back to the cookie). Bearer requests need no CSRF token: a browser never
   attaches them on its own.
2. The console session cookie ``fleet_session``. Unsafe methods (POST, PUT, PATCH, DELETE) also need the
   session's CSRF token, in the ``X-CSRF-Token`` header or the ``csrf_token`` field of a urlencoded form, and
   must not come from another site (``Origin``, when sent, equals the request's own origin or the configured
   ``public_url``; ``Sec-Fetch-Site: cross-site`` is refused).

Answers: 401 with ``WWW-Authenticate`` when no valid credential was sent; 403 when the role is too weak or the
CSRF check fails. Every 403 is audited (``access.denied``) in its own transaction, since the request fails.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Annotated, Any, NoReturn
from urllib.parse import parse_qs, urlsplit

from fastapi import Depends, HTTPException, Query, Request, status
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from agent.protocol import IDENTIFIER_PATTERN
from fleet_server import audit
from fleet_server.auth.roles import ROLES, role_at_least, roles_up_to
from fleet_server.auth.sessions import (
    COOKIE_NAME,
    CSRF_FORM_FIELD,
    CSRF_HEADER,
    csrf_matches,
    validate_session,
)
from fleet_server.auth.tokens import authenticate_token
from fleet_server.models import utcnow
from fleet_server.settings import FleetSettings

__all__ = [
    "BOOTSTRAP_ACTOR",
    "ID_PATTERN",
    "ROLES",
    "UNSAFE_METHODS",
    "Admin",
    "After",
    "Limit",
    "Operator",
    "Principal",
    "ReleaseManager",
    "SettingsDep",
    "Viewer",
    "deny",
    "page_cursor",
    "public",
    "require_role",
    "same_origin_problem",
]

BOOTSTRAP_ACTOR = "token:bootstrap"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_CHALLENGE = "Bearer"

_bearer = HTTPBearer(auto_error=False, scheme_name="bearer",
                     description="A user's API token (POST /api/v1/tokens) or the bootstrap api_token")
_cookie = APIKeyCookie(name=COOKIE_NAME, auto_error=False, scheme_name="session",
                       description="Console session (POST /api/v1/auth/login); unsafe methods also need the "
                                   "X-CSRF-Token header")


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller. ``actor`` goes into the audit log (``user:alice``, ``token:bootstrap``);
    ``roles`` are every role held (the effective ``role`` and the weaker ones); ``via`` is ``bootstrap``,
    ``token`` or ``session``."""

    actor: str
    roles: frozenset[str]
    role: str = "admin"
    via: str = "bootstrap"
    user_id: int | None = None
    username: str | None = None
    token_id: int | None = None
    session_id_hash: str | None = None
    """The session's stored id (``via == "session"``), e.g. to end it on logout."""
    csrf_token: str | None = None
    """The CSRF token the request carried (``via == "session"`` and an unsafe method)."""

    def holds(self, role: str) -> bool:
        return role_at_least(self.role, role)


def _settings(request: Request) -> FleetSettings:
    settings: FleetSettings = request.app.state.settings
    return settings


SettingsDep = Annotated[FleetSettings, Depends(_settings)]


def public() -> None:
    """Policy marker: the route needs no authentication. Declare it as ``dependencies=[Depends(public)]``."""


def _unauthenticated(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": _CHALLENGE})


def deny(request: Request, *, actor: str, reason: str, detail: dict[str, Any] | None = None,
         now: datetime | None = None) -> NoReturn:
    """Answer 403 with ``reason`` after committing an ``access.denied`` audit record in a transaction of its
    own (the request's own transaction, if any, will not commit). For routes that refuse for reasons of
    their own, too."""
    factory: sessionmaker[Session] = request.app.state.sessions
    target = f"{request.method} {request.url.path}"[:256]
    with factory() as db:
        audit.record(db, actor=actor, action="access.denied", target=target, outcome="denied", at=now,
                     detail={"reason": reason, **(detail or {})})
        db.commit()
    raise HTTPException(status.HTTP_403_FORBIDDEN, reason)


def _origin(url: str) -> str | None:
    parts = urlsplit(url.strip().lower())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    default = {"http": 80, "https": 443}[parts.scheme]
    try:
        port = parts.port or default
    except ValueError:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + ("" if port == default else f":{port}")


def same_origin_problem(request: Request, settings: FleetSettings) -> str | None:
    """Why an unsafe browser request looks cross-site, or ``None``: ``Sec-Fetch-Site: cross-site``, or an
    ``Origin`` other than the request's own (scheme and ``Host``) and the configured ``public_url``."""
    if request.headers.get("sec-fetch-site", "").strip().lower() == "cross-site":
        return "cross-site request refused (Sec-Fetch-Site: cross-site)"
    origin = request.headers.get("origin")
    if origin is None:
        return None
    allowed = {_origin(str(request.base_url)), _origin(settings.public_url)} - {None}
    if _origin(origin) not in allowed:
        return f"cross-site request refused (Origin {origin[:100]!r} is not this server's)"
    return None


async def _csrf_form_field(request: Request) -> str | None:
    """The ``csrf_token`` field of an unsafe urlencoded form post (the server-rendered console's forms).
    Other bodies are not read here (a bundle upload streams)."""
    if request.method not in UNSAFE_METHODS:
        return None
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
        return None
    if COOKIE_NAME not in request.cookies:
        return None
    # parsed here (Starlette's request.form() needs python-multipart, which is not a dependency)
    try:
        values = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=1000)
    except ValueError:  # too many fields: no token taken from it
        return None
    found = values.get(CSRF_FORM_FIELD)
    return found[0] if found else None


def _authenticate(request: Request, *, settings: FleetSettings, bearer: HTTPAuthorizationCredentials | None,
                  cookie: str | None, form_csrf: str | None, now: datetime) -> Principal:
    """The caller's principal (401 if none); CSRF and origin checks for session-authenticated unsafe methods
    (403, audited)."""
    factory: sessionmaker[Session] = request.app.state.sessions
    if bearer is not None:
        secret = bearer.credentials
        if settings.api_token and hmac.compare_digest(secret.encode(), settings.api_token.encode()):
            return Principal(actor=BOOTSTRAP_ACTOR, roles=roles_up_to("admin"), role="admin", via="bootstrap")
        with factory() as db:
            found = authenticate_token(db, secret, now)
            db.commit()
        if found is None:
            raise _unauthenticated("invalid, expired or revoked API token")
        user, token, role = found
        return Principal(actor=f"user:{user.username}", roles=roles_up_to(role), role=role, via="token",
                         user_id=user.id, username=user.username, token_id=token.id)
    if request.headers.get("authorization"):
        raise _unauthenticated("unsupported Authorization scheme; send 'Authorization: Bearer <token>'")
    if cookie:
        with factory() as db:
            found_session = validate_session(db, cookie, now)
            db.commit()
        if found_session is None:
            raise _unauthenticated("session expired or ended; log in again")
        user, row = found_session
        actor = f"user:{user.username}"
        given = None
        if request.method in UNSAFE_METHODS:
            problem = same_origin_problem(request, settings)
            if problem is not None:
                deny(request, actor=actor, reason=problem, detail={"via": "session"}, now=now)
            given = request.headers.get(CSRF_HEADER) or form_csrf
            if not csrf_matches(row, given):
                reason = "missing CSRF token" if not given else "CSRF token does not match the session"
                deny(request, actor=actor,
                     reason=f"{reason}: send the session's token in the {CSRF_HEADER} header",
                     detail={"via": "session"}, now=now)
        return Principal(actor=actor, roles=roles_up_to(user.role), role=user.role, via="session",
                         user_id=user.id, username=user.username, session_id_hash=row.id_hash, csrf_token=given)
    raise _unauthenticated("not authenticated: send 'Authorization: Bearer <token>' or log in")


@cache
def require_role(role: str) -> Callable[..., Principal]:
    """A dependency that admits a caller holding ``role`` and returns its :class:`Principal`.

    401 without valid credentials, 403 (audited) when the caller's role is weaker or a session's CSRF
    check fails. The returned callable carries ``required_role`` (and ``role``), read by the route-policy
    check; one callable per role, so FastAPI runs it once per request however often a route names it."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; known: {', '.join(ROLES)}")

    def dependency(request: Request, settings: SettingsDep,
                   bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
                   cookie: Annotated[str | None, Depends(_cookie)],
                   form_csrf: Annotated[str | None, Depends(_csrf_form_field)]) -> Principal:
        now = utcnow()
        who = _authenticate(request, settings=settings, bearer=bearer, cookie=cookie, form_csrf=form_csrf, now=now)
        if not who.holds(role):
            deny(request, actor=who.actor, reason=f"this needs the {role!r} role; you act as {who.role!r}",
                 detail={"required": role, "role": who.role, "via": who.via}, now=now)
        return who

    dependency.__name__ = f"require_role_{role}"
    dependency.required_role = role  # type: ignore[attr-defined]
    dependency.role = role  # type: ignore[attr-defined]
    return dependency


Viewer = Annotated[Principal, Depends(require_role("viewer"))]
"""A route parameter that admits ``viewer`` and stronger roles (and gives the route its :class:`Principal`)."""
Operator = Annotated[Principal, Depends(require_role("operator"))]
ReleaseManager = Annotated[Principal, Depends(require_role("release_manager"))]
Admin = Annotated[Principal, Depends(require_role("admin"))]

ID_PATTERN = f"^{IDENTIFIER_PATTERN}$"
"""The wire identifier rule (device ids, model and cohort names) as a path/query ``pattern``."""


# -- pagination -------------------------------------------------------------------------------------------

Limit = Annotated[int, Query(ge=1, le=1000, description="page size (1..1000)")]
After = Annotated[str | None, Query(pattern=r"^[0-9]{1,18}$",
                                    description="the `next` value of the previous page (opaque)")]
"""A keyset cursor over an integer id. Clients treat it as opaque; every value the pattern admits is usable
(a cursor past the end gives an empty page), so a well-formed request is never refused."""


def page_cursor(ids: list[int | None], limit: int) -> str | None:
    """The ``next`` cursor of a page fetched with ``limit + 1`` rows (``ids`` in page order), or ``None``."""
    if len(ids) <= limit or ids[limit - 1] is None:
        return None
    return str(ids[limit - 1])
