"""The rollout policy's vocabulary: what a rollout is (:class:`RolloutSpec` and its :class:`Phase` list), where it
stands (:class:`RolloutState`), where each device stands (:class:`DeviceState`) and what the caller observed
(:class:`Signals`). Every type is a frozen dataclass or an enum, validated on construction: a bad value raises
:class:`~fleet_server.rollouts.errors.RolloutSpecError` naming the field. Times are Unix seconds (floats), UTC.
"""

from __future__ import annotations

import enum
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Final

from agent.protocol import is_valid_identifier
from fleet_server.rollouts.errors import RolloutSpecError
from fleet_server.rollouts.selection import cumulative_sizes, rank_devices

__all__ = [
    "DAY_S",
    "FAILURE_STEPS",
    "IN_FLIGHT_STEPS",
    "ON_NEW_VERSION_STEPS",
    "TERMINAL_STEPS",
    "ConstantRate",
    "DeviceDrift",
    "DeviceSli",
    "DeviceState",
    "DeviceStep",
    "DriftGate",
    "DriftLevel",
    "ExponentialRate",
    "HaltRule",
    "MaintenanceWindow",
    "Phase",
    "RateLimit",
    "Release",
    "RolloutSpec",
    "RolloutState",
    "RolloutStatus",
    "Signals",
    "SliGate",
    "TimeoutStep",
    "Timeouts",
    "rate_window",
]

DAY_S: Final = 86_400
"""Seconds in a UTC day (Unix time has no leap seconds)."""

_DIGEST_RE: Final = re.compile(r"[0-9a-f]{64}")


# --------------------------------------------------------------------------------------------- validation helpers


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RolloutSpecError(f"must be a finite number, got {value!r}", field=name)
    return float(value)


def _non_negative(value: object, name: str) -> float:
    number = _number(value, name)
    if number < 0:
        raise RolloutSpecError(f"must be >= 0, got {value!r}", field=name)
    return number


def _positive(value: object, name: str) -> float:
    number = _number(value, name)
    if number <= 0:
        raise RolloutSpecError(f"must be > 0, got {value!r}", field=name)
    return number


def _share(value: object, name: str) -> float:
    number = _number(value, name)
    if not 0.0 <= number <= 1.0:
        raise RolloutSpecError(f"must be a share in [0, 1], got {value!r}", field=name)
    return number


def _integer(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RolloutSpecError(f"must be an integer, got {value!r}", field=name)
    if value < minimum:
        raise RolloutSpecError(f"must be >= {minimum}, got {value}", field=name)
    return value


def _identifier(value: object, name: str) -> str:
    if not is_valid_identifier(value):
        raise RolloutSpecError(f"must match [a-z0-9][a-z0-9._-]{{0,63}}, got {value!r}", field=name)
    assert isinstance(value, str)
    return value


# --------------------------------------------------------------------------------------------- gates and signals


class DriftLevel(enum.StrEnum):
    """A device's drift level for one window, as the drift scoring reports it (worst feature wins). The values
    are the drift scores' level strings; the caller leaves out windows too small to judge (``insufficient``)."""

    OK = "ok"
    WARN = "warn"
    ALERT = "alert"

    @property
    def severity(self) -> int:
        """0, 1, 2: for comparisons (``level.severity >= gate.alert_level.severity``)."""
        return _SEVERITY[self]


_SEVERITY: Final = {DriftLevel.OK: 0, DriftLevel.WARN: 1, DriftLevel.ALERT: 2}


@dataclass(frozen=True)
class DeviceDrift:
    """One device's latest drift summary against the bundle's baseline, computed by the caller.

    ``version`` is the model version the window was measured on: reports on the rollout's version come from the
    canary, reports on any other version from the control group (devices still on the old version).
    ``drifted_share`` is the share of the model's input features whose drift score is over the warn threshold.
    """

    version: int
    level: DriftLevel
    drifted_share: float

    def __post_init__(self) -> None:
        _integer(self.version, "drift.version", 0)
        if not isinstance(self.level, DriftLevel):
            raise RolloutSpecError(f"must be a DriftLevel, got {self.level!r}", field="drift.level")
        _share(self.drifted_share, "drift.drifted_share")


@dataclass(frozen=True)
class DeviceSli:
    """One device's inference SLI summary over its latest window: requests, errors and p99 latency."""

    version: int
    requests: int
    errors: int
    latency_p99_ms: float

    def __post_init__(self) -> None:
        _integer(self.version, "sli.version", 0)
        _integer(self.requests, "sli.requests", 0)
        _integer(self.errors, "sli.errors", 0)
        if self.errors > self.requests:
            raise RolloutSpecError(f"{self.errors} errors out of {self.requests} requests", field="sli.errors")
        _non_negative(self.latency_p99_ms, "sli.latency_p99_ms")


@dataclass(frozen=True)
class Signals:
    """What the caller observed about model behaviour, per device id (latest window each).

    Devices outside the rollout's target may appear (a holdout control group); the policy sorts reports into
    canary (this rollout's version, on a device that runs it) and control (any other version).
    """

    drift: Mapping[str, DeviceDrift] = field(default_factory=dict)
    sli: Mapping[str, DeviceSli] = field(default_factory=dict)


@dataclass(frozen=True)
class DriftGate:
    """Halt when the canary drifts: against the bundle's baseline (absolute limits) or against the control group
    still on the old version (a spike that the control does not show is the new model's doing).

    Each limit is optional (``None`` turns that rule off). Nothing is judged below ``min_devices`` canary
    reports (hysteresis against one noisy device, F6); the control comparison also needs ``min_devices``
    control reports. With ``required`` the phase does not advance until the canary has ``min_devices`` reports.
    """

    max_drifted_share: float | None = None
    """Mean share of drifted features over canary devices, vs the baseline."""
    max_alert_share: float | None = None
    """Share of canary devices at ``alert_level`` or worse, vs the baseline."""
    max_excess_over_control: float | None = 0.2
    """Canary minus control, for both the alerting share and the mean drifted share."""
    alert_level: DriftLevel = DriftLevel.ALERT
    min_devices: int = 3
    required: bool = True

    def __post_init__(self) -> None:
        for name in ("max_drifted_share", "max_alert_share", "max_excess_over_control"):
            value = getattr(self, name)
            if value is not None:
                _share(value, f"drift_gate.{name}")
        if not isinstance(self.alert_level, DriftLevel):
            raise RolloutSpecError(f"must be a DriftLevel, got {self.alert_level!r}", field="drift_gate.alert_level")
        _integer(self.min_devices, "drift_gate.min_devices", 1)


@dataclass(frozen=True)
class SliGate:
    """Halt when the canary's inference error rate (all canary requests pooled) or its median device p99 latency
    is over the limit. Needs ``min_requests`` pooled requests for the error rate and ``min_devices`` devices
    (each with at least one request) for latency; with ``required`` the phase waits for that much data."""

    max_error_rate: float | None = 0.01
    max_latency_p99_ms: float | None = None
    min_requests: int = 100
    min_devices: int = 3
    required: bool = True

    def __post_init__(self) -> None:
        if self.max_error_rate is not None:
            _share(self.max_error_rate, "sli_gate.max_error_rate")
        if self.max_latency_p99_ms is not None:
            _positive(self.max_latency_p99_ms, "sli_gate.max_latency_p99_ms")
        _integer(self.min_requests, "sli_gate.min_requests", 1)
        _integer(self.min_devices, "sli_gate.min_devices", 1)


# --------------------------------------------------------------------------------------------- phases and pacing


@dataclass(frozen=True)
class Phase:
    """One stage of a rollout. Phases are cumulative: phase ``n`` may order every device ranked within the first
    ``percent`` of the target (rounded up) or the first ``count`` devices, whichever the phase gives, and never
    fewer than the phase before it.

    Gates are evaluated over every device the rollout has reached so far (see ``docs/rollouts.md``):
    ``failure_rate_halt`` halts once ``min_finished`` devices have finished and the failed share is strictly over
    it; the phase advances when every member has finished, ``success_threshold`` of the finished are healthy,
    and ``min_soak_s`` has passed since the phase started and since its last device became healthy.
    """

    percent: float | None = None
    count: int | None = None
    min_soak_s: float = 0.0
    success_threshold: float = 0.95
    failure_rate_halt: float = 0.10
    min_finished: int = 5
    drift: DriftGate | None = None
    sli: SliGate | None = None

    def __post_init__(self) -> None:
        if (self.percent is None) == (self.count is None):
            raise RolloutSpecError("give exactly one of percent and count", field="phase.percent")
        if self.percent is not None:
            percent = _number(self.percent, "phase.percent")
            if not 0 < percent <= 100:
                raise RolloutSpecError(f"must be in (0, 100], got {self.percent!r}", field="phase.percent")
        if self.count is not None:
            _integer(self.count, "phase.count", 1)
        _non_negative(self.min_soak_s, "phase.min_soak_s")
        _share(self.success_threshold, "phase.success_threshold")
        _share(self.failure_rate_halt, "phase.failure_rate_halt")
        _integer(self.min_finished, "phase.min_finished", 1)
        if self.drift is not None and not isinstance(self.drift, DriftGate):
            raise RolloutSpecError("must be a DriftGate", field="phase.drift")
        if self.sli is not None and not isinstance(self.sli, SliGate):
            raise RolloutSpecError("must be a SliGate", field="phase.sli")

    def size(self, population: int) -> int:
        """How many devices of a target of ``population`` this phase reaches (before the cumulative max)."""
        if self.count is not None:
            return min(self.count, population)
        assert self.percent is not None
        # round() absorbs float noise (10% of 200 is 20, not 20.000000000000004 -> 21).
        return min(population, math.ceil(round(self.percent * population / 100, 9)))


@dataclass(frozen=True)
class ConstantRate:
    """At most ``per_minute`` new orders per minute, on average over a sliding window (see :meth:`window`)."""

    per_minute: float

    def __post_init__(self) -> None:
        _positive(self.per_minute, "rate.per_minute")

    def current(self, healthy: int) -> float:
        """Orders per minute allowed now."""
        return self.per_minute


@dataclass(frozen=True)
class ExponentialRate:
    """Start at ``base_per_minute``; multiply by ``factor`` for every ``every_healthy`` devices that became
    healthy; never above ``max_per_minute`` (AWS IoT Jobs' exponential rollout, driven by evidence, not time)."""

    base_per_minute: float
    factor: float = 2.0
    every_healthy: int = 10
    max_per_minute: float = 1000.0

    def __post_init__(self) -> None:
        _positive(self.base_per_minute, "rate.base_per_minute")
        if _number(self.factor, "rate.factor") < 1:
            raise RolloutSpecError(f"must be >= 1, got {self.factor!r}", field="rate.factor")
        _integer(self.every_healthy, "rate.every_healthy", 1)
        if _positive(self.max_per_minute, "rate.max_per_minute") < self.base_per_minute:
            raise RolloutSpecError("must be >= base_per_minute", field="rate.max_per_minute")

    def current(self, healthy: int) -> float:
        """Orders per minute allowed now, given how many devices of the rollout are healthy."""
        steps = healthy // self.every_healthy
        # Compare in log space: factor ** steps overflows long before the cap stops mattering.
        if steps * math.log(self.factor) >= math.log(self.max_per_minute / self.base_per_minute):
            return self.max_per_minute
        return float(min(self.max_per_minute, self.base_per_minute * self.factor**steps))


RateLimit = ConstantRate | ExponentialRate
"""A rollout's pace: constant, or exponential in the number of healthy devices."""


def rate_window(per_minute: float) -> tuple[int, float]:
    """The sliding window that enforces ``per_minute``: ``(orders, seconds)`` with ``orders >= 1`` and
    ``orders / seconds * 60 == per_minute`` (1000/min -> 1000 per 60 s; 1.5/min -> 2 per 80 s; 0.5/min -> 1
    per 120 s)."""
    orders = max(1, math.ceil(per_minute))
    return orders, 60.0 * orders / per_minute


@dataclass(frozen=True)
class MaintenanceWindow:
    """A daily UTC window in which new orders may go out: ``[start_s, end_s)`` seconds after UTC midnight.
    ``start_s > end_s`` wraps over midnight (22:00-04:00). Cancels, rollbacks and timeouts ignore it."""

    start_s: int
    end_s: int

    def __post_init__(self) -> None:
        for name in ("start_s", "end_s"):
            value = _integer(getattr(self, name), f"window.{name}", 0)
            if value >= DAY_S:
                raise RolloutSpecError(f"must be < {DAY_S}, got {value}", field=f"window.{name}")
        if self.start_s == self.end_s:
            raise RolloutSpecError("an empty window would never open (omit the window instead)", field="window.end_s")

    @classmethod
    def from_hhmm(cls, start: str, end: str) -> MaintenanceWindow:
        """``MaintenanceWindow.from_hhmm("22:00", "04:00")``."""

        def parse(text: str, name: str) -> int:
            match = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)", text)
            if match is None:
                raise RolloutSpecError(f"must be HH:MM (UTC), got {text!r}", field=f"window.{name}")
            return int(match[1]) * 3600 + int(match[2]) * 60

        return cls(parse(start, "start_s"), parse(end, "end_s"))

    def contains(self, now: float) -> bool:
        """True if ``now`` falls inside the window."""
        t = now % DAY_S
        if self.start_s < self.end_s:
            return self.start_s <= t < self.end_s
        return t >= self.start_s or t < self.end_s

    def next_open(self, now: float) -> float:
        """``now`` if the window is open, else the next time it opens."""
        if self.contains(now):
            return now
        midnight = now - now % DAY_S
        opens = midnight + self.start_s
        return opens if opens > now else opens + DAY_S


class TimeoutStep(enum.StrEnum):
    """The step a silent device timed out in, named after what it failed to report next."""

    RECEIVE = "receive"
    """Ordered, never acknowledged with ``received`` (offline, or the order was lost)."""
    DOWNLOAD = "download"
    """Received or downloading, never ``verified``."""
    INSTALL = "install"
    """Verified, never ``installed``."""
    HEALTH = "health"
    """Installed, never ``healthy`` (nor ``rolled_back``)."""


@dataclass(frozen=True)
class Timeouts:
    """Per-step timeouts in seconds, each measured from the device's last event. ``health_s`` must cover the
    bundle's own soak (``health.soak_s``) plus the health check."""

    receive_s: float = 3600.0
    download_s: float = 3600.0
    install_s: float = 600.0
    health_s: float = 1800.0

    def __post_init__(self) -> None:
        for name in ("receive_s", "download_s", "install_s", "health_s"):
            _positive(getattr(self, name), f"timeouts.{name}")

    def of(self, step: TimeoutStep) -> float:
        """The timeout of ``step`` in seconds."""
        return {
            TimeoutStep.RECEIVE: self.receive_s,
            TimeoutStep.DOWNLOAD: self.download_s,
            TimeoutStep.INSTALL: self.install_s,
            TimeoutStep.HEALTH: self.health_s,
        }[step]


# --------------------------------------------------------------------------------------------- the rollout


@dataclass(frozen=True)
class Release:
    """A model version as a deployment order names it."""

    model: str
    version: int
    bundle_digest: str

    def __post_init__(self) -> None:
        _identifier(self.model, "model")
        _integer(self.version, "version", 0)
        if not isinstance(self.bundle_digest, str) or _DIGEST_RE.fullmatch(self.bundle_digest) is None:
            raise RolloutSpecError("must be 64 lower-case hex characters (sha256 of the manifest)",
                                   field="bundle_digest")


@dataclass(frozen=True)
class RolloutSpec:
    """What to roll out, to whom and how. ``target`` is the cohort's device ids, resolved by the caller at each
    call (devices that join the cohort later simply appear in it; their rank decides their phase).

    ``ranked`` (computed once per spec object) is the target in rollout order: by sha256 of rollout id and
    device id, so the order is the same on every replica and never changes for the devices already in it.
    """

    rollout_id: str
    model: str
    version: int
    bundle_digest: str
    target: Sequence[str]
    phases: Sequence[Phase]
    max_concurrent: int = 100
    rate: RateLimit = ConstantRate(1000.0)
    window: MaintenanceWindow | None = None
    timeouts: Timeouts = Timeouts()

    def __post_init__(self) -> None:
        _identifier(self.rollout_id, "rollout_id")
        Release(self.model, self.version, self.bundle_digest)
        target = tuple(self.target)
        for i, device in enumerate(target):
            if not is_valid_identifier(device):
                _identifier(device, f"target[{i}]")
        if len(set(target)) != len(target):
            dupes = sorted(d for d, n in Counter(target).items() if n > 1)
            raise RolloutSpecError(f"lists devices more than once: {dupes[:5]}", field="target")
        phases = tuple(self.phases)
        if not phases:
            raise RolloutSpecError("a rollout needs at least one phase", field="phases")
        for i, phase in enumerate(phases):
            if not isinstance(phase, Phase):
                raise RolloutSpecError("must be a Phase", field=f"phases[{i}]")
        _integer(self.max_concurrent, "max_concurrent", 1)
        if not isinstance(self.rate, ConstantRate | ExponentialRate):
            raise RolloutSpecError("must be a ConstantRate or an ExponentialRate", field="rate")
        if self.window is not None and not isinstance(self.window, MaintenanceWindow):
            raise RolloutSpecError("must be a MaintenanceWindow", field="window")
        if not isinstance(self.timeouts, Timeouts):
            raise RolloutSpecError("must be Timeouts", field="timeouts")
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "phases", phases)

    @property
    def release(self) -> Release:
        """The version this rollout installs."""
        return Release(self.model, self.version, self.bundle_digest)

    @cached_property
    def ranked(self) -> tuple[str, ...]:
        """The target in rollout order (see :func:`~fleet_server.rollouts.selection.rank_devices`)."""
        return tuple(rank_devices(self.rollout_id, self.target))

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        """Cumulative membership size of each phase for the current target."""
        return tuple(cumulative_sizes([p.size(len(self.target)) for p in self.phases]))

    def members(self, phase: int) -> tuple[str, ...]:
        """The devices phase ``phase`` (0-based) may order: the first ``sizes[phase]`` devices in rank order."""
        if not 0 <= phase < len(self.phases):
            raise RolloutSpecError(f"no phase {phase} (the rollout has {len(self.phases)})", field="phase")
        return self.ranked[: self.sizes[phase]]


class RolloutStatus(enum.StrEnum):
    """Where a rollout stands."""

    DRAFT = "draft"
    RUNNING = "running"
    PAUSED = "paused"
    """By an operator, or halted by a gate (``RolloutState.halt_rule`` is set)."""
    COMPLETED = "completed"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled_back"


class HaltRule(enum.StrEnum):
    """Which rule halted a rollout (with the numbers in the halt's reason)."""

    FAILURE_RATE = "failure_rate"
    SUCCESS_THRESHOLD = "success_threshold"
    NO_EVIDENCE = "no_evidence"
    DRIFT_BASELINE = "drift_baseline"
    DRIFT_CONTROL = "drift_control"
    SLI_ERROR_RATE = "sli_error_rate"
    SLI_LATENCY = "sli_latency"


@dataclass(frozen=True)
class RolloutState:
    """``draft``, ``running(phase n)``, ``paused`` (by hand, or halted: ``halt_rule``), ``completed``, ``aborted``,
    ``rolled_back`` (to ``rollback_to``), with the reason of the last change and when it happened."""

    status: RolloutStatus = RolloutStatus.DRAFT
    phase: int = 0
    phase_started_at: float | None = None
    reason: str | None = None
    halt_rule: HaltRule | None = None
    rollback_to: Release | None = None
    changed_at: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.status, RolloutStatus):
            raise RolloutSpecError(f"must be a RolloutStatus, got {self.status!r}", field="state.status")
        _integer(self.phase, "state.phase", 0)
        if self.status in (RolloutStatus.RUNNING, RolloutStatus.PAUSED) and self.phase_started_at is None:
            raise RolloutSpecError(f"a {self.status} rollout needs phase_started_at", field="state.phase_started_at")
        if self.halt_rule is not None and self.status is not RolloutStatus.PAUSED:
            raise RolloutSpecError("only a paused rollout can be halted", field="state.halt_rule")
        if (self.rollback_to is None) == (self.status is RolloutStatus.ROLLED_BACK):
            raise RolloutSpecError("rollback_to is set exactly when the rollout is rolled back",
                                   field="state.rollback_to")

    @classmethod
    def draft(cls) -> RolloutState:
        """A rollout that has not started."""
        return cls()

    @classmethod
    def running(cls, phase: int, since: float) -> RolloutState:
        """``running(phase n)``, the phase started at ``since``."""
        return cls(RolloutStatus.RUNNING, phase, since, changed_at=since)

    @property
    def halted(self) -> bool:
        """Paused by a gate rather than by an operator."""
        return self.halt_rule is not None


# --------------------------------------------------------------------------------------------- devices


class DeviceStep(enum.StrEnum):
    """Where one device stands in this rollout: the agent's deployment events plus the server's own
    ``not_started``, ``ordered`` and ``timed_out``."""

    NOT_STARTED = "not_started"
    ORDERED = "ordered"
    RECEIVED = "received"
    DOWNLOADING = "downloading"
    VERIFIED = "verified"
    INSTALLED = "installed"
    HEALTHY = "healthy"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


IN_FLIGHT_STEPS: Final = frozenset(
    {DeviceStep.ORDERED, DeviceStep.RECEIVED, DeviceStep.DOWNLOADING, DeviceStep.VERIFIED, DeviceStep.INSTALLED}
)
"""Updating: counted against ``max_concurrent``, subject to step timeouts, busy for other rollouts."""
FAILURE_STEPS: Final = frozenset(
    {DeviceStep.FAILED, DeviceStep.ROLLED_BACK, DeviceStep.REJECTED, DeviceStep.TIMED_OUT}
)
"""Finished badly: count toward the failure rate."""
TERMINAL_STEPS: Final = frozenset({DeviceStep.HEALTHY, DeviceStep.CANCELLED, *FAILURE_STEPS})
"""Finished (``cancelled`` is finished but neither a success nor a failure)."""
ON_NEW_VERSION_STEPS: Final = frozenset({DeviceStep.INSTALLED, DeviceStep.HEALTHY})
"""The device serves the rollout's version (its drift and SLI reports belong to the canary)."""


@dataclass(frozen=True)
class DeviceState:
    """One device in one rollout. ``since`` is the time of its last event (timeouts count from it);
    ``command_id`` and ``ordered_at`` belong to the latest order (``ordered_at`` survives a retry, for the
    rate limit); ``rollback`` marks that order as the rollback order; ``online``/``stale_since`` come from the
    device's status and heartbeats (offline devices are ordered after online ones)."""

    step: DeviceStep = DeviceStep.NOT_STARTED
    since: float | None = None
    reason: str | None = None
    command_id: str | None = None
    ordered_at: float | None = None
    attempts: int = 0
    rollback: bool = False
    online: bool = True
    stale_since: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.step, DeviceStep):
            raise RolloutSpecError(f"must be a DeviceStep, got {self.step!r}", field="device.step")
        _integer(self.attempts, "device.attempts", 0)
        if self.step is not DeviceStep.NOT_STARTED and (
            self.since is None or self.command_id is None or self.ordered_at is None or self.attempts < 1
        ):
            raise RolloutSpecError(f"a device in step {self.step} needs since, command_id, ordered_at and "
                                   "attempts >= 1", field="device.step")

    @classmethod
    def ordered(cls, at: float, command_id: str, *, attempts: int = 1, rollback: bool = False) -> DeviceState:
        """``ordered(at)``: an order went out at ``at``."""
        return cls(DeviceStep.ORDERED, at, None, command_id, at, attempts, rollback)

    def moved(self, step: DeviceStep, at: float, reason: str | None = None) -> DeviceState:
        """This state with the device now at ``step`` since ``at``."""
        return DeviceState(step, at, reason, self.command_id, self.ordered_at, self.attempts, self.rollback,
                           self.online, self.stale_since)
