"""Manual operations as pure functions: each takes the rollout as it is and returns an :class:`Outcome` (the new
rollout state, decisions to carry out at once, device states that changed). The caller checks the operator's
role, carries the decisions out, stores the outcome and writes one audit record.

================  ==================================  ===============================================================
operation         allowed from                        effect
================  ==================================  ===============================================================
``start``         draft                               running(phase 1)
``pause``         running                             paused (no new orders; updates under way continue)
``resume``        paused (by hand or halted)          running, same phase; the gates are judged again at once
``abort``         draft, running, paused, completed   aborted; ``SendCancel`` to every device not yet installed
``rollback``      running, paused, completed, aborted  rolled_back; cancels as abort, and the previous version
                                                      (``allow_downgrade``) to every device that runs the new one
``retry_failed``  running, paused, completed          failed, timed-out and rejected devices start over (only them)
================  ==================================  ===============================================================
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from fleet_server.rollouts.decisions import Decision, SendCancel, cancel_command_id
from fleet_server.rollouts.errors import InvalidTransitionError, RolloutSpecError
from fleet_server.rollouts.model import (
    DeviceState,
    DeviceStep,
    Release,
    RolloutSpec,
    RolloutState,
    RolloutStatus,
)
from fleet_server.rollouts.policy import decide

__all__ = [
    "ALLOWED_FROM",
    "CANCELLABLE_STEPS",
    "RETRYABLE_STEPS",
    "Outcome",
    "abort",
    "pause",
    "resume",
    "retry_failed",
    "rollback",
    "start",
]

CANCELLABLE_STEPS = frozenset({DeviceStep.ORDERED, DeviceStep.RECEIVED, DeviceStep.DOWNLOADING, DeviceStep.VERIFIED})
"""Mid-update and not yet activated: a cancel stops these (an installed device answers ``too_late``)."""
RETRYABLE_STEPS = frozenset({DeviceStep.FAILED, DeviceStep.TIMED_OUT, DeviceStep.REJECTED})
"""What ``retry_failed`` starts over. ``rolled_back`` is not retried: that device ran the model and rejected it."""

_S = RolloutStatus


@dataclass(frozen=True)
class Outcome:
    """A manual operation's result: the new state, decisions to carry out now, and changed device states."""

    state: RolloutState
    decisions: tuple[Decision, ...] = ()
    devices: Mapping[str, DeviceState] = field(default_factory=dict)


ALLOWED_FROM: Final[Mapping[str, tuple[RolloutStatus, ...]]] = MappingProxyType({
    "start": (_S.DRAFT,),
    "pause": (_S.RUNNING,),
    "resume": (_S.PAUSED,),
    "abort": (_S.DRAFT, _S.RUNNING, _S.PAUSED, _S.COMPLETED),
    "rollback": (_S.RUNNING, _S.PAUSED, _S.COMPLETED, _S.ABORTED),
    "retry-failed": (_S.RUNNING, _S.PAUSED, _S.COMPLETED),
})
"""The states each manual operation is allowed from (the API's action names; the console shows its buttons
by it)."""


def _require(action: str, state: RolloutState, operation: str | None = None) -> None:
    allowed = ALLOWED_FROM[action]
    if state.status not in allowed:
        raise InvalidTransitionError(operation or action, state.status.value, tuple(s.value for s in allowed))


def start(state: RolloutState, now: float, reason: str = "started") -> Outcome:
    """draft -> running(phase 1). Call :func:`decide` next to send the first orders."""
    _require("start", state)
    return Outcome(RolloutState(_S.RUNNING, 0, now, reason, changed_at=now))


def pause(state: RolloutState, now: float, reason: str = "paused by an operator") -> Outcome:
    """running -> paused. No new orders; devices already updating finish (or time out)."""
    _require("pause", state)
    return Outcome(RolloutState(_S.PAUSED, state.phase, state.phase_started_at, reason, changed_at=now))


def resume(state: RolloutState, now: float, reason: str = "resumed by an operator") -> Outcome:
    """paused (by hand or halted) -> running in the same phase. The soak clock is not reset (the devices kept
    running the new version while paused). A gate that still fails halts again at the next :func:`decide`:
    retry the failed devices first, or change the spec, or abort or roll back."""
    _require("resume", state)
    return Outcome(RolloutState(_S.RUNNING, state.phase, state.phase_started_at, reason, changed_at=now))


def _cancels(spec: RolloutSpec, devices: Mapping[str, DeviceState]) -> list[Decision]:
    out: list[Decision] = []
    for device in spec.ranked:
        st = devices.get(device)
        if st is not None and st.step in CANCELLABLE_STEPS and st.command_id is not None:
            out.append(SendCancel(device, st.command_id, cancel_command_id(device, st.command_id)))
    return out


def abort(spec: RolloutSpec, state: RolloutState, devices: Mapping[str, DeviceState], now: float,
          reason: str = "aborted by an operator") -> Outcome:
    """-> aborted, at any time: a ``SendCancel`` goes out at once to every device mid-update (ordered, received,
    downloading, verified), whatever the pace limits. Devices already on the new version keep it (that is
    :func:`rollback`)."""
    _require("abort", state)
    new = RolloutState(_S.ABORTED, state.phase, state.phase_started_at, reason, changed_at=now)
    return Outcome(new, tuple(_cancels(spec, devices)))


def rollback(spec: RolloutSpec, state: RolloutState, devices: Mapping[str, DeviceState], now: float, *,
             previous: Release, reason: str = "rolled back by an operator",
             busy_elsewhere: Collection[str] = frozenset()) -> Outcome:
    """-> rolled_back to ``previous``: cancels as :func:`abort`, then orders ``previous`` with ``allow_downgrade``
    to every device that installed the new version (installed or healthy, or timed out while installing or
    soaking: it may serve the new version silently), within ``max_concurrent`` but not the
    rate limit, the phases or the maintenance window (the bad version is serving). Later :func:`decide` calls
    keep ordering the rollback as slots free up and to devices that install the new version after all."""
    _require("rollback", state)
    if previous.model != spec.model:
        raise RolloutSpecError(f"rolls back {previous.model!r}, the rollout installs {spec.model!r}",
                               field="previous.model")
    if previous.bundle_digest == spec.bundle_digest:
        raise RolloutSpecError("is the bundle being rolled out", field="previous.bundle_digest")
    new = RolloutState(_S.ROLLED_BACK, state.phase, state.phase_started_at, reason, rollback_to=previous,
                       changed_at=now)
    decisions = _cancels(spec, devices) if state.status is not _S.ABORTED else []
    decisions += decide(spec, new, devices, now, busy_elsewhere=busy_elsewhere)
    return Outcome(new, tuple(decisions))


def retry_failed(spec: RolloutSpec, state: RolloutState, devices: Mapping[str, DeviceState], now: float,
                 *, only: Collection[str] | None = None) -> Outcome:
    """Start over the devices that failed, timed out or were rejected (or those of ``only`` that did) and no
    other (hawkBit #1454). They become not-started again, keeping their attempt count and last order time, and
    :func:`decide` orders them like any member: paced, in the current phase. The rollout's state is unchanged
    (a halted rollout stays halted until resumed)."""
    _require("retry-failed", state, "retry failed devices of")
    changed: dict[str, DeviceState] = {}
    for device in spec.ranked:
        st = devices.get(device)
        if st is None or st.step not in RETRYABLE_STEPS or st.rollback or (only is not None and device not in only):
            continue
        changed[device] = DeviceState(DeviceStep.NOT_STARTED, now, f"retry after {st.step.value}: {st.reason}",
                                      st.command_id, st.ordered_at, st.attempts, False, st.online, st.stale_since)
    return Outcome(state, (), changed)
