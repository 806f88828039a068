"""THREATS.md, last table: "Rollout escapes its cohort" with 200 simulated devices, plus the fleet-server issue's
acceptance list (failure rate halts, drift spike halts, silent devices time out, late joiners are gated, abort
cancels at once, retry-failed reaches only the failed, a stuck rollout never blocks a later one), each driven by
the in-test fleet simulator through the same decide -> carry out -> apply loop the server runs."""

from __future__ import annotations

import random

from fleet_server.rollouts import (
    ConstantRate,
    DeviceStep,
    DriftGate,
    DriftLevel,
    HaltRule,
    Phase,
    RolloutSpec,
    RolloutStatus,
    Timeouts,
    abort,
    busy_devices,
    resume,
    retry_failed,
    tally,
)
from tests.server.rollouts.simulator import Behaviour, FleetSim
from tests.server.rollouts.support import DIGEST, ids

COHORT = ids(200)
OUTSIDERS = ids(50, "other")  # same fleet, not in the cohort: must never receive anything
PHASES = [
    Phase(count=10, min_soak_s=300, failure_rate_halt=0.1, min_finished=10),
    Phase(percent=25, min_soak_s=120, failure_rate_halt=0.1, min_finished=10),
    Phase(percent=50, failure_rate_halt=0.1, min_finished=10),
    Phase(percent=100, failure_rate_halt=0.1, min_finished=10, success_threshold=0.9),
]
TIMEOUTS = Timeouts(receive_s=600, download_s=600, install_s=300, health_s=600)


def cohort_spec(rollout_id: str = "ro-threat", target: list[str] | None = None, **kw: object) -> RolloutSpec:
    return RolloutSpec(rollout_id, "cancer-mlp", 3, DIGEST, COHORT if target is None else target,
                       kw.pop("phases", PHASES), max_concurrent=25, rate=ConstantRate(120),  # type: ignore[arg-type]
                       timeouts=TIMEOUTS, **kw)  # type: ignore[arg-type]


def live(sim: FleetSim) -> bool:
    return any(sim.devices.get(d) is not None and sim.devices[d].step in {
        DeviceStep.ORDERED, DeviceStep.RECEIVED, DeviceStep.DOWNLOADING, DeviceStep.VERIFIED, DeviceStep.INSTALLED}
        for d in sim.spec.target)


def until_stopped(sim: FleetSim) -> bool:
    return sim.state.status is not RolloutStatus.RUNNING and not live(sim)


def test_rollout_escaping_its_cohort_200_devices_each_phase_reaches_exactly_its_plan() -> None:
    """Healthy fleet: the rollout completes; each phase reached exactly its planned devices before advancing;
    nothing outside the cohort, or outside the current phase, was ever ordered."""
    sim = FleetSim(cohort_spec(), seed=7)
    sim.start()
    sim.run(6 * 3600, stop=until_stopped)
    assert sim.state.status is RolloutStatus.COMPLETED, sim.state
    assert all(o.in_phase for o in sim.orders)
    assert sim.ordered_devices() == set(COHORT) and not sim.ordered_devices() & set(OUTSIDERS)
    assert [(to, len(reached)) for _, to, reached in sim.advances] == [(1, 10), (2, 50), (3, 100)]
    for _, to, reached in sim.advances:
        assert reached == set(sim.spec.members(to - 1)), "a phase reached other devices than planned"
    assert sim.count("healthy") == 200 and sim.max_updating <= 25
    assert [a.action for a in sim.audit] == ["start", "complete"]


def test_rollout_escaping_its_cohort_failure_rate_over_threshold_halts_with_audited_reason() -> None:
    """30% of devices fail: the canary phase halts by itself, with the numbers in an audit record, and nothing
    is ordered afterwards or outside the canary phase."""
    def flaky(_device: str, rng: random.Random) -> Behaviour:
        return Behaviour(rng.choice(["failed", "rolled_back", "rejected"])) if rng.random() < 0.3 else Behaviour()

    sim = FleetSim(cohort_spec(), flaky, seed=11)
    sim.start()
    sim.run(6 * 3600, stop=until_stopped)
    assert sim.state.status is RolloutStatus.PAUSED and sim.state.halt_rule is HaltRule.FAILURE_RATE
    halts = [a for a in sim.audit if a.action.startswith("halt:")]
    assert len(halts) == 1 and halts[0].reason == sim.state.reason
    assert "failure rate" in halts[0].reason and "over the halt threshold 10.0%" in halts[0].reason
    assert sim.ordered_devices() <= set(sim.spec.members(0)) and all(o.in_phase for o in sim.orders)
    assert all(o.at < halts[0].at for o in sim.orders)
    n_orders = len(sim.orders)
    sim.run(3600)
    assert len(sim.orders) == n_orders, "a halted rollout kept ordering"


def test_rollout_escaping_its_cohort_failures_in_a_later_phase_halt_it_there() -> None:
    """The model breaks only on devices ranked past the first 50 (say, one hardware variant): phases 1 and 2 pass,
    phase 3 halts, and no device past phase 3's membership was ever ordered."""
    spec = cohort_spec()
    late = set(spec.ranked[50:])

    def breaks_late(device: str, rng: random.Random) -> Behaviour:
        return Behaviour("rolled_back") if device in late and rng.random() < 0.3 else Behaviour()

    sim = FleetSim(spec, breaks_late, seed=12)
    sim.start()
    sim.run(6 * 3600, stop=until_stopped)
    assert (sim.state.status, sim.state.phase, sim.state.halt_rule) == (RolloutStatus.PAUSED, 2, HaltRule.FAILURE_RATE)
    assert [to for _, to, _ in sim.advances] == [1, 2]
    assert set(spec.members(1)) < sim.ordered_devices() <= set(spec.members(2))
    assert all(o.in_phase for o in sim.orders)
    assert "phase 3 of 4" in (sim.state.reason or "") and "rolled_back" in (sim.state.reason or "")


def test_drift_spike_in_the_canary_halts() -> None:
    gate = DriftGate(max_excess_over_control=0.3, min_devices=5)
    phases = [Phase(count=10, min_soak_s=600, drift=gate), *PHASES[1:]]
    sim = FleetSim(cohort_spec(phases=phases), lambda _d, _r: Behaviour(drift=DriftLevel.ALERT, drifted_share=0.6),
                   seed=3)
    sim.start()
    sim.run(6 * 3600, with_signals=True, stop=until_stopped)
    assert sim.state.halt_rule is HaltRule.DRIFT_CONTROL, sim.state
    assert "drift spike in the canary" in (sim.state.reason or "")
    assert sim.ordered_devices() == set(sim.spec.members(0))


def test_no_drift_lets_the_drift_gated_rollout_complete() -> None:
    gate = DriftGate(max_excess_over_control=0.3, min_devices=5)
    sim = FleetSim(cohort_spec(phases=[Phase(count=10, min_soak_s=600, drift=gate), *PHASES[1:]]), seed=3)
    sim.start()
    sim.run(6 * 3600, with_signals=True, stop=until_stopped)
    assert sim.state.status is RolloutStatus.COMPLETED


def test_silent_devices_time_out_and_the_rollout_still_finishes() -> None:
    silent = set(random.Random(5).sample(COHORT, 6))  # 3%: under the 10% halt threshold
    sim = FleetSim(cohort_spec(), lambda d, _r: Behaviour("silent" if d in silent else "healthy"), seed=5)
    sim.start()
    sim.run(8 * 3600, stop=until_stopped)
    assert sim.state.status is RolloutStatus.COMPLETED
    assert {d for d in COHORT if sim.devices[d].step is DeviceStep.TIMED_OUT} == silent
    assert {c.device for c in sim.cancels} == silent, "each timed-out order was withdrawn"


def test_late_joiners_are_ordered_under_the_current_phase() -> None:
    sim = FleetSim(cohort_spec(target=COHORT[:150]), seed=9)
    sim.start()
    sim.run(600)
    assert sim.state.status is RolloutStatus.RUNNING
    sim.spec = cohort_spec(target=COHORT)  # 50 devices join the cohort mid-rollout
    sim.run(8 * 3600, stop=until_stopped)
    assert sim.state.status is RolloutStatus.COMPLETED
    assert all(o.in_phase for o in sim.orders) and sim.ordered_devices() == set(COHORT)


def test_abort_mid_update_cancels_every_updating_device_at_once() -> None:
    sim = FleetSim(cohort_spec(), seed=2)
    sim.start()
    sim.run(8 * 3600, stop=lambda s: s.state.phase == 2 and tally(s.spec, s.state, s.devices, s.now).updating >= 20)
    updating = busy_devices(sim.spec, sim.devices)
    assert len(updating) >= 20
    out = abort(sim.spec, sim.state, sim.devices, sim.now, "operator abort")
    cancellable = {d for d in updating if sim.devices[d].step is not DeviceStep.INSTALLED}
    assert {c.device for c in out.decisions} == cancellable
    sim.carry_out(out.decisions)
    sim.state = out.state
    n_orders = len(sim.orders)
    sim.run(3600)
    assert len(sim.orders) == n_orders
    assert {d for d in cancellable if sim.devices[d].step is DeviceStep.CANCELLED} == cancellable
    assert not busy_devices(sim.spec, sim.devices), "nothing left in progress after an abort"


def test_retry_failed_reaches_only_the_failed_devices() -> None:
    failing = set()

    def flaky(device: str, rng: random.Random) -> Behaviour:
        if rng.random() < 0.4:
            failing.add(device)
            return Behaviour("failed")
        return Behaviour()

    sim = FleetSim(cohort_spec(), flaky, seed=4)
    sim.start()
    sim.run(6 * 3600, stop=until_stopped)
    assert sim.state.halt_rule is HaltRule.FAILURE_RATE
    finished_before = {d for d in COHORT if sim.devices.get(d) is not None}
    failed = {d for d in finished_before if sim.devices[d].step is DeviceStep.FAILED}
    assert failed == failing & finished_before
    for device in failed:  # the cause is fixed (say, the download server): retries succeed
        sim.behaviour[device] = Behaviour()
    out = retry_failed(sim.spec, sim.state, sim.devices, sim.now)
    assert set(out.devices) == failed
    sim.devices.update(out.devices)
    sim.state = resume(sim.state, sim.now).state
    n_orders = len(sim.orders)
    sim.run(600)
    again = {o.device for o in sim.orders[n_orders:]}
    assert again & finished_before == failed, "retry reached a device that had not failed"


def test_stuck_rollout_never_blocks_a_later_rollout_on_other_devices() -> None:
    """Greengrass #807/#1168. Rollout A hangs (its devices stall mid-download, long timeouts) and halts; rollout
    B, over a cohort overlapping A's, never orders A's busy devices, never waits for them, and completes."""
    slow = Timeouts(receive_s=10**6, download_s=10**6, install_s=10**6, health_s=10**6)
    spec_a = RolloutSpec("ro-a", "cancer-mlp", 3, DIGEST, COHORT[:100], [Phase(count=20), Phase(percent=100)],
                         max_concurrent=20, timeouts=slow)
    a = FleetSim(spec_a, lambda _d, _r: Behaviour("stalls"), seed=1)
    a.start()
    a.run(3600)
    busy_a = busy_devices(spec_a, a.devices)
    assert len(busy_a) == 20 and a.state.status is RolloutStatus.RUNNING  # stuck, forever
    assert busy_a & set(COHORT[50:]), "the cohorts overlap on some of A's stuck devices"

    b = FleetSim(cohort_spec("ro-b", target=COHORT[50:]), seed=8, busy_elsewhere=busy_a)
    b.start()
    b.run(8 * 3600, stop=until_stopped)
    assert b.state.status is RolloutStatus.COMPLETED
    assert not b.ordered_devices() & busy_a
    assert b.ordered_devices() == set(COHORT[50:]) - busy_a
