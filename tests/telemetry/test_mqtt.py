"""The agent's MQTT client: unit tests with a scripted paho stand-in, then the real thing against real brokers."""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent.protocol import Ack, Command, Event, ModelState, Status, decode, device_topic, encode
from agent.protocol.topics import Channel
from agent.telemetry.mqtt import AgentMqtt, MqttConfigError, MqttSettings, TlsSettings, backoff_delay, paho_client
from agent.telemetry.outbox import Outbox
from tests.services.mqtt import BrokerService, IngestStub, wait_until

DEV = "dev-1"


def event(seq: int) -> bytes:
    return encode(Event(device_id=DEV, stream_seq=seq, kind="tick", at=1.0))


# -- a scripted stand-in for paho's Client --------------------------------------------------------------


class Info:
    def __init__(self, rc: MQTTErrorCode = MQTTErrorCode.MQTT_ERR_SUCCESS) -> None:
        self.rc = rc

    def is_published(self) -> bool:
        return True


class FakeClient:
    """Enough of paho.Client for AgentMqtt: connect() consumes one scripted outcome, loop() delivers it."""

    def __init__(self, net: FakeNet, client_id: str, protocol: MQTTProtocolVersion) -> None:
        self.net, self.client_id, self.protocol = net, client_id, protocol
        self.on_connect: Any = None
        self.on_disconnect: Any = None
        self.on_message: Any = None
        self.will: tuple[str, bytes, int, bool] | None = None
        self.tls: Any = None
        self.connect_timeout = 0.0
        self.connect_kwargs: dict[str, Any] = {}
        self.subscriptions: list[Any] = []
        self.pending: int | None = None
        self.up = False
        self.inbox: list[tuple[str, bytes]] = []

    def will_set(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.will = (topic, payload, qos, retain)

    def tls_set_context(self, ctx: Any) -> None:
        self.tls = ctx

    def username_pw_set(self, username: str, password: str | None = None) -> None:
        pass

    def connect(self, host: str, port: int, keepalive: int, **kwargs: Any) -> None:
        self.connect_kwargs = {"host": host, "port": port, **kwargs}
        outcome = self.net.outcomes.pop(0) if self.net.outcomes else 0
        if isinstance(outcome, BaseException):
            raise outcome
        self.pending = outcome

    def loop(self, timeout: float = 1.0) -> MQTTErrorCode:
        self.net.clock.t += timeout
        if self.pending is not None:
            code, self.pending = self.pending, None
            if code == -1:  # silence: no CONNACK ever
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            self.up = code == 0
            self.on_connect(self, None, paho.ConnectFlags(session_present=self.net.session_present),
                            ReasonCode(PacketTypes.CONNACK, identifier=code), None)
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        if self.net.cut:
            self.net.cut = False
            self.up = False
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        while self.inbox:
            topic, payload = self.inbox.pop(0)
            msg = paho.MQTTMessage(topic=topic.encode())
            msg.payload = payload
            self.on_message(self, None, msg)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> Info:
        if not self.up:
            return Info(MQTTErrorCode.MQTT_ERR_NO_CONN)
        self.net.published.append((topic, payload, qos, retain))
        return Info()

    def subscribe(self, topics: Any) -> tuple[MQTTErrorCode, int]:
        self.subscriptions.append(topics)
        return MQTTErrorCode.MQTT_ERR_SUCCESS, 1

    def disconnect(self) -> MQTTErrorCode:
        self.up = False
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def socket(self) -> None:
        return None


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


class FakeNet:
    """The scripted world: connect outcomes (CONNACK code, -1 for silence, or an exception), the clients made."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.outcomes: list[int | BaseException] = []
        self.clients: list[FakeClient] = []
        self.published: list[tuple[str, bytes, int, bool]] = []
        self.session_present = False
        self.cut = False

    def factory(self, client_id: str, protocol: MQTTProtocolVersion) -> paho.Client:
        client = FakeClient(self, client_id, protocol)
        self.clients.append(client)
        return client  # type: ignore[return-value]

    def stream(self, stream: str) -> list[int]:
        topic = device_topic(DEV, Channel(stream))
        return [decode(p).stream_seq for t, p, _, _ in self.published if t == topic]  # type: ignore[union-attr]

    def deliver(self, channel: Channel, payload: bytes, device: str = DEV) -> None:
        self.clients[-1].inbox.append((device_topic(device, channel), payload))


@pytest.fixture
def net() -> FakeNet:
    return FakeNet()


@pytest.fixture
def outbox(tmp_path: Path, net: FakeNet) -> Iterator[Outbox]:
    with Outbox(tmp_path / "outbox.sqlite", clock=net.clock) as ob:
        yield ob


def make(net: FakeNet, outbox: Outbox, **kw: Any) -> AgentMqtt:
    handlers = {k: kw.pop(k) for k in ("on_ack", "on_command", "models") if k in kw}
    settings = MqttSettings(host="broker.test", device_id=DEV, heartbeat_s=None, **kw)
    return AgentMqtt(settings, outbox, clock=net.clock, wall_clock=net.clock, sleep=net.clock.sleep,
                     client_factory=net.factory, jitter=lambda: 0.5, **handlers)


def run(mqtt: AgentMqtt, steps: int) -> None:
    for _ in range(steps):
        mqtt.run_once()


# -- connection, protocol and presence -------------------------------------------------------------------


def test_v5_persistent_session_will_online_status_and_subscriptions(net: FakeNet, outbox: Outbox) -> None:
    models = [ModelState(name="detector", version=3, slot="a", healthy=True)]
    mqtt = make(net, outbox, models=lambda: models, agent_version="1.2.3")
    run(mqtt, 2)
    [client] = net.clients
    assert client.client_id == DEV and client.protocol == MQTTProtocolVersion.MQTTv5
    assert client.connect_kwargs["clean_start"] is False
    assert client.connect_kwargs["properties"].SessionExpiryInterval == 7 * 86400
    topic, payload, qos, retain = client.will or ("", b"", 0, False)
    assert (topic, qos, retain) == (f"fleet/v1/{DEV}/status", 1, True)
    assert decode(payload) == Status.offline(DEV, agent_version="1.2.3")
    status_topic, status_payload, _, status_retain = net.published[0]
    status = decode(status_payload)
    assert status_topic == topic and status_retain and isinstance(status, Status)
    assert status.state == "online" and list(status.models) == models
    [subs] = client.subscriptions
    assert [t for t, _ in subs] == [f"fleet/v1/{DEV}/commands", f"fleet/v1/{DEV}/acks"]
    assert all(o.QoS == 1 for _, o in subs)
    assert mqtt.stats().protocol == "5" and mqtt.connected


def test_protocol_level_refusal_falls_back_to_311(net: FakeNet, outbox: Outbox) -> None:
    net.outcomes = [0x84, 0]
    mqtt = make(net, outbox)
    run(mqtt, 4)
    assert [c.protocol for c in net.clients] == [MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311]
    assert net.clients[1].subscriptions == [[(f"fleet/v1/{DEV}/commands", 1), (f"fleet/v1/{DEV}/acks", 1)]]
    stats = mqtt.stats()
    assert (stats.protocol, stats.protocol_fallbacks, stats.connected, stats.connect_failures) == ("3.1.1", 1, True, 0)


def test_silent_broker_on_v5_connect_falls_back_but_only_until_v5_worked(net: FakeNet, outbox: Outbox) -> None:
    net.outcomes = [-1, 0]
    mqtt = make(net, outbox, probe_timeout_s=0.5)
    run(mqtt, 30)
    assert [c.protocol for c in net.clients] == [MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311]
    net2 = FakeNet()
    net2.outcomes = [0, -1, 0]  # v5 accepted once: later silence is a network problem, not the protocol
    with Outbox(outbox.path.with_name("o2.sqlite"), clock=net2.clock) as ob2:
        mqtt2 = make(net2, ob2, probe_timeout_s=0.5, connect_timeout_s=1.0)
        run(mqtt2, 2)
        net2.cut = True
        run(mqtt2, 60)
        assert {c.protocol for c in net2.clients} == {MQTTProtocolVersion.MQTTv5}
        assert mqtt2.stats().connect_failures == 1 and mqtt2.connected


def test_fixed_protocol_311_never_tries_v5(net: FakeNet, outbox: Outbox) -> None:
    mqtt = make(net, outbox, protocol="3.1.1")
    run(mqtt, 2)
    assert [c.protocol for c in net.clients] == [MQTTProtocolVersion.MQTTv311]


def test_reconnect_backoff_is_capped_exponential_with_jitter(net: FakeNet, outbox: Outbox) -> None:
    net.outcomes = [ConnectionRefusedError("refused")] * 8 + [0]
    mqtt = make(net, outbox, reconnect_min_s=1.0, reconnect_max_s=8.0)
    starts = []
    for _ in range(40):
        if not mqtt.connected:
            before = len(net.clients)
            mqtt.run_once()
            if len(net.clients) > before:
                starts.append(net.clock.t)
        else:
            break
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(starts)]
    assert gaps == [0.75, 1.5, 3.0, 6.0, 6.0, 6.0, 6.0, 6.0]  # jitter 0.5: 3/4 of min(8, 2**k)
    assert mqtt.connected and "refused" not in (mqtt.stats().last_error or "")
    assert [backoff_delay(k, 1.0, 8.0, 0.0) for k in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert [backoff_delay(k, 1.0, 8.0, 0.999999) for k in range(5)] == pytest.approx([1, 2, 4, 8, 8], abs=1e-5)


def test_connection_lost_reconnects_and_backoff_restarts_after_a_stable_connection(
        net: FakeNet, outbox: Outbox) -> None:
    mqtt = make(net, outbox, reconnect_min_s=1.0, reconnect_max_s=60.0, stable_s=30.0)
    run(mqtt, 2)
    for _ in range(3):  # three quick flaps: the backoff grows
        net.cut = True
        run(mqtt, 4)  # lost, wait, connect, CONNACK
        assert mqtt.connected
    assert mqtt._attempt == 3
    net.clock.t += 100  # a long, stable connection
    net.cut = True
    mqtt.run_once()
    assert mqtt._attempt == 1 and mqtt.stats().disconnects == 4
    run(mqtt, 3)
    assert mqtt.connected and len(net.clients) == 5


def test_unusable_tls_settings_raise_config_error(tmp_path: Path, outbox: Outbox) -> None:
    settings = MqttSettings(host="h", device_id=DEV, tls=TlsSettings(ca_file=tmp_path / "missing-ca.pem"))
    with pytest.raises(MqttConfigError, match="TLS"):
        AgentMqtt(settings, outbox).start()
    (tmp_path / "bad.pem").write_text("not a certificate")
    settings = MqttSettings(host="h", device_id=DEV, tls=TlsSettings(cert_file=tmp_path / "bad.pem"))
    with pytest.raises(MqttConfigError):
        AgentMqtt(settings, outbox).start()
    with pytest.raises(MqttConfigError):
        MqttSettings(host="h", device_id="Dev/1")
    with pytest.raises(MqttConfigError):
        MqttSettings(host="h", device_id=DEV, drain_rate=0)
    assert MqttSettings(host="h", device_id=DEV, tls=TlsSettings()).effective_port == 8883


def test_tls_context_is_handed_to_paho(net: FakeNet, outbox: Outbox) -> None:
    mqtt = make(net, outbox, tls=TlsSettings())
    run(mqtt, 2)
    assert net.clients[0].tls is not None and net.clients[0].connect_kwargs["port"] == 8883


# -- inbound -------------------------------------------------------------------------------------------------


def test_server_ack_empties_outbox_and_reaches_handler(net: FakeNet, outbox: Outbox) -> None:
    acks: list[Ack] = []
    mqtt = make(net, outbox, on_ack=acks.append, drain_rate=1000)
    for _ in range(5):
        outbox.append("events", event)
    run(mqtt, 3)
    assert net.stream("events") == [0, 1, 2, 3, 4]
    net.deliver(Channel.ACKS, encode(Ack(device_id=DEV, stream="events", seqs=((0, 2),))))
    run(mqtt, 1)
    assert [m.seq for m in outbox.pending("events")] == [3, 4]
    assert len(acks) == 1 and mqtt.stats().acks == 1


def test_garbage_and_foreign_acks_are_ignored(net: FakeNet, outbox: Outbox) -> None:
    mqtt = make(net, outbox)
    outbox.append("events", event)
    run(mqtt, 2)
    net.deliver(Channel.ACKS, b"\x01not msgpack")
    net.deliver(Channel.ACKS, encode(Ack(device_id="dev-2", stream="events", seqs=((0, 0),))), device="dev-2")
    net.deliver(Channel.ACKS, encode(Ack(device_id="dev-2", stream="events", seqs=((0, 0),))))  # payload lies
    net.deliver(Channel.ACKS, encode(Ack(device_id=DEV, stream="other", seqs=((0, 0),))))
    run(mqtt, 1)
    stats = mqtt.stats()
    assert (stats.acks_invalid, stats.ignored, stats.acks) == (3, 1, 0)
    assert [m.seq for m in outbox.pending("events")] == [0] and mqtt.connected


def test_command_handler_errors_do_not_break_the_connection(net: FakeNet, outbox: Outbox) -> None:
    got: list[tuple[str, bytes]] = []

    def on_command(topic: str, payload: bytes) -> None:
        got.append((topic, payload))
        if len(got) == 1:
            raise RuntimeError("updater bug")

    mqtt = make(net, outbox, on_command=on_command)
    run(mqtt, 2)
    net.deliver(Channel.COMMANDS, b"first")
    net.deliver(Channel.COMMANDS, b"second")
    run(mqtt, 1)
    assert [p for _, p in got] == [b"first", b"second"] and got[0][0] == f"fleet/v1/{DEV}/commands"
    assert mqtt.stats().handler_errors == 1 and mqtt.connected


# -- the publisher -------------------------------------------------------------------------------------------


def test_publisher_sends_in_order_at_the_drain_rate(net: FakeNet, outbox: Outbox) -> None:
    for _ in range(200):
        outbox.append("drift" if _ % 2 else "events", lambda seq, s=_: event(seq) if s % 2 == 0 else _window(seq))
    mqtt = make(net, outbox, drain_rate=20.0, max_in_flight=1000, tick_s=0.05)
    run(mqtt, 2)
    start = net.clock.t
    run(mqtt, 100)  # 5 simulated seconds
    elapsed = net.clock.t - start
    sent = len(net.stream("events")) + len(net.stream("drift"))
    assert 20 * elapsed <= sent <= 20 * elapsed + 11  # the rate plus one burst (half a second's worth)
    assert net.stream("events") == list(range(len(net.stream("events"))))
    assert net.stream("drift") == list(range(len(net.stream("drift"))))


def _window(seq: int) -> bytes:
    from tests.telemetry.test_outbox import window

    return window(seq)


def test_in_flight_window_waits_for_server_acks(net: FakeNet, outbox: Outbox) -> None:
    for _ in range(30):
        outbox.append("events", event)
    mqtt = make(net, outbox, drain_rate=1000, max_in_flight=10, ack_timeout_s=30)
    run(mqtt, 10)
    assert net.stream("events") == list(range(10))
    net.deliver(Channel.ACKS, encode(Ack(device_id=DEV, stream="events", seqs=((0, 4),))))
    run(mqtt, 3)
    assert net.stream("events") == list(range(15))


def test_unacknowledged_messages_are_resent_after_the_ack_timeout(net: FakeNet, outbox: Outbox) -> None:
    for _ in range(3):
        outbox.append("events", event)
    mqtt = make(net, outbox, drain_rate=1000, ack_timeout_s=1.0, ack_timeout_max_s=4.0, tick_s=0.1)
    run(mqtt, 2)
    assert net.stream("events") == [0, 1, 2]
    run(mqtt, 10)  # 1 s without any ack: go back to the oldest
    assert net.stream("events") == [0, 1, 2] * 2 and mqtt.stats().go_backs == 1
    run(mqtt, 10)  # the timeout doubled: not yet
    assert mqtt.stats().go_backs == 1
    run(mqtt, 11)
    assert mqtt.stats().go_backs == 2
    net.deliver(Channel.ACKS, encode(Ack(device_id=DEV, stream="events", seqs=((0, 2),))))
    run(mqtt, 50)
    assert outbox.stats().pending == 0 and mqtt.stats().go_backs == 2


def test_missing_in_ack_is_resent_at_once(net: FakeNet, outbox: Outbox) -> None:
    for _ in range(4):
        outbox.append("events", event)
    mqtt = make(net, outbox, drain_rate=1000, ack_timeout_s=60)
    run(mqtt, 3)
    net.deliver(Channel.ACKS, encode(Ack(device_id=DEV, stream="events", seqs=((0, 0), (2, 3)), missing=((1, 1),))))
    run(mqtt, 2)
    assert net.stream("events") == [0, 1, 2, 3, 1]
    assert [m.seq for m in outbox.pending("events")] == [1] and not outbox.pending("events")[0].resend


def test_ack_rejected_marker_in_extra_parks_poison(net: FakeNet, outbox: Outbox) -> None:
    outbox.limits = type(outbox.limits)(poison_after=2)
    for _ in range(3):
        outbox.append("events", event)
    mqtt = make(net, outbox, drain_rate=1000)
    run(mqtt, 3)
    for _ in range(2):
        net.deliver(Channel.ACKS, encode(Ack(device_id=DEV, stream="events", seqs=((0, 0), (2, 2)),
                                             extra={"rejected": [[1, 1]]})))
        run(mqtt, 2)
    assert outbox.stats().pending == 0 and [p.seq for p in outbox.parked()] == [1]


def test_stop_publishes_retained_offline_status(net: FakeNet, outbox: Outbox) -> None:
    mqtt = make(net, outbox)
    run(mqtt, 2)
    mqtt.stop()
    topic, payload, _, retain = net.published[-1]
    status = decode(payload)
    assert topic.endswith("/status") and retain and isinstance(status, Status) and status.state == "offline"
    assert not mqtt.connected


# -- against real brokers ------------------------------------------------------------------------------------


def settings_for(service: BrokerService, **kw: Any) -> MqttSettings:
    base: dict[str, Any] = {"reconnect_min_s": 0.05, "reconnect_max_s": 0.5, "drain_rate": 500.0,
                            "ack_timeout_s": 1.0, "ack_timeout_max_s": 2.0, "probe_timeout_s": 0.5,
                            "heartbeat_s": None, "connect_timeout_s": 2.0}
    base.update(kw)
    return MqttSettings(host=service.host, port=service.port, device_id=DEV, **base)


@pytest.fixture
def stub(broker: BrokerService) -> Iterator[IngestStub]:
    s = IngestStub(broker)
    s.connect()
    yield s
    s.close()


@pytest.fixture
def device(broker: BrokerService, tmp_path: Path) -> Iterator[Callable[..., AgentMqtt]]:
    made: list[tuple[AgentMqtt, Outbox]] = []

    def start(factory: Callable[[str, MQTTProtocolVersion], paho.Client] = paho_client, **kw: Any) -> AgentMqtt:
        handlers = {k: kw.pop(k) for k in ("on_command", "on_ack") if k in kw}
        ob = Outbox(tmp_path / "outbox.sqlite").open()
        mqtt = AgentMqtt(settings_for(broker, **kw), ob, client_factory=factory, **handlers)
        mqtt.start()
        made.append((mqtt, ob))
        assert mqtt.wait_connected(10), mqtt.stats()
        return mqtt

    yield start
    for mqtt, ob in made:
        mqtt.stop()
        ob.close()


@pytest.mark.integration
def test_publish_qos1_reaches_server_and_server_ack_empties_outbox(
        broker: BrokerService, stub: IngestStub, device: Callable[..., AgentMqtt]) -> None:
    mqtt = device()
    for _ in range(50):
        mqtt.outbox.append("events", event)
    wait_until(lambda: mqtt.outbox.stats().pending == 0, 10, what="the server's acks")
    assert stub.seqs(DEV, "events") == list(range(50))
    assert sum(stub.duplicates.values()) == 0
    assert mqtt.stats().protocol == ("5" if broker.kind == "mosquitto" else "3.1.1")
    assert stub.states(DEV)[-1] == "online"


@pytest.mark.integration
def test_last_will_marks_offline_on_abrupt_disconnect(
        broker: BrokerService, stub: IngestStub, device: Callable[..., AgentMqtt]) -> None:
    clients: list[paho.Client] = []

    def factory(client_id: str, protocol: MQTTProtocolVersion) -> paho.Client:
        clients.append(paho_client(client_id, protocol))
        return clients[-1]

    mqtt = device(factory=factory)
    wait_until(lambda: stub.states(DEV)[-1:] == ["online"], 5, what="the online status")
    sock = clients[-1].socket()
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)  # the link dies: no DISCONNECT packet
    wait_until(lambda: "offline" in stub.states(DEV), 10, what="the broker to publish the last will")
    wait_until(lambda: stub.states(DEV)[-1:] == ["online"] and mqtt.connected, 10, what="the reconnect")
    assert mqtt.stats().disconnects == 1


@pytest.mark.integration
def test_reconnect_after_broker_restart_with_the_same_persistent_session(
        broker: BrokerService, stub: IngestStub, device: Callable[..., AgentMqtt]) -> None:
    commands: list[bytes] = []
    mqtt = device(on_command=lambda topic, payload: commands.append(payload))
    broker.restart()
    wait_until(lambda: mqtt.stats().connects == 2, 15, what="the reconnect after the broker restart")
    stub.connected.wait(10)
    # mosquitto (persistence on) still has the session; the embedded broker forgot it: subscribed again either way
    assert mqtt.stats().session_present is broker.persistent
    command = Command(device_id=DEV, command_id="cmd-1", kind="deploy", order={"signed": {}}, sent_at=1.0)
    wait_until(lambda: (stub.send_command(command), time.sleep(0.1), bool(commands))[2], 10,
               what="a command through the new connection")
    mqtt.outbox.append("events", event)
    wait_until(lambda: stub.seqs(DEV, "events") == [0] and mqtt.outbox.stats().pending == 0, 10, what="the ack")


@pytest.mark.integration
def test_graceful_stop_publishes_offline_without_the_will(
        broker: BrokerService, stub: IngestStub, device: Callable[..., AgentMqtt]) -> None:
    mqtt = device()
    wait_until(lambda: stub.states(DEV)[-1:] == ["online"], 5, what="the online status")
    mqtt.stop()
    wait_until(lambda: stub.states(DEV)[-1:] == ["offline"], 5, what="the offline status")


@pytest.mark.integration
def test_embedded_broker_runs_threads_cleanly(embedded_broker: BrokerService) -> None:
    before = threading.active_count()
    from fleet_server.broker import EmbeddedBroker

    extra = EmbeddedBroker()
    port = extra.start()
    assert port > 0 and port != embedded_broker.port
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    extra.stop()
    extra.stop()  # idempotent
    wait_until(lambda: threading.active_count() <= before, 5, what="the broker thread to end")
