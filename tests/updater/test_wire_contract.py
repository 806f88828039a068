"""The update path over the wire contract, byte for byte: the fleet simulator sends Command frames, the device's
CommandProcessor applies them and answers with Event frames that the simulator ingests. The real fleet server
passes these same tests against the same device code."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.protocol import Command, Event, decode, encode
from agent.updater.commands import CommandProcessor, EventSequence, SequencedPublisher
from agent.updater.fetch import FetchConfig, HttpFetcher
from tests.sim.fleet import FleetSim
from tests.sim.fleet_http import FleetHttpSim
from tests.updater.conftest import Device, make_device
from tests.updater.support import make_bundle, make_order


@pytest.fixture
def wired(tmp_path: Path) -> Iterator[tuple[Device, CommandProcessor, FleetSim, list[tuple[str, bytes]]]]:
    d = make_device(tmp_path, fetcher=HttpFetcher(FetchConfig(read_timeout_s=5, stall_window_s=2)))
    sent: list[tuple[str, bytes]] = []
    with FleetHttpSim() as http:
        fleet = FleetSim(d.keys, http)
        publisher = SequencedPublisher(EventSequence(d.state / "orders" / "event_seq"),
                                       lambda t, b: sent.append((t, b)), "fleet/v1/dev-1/events")
        proc = CommandProcessor(device_id="dev-1", updater=d.updater, sink=publisher)
        d.updater._events = proc.publish_event
        yield d, proc, fleet, sent
    d.host.close()


def _deliver(fleet: FleetSim, sent: list[tuple[str, bytes]]) -> list[Event]:
    out = [fleet.receive(t, b) for t, b in sent]
    sent.clear()
    return out


def test_command_frame_deploys_and_events_acknowledge(wired: tuple[Device, CommandProcessor, FleetSim, list]) -> None:
    d, proc, fleet, sent = wired
    topic, frame = fleet.command("dev-1", make_bundle(d.keys, version=1), command_id="cmd-w1")
    assert proc.on_message(topic, frame).status == "healthy"  # type: ignore[union-attr]
    events = _deliver(fleet, sent)
    assert [e.kind for e in events] == ["received", "downloading", "verified", "installed", "healthy"]
    assert [e.stream_seq for e in events] == list(range(5))
    assert all(t == "fleet/v1/dev-1/events" for t, _ in sent) or sent == []
    assert "cmd-w1" not in fleet.pending  # acknowledged: the server stops resending
    assert d.serving() == 1


def test_resent_command_is_answered_not_reapplied(wired: tuple[Device, CommandProcessor, FleetSim, list]) -> None:
    d, proc, fleet, sent = wired
    topic, frame = fleet.command("dev-1", make_bundle(d.keys, version=1), command_id="cmd-w2")
    proc.on_message(topic, frame)
    _deliver(fleet, sent)
    bytes_before = fleet.http.total_body_bytes_sent()
    proc.on_message(topic, frame)  # the broker redelivers (QoS 1) or the server resends
    (ack,) = _deliver(fleet, sent)
    assert (ack.kind, ack.command_id) == ("healthy", "cmd-w2")
    assert fleet.http.total_body_bytes_sent() == bytes_before
    assert ack.stream_seq == 5  # a new event, numbered after the others


def test_command_for_other_device_dropped_at_the_topic(wired: tuple[Device, CommandProcessor, FleetSim, list]) -> None:
    d, proc, fleet, sent = wired
    _topic, frame = fleet.command("dev-2", make_bundle(d.keys, version=1), command_id="cmd-x")
    assert proc.on_message("fleet/v1/dev-1/commands", frame) is None  # mis-routed to dev-1's topic
    assert proc.dropped == 1 and sent == [] and d.serving() is None


def test_order_naming_other_device_inside_own_command_rejected(
        wired: tuple[Device, CommandProcessor, FleetSim, list]) -> None:
    d, proc, fleet, sent = wired
    data = make_bundle(d.keys, version=1)
    order = make_order(d.keys, data, device_id="dev-2", url=fleet.publish(data), token="tok", sequence=1,
                       command_id="cmd-y")
    frame = encode(Command(device_id="dev-1", command_id="cmd-y", kind="deploy", order=order, sent_at=time.time()))
    assert proc.on_message("fleet/v1/dev-1/commands", frame).status == "rejected"  # type: ignore[union-attr]
    (ev,) = _deliver(fleet, sent)
    assert (ev.kind, ev.reason, ev.command_id) == ("rejected", "order", "cmd-y")
    assert d.serving() is None


@pytest.mark.parametrize("payload", [b"", b"\x00garbage", b"\x01\x93\x01\x02\x03", b"\x02" + b"x" * 100])
def test_malformed_command_frames_dropped_without_crash(wired: tuple[Device, CommandProcessor, FleetSim, list],
                                                         payload: bytes) -> None:
    _d, proc, _fleet, sent = wired
    assert proc.on_message("fleet/v1/dev-1/commands", payload) is None
    assert proc.dropped == 1 and sent == []


def test_event_frames_decode_on_the_server_side(wired: tuple[Device, CommandProcessor, FleetSim, list]) -> None:
    d, proc, fleet, sent = wired
    topic, frame = fleet.command("dev-1", make_bundle(d.keys, version=1, signers=[]), command_id="cmd-unsigned")
    assert proc.on_message(topic, frame).status == "rejected"  # type: ignore[union-attr]
    last = decode(sent[-1][1])
    assert isinstance(last, Event)
    assert (last.kind, last.reason, last.command_id) == ("rejected", "signature", "cmd-unsigned")
    assert "signature" in last.detail["message"]


def test_same_device_report_delivered_twice_counted_once(
        wired: tuple[Device, CommandProcessor, FleetSim, list]) -> None:
    d, proc, fleet, sent = wired
    topic, frame = fleet.command("dev-1", make_bundle(d.keys, version=1), command_id="cmd-dup")
    proc.on_message(topic, frame)
    frames = list(sent)
    _deliver(fleet, sent)
    for t, b in frames:  # QoS 1 redelivery of every report
        fleet.receive(t, b)
    assert fleet.duplicates == len(frames)
    assert fleet.kinds("dev-1", "cmd-dup") == ["received", "downloading", "verified", "installed", "healthy"]
