"""API tokens: bearer secrets of a user, stored only as their sha256.

A token is ``fleet_`` followed by 43 URL-safe characters (256 random bits). It is shown once, when created;
the database keeps its sha256 (to find it) and its first characters (to tell tokens apart in listings). A
token acts with its user's *current* role, capped by the token's own ``role`` when it has one, so demoting a
user demotes their tokens at once. It is refused when revoked, expired, or its user is disabled.

Functions here add rows to the caller's session and never commit; the caller commits (with the audit record).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session, select

from fleet_server import audit
from fleet_server.auth.roles import ROLES, min_role, role_at_least
from fleet_server.models import ApiToken, User

__all__ = [
    "LAST_USED_RESOLUTION_S",
    "TOKEN_PREFIX",
    "IssuedToken",
    "TokenError",
    "authenticate_token",
    "create_token",
    "hash_secret",
    "revoke_token",
]

TOKEN_PREFIX = "fleet_"  # noqa: S105 (a prefix, not a secret)
LAST_USED_RESOLUTION_S = 60.0
"""``last_used_at`` is written at most this often per token (a write per request would serialize readers)."""
_SHOWN_PREFIX_LEN = 12


class TokenError(ValueError):
    """A token cannot be created as asked (the message says why)."""


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A token just created: ``secret`` is shown to its owner once and never stored."""

    secret: str
    row: ApiToken


def hash_secret(secret: str) -> str:
    """The stored form of a token or session id: sha256, hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(session: Session, user: User, *, name: str, now: datetime, actor: str,
                 role: str | None = None, expires_in_s: float | None = None,
                 max_role: str | None = None) -> IssuedToken:
    """Create a token for ``user`` and add its audit record (``token.create``). ``role`` caps it; it must not
    exceed ``max_role`` (the creator's own effective role), which becomes the cap when ``role`` is not
    given and ``max_role`` is weaker than the user's role (a capped token cannot mint a stronger one)."""
    if role is not None and role not in ROLES:
        raise TokenError(f"unknown role {role!r}; known: {', '.join(ROLES)}")
    ceiling = min_role(user.role, max_role)
    if role is not None and not role_at_least(ceiling, role):
        raise TokenError(f"a token's role cannot exceed {ceiling!r} (asked for {role!r})")
    cap = role if role is not None else (ceiling if ceiling != user.role else None)
    if expires_in_s is not None and not 60 <= expires_in_s <= 3 * 366 * 86400:
        raise TokenError("expires_in_s must be between 60 s and about 3 years")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    assert user.id is not None
    row = ApiToken(user_id=user.id, name=name, token_hash=hash_secret(secret), prefix=secret[:_SHOWN_PREFIX_LEN],
                   role=cap, created_at=now,
                   expires_at=now + timedelta(seconds=expires_in_s) if expires_in_s is not None else None)
    session.add(row)
    session.flush()
    audit.record(session, actor=actor, action="token.create", target=f"token:{row.id}", at=now,
                 detail={"user": user.username, "name": name, "role": cap, "expires_at":
                         row.expires_at.isoformat() if row.expires_at is not None else None})
    return IssuedToken(secret=secret, row=row)


def authenticate_token(session: Session, secret: str, now: datetime) -> tuple[User, ApiToken, str] | None:
    """The user, token and effective role behind a bearer ``secret``; ``None`` when unknown, revoked,
    expired, or its user is disabled. Refreshes ``last_used_at`` (coarsely) in ``session``: commit it."""
    if not secret.startswith(TOKEN_PREFIX):
        return None
    found = session.exec(
        select(ApiToken, User).join(User, User.id == ApiToken.user_id)  # type: ignore[arg-type]
        .where(ApiToken.token_hash == hash_secret(secret))
    ).first()
    if found is None:
        return None
    token, user = found
    if token.revoked_at is not None or user.disabled or user.role not in ROLES:
        return None
    if token.role is not None and token.role not in ROLES:
        return None  # a cap this server does not know: refuse rather than guess
    if token.expires_at is not None and token.expires_at <= now:
        return None
    if token.last_used_at is None or (now - token.last_used_at).total_seconds() >= LAST_USED_RESOLUTION_S:
        # End the read transaction first: on SQLite a write in a transaction that has already read fails at once
        # with "database is locked" when another connection committed meanwhile (no busy wait); a transaction
        # that starts with the write waits for the lock.
        session.commit()
        session.execute(sa.update(ApiToken).where(ApiToken.id == token.id)  # type: ignore[arg-type]
                        .values(last_used_at=now))
    return user, token, min_role(user.role, token.role)


def revoke_token(session: Session, token: ApiToken, *, now: datetime, actor: str) -> bool:
    """Revoke ``token`` (``token.revoke`` audited); ``False`` when it was revoked already (nothing changes)."""
    if token.revoked_at is not None:
        return False
    token.revoked_at = now
    session.add(token)
    audit.record(session, actor=actor, action="token.revoke", target=f"token:{token.id}", at=now,
                 detail={"user_id": token.user_id, "name": token.name})
    return True
