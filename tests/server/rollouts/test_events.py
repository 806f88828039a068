"""Following a device's deployment events (``on_event``) and recording carried-out decisions
(``apply_decisions``): pure bookkeeping that must not lose, invent or reorder a device's progress."""

from __future__ import annotations

import pytest

from agent.protocol import DeployEvent
from fleet_server.rollouts import (
    Advance,
    Complete,
    DeviceState,
    DeviceStep,
    Halt,
    HaltRule,
    MarkTimedOut,
    RolloutStatus,
    SendCancel,
    SendOrder,
    TimeoutStep,
    Wait,
    apply_decisions,
    on_event,
)
from tests.server.rollouts.support import DIGEST, T0, at, running

S = DeviceStep


def test_the_happy_path_follows_every_agent_event() -> None:
    st = at(S.ORDERED, T0, device="d")
    for i, kind in enumerate(["received", "downloading", "verified", "installed", "healthy"], start=1):
        st = on_event(st, kind, T0 + i, command_id=st.command_id)
        assert st.step.value == kind and st.since == T0 + i


def test_every_deploy_event_kind_maps_to_a_device_step() -> None:
    for kind in DeployEvent:
        ordered = at(S.ORDERED, T0, device="d")
        st = on_event(ordered, kind.value, T0 + 1, command_id=ordered.command_id)
        assert st.step.value == kind.value


def test_events_about_another_command_are_ignored() -> None:
    """An older order's late events, or a cancel command's own answers, must not move this order's device."""
    st = at(S.DOWNLOADING, T0, device="d")
    assert on_event(st, "healthy", T0 + 1, command_id="cmd-older") is st
    assert on_event(st, "rejected", T0 + 1, command_id="cmd-the-cancel", reason="too_late") is st


def test_progress_never_goes_backwards() -> None:
    st = at(S.VERIFIED, T0, device="d")
    assert on_event(st, "received", T0 + 1, command_id=st.command_id) is st
    assert on_event(st, "downloading", T0 + 1, command_id=st.command_id) is st


def test_the_first_terminal_event_wins() -> None:
    st = at(S.FAILED, T0, device="d")
    assert on_event(st, "healthy", T0 + 1, command_id=st.command_id) is st
    assert on_event(st, "cancelled", T0 + 1, command_id=st.command_id) is st


def test_healthy_device_that_crash_loops_later_is_counted_as_rolled_back() -> None:
    st = at(S.HEALTHY, T0, device="d")
    rolled = on_event(st, "rolled_back", T0 + 50, command_id=None, reason="crash_loop")
    assert (rolled.step, rolled.reason) == (S.ROLLED_BACK, "crash_loop")
    # without a command id, only a device on the new version is affected
    assert on_event(at(S.DOWNLOADING, T0, device="d"), "rolled_back", T0, command_id=None, reason="x").step \
        is S.DOWNLOADING


def test_timed_out_device_that_speaks_again_is_followed() -> None:
    st = at(S.TIMED_OUT, T0, device="d")
    assert on_event(st, "healthy", T0 + 9, command_id=st.command_id).step is S.HEALTHY


def test_unknown_event_kinds_and_unordered_devices_change_nothing() -> None:
    st = at(S.ORDERED, T0, device="d")
    assert on_event(st, "heartbeat", T0, command_id=st.command_id) is st
    fresh = DeviceState()
    assert on_event(fresh, "healthy", T0, command_id="cmd-x") is fresh


def test_failure_events_without_a_reason_get_one() -> None:
    st = at(S.DOWNLOADING, T0, device="d")
    assert on_event(st, "failed", T0, command_id=st.command_id).reason == "unknown"


def test_apply_decisions_records_orders_timeouts_and_state_changes() -> None:
    offline = DeviceState(online=False, stale_since=T0 - 5)
    downloading = at(S.DOWNLOADING, T0 - 100, device="b")
    devices = {"a": offline, "b": downloading}
    order = SendOrder("a", "cmd-1", "cancer-mlp", 3, DIGEST, False, 0, 1)
    timeout = MarkTimedOut("b", TimeoutStep.DOWNLOAD, downloading.command_id or "", T0)
    state, changed = apply_decisions(running(0), devices, [order, timeout, SendCancel("b", "c", "d"),
                                                           Wait(None, "x")], T0)
    assert state == running(0)
    assert changed["a"] == DeviceState(S.ORDERED, T0, None, "cmd-1", T0, 1, False, False, T0 - 5)
    assert (changed["b"].step, changed["b"].reason) == (S.TIMED_OUT, "timeout_download")
    advanced, _ = apply_decisions(running(0), {}, [Advance(1, "ok")], T0 + 5)
    assert (advanced.status, advanced.phase, advanced.phase_started_at) == (RolloutStatus.RUNNING, 1, T0 + 5)
    halted, _ = apply_decisions(running(1), {}, [Halt(HaltRule.DRIFT_CONTROL, "spike")], T0 + 6)
    assert (halted.status, halted.halt_rule, halted.reason, halted.phase) == (
        RolloutStatus.PAUSED, HaltRule.DRIFT_CONTROL, "spike", 1)
    done, _ = apply_decisions(running(1), {}, [Complete("done")], T0 + 7)
    assert done.status is RolloutStatus.COMPLETED


def test_a_stale_timeout_does_not_clobber_a_newer_order() -> None:
    newer = at(S.RECEIVED, T0, device="b", attempts=2)
    _, changed = apply_decisions(running(0), {"b": newer},
                                 [MarkTimedOut("b", TimeoutStep.RECEIVE, "cmd-old", T0)], T0)
    assert changed == {}


@pytest.mark.parametrize("kind", ["failed", "rolled_back", "rejected"])
def test_failure_kinds_keep_their_reason(kind: str) -> None:
    st = at(S.INSTALLED, T0, device="d")
    assert on_event(st, kind, T0, command_id=st.command_id, reason="health_check").reason == "health_check"
