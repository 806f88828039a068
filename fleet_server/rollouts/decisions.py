"""What the policy asks the caller to do. The caller carries each decision out (sign and publish an order or a
cancel, write an audit record for a halt, store the new state) and then records it with
:func:`~fleet_server.rollouts.policy.apply_decisions`.

Command ids are derived from (rollout, device, kind, attempt), so the same inputs always produce the same
decisions and a decision carried out twice (a crash between publishing and storing) publishes the same
command id twice, which the agent applies once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from fleet_server.rollouts.model import HaltRule, TimeoutStep

__all__ = [
    "Advance",
    "Complete",
    "Decision",
    "Halt",
    "MarkTimedOut",
    "SendCancel",
    "SendOrder",
    "Wait",
    "cancel_command_id",
    "order_command_id",
]


def order_command_id(rollout_id: str, device: str, attempt: int, *, rollback: bool = False) -> str:
    """The deterministic command id of a deployment order (a valid wire identifier: ``cmd-`` + 32 hex)."""
    kind = "rollback" if rollback else "deploy"
    digest = hashlib.sha256(f"{rollout_id}\n{device}\n{kind}\n{attempt}".encode()).hexdigest()
    return f"cmd-{digest[:32]}"


def cancel_command_id(device: str, command: str) -> str:
    """The deterministic command id of the cancel for ``command`` (so a repeated cancel is the same command)."""
    digest = hashlib.sha256(f"{device}\ncancel\n{command}".encode()).hexdigest()
    return f"cmd-{digest[:32]}"


@dataclass(frozen=True)
class SendOrder:
    """Sign and publish a deployment order to ``device``. ``rollback`` orders carry ``allow_downgrade``."""

    device: str
    command_id: str
    model: str
    version: int
    bundle_digest: str
    allow_downgrade: bool
    phase: int
    attempt: int
    rollback: bool = False


@dataclass(frozen=True)
class SendCancel:
    """Sign and publish a cancel for ``command`` (the order's command id) under ``command_id``."""

    device: str
    command: str
    command_id: str


@dataclass(frozen=True)
class Advance:
    """Move the rollout to ``running(to_phase)``; call :func:`decide` again to start ordering its devices."""

    to_phase: int
    reason: str


@dataclass(frozen=True)
class Halt:
    """Stop ordering: the rollout becomes paused with ``rule`` and ``reason`` (numbers included). Audit it."""

    rule: HaltRule
    reason: str


@dataclass(frozen=True)
class Complete:
    """The last phase passed its gates: the rollout is completed."""

    reason: str


@dataclass(frozen=True)
class MarkTimedOut:
    """``device`` stayed silent past the ``step`` timeout (``deadline``): record ``timed_out``, a failure."""

    device: str
    step: TimeoutStep
    command_id: str
    deadline: float


@dataclass(frozen=True)
class Wait:
    """Nothing more to do now. Call again at ``until`` (``None``: when the next device event arrives) or on any
    event, whichever comes first. ``reason`` says what the rollout waits for."""

    until: float | None
    reason: str


Decision = SendOrder | SendCancel | Advance | Halt | Complete | MarkTimedOut | Wait
"""Everything :func:`decide` and the manual operations return."""
