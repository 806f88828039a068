"""The rollout policy: ``decide(spec, state, devices, now, signals) -> decisions``. Pure: no clock, no I/O, no
randomness; the same inputs give the same decisions in the same order, whatever order the caller lists its
devices or reports in.

One call does, in this order (``docs/rollouts.md`` has the full rules):

1. **Timeouts** (every state but draft): an updating device silent for longer than its step's timeout is
   ``MarkTimedOut`` (a failure) and its order is withdrawn with ``SendCancel``, so it cannot install a version
   the rollout may since have halted. Offline devices therefore never hold a phase past the timeout.
2. **Halt rules** (running): failure rate, inference SLI, drift vs baseline and vs control; the first that
   fails gives one ``Halt`` naming its numbers, and no order goes out in that call or afterwards.
3. **Advance** (running): when every member of the phase has finished, the success threshold holds, the gates
   that require data have it and the soak has passed: ``Advance(n+1)``, or ``Complete`` after the last phase.
   A phase that finished below its success threshold halts instead of stalling.
4. **Orders**: to members of the current phase only, not yet started, not busy in another rollout, online ones
   first, within ``max_concurrent``, the rate limit and the maintenance window. A rolled-back rollout orders the
   previous version (``allow_downgrade``) to devices that run the new one, within ``max_concurrent`` only.
5. **Wait**: when the rollout is live, what it waits for and the next time something changes by itself.

:func:`apply_decisions` records carried-out decisions in the states; :func:`on_event` follows a device's
deployment events. Both are pure too, so the caller's loop is: read states, decide, carry out, apply, store.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from agent.protocol import DeployEvent
from fleet_server.rollouts.decisions import (
    Advance,
    Complete,
    Decision,
    Halt,
    MarkTimedOut,
    SendCancel,
    SendOrder,
    Wait,
    cancel_command_id,
    order_command_id,
)
from fleet_server.rollouts.model import (
    FAILURE_STEPS,
    IN_FLIGHT_STEPS,
    ON_NEW_VERSION_STEPS,
    DeviceState,
    DeviceStep,
    DriftGate,
    HaltRule,
    Phase,
    Release,
    RolloutSpec,
    RolloutState,
    RolloutStatus,
    Signals,
    SliGate,
    TimeoutStep,
    rate_window,
)

__all__ = [
    "NOT_STARTED",
    "Tally",
    "apply_decisions",
    "busy_devices",
    "decide",
    "on_event",
    "tally",
]

NOT_STARTED: Final = DeviceState()
"""The state of a target device the caller has no record of."""

_NO_SIGNALS: Final = Signals()

_TIMEOUT_STEP: Final = {
    DeviceStep.ORDERED: TimeoutStep.RECEIVE,
    DeviceStep.RECEIVED: TimeoutStep.DOWNLOAD,
    DeviceStep.DOWNLOADING: TimeoutStep.DOWNLOAD,
    DeviceStep.VERIFIED: TimeoutStep.INSTALL,
    DeviceStep.INSTALLED: TimeoutStep.HEALTH,
}

_MAY_HAVE_INSTALLED: Final = frozenset({f"timeout_{TimeoutStep.INSTALL.value}", f"timeout_{TimeoutStep.HEALTH.value}"})
"""Timed out while installing or soaking: the device may well serve the new version (a rollback reaches it)."""

_PROGRESS: Final = {
    DeviceStep.ORDERED: 0,
    DeviceStep.RECEIVED: 1,
    DeviceStep.DOWNLOADING: 2,
    DeviceStep.VERIFIED: 3,
    DeviceStep.INSTALLED: 4,
    DeviceStep.HEALTHY: 5,
}

_EVENT_STEP: Final = {
    DeployEvent.RECEIVED: DeviceStep.RECEIVED,
    DeployEvent.DOWNLOADING: DeviceStep.DOWNLOADING,
    DeployEvent.VERIFIED: DeviceStep.VERIFIED,
    DeployEvent.INSTALLED: DeviceStep.INSTALLED,
    DeployEvent.HEALTHY: DeviceStep.HEALTHY,
    DeployEvent.FAILED: DeviceStep.FAILED,
    DeployEvent.ROLLED_BACK: DeviceStep.ROLLED_BACK,
    DeployEvent.REJECTED: DeviceStep.REJECTED,
    DeployEvent.CANCELLED: DeviceStep.CANCELLED,
}


# --------------------------------------------------------------------------------------------- the tally


@dataclass(frozen=True)
class Tally:
    """Where a rollout's phase stands, after the timeouts due at ``now``.

    ``population`` is what the gates judge: the members of the current phase plus every other target device the
    rollout has already ordered (a device pushed out of the phase by a late joiner ranked before it still counts).
    ``pending`` are members not started yet and free to order, online ones first, in rank order; ``busy`` are
    members not started because another rollout is updating them. ``on_new_version`` (installed or healthy) is
    the canary whose drift and SLI reports count; ``may_run_new_version`` adds devices that timed out while
    installing or soaking, which a rollback must reach too.
    """

    phase: int
    members: int
    population: int
    healthy: int
    failures: Mapping[DeviceStep, int]
    cancelled: int
    updating: int
    updating_in_target: int
    pending: tuple[str, ...]
    busy: int
    on_new_version: frozenset[str]
    may_run_new_version: frozenset[str]
    last_healthy_at: float | None
    order_times: tuple[float, ...]
    effective: Mapping[str, DeviceState] = field(repr=False)

    @property
    def failed(self) -> int:
        """Finished badly: failed, rolled back, rejected or timed out."""
        return sum(self.failures.values())

    @property
    def finished(self) -> int:
        """Healthy plus failed: what the success and failure shares are shares of (``cancelled`` is neither)."""
        return self.healthy + self.failed

    @property
    def settled(self) -> bool:
        """No member is updating and none can still be ordered (busy devices are not waited for)."""
        return self.updating == 0 and not self.pending

    def failure_summary(self) -> str:
        """``failed 3, timed_out 2`` (in a fixed order)."""
        parts = [f"{step.value} {self.failures[step]}" for step in DeviceStep if self.failures.get(step)]
        return ", ".join(parts) or "none"


def _timeouts(spec: RolloutSpec, devices: Mapping[str, DeviceState], now: float
              ) -> tuple[list[Decision], dict[str, DeviceState], float]:
    decisions: list[Decision] = []
    timed_out: dict[str, DeviceState] = {}
    next_deadline = math.inf
    for device in spec.ranked:
        state = devices.get(device)
        if state is None or state.step not in IN_FLIGHT_STEPS:
            continue
        step = _TIMEOUT_STEP[state.step]
        assert state.since is not None and state.command_id is not None
        deadline = state.since + spec.timeouts.of(step)
        if deadline <= now:
            decisions.append(MarkTimedOut(device, step, state.command_id, deadline))
            decisions.append(SendCancel(device, state.command_id, cancel_command_id(device, state.command_id)))
            timed_out[device] = state.moved(DeviceStep.TIMED_OUT, now, f"timeout_{step.value}")
        else:
            next_deadline = min(next_deadline, deadline)
    return decisions, timed_out, next_deadline


def _tally(spec: RolloutSpec, phase: int, devices: Mapping[str, DeviceState], overrides: Mapping[str, DeviceState],
           busy_elsewhere: Collection[str]) -> Tally:
    size = spec.sizes[phase]
    healthy = cancelled = updating = updating_in_target = busy = population = 0
    failures: dict[DeviceStep, int] = {}
    online: list[str] = []
    offline: list[str] = []
    on_new: set[str] = set()
    maybe_new: set[str] = set()
    last_healthy_at: float | None = None
    order_times: list[float] = []
    for rank, device in enumerate(spec.ranked):
        state = overrides.get(device) or devices.get(device) or NOT_STARTED
        if state.ordered_at is not None:
            order_times.append(state.ordered_at)
        step = state.step
        if step in IN_FLIGHT_STEPS:
            updating_in_target += 1
        if step is DeviceStep.NOT_STARTED:
            if rank < size:
                if device in busy_elsewhere:
                    busy += 1
                else:
                    (online if state.online else offline).append(device)
            continue
        if state.rollback:
            continue
        population += 1
        if step in ON_NEW_VERSION_STEPS:
            on_new.add(device)
            maybe_new.add(device)
        elif step is DeviceStep.TIMED_OUT and state.reason in _MAY_HAVE_INSTALLED:
            maybe_new.add(device)
        if step is DeviceStep.HEALTHY:
            healthy += 1
            assert state.since is not None
            last_healthy_at = state.since if last_healthy_at is None else max(last_healthy_at, state.since)
        elif step in FAILURE_STEPS:
            failures[step] = failures.get(step, 0) + 1
        elif step is DeviceStep.CANCELLED:
            cancelled += 1
        else:
            updating += 1
    population += len(online) + len(offline) + busy
    effective = {**devices, **overrides} if overrides else devices
    return Tally(phase, size, population, healthy, failures, cancelled, updating, updating_in_target,
                 (*online, *offline), busy, frozenset(on_new), frozenset(maybe_new), last_healthy_at,
                 tuple(order_times), effective)


def tally(spec: RolloutSpec, state: RolloutState, devices: Mapping[str, DeviceState], now: float,
          *, busy_elsewhere: Collection[str] = frozenset()) -> Tally:
    """The current phase's :class:`Tally` (for the console and metrics; :func:`decide` judges the same numbers)."""
    _, overrides, _ = _timeouts(spec, devices, now)
    return _tally(spec, _phase_of(spec, state), devices, overrides, busy_elsewhere)


def _phase_of(spec: RolloutSpec, state: RolloutState) -> int:
    if state.status is RolloutStatus.COMPLETED:
        return len(spec.phases) - 1
    return min(state.phase, len(spec.phases) - 1)


# --------------------------------------------------------------------------------------------- gates


def _share_text(part: int, whole: int) -> str:
    return f"{part}/{whole} = {part / whole:.1%}"


def _failure_rule(spec: RolloutSpec, phase: Phase, t: Tally) -> Halt | None:
    if t.finished < phase.min_finished or t.failed <= phase.failure_rate_halt * t.finished:
        return None
    return Halt(HaltRule.FAILURE_RATE,
                f"failure rate {_share_text(t.failed, t.finished)} of finished devices is over the halt threshold "
                f"{phase.failure_rate_halt:.1%} in phase {t.phase + 1} of {len(spec.phases)} "
                f"(min_finished {phase.min_finished}; {t.failure_summary()}; healthy {t.healthy})")


def _sli_rule(spec: RolloutSpec, gate: SliGate, t: Tally, signals: Signals) -> tuple[Halt | None, str | None]:
    """(halt, what is missing before the gate can pass)."""
    canary = [r for d, r in signals.sli.items() if r.version == spec.version and d in t.on_new_version]
    requests = sum(r.requests for r in canary)
    errors = sum(r.errors for r in canary)
    missing: list[str] = []
    if gate.max_error_rate is not None:
        if requests < gate.min_requests:
            missing.append(f"SLI gate: {requests} of {gate.min_requests} canary requests")
        elif errors > gate.max_error_rate * requests:
            return Halt(HaltRule.SLI_ERROR_RATE,
                        f"inference error rate {_share_text(errors, requests)} over {len(canary)} canary devices "
                        f"is over the limit {gate.max_error_rate:.2%} (phase {t.phase + 1})"), None
    if gate.max_latency_p99_ms is not None:
        p99s = sorted(r.latency_p99_ms for r in canary if r.requests > 0)
        if len(p99s) < gate.min_devices:
            missing.append(f"SLI gate: {len(p99s)} of {gate.min_devices} canary devices with latency")
        else:
            median = statistics.median(p99s)
            if median > gate.max_latency_p99_ms:
                return Halt(HaltRule.SLI_LATENCY,
                            f"median canary p99 latency {median:.1f} ms over {len(p99s)} devices is over the limit "
                            f"{gate.max_latency_p99_ms:.1f} ms (phase {t.phase + 1})"), None
    return None, "; ".join(missing) or None


def _drift_stats(reports: Sequence[tuple[int, float]], gate: DriftGate) -> tuple[int, float]:
    alerting = sum(1 for severity, _ in reports if severity >= gate.alert_level.severity)
    return alerting, math.fsum(share for _, share in reports) / len(reports)


def _drift_rule(spec: RolloutSpec, gate: DriftGate, t: Tally, signals: Signals) -> tuple[Halt | None, str | None]:
    canary: list[tuple[int, float]] = []
    control: list[tuple[int, float]] = []
    for device, report in signals.drift.items():
        if report.version == spec.version:
            if device in t.on_new_version:
                canary.append((report.level.severity, report.drifted_share))
        elif device not in t.on_new_version:
            control.append((report.level.severity, report.drifted_share))
    if len(canary) < gate.min_devices:
        return None, f"drift gate: {len(canary)} of {gate.min_devices} canary drift reports"
    n = len(canary)
    alerting, mean = _drift_stats(canary, gate)
    where = f"(phase {t.phase + 1}, {n} canary devices)"
    if gate.max_drifted_share is not None and mean > gate.max_drifted_share:
        return Halt(HaltRule.DRIFT_BASELINE,
                    f"drift vs the baseline: mean drifted-feature share {mean:.3f} is over "
                    f"{gate.max_drifted_share:.3f} {where}"), None
    if gate.max_alert_share is not None and alerting > gate.max_alert_share * n:
        return Halt(HaltRule.DRIFT_BASELINE,
                    f"drift vs the baseline: {_share_text(alerting, n)} of canary devices at {gate.alert_level} or "
                    f"worse is over {gate.max_alert_share:.1%} {where}"), None
    if gate.max_excess_over_control is not None and len(control) >= gate.min_devices:
        k = len(control)
        control_alerting, control_mean = _drift_stats(control, gate)
        excess = alerting / n - control_alerting / k
        if excess > gate.max_excess_over_control:
            return Halt(HaltRule.DRIFT_CONTROL,
                        f"drift spike in the canary vs the control group: {_share_text(alerting, n)} canary devices "
                        f"at {gate.alert_level} or worse vs {_share_text(control_alerting, k)} of control devices "
                        f"still on the old version; excess {excess:.3f} is over {gate.max_excess_over_control:.3f} "
                        f"(phase {t.phase + 1})"), None
        if mean - control_mean > gate.max_excess_over_control:
            return Halt(HaltRule.DRIFT_CONTROL,
                        f"drift spike in the canary vs the control group: mean drifted-feature share {mean:.3f} "
                        f"over {n} canary devices vs {control_mean:.3f} over {k} control devices; excess "
                        f"{mean - control_mean:.3f} is over {gate.max_excess_over_control:.3f} "
                        f"(phase {t.phase + 1})"), None
    return None, None


# --------------------------------------------------------------------------------------------- orders


@dataclass
class _Pace:
    count: int
    until: float | None
    reason: str | None


def _pace(spec: RolloutSpec, t: Tally, now: float, wanted: int, *, paced: bool) -> _Pace:
    """How many of ``wanted`` orders may go out now, and if not all, when to look again and why."""
    slots = spec.max_concurrent - t.updating_in_target
    count = max(0, min(wanted, slots))
    until: float | None = None
    reason: str | None = None
    if count < wanted:
        reason = f"max_concurrent: {t.updating_in_target} of {spec.max_concurrent} devices updating"
    if not paced or count == 0:
        return _Pace(count, until, reason)
    if spec.window is not None and not spec.window.contains(now):
        return _Pace(0, spec.window.next_open(now), "outside the maintenance window")
    per_minute = spec.rate.current(t.healthy)
    cap, window_s = rate_window(per_minute)
    recent = sorted(ts for ts in t.order_times if ts > now - window_s)
    allowed = max(0, cap - len(recent))
    if allowed < count:
        count = allowed
        sent = sorted([*recent, *([now] * count)])
        until = sent[len(sent) - cap] + window_s
        reason = f"rate limit: {cap} orders per {window_s:.0f} s ({per_minute:g}/min)"
    return _Pace(count, until, reason)


def _orders(spec: RolloutSpec, release: Release, t: Tally, candidates: Sequence[str], *, phase: int,
            pace: _Pace, rollback: bool) -> list[Decision]:
    out: list[Decision] = []
    for device in candidates[: pace.count]:
        attempt = t.effective.get(device, NOT_STARTED).attempts + 1
        out.append(SendOrder(device, order_command_id(spec.rollout_id, device, attempt, rollback=rollback),
                             release.model, release.version, release.bundle_digest, rollback, phase, attempt,
                             rollback))
    return out


def _wait(reasons: Iterable[str | None], untils: Iterable[float | None], now: float) -> Wait:
    times = [u for u in untils if u is not None and math.isfinite(u) and u > now]
    text = "; ".join(r for r in reasons if r) or "waiting for device events"
    return Wait(min(times) if times else None, text)


# --------------------------------------------------------------------------------------------- decide


def decide(spec: RolloutSpec, state: RolloutState, devices: Mapping[str, DeviceState], now: float,
           signals: Signals | None = None, *, busy_elsewhere: Collection[str] = frozenset()) -> list[Decision]:
    """The decisions for ``spec`` in ``state`` at ``now``. ``devices`` maps device ids to their state in this
    rollout (a target device missing from it has not started; devices outside ``spec.target`` are ignored);
    ``signals`` carries drift and SLI reports; ``busy_elsewhere`` lists devices another rollout is updating,
    which this one never orders and never waits for."""
    if state.status is RolloutStatus.DRAFT:
        return []
    signals = signals or _NO_SIGNALS
    busy_elsewhere = frozenset(busy_elsewhere)
    decisions, overrides, next_deadline = _timeouts(spec, devices, now)
    phase = _phase_of(spec, state)
    t = _tally(spec, phase, devices, overrides, busy_elsewhere)
    status = state.status

    if status in (RolloutStatus.PAUSED, RolloutStatus.ABORTED):
        if status is RolloutStatus.PAUSED or t.updating_in_target:
            label = "halted" if state.halted else str(status)
            decisions.append(_wait([f"{label}: {state.reason or 'no reason given'}"], [next_deadline], now))
        return decisions

    if status is RolloutStatus.ROLLED_BACK:
        assert state.rollback_to is not None
        candidates = [d for d in spec.ranked if d in t.may_run_new_version and d not in busy_elsewhere]
        pace = _pace(spec, t, now, len(candidates), paced=False)
        decisions += _orders(spec, state.rollback_to, t, candidates, phase=state.phase, pace=pace, rollback=True)
        if len(candidates) > pace.count or t.updating_in_target:
            decisions.append(_wait([f"rolling back to version {state.rollback_to.version}", pace.reason],
                                   [next_deadline], now))
        return decisions

    if status is RolloutStatus.COMPLETED:
        # Late joiners and devices freed by other rollouts: members of the last phase, whose gates passed.
        pace = _pace(spec, t, now, len(t.pending), paced=True)
        decisions += _orders(spec, spec.release, t, t.pending, phase=phase, pace=pace, rollback=False)
        if t.pending or t.updating_in_target:
            decisions.append(_wait(["completed: ordering devices that joined later", pace.reason],
                                   [next_deadline, pace.until], now))
        return decisions

    return decisions + _running(spec, state, t, now, signals=signals, next_deadline=next_deadline)


def _running(spec: RolloutSpec, state: RolloutState, t: Tally, now: float, *, signals: Signals,
             next_deadline: float) -> list[Decision]:
    phase = spec.phases[t.phase]
    missing: list[str] = []
    halt = _failure_rule(spec, phase, t)
    if halt is None and phase.sli is not None:
        halt, lacking = _sli_rule(spec, phase.sli, t, signals)
        missing += [lacking] if lacking and phase.sli.required else []
    if halt is None and phase.drift is not None:
        halt, lacking = _drift_rule(spec, phase.drift, t, signals)
        missing += [lacking] if lacking and phase.drift.required else []
    if halt is not None:
        return [halt]

    if t.settled:
        return [_settled(spec, state, t, now, missing=missing, next_deadline=next_deadline)]

    pace = _pace(spec, t, now, len(t.pending), paced=True)
    out = _orders(spec, spec.release, t, t.pending, phase=t.phase, pace=pace, rollback=False)
    reasons = [f"phase {t.phase + 1} of {len(spec.phases)}: {t.healthy} healthy, {t.failed} failed, "
               f"{t.updating_in_target + pace.count} updating, {len(t.pending) - pace.count} to order"
               + (f", {t.busy} busy in other rollouts" if t.busy else ""), pace.reason]
    out.append(_wait(reasons, [next_deadline, pace.until], now))
    return out


def _settled(spec: RolloutSpec, state: RolloutState, t: Tally, now: float, *, missing: list[str],
             next_deadline: float) -> Decision:
    """The decision for a phase with nothing left to order or wait for from devices."""
    phase = spec.phases[t.phase]
    last = t.phase == len(spec.phases) - 1
    where = f"phase {t.phase + 1} of {len(spec.phases)}"
    if t.finished == 0:
        if t.busy:
            return _wait([f"{where}: all {t.busy} remaining devices are busy in other rollouts"], [next_deadline], now)
        if t.population:
            return Halt(HaltRule.NO_EVIDENCE,
                        f"{where} finished with no device healthy or failed ({t.cancelled} cancelled): nothing to "
                        "judge the gates on")
    elif t.healthy < phase.success_threshold * t.finished:
        return Halt(HaltRule.SUCCESS_THRESHOLD,
                    f"{where} finished with {_share_text(t.healthy, t.finished)} healthy, under the success "
                    f"threshold {phase.success_threshold:.1%} ({t.failure_summary()})")
    if missing and t.population:
        return _wait([f"{where}: waiting for data", *missing], [next_deadline], now)
    assert state.phase_started_at is not None
    soak_from = max(state.phase_started_at, t.last_healthy_at or state.phase_started_at)
    ready_at = soak_from + phase.min_soak_s
    if now < ready_at:
        return _wait([f"{where}: soaking until {ready_at:.0f} ({phase.min_soak_s:g} s after the phase started "
                      "and its last device became healthy)"], [ready_at, next_deadline], now)
    summary = f"{where} passed: {t.healthy}/{t.finished} healthy, soaked {now - soak_from:.0f} s"
    if last:
        return Complete(summary)
    return Advance(t.phase + 1, summary)


# --------------------------------------------------------------------------------------------- bookkeeping


def apply_decisions(state: RolloutState, devices: Mapping[str, DeviceState], decisions: Iterable[Decision],
                    now: float) -> tuple[RolloutState, dict[str, DeviceState]]:
    """Record carried-out decisions: the rollout's new state and the device states that changed (only those).

    ``SendOrder`` -> ``ordered(now)``; ``MarkTimedOut`` -> ``timed_out``; ``Advance`` -> ``running(n)`` from
    ``now``; ``Halt`` -> ``paused`` with its rule and reason; ``Complete`` -> ``completed``. Cancels and waits
    change nothing: the device's ``cancelled`` event will.
    """
    changed: dict[str, DeviceState] = {}
    for decision in decisions:
        if isinstance(decision, SendOrder):
            prev = changed.get(decision.device) or devices.get(decision.device) or NOT_STARTED
            changed[decision.device] = DeviceState(
                DeviceStep.ORDERED, now, None, decision.command_id, now, decision.attempt, decision.rollback,
                prev.online, prev.stale_since)
        elif isinstance(decision, MarkTimedOut):
            prev = changed.get(decision.device) or devices.get(decision.device) or NOT_STARTED
            if prev.command_id == decision.command_id and prev.step in IN_FLIGHT_STEPS:
                changed[decision.device] = prev.moved(DeviceStep.TIMED_OUT, now, f"timeout_{decision.step.value}")
        elif isinstance(decision, Advance) and state.status is RolloutStatus.RUNNING:
            state = RolloutState(RolloutStatus.RUNNING, decision.to_phase, now, decision.reason, changed_at=now)
        elif isinstance(decision, Halt) and state.status is RolloutStatus.RUNNING:
            state = RolloutState(RolloutStatus.PAUSED, state.phase, state.phase_started_at, decision.reason,
                                 decision.rule, changed_at=now)
        elif isinstance(decision, Complete) and state.status is RolloutStatus.RUNNING:
            state = RolloutState(RolloutStatus.COMPLETED, state.phase, state.phase_started_at, decision.reason,
                                 changed_at=now)
    return state, changed


def on_event(device: DeviceState, kind: str, at: float, *, command_id: str | None,
             reason: str | None = None) -> DeviceState:
    """The device's state after a deployment event (``agent.protocol.DeployEvent``) received at ``at``.

    Events about another command (an older order, or a cancel command's own answers) change nothing; progress
    never goes backwards; the first terminal event wins, except that a healthy device can still roll back and a
    timed-out device that speaks again is followed (its late ``healthy`` is the truth). An event without a
    command id is the agent acting on its own (a crash-loop rollback) and applies to a device on the new version.
    """
    try:
        step = _EVENT_STEP[DeployEvent(kind)]
    except ValueError:
        return device
    current = device.step
    if current is DeviceStep.NOT_STARTED:
        return device
    if step in (DeviceStep.FAILED, DeviceStep.ROLLED_BACK, DeviceStep.REJECTED):
        reason = reason or "unknown"
    if command_id is None:
        if step in (DeviceStep.ROLLED_BACK, DeviceStep.FAILED) and current in ON_NEW_VERSION_STEPS:
            return device.moved(step, at, reason)
        return device
    if command_id != device.command_id:
        return device
    if step in _PROGRESS:
        if current is DeviceStep.TIMED_OUT or (current in _PROGRESS and _PROGRESS[step] > _PROGRESS[current]):
            return device.moved(step, at)
        return device
    if current in IN_FLIGHT_STEPS or current is DeviceStep.TIMED_OUT or (
        current is DeviceStep.HEALTHY and step in (DeviceStep.ROLLED_BACK, DeviceStep.FAILED)
    ):
        return device.moved(step, at, reason)
    return device


def busy_devices(spec: RolloutSpec, devices: Mapping[str, DeviceState]) -> frozenset[str]:
    """Target devices this rollout is updating: pass the union over the other live rollouts as their
    ``busy_elsewhere``."""
    return frozenset(d for d in spec.target if (s := devices.get(d)) is not None and s.step in IN_FLIGHT_STEPS)
