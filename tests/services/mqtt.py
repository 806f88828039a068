"""MQTT broker fixtures (real mosquitto; the embedded pure-Python broker) and a stand-in ingestion server.

Fixtures (registered as a pytest plugin from ``tests/conftest.py``):

* ``mosquitto``: the real ``/usr/sbin/mosquitto`` (or the one on ``PATH``) on a free 127.0.0.1 port, with a
  throwaway test-only config: anonymous, no TLS, persistence on in a temp directory (as Debian's packaged
  ``mosquitto.conf`` has it, so sessions and queued messages survive a restart), and otherwise mosquitto's defaults
  (``max_queued_messages`` stays 1000: a server that is away loses what is past that). Missing mosquitto fails the
  test when ``CI`` is set and skips it otherwise (``apt-get install mosquitto``).
* ``embedded_broker``: :class:`fleet_server.broker.EmbeddedBroker` (amqtt, MQTT 3.1.1, queues nothing).
* ``broker``: parametrized over both.

Each yields a :class:`BrokerService` (``host``, ``port``, ``stop()``, ``start()``, ``restart()``, and what the
broker keeps across restarts). :class:`IngestStub` plays the fleet server's ingestion: a paho subscriber with a
persistent session that stores stream messages by (device, stream, seq), counts duplicates and publishes ``Ack``
messages (stored ranges + gaps as ``missing``) on ``fleet/v1/{id}/acks``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol import (
    Ack,
    Channel,
    Command,
    DriftWindow,
    Event,
    Message,
    ProtocolError,
    ReceivedTracker,
    Status,
    decode_for_topic,
    device_topic,
    encode,
    parse_device_topic,
    subscription,
)
from fleet_server.broker import EmbeddedBroker
from tests.services.required import unavailable

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto",)


def find_mosquitto() -> str | None:
    for path in MOSQUITTO_PATHS:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("mosquitto")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class BrokerService(Protocol):
    kind: str
    host: str
    port: int
    persistent: bool
    """Sessions, subscriptions and queued QoS 1 messages survive a restart."""
    queues_offline: bool
    """QoS 1 messages for a disconnected persistent session are queued (bounded)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def restart(self) -> None: ...


class MosquittoBroker:
    """A real mosquitto process with a test-only config; ``stop()`` is SIGTERM (mosquitto saves its persistence
    file on a clean exit), ``kill()`` is SIGKILL."""

    kind = "mosquitto"
    persistent = True
    queues_offline = True

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        (workdir / "data").mkdir(exist_ok=True)
        self._write_config()

    def _write_config(self) -> None:
        lines = [
            "# test-only mosquitto config (tests/services/mqtt.py): anonymous, no TLS, loopback only",
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.workdir / 'data'}/",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise mosquitto drops to the 'mosquitto' user and cannot write workdir
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> None:
        for attempt in range(3):
            with self.log.open("ab") as log:
                self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log, stderr=log)
            try:
                self._wait_accepting(timeout)
                return
            except RuntimeError:
                self._terminate(signal.SIGKILL)
                if attempt == 2 or self.proc is None or "Address already in use" not in self.log_text():
                    raise
                self.port = free_port()  # lost a race for the port: take another one
                self._write_config()

    def _wait_accepting(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}:\n{self.log_text()}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.5):
                return
            time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not accept connections within {timeout} s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def _terminate(self, sig: signal.Signals) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def stop(self) -> None:
        self._terminate(signal.SIGTERM)

    def kill(self) -> None:
        self._terminate(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()


class EmbeddedService:
    """:class:`EmbeddedBroker` behind the same interface; it keeps nothing across a restart and queues nothing."""

    kind = "embedded"
    persistent = False
    queues_offline = False

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.broker = EmbeddedBroker(self.host, 0)
        self.port = 0

    def start(self) -> None:
        self.port = self.broker.start()

    def stop(self) -> None:
        self.broker.stop()

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """A running mosquitto on a free port (killed at teardown)."""
    binary = find_mosquitto()
    if binary is None:
        unavailable("mosquitto is not installed (apt-get install mosquitto)")
    broker = MosquittoBroker(binary, tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


@pytest.fixture
def embedded_broker() -> Iterator[EmbeddedService]:
    """The embedded amqtt broker on a free port (stopped at teardown)."""
    service = EmbeddedService()
    service.start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(params=["mosquitto", "embedded"])
def broker(request: pytest.FixtureRequest) -> BrokerService:
    """Each test runs against the real mosquitto and against the embedded broker."""
    name = "embedded_broker" if request.param == "embedded" else "mosquitto"
    service: BrokerService = request.getfixturevalue(name)
    return service


class IngestStub:
    """A test-side fleet server: stores stream messages by (device, stream, seq) exactly once and acknowledges.

    It connects with a persistent session (MQTT 3.1.1, ``clean_session=False``, fixed client id) and keeps its
    state across :meth:`disconnect` / :meth:`connect` like a server with a database. Every ``ack_interval_s`` it
    publishes, per (device, stream) that received something, ``Ack(seqs=<all stored>, missing=<gaps>)``.
    ``reject(device, stream, seq)`` makes it refuse a message for good (not stored, not acked: a gap).
    """

    def __init__(self, service: BrokerService, *, client_id: str = "fleet-ingest-stub", ack: bool = True,
                 ack_interval_s: float = 0.05, reject: Callable[[str, str, int], bool] | None = None) -> None:
        self.service = service
        self.client_id = client_id
        self.acking = ack
        self.ack_interval_s = ack_interval_s
        self.reject = reject
        self.lock = threading.Lock()
        self.stored: dict[tuple[str, str, int], Message] = {}
        self.arrivals: list[tuple[str, str, int]] = []
        self.deliveries: Counter[tuple[str, str, int]] = Counter()
        self.duplicates: Counter[tuple[str, str]] = Counter()
        self.rejected: Counter[tuple[str, str, int]] = Counter()
        self.trackers: dict[tuple[str, str], ReceivedTracker] = {}
        self.statuses: list[tuple[str, str | None]] = []
        self.acks_sent = 0
        self.dirty: set[tuple[str, str]] = set()
        self.client: paho.Client | None = None
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._acker: threading.Thread | None = None

    # -- connection ---------------------------------------------------------------------------------

    def connect(self, wait: bool = True, timeout: float = 10.0) -> None:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=False,
                             protocol=paho.MQTTv311)
        client.reconnect_delay_set(0.05, 0.3)  # floats work; paho annotates ints
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.max_inflight_messages_set(100)
        self.client = client
        client.connect_async(self.service.host, self.service.port, keepalive=30)
        client.loop_start()
        if self._acker is None:
            self._stop.clear()
            self._acker = threading.Thread(target=self._ack_loop, daemon=True)
            self._acker.start()
        if wait:
            wait_until(self.connected.is_set, timeout, what="the ingest stub to connect")

    def disconnect(self) -> None:
        client, self.client = self.client, None
        self.connected.clear()
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def restart(self) -> None:
        self.disconnect()
        self.connect()

    def close(self) -> None:
        self.disconnect()
        self._stop.set()
        if self._acker is not None:
            self._acker.join(5)
            self._acker = None

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            return
        client.subscribe([(subscription(Channel.DRIFT), 1), (subscription(Channel.EVENTS), 1),
                          (subscription(Channel.STATUS), 1)])
        self.connected.set()
        with self.lock:
            self.dirty.update(self.trackers)  # re-acknowledge everything after a (re)connect

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connected.clear()

    # -- ingestion ----------------------------------------------------------------------------------

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            device, channel = parse_device_topic(message.topic)
        except ProtocolError:
            return
        if channel is Channel.STATUS:
            state = None
            if message.payload:
                status = decode_for_topic(message.topic, message.payload)
                assert isinstance(status, Status)
                state = status.state
            with self.lock:
                self.statuses.append((device, state))
            return
        try:
            msg = decode_for_topic(message.topic, message.payload)
        except ProtocolError:
            return
        assert isinstance(msg, DriftWindow | Event)
        stream = channel.value
        key = (device, stream, msg.stream_seq)
        with self.lock:
            self.deliveries[key] += 1
            if self.reject is not None and self.reject(device, stream, msg.stream_seq):
                self.rejected[key] += 1
                self.dirty.add((device, stream))
                return
            tracker = self.trackers.setdefault((device, stream), ReceivedTracker())
            if tracker.record(msg.stream_seq) == "new":
                self.stored[key] = msg
                self.arrivals.append(key)
                if isinstance(msg, DriftWindow) and msg.replaces is not None:
                    first, last = msg.replaces
                    tracker.record_range(first, last)
                    for seq in range(first, last + 1):
                        self.stored.pop((device, stream, seq), None)
            else:
                self.duplicates[(device, stream)] += 1
            self.dirty.add((device, stream))

    def _ack_loop(self) -> None:
        while not self._stop.wait(self.ack_interval_s):
            self.flush_acks()

    def flush_acks(self) -> None:
        client = self.client
        if not self.acking or client is None or not self.connected.is_set():
            return
        with self.lock:
            todo = [(key, self.trackers[key].to_ranges(), self.trackers[key].gaps())
                    for key in sorted(self.dirty) if key in self.trackers]
            self.dirty.clear()
        for (device, stream), seqs, missing in todo:
            ack = Ack(device_id=device, stream=stream, seqs=seqs, missing=missing)
            client.publish(device_topic(device, Channel.ACKS), encode(ack), qos=1)
            self.acks_sent += 1

    # -- queries and commands -----------------------------------------------------------------------

    def seqs(self, device: str, stream: str = "drift") -> list[int]:
        with self.lock:
            return sorted(seq for (d, s, seq) in self.stored if d == device and s == stream)

    def count(self, device: str, stream: str = "drift") -> int:
        with self.lock:
            tracker = self.trackers.get((device, stream))
            return 0 if tracker is None else tracker.received_count

    def send_command(self, command: Command) -> None:
        assert self.client is not None
        self.client.publish(device_topic(command.device_id, Channel.COMMANDS), encode(command), qos=1)

    def states(self, device: str) -> list[str | None]:
        with self.lock:
            return [state for d, state in self.statuses if d == device]
