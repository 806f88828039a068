"""Users: create, change role, disable, set password, with their audit records. Shared by the API and the CLI.

Each function adds to the caller's session (rows and audit records) and leaves the commit to the caller, so
the change and its record commit together. Changing a user's role, disabling them or setting a new password
ends all their console sessions at once; their API tokens follow the user's current role and are refused
while the user is disabled.

The last enabled admin cannot be demoted or disabled (:class:`LastAdminError`): someone must be left who can
manage users. (The bootstrap ``api_token`` is configuration, not a user, and does not count.)
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, select

from fleet_server import audit
from fleet_server.auth.passwords import MIN_PASSWORD_LEN, hash_password
from fleet_server.auth.roles import ROLES
from fleet_server.auth.sessions import end_user_sessions
from fleet_server.models import User

__all__ = [
    "MAX_PASSWORD_LEN",
    "USERNAME_PATTERN",
    "LastAdminError",
    "UserError",
    "UserExistsError",
    "create_user",
    "get_user",
    "update_user",
]

USERNAME_PATTERN = r"^[a-z0-9][a-z0-9._@-]{0,63}$"
"""Lower-case letters, digits and ``._@-``, 1-64 characters, starting with a letter or digit."""
MAX_PASSWORD_LEN = 1024
_USERNAME = re.compile(USERNAME_PATTERN)


class UserError(ValueError):
    """A user change that cannot be made as asked (the message says why)."""


class UserExistsError(UserError):
    """A user of that name exists already."""


class LastAdminError(UserError):
    """The change would leave no enabled admin."""


def get_user(session: Session, username: str) -> User | None:
    return session.exec(select(User).where(User.username == username)).first()


def _check_password(password: str) -> None:
    if not MIN_PASSWORD_LEN <= len(password) <= MAX_PASSWORD_LEN:
        raise UserError(f"a password needs {MIN_PASSWORD_LEN} to {MAX_PASSWORD_LEN} characters")


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise UserError(f"unknown role {role!r}; known: {', '.join(ROLES)}")


def create_user(session: Session, *, username: str, role: str, password: str | None, actor: str,
                now: datetime) -> User:
    """Add a user (``user.create`` audited). Without a password the user has API tokens only."""
    if not _USERNAME.fullmatch(username):
        raise UserError(f"invalid username {username!r}: 1-64 of a-z, 0-9, '.', '_', '@', '-'")
    _check_role(role)
    if password is not None:
        _check_password(password)
    if get_user(session, username) is not None:
        raise UserExistsError(f"user {username!r} exists already")
    user = User(username=username, role=role, password_hash=hash_password(password) if password else None,
                created_at=now, updated_at=now)
    session.add(user)
    session.flush()
    audit.record(session, actor=actor, action="user.create", target=f"user:{username}", at=now,
                 detail={"role": role, "password": password is not None})
    return user


def _other_enabled_admins(session: Session, user: User) -> int:
    count = session.execute(
        sa.select(sa.func.count()).select_from(User)
        .where(User.role == "admin", User.disabled == sa.false(), User.id != user.id)  # type: ignore[arg-type]
    ).scalar_one()
    return int(count)


def update_user(session: Session, user: User, *, actor: str, now: datetime, role: str | None = None,
                disabled: bool | None = None, password: str | None = None) -> list[str]:
    """Apply the given changes; one audit record per change (``user.set_role``, ``user.disable``,
    ``user.enable``, ``user.set_password``). Returns the actions taken (empty: nothing changed). Role
    changes, disabling and new passwords end the user's sessions."""
    if role is not None:
        _check_role(role)
    if password is not None:
        _check_password(password)
    loses_admin = user.role == "admin" and not user.disabled and (
        (role is not None and role != "admin") or disabled is True)
    if loses_admin and _other_enabled_admins(session, user) == 0:
        raise LastAdminError(f"{user.username!r} is the last enabled admin; make another admin first")
    changes: list[tuple[str, dict[str, Any]]] = []
    end_sessions = False
    if role is not None and role != user.role:
        changes.append(("user.set_role", {"from": user.role, "to": role}))
        user.role = role
        end_sessions = True
    if disabled is not None and disabled != user.disabled:
        changes.append(("user.disable" if disabled else "user.enable", {}))
        user.disabled = disabled
        end_sessions = end_sessions or disabled
    if password is not None:
        user.password_hash = hash_password(password)
        changes.append(("user.set_password", {}))
        end_sessions = True
    if not changes:
        return []
    user.updated_at = now
    session.add(user)
    ended: dict[str, Any] = {}
    if end_sessions:
        assert user.id is not None
        ended = {"sessions_ended": end_user_sessions(session, user.id)}
    for action, detail in changes:
        audit.record(session, actor=actor, action=action, target=f"user:{user.username}", at=now,
                     detail={**detail, **ended})
    return [action for action, _ in changes]
