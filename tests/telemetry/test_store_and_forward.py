"""Store-and-forward end to end (THREATS.md, "Store-and-forward and ingestion"), against real brokers.

The device side is the real Outbox + AgentMqtt (in-process, or the ``agent_harness`` process when it must be
SIGKILLed); the server side is :class:`tests.services.mqtt.IngestStub`, which stores by (device, stream, seq) and
acknowledges with ``Ack(seqs, missing)`` on ``fleet/v1/{id}/acks``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.protocol import Command, DriftWindow, Event, decode, encode
from agent.telemetry.mqtt import AgentMqtt, MqttSettings
from agent.telemetry.outbox import Outbox, OutboxLimits
from tests.services.mqtt import BrokerService, IngestStub, MosquittoBroker, wait_until
from tests.telemetry.agent_harness import window_frame

REPO = Path(__file__).resolve().parents[2]
DEV = "dev-1"

pytestmark = pytest.mark.integration


def settings_for(service: BrokerService, **kw: Any) -> MqttSettings:
    base: dict[str, Any] = {"reconnect_min_s": 0.05, "reconnect_max_s": 0.5, "drain_rate": 500.0,
                            "ack_timeout_s": 1.0, "ack_timeout_max_s": 2.0, "probe_timeout_s": 0.5,
                            "heartbeat_s": None, "connect_timeout_s": 2.0}
    base.update(kw)
    return MqttSettings(host=service.host, port=service.port, device_id=DEV, **base)


@pytest.fixture
def stub(broker: BrokerService) -> Iterator[IngestStub]:
    s = IngestStub(broker)
    yield s
    s.close()


class Device:
    """An in-process device: outbox + MQTT client (restartable on the same outbox file)."""

    def __init__(self, service: BrokerService, db: Path, limits: OutboxLimits | None = None, **kw: Any) -> None:
        self.service, self.db, self.limits, self.kw = service, db, limits, kw
        self.outbox: Outbox | None = None
        self.mqtt: AgentMqtt | None = None

    def start(self, **handlers: Any) -> AgentMqtt:
        self.outbox = Outbox(self.db, limits=self.limits).open()
        self.mqtt = AgentMqtt(settings_for(self.service, **self.kw), self.outbox, **handlers)
        self.mqtt.start()
        return self.mqtt

    def stop(self) -> None:
        if self.mqtt is not None:
            self.mqtt.stop()
        if self.outbox is not None:
            self.outbox.close()
        self.mqtt = self.outbox = None


@pytest.fixture
def devices() -> Iterator[Callable[..., Device]]:
    made: list[Device] = []

    def make(service: BrokerService, db: Path, limits: OutboxLimits | None = None, **kw: Any) -> Device:
        made.append(Device(service, db, limits, **kw))
        return made[-1]

    yield make
    for d in made:
        d.stop()


class Harness:
    """``python -m tests.telemetry.agent_harness`` as a real process we can SIGKILL."""

    def __init__(self, service: BrokerService, db: Path, count: int, *extra: str) -> None:
        self.service, self.db, self.count, self.extra = service, db, count, extra
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.produced = 0
        self.kills = 0

    def start(self) -> None:
        self.lines = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.telemetry.agent_harness", "--db", str(self.db), "--host",
             self.service.host, "--port", str(self.service.port), "--device", DEV, "--count", str(self.count),
             *self.extra], cwd=REPO, stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.strip()
            self.lines.append(line)
            if line.startswith("produced "):
                self.produced = int(line.split()[1])

    def saw(self, text: str) -> bool:
        return text in self.lines

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(10) == -signal.SIGKILL
        self.kills += 1

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(15)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def assert_exactly_once(stub: IngestStub, n: int, stream: str = "drift", *, in_order: bool = True) -> None:
    assert stub.seqs(DEV, stream) == list(range(n)), "every window is stored"
    with stub.lock:
        arrivals = [seq for (d, s, seq) in stub.arrivals if d == DEV and s == stream]
        windows = [stub.stored[(DEV, stream, seq)] for seq in range(n)]
    assert len(arrivals) == n, "each (device, stream, seq) is stored exactly once"
    if in_order:
        assert arrivals == sorted(arrivals), "stored in order"
    starts = [w.window_start for w in windows if isinstance(w, DriftWindow)]
    assert starts == sorted(starts), "sequence order is production order, across restarts"


# -- broker down for a while; the device killed twice during the outage and once while draining ---------------


def test_broker_down_agent_killed_twice_during_outage_and_once_during_drain(
        mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    n = 1000
    stub = IngestStub(mosquitto)
    stub.connect()
    harness = Harness(mosquitto, tmp_path / "outbox.sqlite", n, "--produce-interval", "0.001",
                      "--drain-rate", "300", "--ack-timeout", "1.0")
    try:
        mosquitto.stop()  # the outage (the server's persistent session is saved with the broker's state)
        for kill_at in (300, 650):
            harness.start()
            wait_until(lambda k=kill_at: harness.produced >= k, 30, what=f"{kill_at} windows produced")
            harness.kill()
            assert harness.produced < n
        harness.start()
        wait_until(lambda: harness.saw("produced-all"), 30, what="all windows produced")
        assert stub.count(DEV) == 0
        mosquitto.start()  # the broker is back: the device drains at its paced rate
        wait_until(lambda: stub.count(DEV) >= 300, 30, what="the drain to start")
        harness.kill()  # killed while draining
        assert stub.count(DEV) < n, "the kill must happen during the drain"
        harness.start()
        wait_until(lambda: stub.count(DEV) == n, 45, what="every window at the server")
        wait_until(lambda: harness.saw("drained"), 15, what="the device outbox to empty")
        assert harness.terminate() == 0
        assert harness.kills == 3
        assert_exactly_once(stub, n)
    finally:
        harness.close()
        stub.close()


# -- fleet server away: broker up, 1 500 windows, a bounded (mosquitto) or absent (embedded) offline queue -----


def test_server_away_1500_windows_all_stored_after_it_returns(
        broker: BrokerService, stub: IngestStub, devices: Callable[..., Device], tmp_path: Path) -> None:
    n = 1500
    stub.connect()  # the server's persistent session exists ...
    stub.disconnect()  # ... and the server goes away
    # A device that publishes everything at once (large window, fast drain) overflows the broker's queue.
    device = devices(broker, tmp_path / "outbox.sqlite", max_in_flight=2000, drain_rate=3000.0,
                     ack_timeout_s=1.0, ack_timeout_max_s=2.0)
    mqtt = device.start()
    assert device.outbox is not None
    for _ in range(n):
        device.outbox.append("drift", lambda seq: window_frame(DEV, seq, time.time()))
    wait_until(lambda: mqtt.stats().published >= n, 30, what="the device to publish every window")
    time.sleep(0.5)
    stub.connect()  # the server returns
    wait_until(lambda: stub.count(DEV) == n, 60, what="all 1500 windows at the server")
    wait_until(lambda: device.outbox is not None and device.outbox.stats().pending == 0, 15,
               what="the device outbox to empty")
    # The server comes back in the middle of the broker's backlog, so the oldest windows arrive last (resent).
    assert_exactly_once(stub, n, in_order=False)
    assert mqtt.stats().go_backs >= 1, "the device had to resend what the broker did not keep"
    if isinstance(broker, MosquittoBroker):
        assert "Outgoing messages are being dropped for client fleet-ingest-stub" in broker.log_text()


# -- duplicate delivery ---------------------------------------------------------------------------------------


def test_duplicate_delivery_across_server_restart_is_stored_once(
        broker: BrokerService, stub: IngestStub, devices: Callable[..., Device], tmp_path: Path) -> None:
    stub.acking = False  # the server stores but its acks are lost: the device resends
    stub.connect()
    device = devices(broker, tmp_path / "outbox.sqlite", ack_timeout_s=0.3, ack_timeout_max_s=0.3)
    device.start()
    assert device.outbox is not None
    for _ in range(5):
        device.outbox.append("events", lambda seq: encode(Event(device_id=DEV, stream_seq=seq, kind="tick", at=1.0)))

    def delivered(times: int) -> bool:
        with stub.lock:
            return all(stub.deliveries[(DEV, "events", seq)] >= times for seq in range(5))

    wait_until(lambda: delivered(2), 15, what="every event twice")
    stub.restart()  # the server restarts (its store survives, like a database)
    wait_until(lambda: delivered(3), 15, what="every event three times")
    stub.acking = True
    wait_until(lambda: device.outbox is not None and device.outbox.stats().pending == 0, 15, what="the acks")
    assert stub.seqs(DEV, "events") == list(range(5))
    with stub.lock:
        total = sum(stub.deliveries[(DEV, "events", seq)] for seq in range(5))
        assert stub.duplicates[(DEV, "events")] == total - 5 >= 10


# -- broker restart with a queued command ---------------------------------------------------------------------


def test_broker_restart_with_queued_command_delivered_once(
        broker: BrokerService, stub: IngestStub, devices: Callable[..., Device], tmp_path: Path) -> None:
    stub.connect()
    device = devices(broker, tmp_path / "outbox.sqlite")
    copies: list[Command] = []
    applied: list[str] = []

    def on_command(topic: str, payload: bytes) -> None:  # what the updater does, minus the deployment
        command = decode(payload)
        assert isinstance(command, Command)
        copies.append(command)
        if command.command_id in applied:
            return  # a repeat: applied once (the updater answers it again from its record)
        applied.append(command.command_id)
        assert device.outbox is not None
        device.outbox.append("events", lambda seq: encode(Event(
            device_id=DEV, stream_seq=seq, kind="received", at=time.time(), command_id=command.command_id)))

    mqtt = device.start(on_command=on_command)
    assert mqtt.wait_connected(10)
    device.stop()  # the device is offline: its persistent session stays at the broker
    order = {"signed": {"command_id": "cmd-7"}, "signatures": []}
    stub.send_command(Command(device_id=DEV, command_id="cmd-7", kind="deploy", order=order, sent_at=1.0))
    time.sleep(0.3)
    broker.restart()  # mosquitto keeps the queued command (persistence); the embedded broker loses it
    stub.connected.wait(10)

    answered = threading.Event()
    stop = threading.Event()

    def server_resends() -> None:  # the server resends until the device answers with the command id
        sent_at = 2.0
        while not stop.wait(1.0) and not answered.is_set():
            stub.send_command(Command(device_id=DEV, command_id="cmd-7", kind="deploy", order=order,
                                      sent_at=sent_at))
            sent_at += 1

    resender = threading.Thread(target=server_resends, daemon=True)
    resender.start()
    try:
        device.start(on_command=on_command)

        def got_answer() -> bool:
            with stub.lock:
                events = [m for (d, s, _), m in stub.stored.items() if d == DEV and s == "events"]
            if any(isinstance(e, Event) and e.command_id == "cmd-7" for e in events):
                answered.set()
            return answered.is_set()

        wait_until(got_answer, 20, what="the device's answer to the command")
    finally:
        stop.set()
        resender.join(5)
    assert applied == ["cmd-7"], "the command is applied exactly once"
    assert stub.seqs(DEV, "events") == [0]
    if broker.persistent:
        assert copies[0].sent_at == 1.0, "mosquitto delivered the copy it queued before the restart"


# -- poison message -------------------------------------------------------------------------------------------


def test_poison_message_parked_after_k_tries_and_the_rest_flow(
        broker: BrokerService, devices: Callable[..., Device], tmp_path: Path) -> None:
    stub = IngestStub(broker, reject=lambda device, stream, seq: stream == "events" and seq == 3)
    stub.connect()
    try:
        device = devices(broker, tmp_path / "outbox.sqlite", OutboxLimits(poison_after=3, missing_grace_s=0.3),
                         ack_timeout_s=0.5, ack_timeout_max_s=1.0)
        device.start()
        ob = device.outbox
        assert ob is not None
        for _ in range(10):
            ob.append("events", lambda seq: encode(Event(device_id=DEV, stream_seq=seq, kind="tick", at=1.0)))
        wait_until(lambda: [p.seq for p in ob.parked()] == [3], 20, what="the poison message to be parked")
        for _ in range(5):
            ob.append("events", lambda seq: encode(Event(device_id=DEV, stream_seq=seq, kind="tick", at=1.0)))
        wait_until(lambda: ob.stats().pending == 0, 15, what="the rest to flow")
        assert stub.seqs(DEV, "events") == [s for s in range(15) if s != 3]
        with stub.lock:
            assert stub.rejected[(DEV, "events", 3)] >= 3
    finally:
        stub.close()


# -- outbox full during an outage: merged windows end to end --------------------------------------------------


def test_outbox_full_during_outage_merged_windows_keep_exact_sample_counts(
        embedded_broker: BrokerService, devices: Callable[..., Device], tmp_path: Path) -> None:
    n = 60
    size = len(window_frame(DEV, 0, 0.0))
    stub = IngestStub(embedded_broker)
    stub.connect()
    try:
        embedded_broker.stop()
        device = devices(embedded_broker, tmp_path / "outbox.sqlite", OutboxLimits(max_bytes=size * 20, merge_max=8))
        device.start()
        ob = device.outbox
        assert ob is not None
        for _ in range(n):
            ob.append("drift", lambda seq: window_frame(DEV, seq, time.time()))
        stats = ob.stats().streams["drift"]
        assert stats.merges > 0 and stats.dropped == 0
        embedded_broker.start()
        wait_until(lambda: ob.stats().pending == 0, 30, what="the drain")
        with stub.lock:
            tracker = stub.trackers[(DEV, "drift")]
            samples = sum(m.samples for m in stub.stored.values() if isinstance(m, DriftWindow))
            assert tracker.gaps() == () and tracker.received_count == stats.next_seq
        assert samples == 16 * n, "merging keeps every sample"
    finally:
        stub.close()
