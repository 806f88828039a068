"""Dependencies shared by the API routes: who is calling (:func:`require_role`) and the settings.

Authentication is a placeholder until the RBAC issue: every route depends on ``require_role(role)``, which
today accepts exactly one static bearer token (``api_token`` in the settings) and grants it every role. With
no token configured every request is denied. The RBAC work replaces the body of :func:`require_role` (users,
roles, per-route checks) without touching the routes.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fleet_server.settings import FleetSettings

__all__ = ["ROLES", "Principal", "SettingsDep", "require_role"]

ROLES = ("viewer", "operator", "release_manager", "admin")
"""Known roles, weakest first; each holds the rights of the ones before it."""

_bearer = HTTPBearer(auto_error=False, description="Static API token (until RBAC)")


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller: ``actor`` goes into the audit log."""

    actor: str
    roles: frozenset[str]


def _settings(request: Request) -> FleetSettings:
    settings: FleetSettings = request.app.state.settings
    return settings


SettingsDep = Annotated[FleetSettings, Depends(_settings)]


def require_role(role: str) -> Callable[..., Principal]:
    """A dependency that admits a caller holding ``role`` and returns its :class:`Principal`; 401 otherwise.

    Placeholder: the static ``api_token`` holds every role; a missing or wrong token is refused, and so is
    every request when no token is configured.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; known: {', '.join(ROLES)}")

    def dependency(settings: SettingsDep,
                   credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
        expected = settings.api_token
        given = credentials.credentials if credentials is not None else ""
        if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or invalid bearer token",
                                headers={"WWW-Authenticate": "Bearer"})
        return Principal(actor="token:bootstrap", roles=frozenset(ROLES))

    dependency.__name__ = f"require_role_{role}"
    return dependency
