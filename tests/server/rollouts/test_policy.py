"""One test per rule of ``decide``, each named after the failure it prevents."""

from __future__ import annotations

import pytest

from agent.protocol import is_valid_identifier
from fleet_server.rollouts import (
    DAY_S,
    Advance,
    Complete,
    ConstantRate,
    DeviceDrift,
    DeviceSli,
    DeviceState,
    DeviceStep,
    DriftGate,
    DriftLevel,
    ExponentialRate,
    Halt,
    HaltRule,
    MaintenanceWindow,
    MarkTimedOut,
    Phase,
    RolloutState,
    RolloutStatus,
    Signals,
    SliGate,
    Timeouts,
    TimeoutStep,
    Wait,
    apply_decisions,
    busy_devices,
    cancel_command_id,
    decide,
    order_command_id,
    rank_devices,
    tally,
)
from tests.server.rollouts.support import T0, at, cancels, fleet, make_spec, of_type, orders, running

S = DeviceStep


def test_draft_rollout_sends_nothing() -> None:
    assert decide(make_spec(), RolloutState.draft(), {}, T0) == []


def test_orders_go_only_to_current_phase_members_in_rank_order() -> None:
    spec = make_spec(20)
    decisions = decide(spec, running(0), {}, T0)
    sent = orders(decisions)
    assert [o.device for o in sent] == list(spec.members(0)) == list(spec.ranked[:5])
    assert all(o.phase == 0 and o.version == 3 and not o.allow_downgrade and o.attempt == 1 for o in sent)
    assert isinstance(decisions[-1], Wait)


def test_next_phase_orders_only_its_new_members() -> None:
    spec = make_spec(20)
    devices = fleet(spec, {S.HEALTHY: 5})
    sent = orders(decide(spec, running(1), devices, T0))
    assert {o.device for o in sent} == set(spec.ranked[5:])


def test_late_joiner_gated_by_current_phase() -> None:
    """hawkBit #1548: a device that joins the cohort later gets no free pass around the gates."""
    phases = [Phase(count=5, min_soak_s=3600, failure_rate_halt=0.1, min_finished=5), Phase(percent=100)]
    base = make_spec(20, phases=phases)
    devices = fleet(base, {S.HEALTHY: 5})
    # Phase 1 finished and is soaking: nothing to order.
    assert orders(decide(base, running(0), devices, T0 + 10)) == []
    # A device joins whose rank falls into phase 1: it is ordered in phase 1, and the phase waits for it...
    joiner = next(d for d in (f"late-{i}" for i in range(10_000))
                  if rank_devices("ro-test", [*base.target, d]).index(d) < 5)
    grown = make_spec(target=[*base.target, joiner], phases=phases)
    decisions = decide(grown, running(0), devices, T0 + 4000)
    assert [o.device for o in orders(decisions)] == [joiner]
    assert not of_type(decisions, Advance)
    # ...and its failure is judged by the same rule: 1 of 6 finished failed is over 10%: halt.
    devices[joiner] = at(S.FAILED, T0 + 4100, device=joiner)
    decisions = decide(grown, running(0), devices, T0 + 4200)
    assert [type(d) for d in decisions] == [Halt]
    assert "1/6" in decisions[0].reason
    # While halted, another late joiner gets nothing.
    assert orders(decide(grown, RolloutState(RolloutStatus.PAUSED, 0, T0, "x", HaltRule.FAILURE_RATE),
                         {}, T0 + 4300)) == []


def test_late_joiner_ranked_in_a_later_phase_waits_for_that_phase() -> None:
    base = make_spec(20)
    joiner = next(d for d in (f"late-{i}" for i in range(10_000))
                  if rank_devices("ro-test", [*base.target, d]).index(d) >= 5)
    grown = make_spec(target=[*base.target, joiner])
    assert joiner not in {o.device for o in orders(decide(grown, running(0), {}, T0))}
    assert joiner in {o.device for o in orders(decide(grown, running(1), {}, T0))}


def test_max_concurrent_caps_devices_updating_at_once() -> None:
    spec = make_spec(20, phases=[Phase(count=10), Phase(percent=100)], max_concurrent=3)
    devices = fleet(spec, {S.DOWNLOADING: 1})
    decisions = decide(spec, running(0), devices, T0)
    assert len(orders(decisions)) == 2
    assert "max_concurrent: 1 of 3" in decisions[-1].reason
    full = fleet(spec, {S.DOWNLOADING: 2, S.INSTALLED: 1})
    assert orders(decide(spec, running(0), full, T0)) == []


def test_constant_rate_limit_spreads_orders_over_minutes() -> None:
    spec = make_spec(20, phases=[Phase(percent=100)], rate=ConstantRate(2))
    state, devices = running(0), {}
    first = decide(spec, state, devices, T0)
    assert len(orders(first)) == 2
    assert first[-1] == Wait(T0 + 60, first[-1].reason) and "rate limit" in first[-1].reason
    state, changed = apply_decisions(state, devices, first, T0)
    devices = {**devices, **changed}
    assert orders(decide(spec, state, devices, T0 + 59)) == []
    assert len(orders(decide(spec, state, devices, T0 + 60))) == 2


def test_exponential_rate_grows_with_healthy_devices() -> None:
    rate = ExponentialRate(2, factor=2, every_healthy=2, max_per_minute=100)
    spec = make_spec(40, phases=[Phase(percent=100, min_finished=100)], rate=rate)
    assert len(orders(decide(spec, running(0), {}, T0))) == 2
    devices = fleet(spec, {S.HEALTHY: 4}, since=T0 - 600)
    assert len(orders(decide(spec, running(0), devices, T0))) == 8


def test_no_orders_outside_the_maintenance_window() -> None:
    midnight = 1_700_006_400.0
    spec = make_spec(20, phases=[Phase(count=5, min_finished=10), Phase(percent=100)],
                     window=MaintenanceWindow.from_hhmm("02:00", "04:00"))
    overdue = {spec.ranked[0]: at(S.ORDERED, midnight, device=spec.ranked[0])}
    decisions = decide(spec, running(0, midnight), overdue, midnight + 12 * 3600)
    assert orders(decisions) == []
    assert of_type(decisions, MarkTimedOut), "timeouts are not held back by the window"
    assert decisions[-1].until == midnight + DAY_S + 2 * 3600
    assert "maintenance window" in decisions[-1].reason
    assert len(orders(decide(spec, running(0, midnight), {}, midnight + 2 * 3600))) == 5


def test_silent_device_times_out_and_counts_as_failure() -> None:
    """hawkBit #693: a device that never reports back must not stay 'in progress' forever."""
    spec = make_spec(20, phases=[Phase(count=5, failure_rate_halt=0.1, min_finished=5), Phase(percent=100)],
                     timeouts=Timeouts(receive_s=600))
    devices = fleet(spec, {S.HEALTHY: 4})
    silent = spec.ranked[4]
    devices[silent] = at(S.ORDERED, T0, device=silent, online=False)
    assert not of_type(decide(spec, running(0), devices, T0 + 599), MarkTimedOut)
    decisions = decide(spec, running(0), devices, T0 + 600)
    assert decisions[0] == MarkTimedOut(silent, TimeoutStep.RECEIVE, devices[silent].command_id or "", T0 + 600)
    halt = of_type(decisions, Halt)[0]
    assert halt.rule is HaltRule.FAILURE_RATE and "1/5" in halt.reason and "timed_out 1" in halt.reason


def test_timed_out_order_is_withdrawn_so_a_late_device_cannot_install_it() -> None:
    spec = make_spec(20, timeouts=Timeouts(download_s=60))
    device = spec.ranked[0]
    devices = {device: at(S.DOWNLOADING, T0, device=device)}
    command = devices[device].command_id
    assert command is not None
    cancel = cancels(decide(spec, running(0), devices, T0 + 60))
    assert [(c.device, c.command, c.command_id) for c in cancel] == [(device, command,
                                                                      cancel_command_id(device, command))]


@pytest.mark.parametrize(("step", "timeout_step", "seconds"), [
    (S.ORDERED, TimeoutStep.RECEIVE, 10), (S.RECEIVED, TimeoutStep.DOWNLOAD, 20),
    (S.DOWNLOADING, TimeoutStep.DOWNLOAD, 20), (S.VERIFIED, TimeoutStep.INSTALL, 30),
    (S.INSTALLED, TimeoutStep.HEALTH, 40)])
def test_each_step_times_out_after_its_own_timeout(step: DeviceStep, timeout_step: TimeoutStep,
                                                   seconds: float) -> None:
    spec = make_spec(20, timeouts=Timeouts(receive_s=10, download_s=20, install_s=30, health_s=40))
    device = spec.ranked[0]
    devices = {device: at(step, T0, device=device)}
    before = decide(spec, running(0), devices, T0 + seconds - 1)
    assert not of_type(before, MarkTimedOut)
    assert before[-1].until == T0 + seconds, "the wait names the next deadline"
    timed_out = of_type(decide(spec, running(0), devices, T0 + seconds), MarkTimedOut)
    assert [(m.device, m.step) for m in timed_out] == [(device, timeout_step)]


def test_offline_devices_do_not_stall_a_phase_past_its_timeout() -> None:
    spec = make_spec(20, phases=[Phase(count=5, success_threshold=0.8, failure_rate_halt=0.5), Phase(percent=100)],
                     timeouts=Timeouts(receive_s=3600))
    devices = fleet(spec, {S.HEALTHY: 4})
    offline = spec.ranked[4]
    devices[offline] = at(S.ORDERED, T0, device=offline, online=False)
    assert not of_type(decide(spec, running(0), devices, T0 + 3599), Advance)
    decisions = decide(spec, running(0), devices, T0 + 3600)
    assert [type(d).__name__ for d in decisions] == ["MarkTimedOut", "SendCancel", "Advance"]


def test_online_devices_are_ordered_before_offline_ones() -> None:
    spec = make_spec(20, max_concurrent=3)
    devices = {d: DeviceState(online=False) for d in spec.ranked[:2]}
    assert [o.device for o in orders(decide(spec, running(0), devices, T0))] == list(spec.ranked[2:5])


def test_failure_rate_over_threshold_halts_with_the_numbers_in_the_reason() -> None:
    spec = make_spec(20, phases=[Phase(count=10, failure_rate_halt=0.2, min_finished=5), Phase(percent=100)])
    devices = fleet(spec, {S.FAILED: 3, S.REJECTED: 1, S.HEALTHY: 2})
    decisions = decide(spec, running(0), devices, T0)
    assert orders(decisions) == [], "a halt never comes with new orders"
    (halt,) = of_type(decisions, Halt)
    assert halt.rule is HaltRule.FAILURE_RATE
    for text in ("4/6", "66.7%", "20.0%", "min_finished 5", "failed 3", "rejected 1", "phase 1 of 2"):
        assert text in halt.reason


def test_failure_rate_is_not_judged_below_min_finished() -> None:
    spec = make_spec(20, phases=[Phase(count=10, failure_rate_halt=0.2, min_finished=5), Phase(percent=100)])
    devices = fleet(spec, {S.FAILED: 4})
    decisions = decide(spec, running(0), devices, T0)
    assert not of_type(decisions, Halt)
    assert len(orders(decisions)) == 6


def test_failure_rate_exactly_at_the_threshold_does_not_halt() -> None:
    spec = make_spec(20, phases=[Phase(count=10, failure_rate_halt=0.2, min_finished=5), Phase(percent=100)])
    assert not of_type(decide(spec, running(0), fleet(spec, {S.FAILED: 1, S.HEALTHY: 4}), T0), Halt)


def test_phase_does_not_advance_before_its_minimum_soak() -> None:
    """Mender's phases are time-only: here the soak is a floor, not the gate."""
    spec = make_spec(20, phases=[Phase(count=5, min_soak_s=600), Phase(percent=100)])
    devices = fleet(spec, {S.HEALTHY: 5}, since=T0 + 100)
    waiting = decide(spec, running(0), devices, T0 + 699)
    assert not of_type(waiting, Advance) and waiting[-1].until == T0 + 700
    (advance,) = decide(spec, running(0), devices, T0 + 700)
    assert isinstance(advance, Advance) and advance.to_phase == 1 and "soaked 600 s" in advance.reason


def test_soak_counts_from_the_last_device_that_became_healthy() -> None:
    spec = make_spec(20, phases=[Phase(count=5, min_soak_s=600), Phase(percent=100)])
    devices = fleet(spec, {S.HEALTHY: 5})
    late = spec.ranked[4]
    devices[late] = at(S.HEALTHY, T0 + 5000, device=late)
    assert not of_type(decide(spec, running(0), devices, T0 + 5599), Advance)
    assert of_type(decide(spec, running(0), devices, T0 + 5600), Advance)


def test_phase_does_not_advance_while_devices_are_still_updating() -> None:
    spec = make_spec(20)
    devices = fleet(spec, {S.HEALTHY: 4, S.INSTALLED: 1})
    assert not of_type(decide(spec, running(0), devices, T0 + 10), Advance)


def test_failed_post_install_health_check_blocks_the_phase() -> None:
    """hawkBit #2867: post-install health is a gate. 9 of 10 healthy is under a 95% threshold: halt, not advance
    (and not a silent stall either)."""
    spec = make_spec(20, phases=[Phase(count=10, success_threshold=0.95, failure_rate_halt=0.5), Phase(percent=100)])
    devices = fleet(spec, {S.HEALTHY: 9, S.ROLLED_BACK: 1})
    decisions = decide(spec, running(0), devices, T0 + 10)
    assert [type(d) for d in decisions] == [Halt]
    assert decisions[0].rule is HaltRule.SUCCESS_THRESHOLD and "9/10 = 90.0%" in decisions[0].reason


def test_last_phase_completes() -> None:
    spec = make_spec(20)
    decisions = decide(spec, running(1), fleet(spec, {S.HEALTHY: 20}), T0 + 10)
    assert [type(d) for d in decisions] == [Complete]
    assert "20/20 healthy" in decisions[0].reason


def test_empty_cohort_completes_instead_of_waiting_forever() -> None:
    spec = make_spec(0)
    assert [type(d) for d in decide(spec, running(0), {}, T0)] == [Advance]
    assert [type(d) for d in decide(spec, running(1), {}, T0)] == [Complete]


def test_a_phase_where_every_device_was_cancelled_halts_for_lack_of_evidence() -> None:
    spec = make_spec(20)
    decisions = decide(spec, running(0), fleet(spec, {S.CANCELLED: 5}), T0)
    assert [d.rule for d in of_type(decisions, Halt)] == [HaltRule.NO_EVIDENCE]


@pytest.mark.parametrize("state", [
    RolloutState(RolloutStatus.PAUSED, 0, T0, "halted", HaltRule.FAILURE_RATE),
    RolloutState(RolloutStatus.PAUSED, 0, T0, "operator"),
    RolloutState(RolloutStatus.ABORTED, 0, T0, "operator"),
])
def test_stopped_rollout_sends_no_orders_but_still_times_out_devices(state: RolloutState) -> None:
    spec = make_spec(20, timeouts=Timeouts(receive_s=60))
    overdue = spec.ranked[0]
    devices = {overdue: at(S.ORDERED, T0, device=overdue)}
    decisions = decide(spec, state, devices, T0 + 60)
    assert orders(decisions) == []
    assert [m.device for m in of_type(decisions, MarkTimedOut)] == [overdue]


# --------------------------------------------------------------------------------------------- model signals


def drift_signals(spec_version: int, canary: dict[str, DriftLevel], control: dict[str, DriftLevel],
                  share: float = 0.5) -> Signals:
    reports = {d: DeviceDrift(spec_version, lvl, share if lvl is not DriftLevel.OK else 0.0)
               for d, lvl in canary.items()}
    reports |= {d: DeviceDrift(2, lvl, share if lvl is not DriftLevel.OK else 0.0) for d, lvl in control.items()}
    return Signals(drift=reports)


def drift_case(gate: DriftGate, canary_level: DriftLevel, control_level: DriftLevel, n_canary: int = 5
               ) -> list[object]:
    spec = make_spec(20, phases=[Phase(count=n_canary, drift=gate), Phase(percent=100)])
    canary = list(spec.ranked[:n_canary])
    control = list(spec.ranked[10:15])
    devices = {d: at(S.HEALTHY, T0, device=d) for d in canary}
    signals = drift_signals(3, dict.fromkeys(canary, canary_level), dict.fromkeys(control, control_level))
    return list(decide(spec, running(0), devices, T0 + 60, signals))


def test_drift_spike_in_the_canary_vs_control_halts() -> None:
    decisions = drift_case(DriftGate(max_excess_over_control=0.3), DriftLevel.ALERT, DriftLevel.OK)
    (halt,) = of_type(decisions, Halt)
    assert halt.rule is HaltRule.DRIFT_CONTROL
    assert "5/5 = 100.0% canary" in halt.reason and "0/5 = 0.0% of control" in halt.reason


def test_drift_that_the_control_group_shows_too_is_not_blamed_on_the_new_model() -> None:
    decisions = drift_case(DriftGate(max_excess_over_control=0.3), DriftLevel.ALERT, DriftLevel.ALERT)
    assert not of_type(decisions, Halt)
    assert of_type(decisions, Advance)


def test_drift_vs_the_baseline_halts_even_without_a_control_group() -> None:
    decisions = drift_case(DriftGate(max_drifted_share=0.3, max_excess_over_control=None), DriftLevel.WARN,
                           DriftLevel.WARN)
    (halt,) = of_type(decisions, Halt)
    assert halt.rule is HaltRule.DRIFT_BASELINE and "0.500" in halt.reason
    decisions = drift_case(DriftGate(max_alert_share=0.5, max_excess_over_control=None), DriftLevel.ALERT,
                           DriftLevel.OK)
    assert [h.rule for h in of_type(decisions, Halt)] == [HaltRule.DRIFT_BASELINE]


def test_drift_gate_needs_min_devices_before_judging_and_before_advancing() -> None:
    """F6: one or two noisy devices neither halt a rollout nor wave it through."""
    decisions = drift_case(DriftGate(max_excess_over_control=0.3, min_devices=3), DriftLevel.ALERT, DriftLevel.OK,
                           n_canary=2)
    assert not of_type(decisions, Halt) and not of_type(decisions, Advance)
    assert "drift gate: 2 of 3 canary drift reports" in decisions[-1].reason


def test_optional_drift_gate_does_not_hold_the_phase_without_data() -> None:
    spec = make_spec(20, phases=[Phase(count=5, drift=DriftGate(required=False)), Phase(percent=100)])
    assert of_type(decide(spec, running(0), fleet(spec, {S.HEALTHY: 5}), T0 + 60), Advance)


def test_drift_reports_from_devices_not_running_the_new_version_are_not_canary() -> None:
    spec = make_spec(20, phases=[Phase(count=5, drift=DriftGate(max_excess_over_control=0.3)), Phase(percent=100)])
    devices = fleet(spec, {S.DOWNLOADING: 5})
    # They claim the new version, but the server has not seen them install it: not canary evidence.
    signals = drift_signals(3, dict.fromkeys(spec.ranked[:5], DriftLevel.ALERT),
                            dict.fromkeys(spec.ranked[10:15], DriftLevel.OK))
    assert not of_type(decide(spec, running(0), devices, T0 + 1, signals), Halt)


def sli_case(gate: SliGate, errors: int, p99: float, requests: int = 100) -> list[object]:
    spec = make_spec(20, phases=[Phase(count=5, sli=gate), Phase(percent=100)])
    devices = fleet(spec, {S.HEALTHY: 5})
    signals = Signals(sli={d: DeviceSli(3, requests, errors, p99) for d in spec.ranked[:5]}
                      | {d: DeviceSli(2, 100, 50, 900.0) for d in spec.ranked[10:15]})
    return list(decide(spec, running(0), devices, T0 + 60, signals))


def test_inference_error_rate_over_the_limit_halts() -> None:
    (halt,) = of_type(sli_case(SliGate(max_error_rate=0.01), errors=5, p99=5.0), Halt)
    assert halt.rule is HaltRule.SLI_ERROR_RATE and "25/500 = 5.0%" in halt.reason


def test_inference_latency_over_the_limit_halts() -> None:
    (halt,) = of_type(sli_case(SliGate(max_error_rate=None, max_latency_p99_ms=50), errors=0, p99=80.0), Halt)
    assert halt.rule is HaltRule.SLI_LATENCY and "80.0 ms" in halt.reason


def test_healthy_sli_lets_the_phase_advance_and_control_reports_are_not_blamed() -> None:
    decisions = sli_case(SliGate(max_error_rate=0.01, max_latency_p99_ms=50), errors=0, p99=5.0)
    assert of_type(decisions, Advance)


def test_sli_gate_waits_for_enough_requests() -> None:
    decisions = sli_case(SliGate(max_error_rate=0.01, min_requests=1000), errors=5, p99=5.0)
    assert not of_type(decisions, Halt) and not of_type(decisions, Advance)
    assert "500 of 1000 canary requests" in decisions[-1].reason


# --------------------------------------------------------------------------------------------- other rollouts


def test_never_orders_a_device_busy_in_another_rollout() -> None:
    spec = make_spec(20)
    busy = set(spec.ranked[:2])
    sent = {o.device for o in orders(decide(spec, running(0), {}, T0, busy_elsewhere=busy))}
    assert sent == set(spec.ranked[2:5])


def test_devices_busy_elsewhere_do_not_block_the_phase() -> None:
    """Greengrass #807/#1168: a stuck rollout must not block a later one. The phase advances on the devices it
    could reach; the busy ones are ordered when they are free, in whatever phase the rollout is in by then."""
    spec = make_spec(20)
    devices = fleet(spec, {S.HEALTHY: 3})
    busy = set(spec.ranked[3:5])
    assert of_type(decide(spec, running(0), devices, T0 + 1, busy_elsewhere=busy), Advance)
    later = decide(spec, running(1), devices, T0 + 2)
    assert busy <= {o.device for o in orders(later)}


def test_devices_outside_the_target_are_never_counted_or_waited_for() -> None:
    spec = make_spec(20, max_concurrent=5)
    stranger = at(S.DOWNLOADING, T0 - 10**6, device="other-1")
    decisions = decide(spec, running(0), {"other-1": stranger}, T0)
    assert len(orders(decisions)) == 5
    assert not of_type(decisions, MarkTimedOut)
    assert of_type(decide(spec, running(0), {"other-1": stranger, **fleet(spec, {S.HEALTHY: 5})}, T0), Advance)


def test_busy_devices_lists_only_this_rollouts_updates() -> None:
    spec = make_spec(20)
    devices = fleet(spec, {S.DOWNLOADING: 2, S.HEALTHY: 2, S.INSTALLED: 1}) | {"other-1": at(S.ORDERED)}
    assert busy_devices(spec, devices) == {*spec.ranked[:2], spec.ranked[4]}


# --------------------------------------------------------------------------------------------- completed, misc


def test_completed_rollout_still_orders_late_joiners_paced() -> None:
    spec = make_spec(20, window=MaintenanceWindow.from_hhmm("02:00", "04:00"))
    devices = fleet(spec, {S.HEALTHY: 20})
    grown = make_spec(target=[*spec.target, "late-1"], window=spec.window)
    done = RolloutState(RolloutStatus.COMPLETED, 1, T0, "done")
    midnight = 1_700_006_400.0
    assert orders(decide(grown, done, devices, midnight + 12 * 3600)) == []
    sent = orders(decide(grown, done, devices, midnight + 3 * 3600))
    assert [(o.device, o.phase) for o in sent] == [("late-1", 1)]
    assert decide(spec, done, devices, midnight) == [], "nothing left to do: no wait either"


def test_command_ids_are_deterministic_wire_identifiers() -> None:
    a = order_command_id("ro-test", "dev-001", 1)
    assert is_valid_identifier(a) and a == order_command_id("ro-test", "dev-001", 1)
    assert len({a, order_command_id("ro-test", "dev-001", 2), order_command_id("ro-test", "dev-001", 1, rollback=True),
                order_command_id("ro-other", "dev-001", 1), cancel_command_id("dev-001", a)}) == 5
    assert is_valid_identifier(cancel_command_id("dev-001", a))


def test_tally_reports_what_decide_judges() -> None:
    spec = make_spec(20, timeouts=Timeouts(receive_s=60))
    devices = fleet(spec, {S.HEALTHY: 2, S.FAILED: 1, S.ORDERED: 1})
    t = tally(spec, running(0), devices, T0 + 60, busy_elsewhere={spec.ranked[4]})
    assert (t.healthy, t.failed, t.finished, t.busy, t.updating, t.pending) == (2, 2, 4, 1, 0, ())
    assert t.failures == {S.FAILED: 1, S.TIMED_OUT: 1} and t.settled


def test_wait_without_deadlines_waits_for_events() -> None:
    spec = make_spec(20, timeouts=Timeouts(receive_s=60))
    paused = RolloutState(RolloutStatus.PAUSED, 0, T0, "maintenance")
    assert decide(spec, paused, {}, T0) == [Wait(None, "paused: maintenance")]
