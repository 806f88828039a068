"""The rollout vocabulary validates itself: a bad value raises RolloutSpecError naming the field, so a bad rollout
is refused when it is created, not discovered when a gate misfires."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet_server.rollouts import (
    DAY_S,
    ConstantRate,
    DeviceDrift,
    DeviceSli,
    DeviceState,
    DeviceStep,
    DriftGate,
    DriftLevel,
    ExponentialRate,
    HaltRule,
    MaintenanceWindow,
    Phase,
    Release,
    RolloutSpecError,
    RolloutState,
    RolloutStatus,
    SliGate,
    Timeouts,
    TimeoutStep,
    rate_window,
)
from tests.server.rollouts.support import DIGEST, PREVIOUS, make_spec

BAD: list[tuple[str, Callable[[], Any]]] = [
    ("phase.percent", Phase),
    ("phase.percent", lambda: Phase(percent=10, count=3)),
    ("phase.percent", lambda: Phase(percent=0)),
    ("phase.percent", lambda: Phase(percent=101)),
    ("phase.percent", lambda: Phase(percent=math.nan)),
    ("phase.count", lambda: Phase(count=0)),
    ("phase.count", lambda: Phase(count=True)),
    ("phase.min_soak_s", lambda: Phase(count=1, min_soak_s=-1)),
    ("phase.success_threshold", lambda: Phase(count=1, success_threshold=1.5)),
    ("phase.failure_rate_halt", lambda: Phase(count=1, failure_rate_halt=-0.1)),
    ("phase.min_finished", lambda: Phase(count=1, min_finished=0)),
    ("drift_gate.max_excess_over_control", lambda: DriftGate(max_excess_over_control=2)),
    ("drift_gate.min_devices", lambda: DriftGate(min_devices=0)),
    ("sli_gate.max_error_rate", lambda: SliGate(max_error_rate=-1)),
    ("sli_gate.max_latency_p99_ms", lambda: SliGate(max_latency_p99_ms=0)),
    ("rate.per_minute", lambda: ConstantRate(0)),
    ("rate.factor", lambda: ExponentialRate(10, factor=0.5)),
    ("rate.max_per_minute", lambda: ExponentialRate(10, max_per_minute=5)),
    ("window.start_s", lambda: MaintenanceWindow(-1, 10)),
    ("window.end_s", lambda: MaintenanceWindow(0, DAY_S)),
    ("window.end_s", lambda: MaintenanceWindow(3600, 3600)),
    ("window.start_s", lambda: MaintenanceWindow.from_hhmm("25:00", "04:00")),
    ("timeouts.health_s", lambda: Timeouts(health_s=0)),
    ("model", lambda: Release("Bad Model", 1, DIGEST)),
    ("version", lambda: Release("m", -1, DIGEST)),
    ("bundle_digest", lambda: Release("m", 1, "ABC")),
    ("rollout_id", lambda: make_spec().__class__("RO/1", "m", 1, DIGEST, [], [Phase(count=1)])),
    ("target[1]", lambda: make_spec(target=["dev-1", "dev+2"])),
    ("target", lambda: make_spec(target=["dev-1", "dev-1"])),
    ("phases", lambda: make_spec(phases=[])),
    ("max_concurrent", lambda: make_spec(max_concurrent=0)),
    ("drift.drifted_share", lambda: DeviceDrift(3, DriftLevel.OK, 1.2)),
    ("sli.errors", lambda: DeviceSli(3, 10, 11, 1.0)),
    ("state.phase_started_at", lambda: RolloutState(RolloutStatus.RUNNING)),
    ("state.halt_rule", lambda: RolloutState(RolloutStatus.RUNNING, 0, 1.0, halt_rule=HaltRule.FAILURE_RATE)),
    ("state.rollback_to", lambda: RolloutState(RolloutStatus.ROLLED_BACK)),
    ("state.rollback_to", lambda: RolloutState(rollback_to=PREVIOUS)),
    ("device.step", lambda: DeviceState(DeviceStep.ORDERED)),
    ("device.attempts", lambda: DeviceState(attempts=-1)),
]


@pytest.mark.parametrize(("field", "build"), BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_invalid_rollout_values_are_refused_naming_the_field(field: str, build: Callable[[], Any]) -> None:
    with pytest.raises(RolloutSpecError) as err:
        build()
    assert err.value.field == field


def test_spec_normalises_target_and_phases_to_tuples() -> None:
    spec = make_spec(3)
    assert isinstance(spec.target, tuple) and isinstance(spec.phases, tuple)
    assert spec.release == Release("cancer-mlp", 3, DIGEST)
    with pytest.raises(RolloutSpecError, match="no phase 5"):
        spec.members(5)


def test_maintenance_window_wraps_over_midnight() -> None:
    window = MaintenanceWindow.from_hhmm("22:00", "04:00")
    midnight = 1_700_006_400.0  # 2023-11-15 00:00 UTC
    assert midnight % DAY_S == 0
    assert window.contains(midnight + 3 * 3600)
    assert window.contains(midnight - 3600)
    assert not window.contains(midnight + 4 * 3600)
    assert window.next_open(midnight + 12 * 3600) == midnight + 22 * 3600
    assert window.next_open(midnight + 23 * 3600) == midnight + 23 * 3600


@given(st.integers(0, DAY_S - 1), st.integers(0, DAY_S - 1), st.floats(0, 4e9))
def test_next_open_is_the_first_open_instant(start: int, end: int, now: float) -> None:
    if start == end:
        return
    window = MaintenanceWindow(start, end)
    opens = window.next_open(now)
    assert now <= opens < now + DAY_S
    assert window.contains(opens)
    if opens > now:
        assert not window.contains(now) and not window.contains(opens - 1e-3)


@pytest.mark.parametrize(("per_minute", "expected"), [(1000, (1000, 60.0)), (1.5, (2, 80.0)), (0.5, (1, 120.0))])
def test_rate_window_keeps_the_average_rate(per_minute: float, expected: tuple[int, float]) -> None:
    assert rate_window(per_minute) == expected


def test_exponential_rate_grows_with_evidence_and_stops_at_its_cap() -> None:
    rate = ExponentialRate(10, factor=2, every_healthy=5, max_per_minute=100)
    assert [rate.current(h) for h in (0, 4, 5, 10, 15, 20, 10**9)] == [10, 10, 20, 40, 80, 100, 100]
    assert ConstantRate(7).current(10**6) == 7


def test_timeouts_by_step() -> None:
    t = Timeouts(receive_s=1, download_s=2, install_s=3, health_s=4)
    assert [t.of(s) for s in TimeoutStep] == [1, 2, 3, 4]


def test_drift_levels_are_ordered_by_severity() -> None:
    assert [lvl.severity for lvl in DriftLevel] == [0, 1, 2]


@pytest.mark.parametrize("name", ["fleet_server.rollouts", *(f"fleet_server.rollouts.{m}" for m in (
    "model", "policy", "decisions", "operations", "selection", "errors"))])
def test_public_names_declared_and_present(name: str) -> None:
    module = importlib.import_module(name)
    assert len(set(module.__all__)) == len(module.__all__)
    assert [n for n in module.__all__ if not hasattr(module, n)] == []


def test_device_steps_follow_the_wire_event_vocabulary() -> None:
    """One definition of the deployment events (agent.protocol); the rollout's device steps must track it."""
    from agent.protocol import DEPLOY_EVENT_KINDS
    from fleet_server.rollouts.model import DeviceStep

    steps = {s.value for s in DeviceStep}
    assert steps >= DEPLOY_EVENT_KINDS
    assert steps - DEPLOY_EVENT_KINDS == {"not_started", "ordered", "timed_out"}  # the server's own
