"""Console login, logout and "who am I".

* ``POST /api/v1/auth/login`` (public): ``{"username", "password"}``; sets the ``fleet_session`` cookie
  (HttpOnly, SameSite=Strict, Path=/, Secure unless ``session_cookie_secure`` is off) and returns the user's
  role, the session's CSRF token (send it as ``X-CSRF-Token`` on unsafe requests) and the expiry. A
  cross-site login attempt (``Origin`` of another site) is refused with 403 (login CSRF).
* ``POST /api/v1/auth/logout``: ends the session of the cookie at once and clears the cookie. With a bearer
  token there is no session: nothing happens (revoke tokens with ``DELETE /api/v1/tokens/{id}``).
* ``GET /api/v1/auth/me``: the caller (actor, role, how authenticated; the CSRF token for a session).

Login successes and failures and logouts are audited (``auth.login``, ``auth.logout``).
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from pydantic import BaseModel, Field

from fleet_server.api.deps import SettingsDep, Viewer, deny, public, same_origin_problem
from fleet_server.api.errors import error_responses
from fleet_server.auth import sessions
from fleet_server.auth.roles import ROLES
from fleet_server.auth.users import MAX_PASSWORD_LEN, USERNAME_PATTERN
from fleet_server.db import SessionDep
from fleet_server.models import SessionRecord, utcnow

__all__ = ["LoginPublic", "LoginRequest", "MePublic", "router", "set_session_cookie"]

router = APIRouter(prefix="/api/v1/auth", tags=["auth"])



class LoginRequest(BaseModel):
    username: str = Field(pattern=USERNAME_PATTERN, max_length=64)
    password: str = Field(min_length=1, max_length=MAX_PASSWORD_LEN)


class LoginPublic(BaseModel):
    username: str
    role: str
    csrf_token: str
    """Send it in the ``X-CSRF-Token`` header (or a form's ``csrf_token`` field) with every unsafe request."""
    expires_at: datetime


class MePublic(BaseModel):
    actor: str
    username: str | None
    """``None`` for the bootstrap token (it belongs to no user)."""
    role: str
    roles: list[str]
    """Every role held: ``role`` and the weaker ones."""
    via: str
    """``session``, ``token`` or ``bootstrap``."""
    csrf_token: str | None = None
    expires_at: datetime | None = None
    """When the session ends (sessions only)."""


def set_session_cookie(response: Response, cookie_value: str, *, ttl_s: float, secure: bool) -> None:
    """Put a session id into the ``fleet_session`` cookie (HttpOnly, SameSite=Strict, Path=/, Secure)."""
    response.set_cookie(sessions.COOKIE_NAME, cookie_value, max_age=int(ttl_s), path="/", secure=secure,
                        httponly=True, samesite="strict")


@router.post("/login", response_model=LoginPublic, dependencies=[Depends(public)],
             responses=error_responses(422))
def login(body: LoginRequest, request: Request, response: Response, session: SessionDep,
          settings: SettingsDep) -> LoginPublic:
    """Log in with a password; the session cookie comes with the answer. 401 for a wrong username or
    password (one message for both); 403 for a cross-site attempt."""
    now = utcnow()
    problem = same_origin_problem(request, settings)
    if problem is not None:
        deny(request, actor="anonymous", reason=problem, detail={"username": body.username}, now=now)
    client = request.client.host if request.client is not None else None
    try:
        result = sessions.login(session, body.username, body.password, now, ttl_s=settings.session_ttl_s,
                                client=client)
    except sessions.LoginFailedError as exc:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, str(exc),
                            headers={"WWW-Authenticate": "Bearer"}) from None
    set_session_cookie(response, result.cookie_value, ttl_s=settings.session_ttl_s,
                       secure=settings.session_cookie_secure)
    return LoginPublic(username=result.user.username, role=result.user.role, csrf_token=result.csrf_token,
                       expires_at=result.expires_at)


@router.post("/logout", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses())
def logout(who: Viewer, request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    """End the caller's console session now (the cookie is refused from here on) and clear the cookie."""
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    cookie = request.cookies.get(sessions.COOKIE_NAME)
    if who.via == "session" and cookie:
        sessions.logout(session, cookie, utcnow())
        response.delete_cookie(sessions.COOKIE_NAME, path="/", secure=settings.session_cookie_secure,
                               httponly=True, samesite="strict")
    return response


@router.get("/me", response_model=MePublic, responses=error_responses())
def me(who: Viewer, request: Request, session: SessionDep) -> MePublic:
    """Who the caller is, their role, and (console sessions) the CSRF token and when the session ends."""
    roles = [r for r in ROLES if r in who.roles]
    out = MePublic(actor=who.actor, username=who.username, role=who.role, roles=roles, via=who.via)
    cookie = request.cookies.get(sessions.COOKIE_NAME)
    if who.via == "session" and cookie and who.session_id_hash is not None:
        row = session.get(SessionRecord, who.session_id_hash)
        out.csrf_token = sessions.session_csrf_token(cookie)
        out.expires_at = row.expires_at if row is not None else None
    return out
