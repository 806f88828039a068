"""Console sessions: server-side, a random id in an HttpOnly cookie, only its sha256 stored.

The session id (256 random bits) lives only in the ``fleet_session`` cookie; the ``sessions`` table keeps its
sha256, the user, the user's role at login and an absolute expiry (``session_ttl_s`` after login). A session is
refused at once after logout (its row is deleted), when it expired, when its user is disabled, or when the
user's role differs from the role at login (role changes and disabling also delete the user's sessions; the
role comparison is the backstop).

CSRF token: ``HMAC-SHA256(key=session id, "fleet-csrf-v1")``, URL-safe base64. It is derived from the secret
in the cookie, so the server can render it into any form of the session without storing it in the clear and
without a server-wide secret (every replica computes the same one); it reveals nothing about the session id.
The table keeps its sha256 (``csrf_hash``) and requests are checked against that in constant time.

``login`` and ``logout`` commit (a failed login's audit record must persist even though the caller answers
401); the other functions add to the caller's session and leave the commit to it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache

import sqlalchemy as sa
from sqlmodel import Session, select

from fleet_server import audit
from fleet_server.auth.passwords import hash_password, verify_password
from fleet_server.auth.roles import ROLES
from fleet_server.auth.tokens import hash_secret
from fleet_server.models import SessionRecord, User

__all__ = [
    "COOKIE_NAME",
    "CSRF_FORM_FIELD",
    "CSRF_HEADER",
    "LAST_SEEN_RESOLUTION_S",
    "LoginFailedError",
    "LoginResult",
    "csrf_matches",
    "end_user_sessions",
    "login",
    "logout",
    "session_csrf_token",
    "start_session",
    "validate_session",
]

COOKIE_NAME = "fleet_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FORM_FIELD = "csrf_token"
LAST_SEEN_RESOLUTION_S = 60.0
"""``last_seen_at`` is written at most this often per session."""
_CSRF_CONTEXT = b"fleet-csrf-v1"


class LoginFailedError(Exception):
    """Wrong username or password, or the user cannot log in (disabled, no password). One message for
    every cause, so a caller cannot tell which usernames exist; the audit record has the ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__("invalid username or password")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class LoginResult:
    """A new session: ``cookie_value`` goes into the ``fleet_session`` cookie, ``csrf_token`` into forms."""

    cookie_value: str
    csrf_token: str
    user: User
    expires_at: datetime


def session_csrf_token(cookie_value: str) -> str:
    """The CSRF token of the session whose cookie holds ``cookie_value`` (pure; see the module docstring)."""
    mac = hmac.new(cookie_value.encode(), _CSRF_CONTEXT, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def csrf_matches(row: SessionRecord, given: str | None) -> bool:
    """Whether ``given`` is the CSRF token of session ``row`` (constant time)."""
    if not given:
        return False
    return hmac.compare_digest(hash_secret(given), row.csrf_hash)


def start_session(session: Session, user: User, *, now: datetime, ttl_s: float) -> LoginResult:
    """Add a session for ``user`` (already authenticated) to ``session``, deleting the user's expired ones;
    the caller commits."""
    assert user.id is not None
    session.execute(sa.delete(SessionRecord).where(SessionRecord.user_id == user.id,  # type: ignore[arg-type]
                                                   SessionRecord.expires_at <= now))  # type: ignore[arg-type]
    cookie_value = secrets.token_urlsafe(32)
    csrf = session_csrf_token(cookie_value)
    expires = now + timedelta(seconds=ttl_s)
    session.add(SessionRecord(id_hash=hash_secret(cookie_value), user_id=user.id, csrf_hash=hash_secret(csrf),
                              role=user.role, created_at=now, expires_at=expires, last_seen_at=now))
    return LoginResult(cookie_value=cookie_value, csrf_token=csrf, user=user, expires_at=expires)


@cache
def _dummy_hash() -> str:
    return hash_password("not-a-password-of-anyone")


def login(session: Session, username: str, password: str, now: datetime, *, ttl_s: float,
          client: str | None = None) -> LoginResult:
    """Check the password and start a session. Audits ``auth.login`` (``ok`` or ``failed`` with the reason)
    and commits either way; raises :class:`LoginFailedError` on failure. Unknown users cost the same scrypt
    work as known ones."""
    user = session.exec(select(User).where(User.username == username)).first()
    detail: dict[str, str] = {"client": client} if client else {}
    reason = None
    if user is None:
        verify_password(password, _dummy_hash())
        reason = "unknown_user"
    elif not verify_password(password, user.password_hash):
        reason = "no_password" if user.password_hash is None else "bad_password"
    elif user.disabled:
        reason = "disabled"
    elif user.role not in ROLES:
        reason = "unknown_role"
    if reason is not None or user is None:
        audit.record(session, actor="anonymous", action="auth.login", target=f"user:{username}", outcome="failed",
                     at=now, detail={**detail, "reason": reason or "unknown_user"})
        session.commit()
        raise LoginFailedError(reason or "unknown_user")
    result = start_session(session, user, now=now, ttl_s=ttl_s)
    audit.record(session, actor=f"user:{user.username}", action="auth.login", target=f"user:{user.username}",
                 at=now, detail=detail)
    session.commit()
    return result


def validate_session(session: Session, cookie_value: str, now: datetime) -> tuple[User, SessionRecord] | None:
    """The user and session behind a cookie; ``None`` when unknown (logged out), expired, the user disabled
    or their role changed since login. Refreshes ``last_seen_at`` (coarsely) in ``session``: commit it."""
    found = session.exec(
        select(SessionRecord, User).join(User, User.id == SessionRecord.user_id)  # type: ignore[arg-type]
        .where(SessionRecord.id_hash == hash_secret(cookie_value))
    ).first()
    if found is None:
        return None
    row, user = found
    if row.expires_at <= now or user.disabled or user.role != row.role or user.role not in ROLES:
        return None
    if (now - row.last_seen_at).total_seconds() >= LAST_SEEN_RESOLUTION_S:
        session.commit()  # end the read first: on SQLite a read-then-write transaction fails at once when another
        # connection committed meanwhile, while one that starts with the write waits for the lock
        session.execute(sa.update(SessionRecord).where(SessionRecord.id_hash == row.id_hash)  # type: ignore[arg-type]
                        .values(last_seen_at=now))
    return user, row


def logout(session: Session, cookie_value: str, now: datetime) -> bool:
    """End the session of ``cookie_value`` (``auth.logout`` audited) and commit; ``False`` if there was none."""
    found = session.exec(
        select(SessionRecord, User).join(User, User.id == SessionRecord.user_id)  # type: ignore[arg-type]
        .where(SessionRecord.id_hash == hash_secret(cookie_value))
    ).first()
    if found is None:
        return False
    row, user = found
    session.delete(row)
    audit.record(session, actor=f"user:{user.username}", action="auth.logout", target=f"user:{user.username}",
                 at=now)
    session.commit()
    return True


def end_user_sessions(session: Session, user_id: int) -> int:
    """Delete every session of a user (role change, disabling, new password); the caller commits.
    Returns how many ended."""
    result = session.execute(sa.delete(SessionRecord).where(SessionRecord.user_id == user_id))  # type: ignore[arg-type]
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
