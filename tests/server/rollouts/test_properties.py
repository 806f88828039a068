"""Property tests: over random specs, rollout states, device states, signals and clocks, ``decide`` never escapes
the cohort or the current phase, never exceeds max_concurrent, the rate limit or the maintenance window, is
deterministic whatever the input order, and never orders after a halt. Then the same invariants over whole
simulated rollouts."""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet_server.rollouts import (
    DAY_S,
    IN_FLIGHT_STEPS,
    Advance,
    Complete,
    ConstantRate,
    Decision,
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
    RolloutSpec,
    RolloutState,
    RolloutStatus,
    SendOrder,
    Signals,
    SliGate,
    Timeouts,
    decide,
    order_command_id,
    rate_window,
    tally,
)
from tests.server.rollouts.simulator import Behaviour, FleetSim
from tests.server.rollouts.support import DIGEST, PREVIOUS, T0

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIMS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
OUTSIDERS = ["x-0", "x-1", "x-2"]
NOT_STARTED = DeviceState()


@dataclass
class Scenario:
    spec: RolloutSpec
    state: RolloutState
    devices: dict[str, DeviceState]
    now: float
    busy: frozenset[str]
    signals: Signals

    def decide(self) -> list[Decision]:
        return decide(self.spec, self.state, self.devices, self.now, self.signals, busy_elsewhere=self.busy)


@st.composite
def phases(draw: st.DrawFn) -> Phase:
    size = draw(st.one_of(st.builds(dict, percent=st.floats(0.5, 100)), st.builds(dict, count=st.integers(1, 40))))
    gates = {}
    if draw(st.booleans()):
        gates["drift"] = DriftGate(max_drifted_share=draw(st.none() | st.floats(0, 1)),
                                   max_excess_over_control=draw(st.none() | st.floats(0, 1)),
                                   min_devices=draw(st.integers(1, 4)), required=draw(st.booleans()))
    if draw(st.booleans()):
        gates["sli"] = SliGate(max_error_rate=draw(st.none() | st.floats(0, 0.5)),
                               max_latency_p99_ms=draw(st.none() | st.floats(1, 100)),
                               min_requests=draw(st.integers(1, 500)), min_devices=draw(st.integers(1, 4)),
                               required=draw(st.booleans()))
    return Phase(**size, min_soak_s=draw(st.sampled_from([0, 60, 3600])),
                 success_threshold=draw(st.just(0.0) | st.floats(0, 1)),
                 failure_rate_halt=draw(st.just(1.0) | st.floats(0, 1)),
                 min_finished=draw(st.integers(1, 10)), **gates)


MODES = {
    # mostly fresh: many orders to decide on
    "fresh": [DeviceStep.NOT_STARTED] * 6 + [DeviceStep.ORDERED, DeviceStep.DOWNLOADING, DeviceStep.HEALTHY],
    # mostly finished: phases to advance, complete or halt
    "settled": [DeviceStep.HEALTHY] * 6 + [DeviceStep.FAILED, DeviceStep.TIMED_OUT, DeviceStep.CANCELLED,
                                           DeviceStep.INSTALLED],
    "mixed": list(DeviceStep),
}


def device_state(draw: st.DrawFn, device: str, now: float, mode: str) -> DeviceState:
    step = draw(st.sampled_from(MODES[mode]))
    online = draw(st.booleans())
    attempts = draw(st.integers(1, 3))
    rollback = draw(st.booleans()) and draw(st.booleans())
    command = order_command_id("ro-prop", device, attempts, rollback=rollback)
    since = now - draw(st.one_of(st.integers(0, 300), st.integers(0, 8000)))
    ordered_at = since - draw(st.integers(0, 200))
    if step is DeviceStep.NOT_STARTED:
        if draw(st.booleans()):  # a retried device keeps its last order time
            return DeviceState(step, since, "retry", command, ordered_at, attempts, False, online)
        return DeviceState(online=online)
    reason = draw(st.sampled_from([None, "download", "timeout_health", "timeout_install", "health_check"]))
    return DeviceState(step, since, reason, command, ordered_at, attempts, rollback, online)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    n = draw(st.integers(0, 30))
    target = [f"d-{i:02d}" for i in range(n)]
    rate = draw(st.one_of(
        st.builds(ConstantRate, st.floats(0.2, 30)),
        st.builds(ExponentialRate, st.floats(0.5, 5), st.floats(1, 3), st.integers(1, 5), st.just(60.0)),
    ))
    window = None
    if draw(st.booleans()):
        start, end = draw(st.integers(0, DAY_S - 1)), draw(st.integers(0, DAY_S - 1))
        window = MaintenanceWindow(start, end) if start != end else None
    timeouts = Timeouts(*(draw(st.integers(10, 5000)) for _ in range(4)))
    spec = RolloutSpec("ro-prop", "cancer-mlp", 3, DIGEST, target, draw(st.lists(phases(), min_size=1, max_size=4)),
                       max_concurrent=draw(st.integers(1, 10)), rate=rate, window=window, timeouts=timeouts)
    now = T0 + draw(st.integers(0, 2 * DAY_S))
    mode = draw(st.sampled_from(sorted(MODES)))
    devices = {d: device_state(draw, d, now, mode) for d in target + OUTSIDERS if draw(st.integers(0, 3))}
    status = draw(st.sampled_from([RolloutStatus.RUNNING] * 6 + list(RolloutStatus)))
    started = None if status is RolloutStatus.DRAFT else now - draw(st.sampled_from([0, 30, 600, 8000]))
    halt = draw(st.sampled_from([None, *HaltRule])) if status is RolloutStatus.PAUSED else None
    state = RolloutState(status, draw(st.integers(0, len(spec.phases) - 1)), started, "why", halt,
                         PREVIOUS if status is RolloutStatus.ROLLED_BACK else None)
    busy = draw(st.frozensets(st.sampled_from(target + OUTSIDERS), max_size=4))
    reporting = [d for d in target + OUTSIDERS if draw(st.booleans())]
    drift = {d: DeviceDrift(draw(st.sampled_from([2, 3])), draw(st.sampled_from(list(DriftLevel))),
                            draw(st.floats(0, 1))) for d in reporting}
    sli = {}
    for d in reporting:
        requests = draw(st.integers(0, 300))
        sli[d] = DeviceSli(draw(st.sampled_from([2, 3])), requests, draw(st.integers(0, requests)),
                           draw(st.floats(0, 200)))
    return Scenario(spec, state, devices, now, busy, Signals(drift, sli))


def _phase(sc: Scenario) -> int:
    if sc.state.status is RolloutStatus.COMPLETED:
        return len(sc.spec.phases) - 1
    return sc.state.phase


@PROPS
@given(scenarios())
def test_orders_never_escape_the_cohort_or_the_current_phase(sc: Scenario) -> None:
    decisions = sc.decide()
    sent = [d for d in decisions if isinstance(d, SendOrder)]
    members = set(sc.spec.members(_phase(sc)))
    assert len({o.device for o in sent}) == len(sent), "one order per device per call"
    for o in sent:
        assert o.device in sc.spec.target and o.device not in sc.busy
        before = sc.devices.get(o.device, NOT_STARTED)
        if o.rollback:
            assert sc.state.status is RolloutStatus.ROLLED_BACK and o.allow_downgrade and o.version == 2
            assert before.step is not DeviceStep.NOT_STARTED and not before.rollback
        else:
            assert sc.state.status in (RolloutStatus.RUNNING, RolloutStatus.COMPLETED)
            assert o.device in members, "order outside the current phase's membership"
            assert before.step is DeviceStep.NOT_STARTED and not o.allow_downgrade and o.version == 3


@PROPS
@given(scenarios())
def test_never_exceeds_max_concurrent(sc: Scenario) -> None:
    decisions = sc.decide()
    timed_out = sum(1 for d in decisions if isinstance(d, MarkTimedOut))
    updating = sum(1 for d in sc.spec.target if sc.devices.get(d, NOT_STARTED).step in IN_FLIGHT_STEPS) - timed_out
    sent = sum(1 for d in decisions if isinstance(d, SendOrder))
    assert sent <= max(0, sc.spec.max_concurrent - updating)


@PROPS
@given(scenarios())
def test_never_exceeds_the_rate_limit_nor_orders_outside_the_window(sc: Scenario) -> None:
    sent = [d for d in sc.decide() if isinstance(d, SendOrder) and not d.rollback]
    if not sent:
        return
    if sc.spec.window is not None:
        assert sc.spec.window.contains(sc.now)
    ceiling = sc.spec.rate.per_minute if isinstance(sc.spec.rate, ConstantRate) else sc.spec.rate.max_per_minute
    cap, window_s = rate_window(ceiling)
    recent = sum(1 for d in sc.spec.target
                 if (t := sc.devices.get(d, NOT_STARTED).ordered_at) is not None and t > sc.now - window_s)
    assert recent + len(sent) <= cap


@PROPS
@given(scenarios(), st.randoms(use_true_random=False))
def test_decisions_are_deterministic_whatever_the_input_order(sc: Scenario, rng: random.Random) -> None:
    first = sc.decide()
    assert sc.decide() == first
    target = list(sc.spec.target)
    rng.shuffle(target)
    spec = RolloutSpec(sc.spec.rollout_id, sc.spec.model, sc.spec.version, sc.spec.bundle_digest, target,
                       sc.spec.phases, sc.spec.max_concurrent, sc.spec.rate, sc.spec.window, sc.spec.timeouts)

    def shuffled(mapping: dict[str, object]) -> dict[str, object]:
        keys = list(mapping)
        rng.shuffle(keys)
        return {k: mapping[k] for k in keys}

    signals = Signals(shuffled(dict(sc.signals.drift)), shuffled(dict(sc.signals.sli)))  # type: ignore[arg-type]
    again = decide(spec, sc.state, shuffled(sc.devices), sc.now, signals,  # type: ignore[arg-type]
                   busy_elsewhere=sorted(sc.busy, reverse=True))
    assert again == first


@PROPS
@given(scenarios())
def test_halts_are_monotone(sc: Scenario) -> None:
    """Once halted (or paused, aborted, draft) nothing new is ordered; a halt never comes with an order."""
    decisions = sc.decide()
    sent = [d for d in decisions if isinstance(d, SendOrder)]
    if sc.state.status in (RolloutStatus.DRAFT, RolloutStatus.PAUSED, RolloutStatus.ABORTED):
        assert sent == []
    if any(isinstance(d, Halt) for d in decisions):
        assert sent == []
    verdicts = [d for d in decisions if isinstance(d, Halt | Advance | Complete)]
    assert len(verdicts) <= 1
    if verdicts:
        assert sc.state.status is RolloutStatus.RUNNING
    for v in verdicts:
        if isinstance(v, Advance):
            assert v.to_phase == sc.state.phase + 1 < len(sc.spec.phases)
        if isinstance(v, Complete):
            assert sc.state.phase == len(sc.spec.phases) - 1


@PROPS
@given(scenarios())
def test_timeouts_are_marked_only_for_silent_devices_of_the_target(sc: Scenario) -> None:
    for d in sc.decide():
        if isinstance(d, MarkTimedOut):
            st_ = sc.devices[d.device]
            assert d.device in sc.spec.target and st_.step in IN_FLIGHT_STEPS and d.deadline <= sc.now
            assert d.command_id == st_.command_id


# --------------------------------------------------------------------------------------------- whole rollouts


@st.composite
def simulations(draw: st.DrawFn) -> FleetSim:
    n = draw(st.integers(5, 60))
    target = [f"d-{i:02d}" for i in range(n)]
    n_phases = draw(st.integers(1, 4))
    spec = RolloutSpec(
        "ro-sim", "cancer-mlp", 3, DIGEST, target,
        [*(Phase(percent=draw(st.floats(1, 60)), min_soak_s=draw(st.sampled_from([0, 120])),
                 failure_rate_halt=draw(st.floats(0.05, 0.5)), min_finished=draw(st.integers(1, 5)),
                 success_threshold=0.5) for _ in range(n_phases - 1)), Phase(percent=100, success_threshold=0.5)],
        max_concurrent=draw(st.integers(1, 8)), rate=ConstantRate(draw(st.floats(1, 30))),
        timeouts=Timeouts(receive_s=300, download_s=300, install_s=120, health_s=300))
    failure = draw(st.floats(0, 0.6))
    silent = draw(st.floats(0, 0.2))

    def behaviour(_device: str, rng: random.Random) -> Behaviour:
        roll = rng.random()
        if roll < silent:
            return Behaviour("silent")
        if roll < silent + failure:
            return Behaviour(rng.choice(["failed", "rolled_back", "rejected", "stalls"]))
        return Behaviour()

    busy = frozenset(draw(st.lists(st.sampled_from(target), max_size=3)))
    return FleetSim(spec, behaviour, seed=draw(st.integers(0, 2**32)), step_s=5.0, busy_elsewhere=busy)


@SIMS
@given(simulations())
def test_simulated_rollouts_keep_every_invariant(sim: FleetSim) -> None:
    sim.start()
    sim.run(4 * 3600, stop=lambda s: s.state.status in (RolloutStatus.PAUSED, RolloutStatus.COMPLETED)
            and not any(s.devices.get(d, NOT_STARTED).step in IN_FLIGHT_STEPS for d in s.spec.target))
    if sim.state.status is RolloutStatus.RUNNING:  # only a phase whose every remaining member is busy elsewhere
        t = tally(sim.spec, sim.state, sim.devices, sim.now, busy_elsewhere=sim.busy_elsewhere)
        assert t.busy and t.finished == 0 and t.settled, (sim.state, t)
    else:
        assert sim.state.status in (RolloutStatus.PAUSED, RolloutStatus.COMPLETED), sim.state
    assert all(o.in_phase for o in sim.orders), "an order escaped its phase"
    assert not {o.device for o in sim.orders} & sim.busy_elsewhere
    assert sim.max_updating <= sim.spec.max_concurrent
    assert isinstance(sim.spec.rate, ConstantRate)
    cap, window_s = rate_window(sim.spec.rate.per_minute)
    times = sorted(o.at for o in sim.orders)
    assert all(sum(1 for t in times if end - window_s < t <= end) <= cap for end in times)
    halts = [a for a in sim.audit if a.action.startswith("halt:")]
    if halts:
        assert len(halts) == 1 and all(o.at < halts[0].at for o in sim.orders), "ordered after a halt"
    elif sim.state.status is RolloutStatus.COMPLETED:
        ordered = sim.ordered_devices()
        assert ordered == set(sim.spec.target) - sim.busy_elsewhere
