"""The rollout policy's own errors: a spec the caller must fix, or an operation the current state does not allow.

Both families tell the caller what to do: a :class:`RolloutSpecError` is rejected and reported (it names the field,
so an API can answer 422 with it); an :class:`InvalidTransitionError` is refused (an API answers 409: pausing a
completed rollout, resuming one that is not paused).
"""

from __future__ import annotations

__all__ = ["InvalidTransitionError", "RolloutError", "RolloutSpecError"]


class RolloutError(Exception):
    """Base of every error raised by :mod:`fleet_server.rollouts`."""


class RolloutSpecError(RolloutError, ValueError):
    """A rollout, phase, gate or device state is invalid. ``field`` names the offending field."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class InvalidTransitionError(RolloutError):
    """A manual operation is not allowed in the rollout's current state."""

    def __init__(self, operation: str, status: str, allowed: tuple[str, ...]) -> None:
        super().__init__(f"cannot {operation} a rollout that is {status} (allowed from: {', '.join(allowed)})")
        self.operation = operation
        self.status = status
