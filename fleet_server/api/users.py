"""Users and API tokens.

* ``GET /api/v1/users``, ``POST /api/v1/users``, ``GET/PATCH /api/v1/users/{username}`` (admin): list,
  create, read, change ``role`` / ``disabled`` / ``password``. A role change, disabling or a new password ends
  the user's console sessions at once; the last enabled admin cannot be demoted or disabled (409).
* ``POST /api/v1/tokens`` (any role): a token for yourself, optionally capped at a role no stronger than your
  own, optionally expiring; the secret is in the answer once and never again.
* ``GET /api/v1/tokens``: your tokens (admin: anyone's with ``?user=``).
* ``DELETE /api/v1/tokens/{token_id}``: revoke one of your tokens (admin: anyone's); 404 for someone else's.

Every change is audited (``user.create``, ``user.set_role``, ``user.disable``, ``user.enable``,
``user.set_password``, ``token.create``, ``token.revoke``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Path, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import col, select

from fleet_server.api.deps import Admin, After, Limit, Viewer, deny, page_cursor
from fleet_server.api.errors import error_responses
from fleet_server.auth import tokens as tokens_mod
from fleet_server.auth import users as users_mod
from fleet_server.auth.users import MAX_PASSWORD_LEN, USERNAME_PATTERN
from fleet_server.db import SessionDep
from fleet_server.models import ApiToken, User, utcnow

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["users"])

Role = Literal["viewer", "operator", "release_manager", "admin"]
Username = Annotated[str, Path(pattern=USERNAME_PATTERN, max_length=64, description="user name")]
TokenId = Annotated[int, Path(ge=1, le=2**31 - 1, description="token id")]
Password = Annotated[str, Field(min_length=12, max_length=MAX_PASSWORD_LEN)]
_PRINTABLE = r"^[^\x00-\x1f\x7f]+$"
MAX_TOKEN_LIFETIME_S = 3 * 366 * 86400


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(pattern=USERNAME_PATTERN, max_length=64)
    role: Role
    password: Password | None = None
    """Omit for a user who works with API tokens only (no console login)."""


class UserUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role | None = None
    disabled: bool | None = None
    password: Password | None = None


class UserPublic(BaseModel):
    id: int
    username: str
    role: str
    disabled: bool
    has_password: bool
    created_at: datetime
    updated_at: datetime


class UserPage(BaseModel):
    items: list[UserPublic]
    next: str | None


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=_PRINTABLE)
    role: Role | None = None
    """Cap the token at this role (no stronger than yours). Default: your role (a session, or an uncapped
    token, gets a token that follows your role as it changes)."""
    expires_in_s: int | None = Field(default=None, ge=60, le=MAX_TOKEN_LIFETIME_S)


class TokenPublic(BaseModel):
    id: int
    user: str
    name: str
    prefix: str
    """The token's first characters, to recognise it."""
    role: str | None
    """The cap (``None``: the user's role)."""
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    """Updated at most once a minute."""


class TokenCreated(TokenPublic):
    token: str
    """The secret: send it as ``Authorization: Bearer <token>``. Shown only now."""


class TokenPage(BaseModel):
    items: list[TokenPublic]
    next: str | None


def _user_public(u: User) -> UserPublic:
    assert u.id is not None
    return UserPublic(id=u.id, username=u.username, role=u.role, disabled=u.disabled,
                      has_password=u.password_hash is not None, created_at=u.created_at, updated_at=u.updated_at)


def _token_public(t: ApiToken, username: str) -> TokenPublic:
    assert t.id is not None
    return TokenPublic(id=t.id, user=username, name=t.name, prefix=t.prefix, role=t.role, created_at=t.created_at,
                       expires_at=t.expires_at, revoked_at=t.revoked_at, last_used_at=t.last_used_at)


def _get_user_or_404(session: SessionDep, username: str) -> User:
    user = users_mod.get_user(session, username)
    if user is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no user {username!r}")
    return user


_MAX_ID = 2**31 - 1
"""User and token ids are 32-bit: a cursor past that is past every row (PostgreSQL refuses a larger literal)."""


@router.get("/users", response_model=UserPage, responses=error_responses(422))
def list_users(*, session: SessionDep, _: Admin, limit: Limit = 100, after: After = None) -> UserPage:
    """Users in creation order."""
    q = select(User).order_by(User.id).limit(limit + 1)  # type: ignore[arg-type]
    if after is not None:
        last = min(int(after), _MAX_ID)
        q = q.where(col(User.id) > last)
    rows = list(session.exec(q))
    cursor = page_cursor([r.id for r in rows], limit)
    rows = rows[:limit]
    return UserPage(items=[_user_public(u) for u in rows],
                    next=cursor)


@router.post("/users", response_model=UserPublic, status_code=status.HTTP_201_CREATED,
             responses=error_responses(409, 422))
def create_user(*, session: SessionDep, who: Admin, body: UserCreate) -> UserPublic:
    """Create a user (409 if the name is taken)."""
    try:
        user = users_mod.create_user(session, username=body.username, role=body.role, password=body.password,
                                     actor=who.actor, now=utcnow())
    except users_mod.UserExistsError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    except users_mod.UserError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    try:
        session.commit()
    except sa.exc.IntegrityError:  # created concurrently under the same name
        session.rollback()
        raise HTTPException(status.HTTP_409_CONFLICT, f"user {body.username!r} exists already") from None
    return _user_public(user)


@router.get("/users/{username}", response_model=UserPublic, responses=error_responses(404, 422))
def get_user(*, session: SessionDep, _: Admin, username: Username) -> UserPublic:
    return _user_public(_get_user_or_404(session, username))


@router.patch("/users/{username}", response_model=UserPublic, responses=error_responses(404, 409, 422))
def update_user(*, session: SessionDep, who: Admin, username: Username, body: UserUpdate) -> UserPublic:
    """Change a user's role, disable or enable them, or set a new password. Ends their sessions on a role
    change, disabling or a new password. 409 when it would leave no enabled admin."""
    user = _get_user_or_404(session, username)
    try:
        users_mod.update_user(session, user, actor=who.actor, now=utcnow(), role=body.role,
                              disabled=body.disabled, password=body.password)
    except users_mod.LastAdminError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    except users_mod.UserError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    session.commit()
    return _user_public(user)


@router.post("/tokens", response_model=TokenCreated, status_code=status.HTTP_201_CREATED,
             responses=error_responses(409, 422))
def create_token(*, session: SessionDep, who: Viewer, body: TokenCreate) -> TokenCreated:
    """Create an API token for yourself. The secret is in this answer only. 409 for the bootstrap token,
    which belongs to no user."""
    if who.user_id is None:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            "the bootstrap token belongs to no user: create a user and a token for it")
    user = session.get(User, who.user_id)
    if user is None:
        raise HTTPException(status.HTTP_409_CONFLICT, "your user no longer exists")
    try:
        issued = tokens_mod.create_token(session, user, name=body.name, now=utcnow(), actor=who.actor,
                                         role=body.role, expires_in_s=body.expires_in_s, max_role=who.role)
    except tokens_mod.TokenError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    session.commit()
    return TokenCreated(**_token_public(issued.row, user.username).model_dump(), token=issued.secret)


@router.get("/tokens", response_model=TokenPage, responses=error_responses(404, 422))
def list_tokens(*, request: Request, session: SessionDep, who: Viewer, limit: Limit = 100, after: After = None,
                user: Annotated[str | None, Query(pattern=USERNAME_PATTERN, max_length=64,
                                                  description="whose tokens (admin only; default: yours)")] = None,
                ) -> TokenPage:
    """Your tokens, oldest first (revoked and expired ones included, marked so)."""
    if user is not None and user != who.username:
        if not who.holds("admin"):
            deny(request, actor=who.actor, reason="listing another user's tokens needs the 'admin' role",
                 detail={"required": "admin", "role": who.role, "user": user})
        owner: User | None = _get_user_or_404(session, user)
    else:
        owner = session.get(User, who.user_id) if who.user_id is not None else None
    if owner is None:
        return TokenPage(items=[], next=None)
    q = select(ApiToken).where(ApiToken.user_id == owner.id).order_by(ApiToken.id).limit(limit + 1)  # type: ignore[arg-type]
    if after is not None:
        last = min(int(after), _MAX_ID)
        q = q.where(col(ApiToken.id) > last)
    rows = list(session.exec(q))
    cursor = page_cursor([r.id for r in rows], limit)
    rows = rows[:limit]
    return TokenPage(items=[_token_public(t, owner.username) for t in rows],
                     next=cursor)


@router.delete("/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(404, 422))
def revoke_token(*, session: SessionDep, who: Viewer, token_id: TokenId) -> Response:
    """Revoke a token now (yours; an admin may revoke anyone's). Revoking a revoked token changes nothing."""
    token = session.get(ApiToken, token_id)
    if token is None or (token.user_id != who.user_id and not who.holds("admin")):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no token {token_id} of yours")
    tokens_mod.revoke_token(session, token, now=utcnow(), actor=who.actor)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
