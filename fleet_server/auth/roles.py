"""Roles, weakest first: each role holds the rights of the weaker ones."""

from __future__ import annotations

__all__ = ["ROLES", "min_role", "role_at_least", "roles_up_to"]

ROLES: tuple[str, ...] = ("viewer", "operator", "release_manager", "admin")
"""Known roles, weakest first; each holds the rights of the ones before it."""

_RANK = {role: i for i, role in enumerate(ROLES)}


def _rank(role: str) -> int:
    try:
        return _RANK[role]
    except KeyError:
        raise ValueError(f"unknown role {role!r}; known: {', '.join(ROLES)}") from None


def role_at_least(have: str, need: str) -> bool:
    """Whether ``have`` holds the rights of ``need`` (``release_manager`` holds ``operator``'s)."""
    return _rank(have) >= _rank(need)


def min_role(a: str, b: str | None) -> str:
    """The weaker of two roles (``b`` ``None``: no cap, ``a``)."""
    if b is None:
        return a
    return a if _rank(a) <= _rank(b) else b


def roles_up_to(role: str) -> frozenset[str]:
    """Every role that ``role`` holds: itself and the weaker ones."""
    return frozenset(ROLES[: _rank(role) + 1])
