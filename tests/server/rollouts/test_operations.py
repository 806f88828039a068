"""Manual operations: pause, resume, abort (cancels go out at once), roll back, retry only the failed."""

from __future__ import annotations

import pytest

from fleet_server.rollouts import (
    CANCELLABLE_STEPS,
    ConstantRate,
    DeviceStep,
    Halt,
    HaltRule,
    InvalidTransitionError,
    MaintenanceWindow,
    Phase,
    Release,
    RolloutSpecError,
    RolloutState,
    RolloutStatus,
    SendCancel,
    abort,
    decide,
    order_command_id,
    pause,
    resume,
    retry_failed,
    rollback,
    start,
)
from tests.server.rollouts.support import (
    OLD_DIGEST,
    PREVIOUS,
    T0,
    at,
    cancels,
    fleet,
    make_spec,
    of_type,
    orders,
    running,
)

S = DeviceStep
R = RolloutStatus


def test_start_runs_phase_one_and_only_from_draft() -> None:
    out = start(RolloutState.draft(), T0)
    assert (out.state.status, out.state.phase, out.state.phase_started_at) == (R.RUNNING, 0, T0)
    with pytest.raises(InvalidTransitionError, match="cannot start a rollout that is running"):
        start(out.state, T0)


def test_pause_stops_new_orders_and_resume_continues_in_the_same_phase() -> None:
    spec = make_spec(20)
    paused = pause(running(1, T0), T0 + 5, "investigating").state
    assert (paused.status, paused.reason, paused.halted) == (R.PAUSED, "investigating", False)
    assert orders(decide(spec, paused, {}, T0 + 6)) == []
    resumed = resume(paused, T0 + 7).state
    assert (resumed.status, resumed.phase, resumed.phase_started_at) == (R.RUNNING, 1, T0)
    assert orders(decide(spec, resumed, {}, T0 + 8))


def test_resume_after_a_halt_halts_again_while_the_gate_still_fails() -> None:
    spec = make_spec(20, phases=[Phase(count=10, failure_rate_halt=0.2, min_finished=5), Phase(percent=100)])
    devices = fleet(spec, {S.FAILED: 3, S.HEALTHY: 3})
    halted = RolloutState(R.PAUSED, 0, T0, "failure rate", HaltRule.FAILURE_RATE)
    assert [type(d) for d in decide(spec, resume(halted, T0).state, devices, T0)] == [Halt]


def test_abort_cancels_devices_mid_update_at_once() -> None:
    """Greengrass #807/#1168: a stuck deployment must be cancellable. Every device not yet installed gets its
    cancel in the same call, whatever max_concurrent, the rate limit or the maintenance window say."""
    spec = make_spec(20, max_concurrent=1, rate=ConstantRate(0.1), window=MaintenanceWindow.from_hhmm("02:00", "03:00"))
    devices = fleet(spec, {S.ORDERED: 3, S.RECEIVED: 2, S.DOWNLOADING: 4, S.VERIFIED: 1, S.INSTALLED: 2,
                           S.HEALTHY: 3, S.FAILED: 1})
    out = abort(spec, running(1), devices, T0 + 12 * 3600, "bad bundle")
    assert (out.state.status, out.state.reason) == (R.ABORTED, "bad bundle")
    mid_update = {d for d, st in devices.items() if st.step in CANCELLABLE_STEPS}
    assert len(mid_update) == 10
    assert all(isinstance(d, SendCancel) for d in out.decisions)
    assert {c.device for c in cancels(out.decisions)} == mid_update
    assert all(c.command == devices[c.device].command_id for c in cancels(out.decisions))


def test_aborted_rollout_never_orders_again() -> None:
    spec = make_spec(20)
    aborted = abort(spec, running(0), {}, T0).state
    assert orders(decide(spec, aborted, {}, T0 + 1)) == []
    assert decide(spec, aborted, {}, T0 + 1) == []
    with pytest.raises(InvalidTransitionError):
        resume(aborted, T0)


def test_rollback_orders_the_previous_version_to_devices_that_got_the_new_one() -> None:
    spec = make_spec(20, rate=ConstantRate(0.1), window=MaintenanceWindow.from_hhmm("02:00", "03:00"))
    devices = fleet(spec, {S.HEALTHY: 4, S.INSTALLED: 1, S.DOWNLOADING: 2, S.FAILED: 1, S.ROLLED_BACK: 1})
    out = rollback(spec, running(1), devices, T0 + 100, previous=PREVIOUS, reason="drift in the field")
    assert (out.state.status, out.state.rollback_to) == (R.ROLLED_BACK, PREVIOUS)
    sent = orders(out.decisions)
    on_new = {d for d, st in devices.items() if st.step in (S.HEALTHY, S.INSTALLED)}
    assert {o.device for o in sent} == on_new
    assert all(o.allow_downgrade and o.rollback and (o.version, o.bundle_digest) == (2, OLD_DIGEST) for o in sent)
    assert all(o.command_id == order_command_id("ro-test", o.device, 2, rollback=True) for o in sent)
    assert {c.device for c in cancels(out.decisions)} == {d for d, st in devices.items() if st.step is S.DOWNLOADING}


@pytest.mark.parametrize(("step", "reached"), [(S.INSTALLED, True), (S.VERIFIED, True), (S.DOWNLOADING, False)])
def test_rollback_reaches_devices_that_went_silent_while_installing(step: DeviceStep, reached: bool) -> None:
    """A device that timed out after verifying may be serving the new version without telling: roll it back too."""
    spec = make_spec(20)
    devices = fleet(spec, {step: 1})
    out = rollback(spec, running(1), devices, T0 + 10 * 3600, previous=PREVIOUS)
    assert bool(orders(out.decisions)) is reached


def test_rollback_reaches_devices_that_installed_after_their_cancel_lost_the_race() -> None:
    spec = make_spec(20)
    state = RolloutState(R.ROLLED_BACK, 1, T0, "rb", rollback_to=PREVIOUS)
    late = spec.ranked[0]
    devices = {late: at(S.INSTALLED, T0 + 10, device=late),
               spec.ranked[1]: at(S.HEALTHY, T0, device=spec.ranked[1], rollback=True, attempts=2)}
    assert [o.device for o in orders(decide(spec, state, devices, T0 + 11))] == [late]


def test_rollback_respects_max_concurrent_and_devices_busy_elsewhere() -> None:
    spec = make_spec(20, max_concurrent=3)
    devices = fleet(spec, {S.HEALTHY: 6})
    busy = {spec.ranked[0]}
    out = rollback(spec, running(1), devices, T0, previous=PREVIOUS, busy_elsewhere=busy)
    assert [o.device for o in orders(out.decisions)] == list(spec.ranked[1:4])


def test_rollback_refuses_another_model_or_the_same_bundle() -> None:
    spec = make_spec(20)
    with pytest.raises(RolloutSpecError, match=r"previous\.model"):
        rollback(spec, running(0), {}, T0, previous=Release("other-model", 2, OLD_DIGEST))
    with pytest.raises(RolloutSpecError, match=r"previous\.bundle_digest"):
        rollback(spec, running(0), {}, T0, previous=Release("cancer-mlp", 3, spec.bundle_digest))


def test_retry_failed_reaches_only_failed_devices() -> None:
    """hawkBit #1454: retry the failed, timed-out and rejected devices, and nothing else."""
    spec = make_spec(20, phases=[Phase(count=10, failure_rate_halt=0.9), Phase(percent=100)])
    devices = fleet(spec, {S.FAILED: 2, S.TIMED_OUT: 1, S.REJECTED: 1, S.ROLLED_BACK: 1, S.CANCELLED: 1,
                           S.HEALTHY: 2, S.DOWNLOADING: 2})
    out = retry_failed(spec, running(0), devices, T0 + 100)
    retried = {d for d, st in devices.items() if st.step in (S.FAILED, S.TIMED_OUT, S.REJECTED)}
    assert set(out.devices) == retried and out.state == running(0) and out.decisions == ()
    assert all(st.step is S.NOT_STARTED and st.attempts == 1 for st in out.devices.values())
    sent = orders(decide(spec, running(0), {**devices, **out.devices}, T0 + 101))
    assert {o.device for o in sent} == retried
    assert all(o.attempt == 2 and o.command_id == order_command_id("ro-test", o.device, 2) for o in sent)


def test_retry_failed_can_be_limited_to_chosen_devices() -> None:
    spec = make_spec(20)
    devices = fleet(spec, {S.FAILED: 3})
    chosen = spec.ranked[1]
    assert set(retry_failed(spec, running(0), devices, T0, only={chosen, "dev-999"}).devices) == {chosen}


@pytest.mark.parametrize(("operation", "status"), [
    ("pause", R.PAUSED), ("pause", R.DRAFT), ("resume", R.RUNNING), ("abort", R.ABORTED),
    ("abort", R.ROLLED_BACK), ("rollback", R.DRAFT), ("rollback", R.ROLLED_BACK), ("retry", R.DRAFT),
    ("retry", R.ABORTED), ("retry", R.ROLLED_BACK),
])
def test_operations_refuse_states_they_do_not_apply_to(operation: str, status: RolloutStatus) -> None:
    spec = make_spec(5)
    state = RolloutState(status, 0, T0 if status is not R.DRAFT else None,
                         rollback_to=PREVIOUS if status is R.ROLLED_BACK else None)
    call = {
        "pause": lambda: pause(state, T0),
        "resume": lambda: resume(state, T0),
        "abort": lambda: abort(spec, state, {}, T0),
        "rollback": lambda: rollback(spec, state, {}, T0, previous=PREVIOUS),
        "retry": lambda: retry_failed(spec, state, {}, T0),
    }[operation]
    with pytest.raises(InvalidTransitionError):
        call()


def test_halted_rollout_can_be_retried_then_resumed() -> None:
    spec = make_spec(20, phases=[Phase(count=10, failure_rate_halt=0.2, min_finished=5), Phase(percent=100)])
    devices = fleet(spec, {S.FAILED: 3, S.HEALTHY: 3})
    halted = RolloutState(R.PAUSED, 0, T0, "failure rate", HaltRule.FAILURE_RATE)
    retried = retry_failed(spec, halted, devices, T0 + 1)
    assert retried.state is halted
    decisions = decide(spec, resume(halted, T0 + 2).state, {**devices, **retried.devices}, T0 + 3)
    assert not of_type(decisions, Halt) and len(orders(decisions)) == 7
