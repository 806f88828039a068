"""The device simulator: simulated agents speak the real wire contract, and the real server ingests them.

Two layers: :class:`SimDevice` driven by a fake host with a virtual clock (exact, fast: event sequences, dedupe,
cancel rules, outbox), and :class:`SimulatedFleet` over real brokers (mosquitto and the embedded amqtt broker) with
the real ``MqttIngestService`` + ``BatchWriter`` writing into a real database (SQLite; one test on PostgreSQL).
Commands are real signed orders (``tests/updater/support.py``) in real ``Command`` frames.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy.engine import Engine

from agent.bundle import TrustRoot
from agent.drift import Summary, score_summary
from agent.protocol import (
    Ack,
    Channel,
    Command,
    DriftWindow,
    Event,
    Heartbeat,
    Message,
    Status,
    decode,
    device_topic,
    encode,
    validate_deploy_event,
)
from fleet_server.db import create_db_engine
from fleet_server.ingest import BatchWriter, Ingestor
from fleet_server.migrate import upgrade
from fleet_server.mqtt import MqttIngestService
from fleet_server.settings import FleetSettings
from fleet_server.simulator import (
    DeviceGroup,
    Download,
    Fractions,
    Latencies,
    OfflinePlan,
    Outcome,
    Scenario,
    ScenarioError,
    SimDevice,
    SimStats,
    SimulatedFleet,
    VersionBehaviour,
    WindowFactory,
    plan_devices,
    register_devices,
)
from fleet_server.simulator.download import fetch_bundle
from fleet_server.simulator.windows import LATENCY_EDGES_US, default_baseline
from tests.services.mqtt import BrokerService, wait_until
from tests.sim.fleet_http import FleetHttpSim
from tests.updater.support import Keys, make_bundle, make_order

MODEL = "cancer-mlp"
FAST = Latencies(received=0.0, downloading=0.0, verified=0.01, installed=0.01, healthy=0.01, jitter=0.0)
DEPLOY_OK = ["received", "downloading", "verified", "installed", "healthy"]


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def bundle(keys: Keys) -> bytes:
    return make_bundle(keys, version=2)


@pytest.fixture(scope="module")
def root(keys: Keys) -> TrustRoot:
    return TrustRoot.from_bytes(keys.root_bytes())


_seq = itertools.count(1)


def command(keys: Keys, bundle: bytes, device: str, *, kind: str = "deploy", cancels: str | None = None,
            command_id: str | None = None, sequence: int | None = None, url: str = "http://127.0.0.1:9/b",
            token: str = "tok", **kw: Any) -> Command:
    seq = sequence if sequence is not None else next(_seq)
    order = make_order(keys, bundle, device_id=kw.pop("order_device", device), url=url, token=token, sequence=seq,
                       command_id=command_id or f"cmd-{uuid.uuid4().hex[:10]}", action=kind, cancels=cancels, **kw)
    return Command(device_id=device, command_id=order["signed"]["command_id"], kind=kind, order=order,  # type: ignore[arg-type]
                   sent_at=time.time())


# -- a fake host with a virtual clock -----------------------------------------------------------------------------


class FakeHost:
    """DeviceHost for unit tests: virtual time, recorded publishes, manual downloads."""

    def __init__(self) -> None:
        self.stats = SimStats()
        self.t = 0.0
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._n = itertools.count()
        self.sent: list[tuple[Channel, Message, bool]] = []
        self.link_up = True
        self.downloads: list[tuple[Any, Callable[[str | None], None]]] = []

    def now(self) -> float:
        return self.t

    def wall(self) -> float:
        return time.time() + self.t

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (self.t + delay, next(self._n), fn))

    def publish(self, device: SimDevice, channel: Channel, payload: bytes, *, retain: bool = False) -> bool:
        if not self.link_up:
            return False
        self.sent.append((channel, decode(payload), retain))
        return True

    def download(self, device: SimDevice, order: Any, done: Callable[[str | None], None]) -> None:
        self.downloads.append((order, done))

    def advance(self, dt: float) -> None:
        end = self.t + dt
        while self._timers and self._timers[0][0] <= end:
            when, _, fn = heapq.heappop(self._timers)
            self.t = max(self.t, when)
            fn()
        self.t = end

    def events(self, command_id: str | None = None) -> list[Event]:
        return [m for _, m, _ in self.sent
                if isinstance(m, Event) and (command_id is None or m.command_id == command_id)]

    def kinds(self, command_id: str) -> list[str]:
        return [e.kind for e in self.events(command_id)]


def sim_device(root: TrustRoot | None, *, latency: Latencies = FAST, outcome_fractions: Fractions | None = None,
               installed: dict[str, int] | None = None, **scenario_kw: Any) -> tuple[SimDevice, FakeHost]:
    scenario = Scenario(groups=(DeviceGroup(count=1, installed=installed or {MODEL: 1}, latency=latency,
                                            fractions=outcome_fractions),),
                        heartbeat_s=3600, window_s=3600, **scenario_kw)
    host = FakeHost()
    dev = SimDevice(plan_devices(scenario)[0], scenario, host, WindowFactory(scenario), trust_root=root)
    dev.start()
    dev.on_connected()
    return dev, host


def deliver(dev: SimDevice, cmd: Command) -> None:
    dev.on_message(device_topic(dev.device_id, Channel.COMMANDS), encode(cmd))


def ack(dev: SimDevice, stream: str, seqs: tuple[tuple[int, int], ...],
        missing: tuple[tuple[int, int], ...] = ()) -> None:
    frame = encode(Ack(device_id=dev.device_id, stream=stream, seqs=seqs, missing=missing))
    dev.on_message(device_topic(dev.device_id, Channel.ACKS), frame)


# -- unit tests on one simulated agent ---------------------------------------------------------------------------


def test_connect_announces_online_status_and_heartbeat(root: TrustRoot) -> None:
    dev, host = sim_device(root)
    (ch, status, retained), (ch2, beat, _) = host.sent[:2]
    assert ch is Channel.STATUS and retained and isinstance(status, Status) and status.state == "online"
    assert [(m.name, m.version) for m in status.models] == [(MODEL, 1)]
    assert ch2 is Channel.HEARTBEAT and isinstance(beat, Heartbeat)
    will = decode(dev.offline_status())
    assert isinstance(will, Status) and will.state == "offline" and will.sent_at is None


def test_signed_deploy_walks_every_step_and_republishes_status(keys: Keys, bundle: bytes, root: TrustRoot) -> None:
    dev, host = sim_device(root)
    cmd = command(keys, bundle, dev.device_id)
    deliver(dev, cmd)
    host.advance(1.0)
    events = host.events(cmd.command_id)
    assert [e.kind for e in events] == DEPLOY_OK
    assert [e.stream_seq for e in events] == list(range(5))
    for e in events:
        validate_deploy_event(e)
        assert (e.model, e.version) == (MODEL, 2)
    statuses = [m for ch, m, _ in host.sent if isinstance(m, Status)]
    assert [(m.name, m.version) for m in statuses[-1].models] == [(MODEL, 2)]
    assert dev.models == {MODEL: 2} and dev.applied[cmd.command_id] == ("healthy", None)


def test_resent_command_is_answered_with_its_latest_event_not_reapplied(keys: Keys, bundle: bytes,
                                                                         root: TrustRoot) -> None:
    dev, host = sim_device(root, latency=Latencies(verified=5.0, jitter=0.0))
    cmd = command(keys, bundle, dev.device_id)
    deliver(dev, cmd)
    host.advance(1.0)
    deliver(dev, cmd)  # still downloading: answered with the latest event, not started again
    assert host.kinds(cmd.command_id) == ["received", "downloading", "downloading"]
    assert host.events(cmd.command_id)[-1].detail["message"] == "in progress"
    host.advance(10.0)
    deliver(dev, cmd)  # finished: the recorded outcome again
    kinds = host.kinds(cmd.command_id)
    assert kinds == ["received", "downloading", "downloading", "verified", "installed", "healthy", "healthy"]
    assert host.events(cmd.command_id)[-1].detail["message"] == "already applied"
    assert host.stats.version_changes == 1 and host.stats.commands_duplicate == 2
    assert host.stats.events_sent == {k: 1 for k in DEPLOY_OK}  # repeat answers are not new events


def test_orders_for_another_device_or_badly_signed_or_replayed_are_rejected(keys: Keys, bundle: bytes,
                                                                             root: TrustRoot) -> None:
    dev, host = sim_device(root)
    other = command(keys, bundle, dev.device_id, order_device="sim-99999")
    deliver(dev, other)
    forged = command(keys, bundle, dev.device_id, signers=[Keys().orders[0]])
    deliver(dev, forged)
    good = command(keys, bundle, dev.device_id, sequence=500)
    deliver(dev, good)
    replay = command(keys, bundle, dev.device_id, sequence=400)
    deliver(dev, replay)
    host.advance(1.0)
    for cmd, reason in ((other, "order"), (forged, "signature"), (replay, "order")):
        events = host.events(cmd.command_id)
        assert [(e.kind, e.reason) for e in events] == [("rejected", reason)], cmd.command_id
        validate_deploy_event(events[0])
    assert host.kinds(good.command_id) == DEPLOY_OK
    assert dev.models == {MODEL: 2}
    assert dict(host.stats.commands_rejected) == {"order": 2, "signature": 1}


def test_cancel_before_install_cancels_and_after_install_is_too_late(keys: Keys, bundle: bytes,
                                                                      root: TrustRoot) -> None:
    dev, host = sim_device(root, latency=Latencies(downloading=0.0, verified=10.0, installed=0.0, healthy=10.0,
                                                   jitter=0.0))
    first = command(keys, bundle, dev.device_id)
    deliver(dev, first)
    host.advance(1.0)
    stop = command(keys, bundle, dev.device_id, kind="cancel", cancels=first.command_id)
    deliver(dev, stop)
    host.advance(30.0)
    assert host.kinds(first.command_id) == ["received", "downloading", "cancelled"]
    assert host.events(first.command_id)[-1].detail["cancelled_by"] == stop.command_id
    assert host.kinds(stop.command_id) == ["received", "cancelled"]
    assert host.events(stop.command_id)[-1].detail["cancels"] == first.command_id
    assert dev.models == {MODEL: 1}

    second = command(keys, bundle, dev.device_id)
    deliver(dev, second)
    host.advance(10.5)  # installed, health check still running
    assert host.kinds(second.command_id)[-1] == "installed"
    late = command(keys, bundle, dev.device_id, kind="cancel", cancels=second.command_id)
    deliver(dev, late)
    host.advance(30.0)
    assert host.kinds(late.command_id) == ["received", "rejected"]
    assert host.events(late.command_id)[-1].reason == "too_late"
    assert host.kinds(second.command_id)[-1] == "healthy"
    after = command(keys, bundle, dev.device_id, kind="cancel", cancels=second.command_id)
    deliver(dev, after)
    assert [(e.kind, e.reason) for e in host.events(after.command_id)] == [("received", None), ("rejected", "too_late")]
    for e in host.events():
        validate_deploy_event(e)


@pytest.mark.parametrize(("outcome", "expected"), [
    (Fractions(fail=1.0), [("received", None), ("downloading", None), ("failed", "download")]),
    (Fractions(reject=1.0), [("received", None), ("downloading", None), ("rejected", "incompatible")]),
    (Fractions(rollback=1.0), [("received", None), ("downloading", None), ("verified", None), ("installed", None),
                               ("rolled_back", "health_check")]),
    (Fractions(silent=1.0), []),
])
def test_configured_outcomes(keys: Keys, bundle: bytes, root: TrustRoot, outcome: Fractions,
                             expected: list[tuple[str, str | None]]) -> None:
    dev, host = sim_device(root, outcome_fractions=outcome)
    cmd = command(keys, bundle, dev.device_id)
    deliver(dev, cmd)
    host.advance(1.0)
    assert [(e.kind, e.reason) for e in host.events(cmd.command_id)] == expected
    assert dev.models == {MODEL: 1}  # nothing changed, or rolled back to 1
    retry = command(keys, bundle, dev.device_id)  # bad_attempts=1: the next order succeeds (except silent)
    deliver(dev, retry)
    host.advance(1.0)
    assert host.kinds(retry.command_id) == ([] if outcome.silent else DEPLOY_OK)


def test_version_rule_older_needs_allow_downgrade_and_same_version_is_healthy(keys: Keys, bundle: bytes,
                                                                             root: TrustRoot) -> None:
    dev, host = sim_device(root, installed={MODEL: 3})
    older = command(keys, bundle, dev.device_id)
    deliver(dev, older)
    host.advance(1.0)
    assert [(e.kind, e.reason) for e in host.events(older.command_id)][-1] == ("rejected", "rollback")
    down = command(keys, bundle, dev.device_id, allow_downgrade=True)
    deliver(dev, down)
    host.advance(1.0)
    assert host.kinds(down.command_id) == DEPLOY_OK and dev.models == {MODEL: 2}
    same = command(keys, bundle, dev.device_id)
    deliver(dev, same)
    host.advance(1.0)
    assert host.kinds(same.command_id) == ["received", "downloading", "verified", "healthy"]
    assert host.stats.version_changes == 1


def test_outbox_keeps_messages_until_the_server_acks_and_resends_on_timeout_and_missing(
        keys: Keys, bundle: bytes, root: TrustRoot) -> None:
    dev, host = sim_device(root, ack_timeout_s=5.0)
    cmd = command(keys, bundle, dev.device_id)
    deliver(dev, cmd)
    host.advance(1.0)
    assert dev.unacked == {"events": 5, "drift": 0}
    ack(dev, "events", ((0, 1), (3, 3)), missing=((2, 2),))
    assert dev.unacked["events"] == 2
    assert [e.stream_seq for e in host.events()][-1] == 2  # the missing one went out again at once
    host.t += 6.0
    assert dev.check_outbox(host.t)
    assert [e.stream_seq for e in host.events()][-2:] == [2, 4]  # go-back-N after the ack timeout
    assert host.stats.go_backs == 1
    ack(dev, "events", ((0, 4),))
    assert dev.unacked == {"events": 0, "drift": 0}
    assert not dev.check_outbox(host.t)
    host.link_up = False  # away: windows wait in the outbox, sent after the reconnect
    dev.on_disconnected()
    dev.send_windows()
    assert dev.unacked["drift"] == 1
    host.link_up = True
    dev.on_connected()
    assert isinstance(host.sent[-1][1], DriftWindow) and host.stats.resent >= 3


def test_a_deploy_waits_for_the_running_one_and_a_cancel_for_an_unknown_command_is_remembered(
        keys: Keys, bundle: bytes, root: TrustRoot) -> None:
    dev, host = sim_device(root, latency=Latencies(verified=2.0, jitter=0.0))
    early = command(keys, bundle, dev.device_id, kind="cancel", cancels="cmd-later")
    deliver(dev, early)
    first = command(keys, bundle, dev.device_id)
    later = command(keys, bundle, dev.device_id, command_id="cmd-later")
    deliver(dev, first)
    deliver(dev, later)
    host.advance(10.0)
    assert host.kinds(early.command_id) == ["received", "cancelled"]
    assert host.kinds(first.command_id) == DEPLOY_OK
    assert host.kinds("cmd-later") == ["received", "cancelled"]


def test_without_a_trust_root_orders_are_unverified_but_device_replay_and_expiry_still_hold(
        keys: Keys, bundle: bytes) -> None:
    dev, host = sim_device(None)
    forged = command(keys, bundle, dev.device_id, signers=[Keys().orders[0]], sequence=10)
    deliver(dev, forged)  # no root: the signature is not checked (benchmarks without keys)
    stolen = command(keys, bundle, dev.device_id, order_device="sim-55555", sequence=11)
    replay = command(keys, bundle, dev.device_id, sequence=10)
    expired = command(keys, bundle, dev.device_id, sequence=12, issued_at=time.time() - 7200, expires_in=3600)
    for cmd in (stolen, replay, expired):
        deliver(dev, cmd)
    host.advance(1.0)
    assert host.kinds(forged.command_id) == DEPLOY_OK
    assert [(e.kind, e.reason) for c in (stolen, replay, expired) for e in host.events(c.command_id)] == [
        ("rejected", "order"), ("rejected", "order"), ("rejected", "stale")]


def test_state_survives_a_restart_so_sequences_continue(keys: Keys, bundle: bytes, root: TrustRoot) -> None:
    dev, host = sim_device(root)
    deliver(dev, command(keys, bundle, dev.device_id, sequence=50))
    host.advance(1.0)
    saved = dev.snapshot_state()
    again, host2 = sim_device(root)
    again.restore(saved)
    replay = command(keys, bundle, dev.device_id, sequence=50)
    deliver(again, replay)
    assert [(e.kind, e.reason, e.stream_seq) for e in host2.events()] == [("rejected", "order", 5)]
    assert again.models == {MODEL: 2}


# -- scenario, determinism, drift and SLIs ------------------------------------------------------------------------


def test_outcome_fractions_are_exact_and_reproducible_with_a_seed() -> None:
    fr = Fractions(fail=0.05, reject=0.03, rollback=0.02, silent=0.01, offline=0.1)
    scenario = Scenario(seed=7, groups=(DeviceGroup(count=1000, labels={"ring": "canary"}),), fractions=fr)
    plans = plan_devices(scenario)
    counts = {o: sum(1 for p in plans if p.outcome is o) for o in Outcome}
    assert counts == {Outcome.FAIL: 50, Outcome.REJECT: 30, Outcome.ROLLBACK: 20, Outcome.SILENT: 10,
                      Outcome.OK: 890}
    assert sum(p.offline for p in plans) == 100
    assert plan_devices(scenario) == plans
    other = plan_devices(Scenario(seed=8, groups=scenario.groups, fractions=fr))
    assert [p.device_id for p in other] == [p.device_id for p in plans]
    assert {p.device_id for p in other if p.outcome is Outcome.FAIL} != {p.device_id for p in plans
                                                                         if p.outcome is Outcome.FAIL}
    assert plans[0].device_id == "sim-00000" and plans[0].labels == {"ring": "canary"}


def test_scenario_loads_from_toml_and_names_the_bad_field(tmp_path: Path) -> None:
    text = """
seed = 3
id_prefix = "lab"
heartbeat_s = 5
[fractions]
fail = 0.1
[latency]
verified = 0.5
[download]
fraction = 0.5
mode = "full"
[[groups]]
name = "canary"
count = 10
profile = "raspberry-pi-4"
labels = { ring = "canary", site = "berlin" }
installed = { "cancer-mlp" = 1 }
[groups.fractions]
rollback = 0.5
[[groups]]
name = "rest"
count = 20
[[versions]]
model = "cancer-mlp"
version = 2
drift_shift = 1.5
error_rate = 0.1
"""
    path = tmp_path / "scenario.toml"
    path.write_text(text)
    s = Scenario.from_toml(path)
    assert s.device_count == 30 and s.groups[0].labels == {"ring": "canary", "site": "berlin"}
    assert s.groups[0].fractions == Fractions(fail=0.1, rollback=0.5) and s.groups[1].fractions is None
    assert s.download.mode == "full"
    assert s.behaviour(MODEL, 2).drift_shift == 1.5 and s.behaviour(MODEL, 1).drift_shift == 0.0
    plans = plan_devices(s)
    assert plans[0].device_id == "lab-00000" and sum(p.outcome is Outcome.ROLLBACK for p in plans) == 5
    assert sum(p.outcome is Outcome.FAIL for p in plans) == 1 + 2  # 10 % of the canary group and of the rest
    for bad, field in (("[fractions]\nfail = 2\n", "fractions.fail"), ("colour = 1\n", "colour"),
                       ("[[groups]]\ncount = 1\nprofile = \"toaster\"\n", "groups[0].profile"),
                       ("[[groups]]\ncount = 1\n[groups.fractions]\nfail = 0.7\nreject = 0.7\n",
                        "groups[0].fractions"),
                       ("[[groups]]\ncount = -1\n", "groups[0].count"), ("id_prefix = \"Bad/Id\"\n", "id_prefix")):
        with pytest.raises(ScenarioError) as info:
            Scenario.from_toml(bad)
        assert info.value.field == field, bad


def test_windows_drift_by_version_and_slis_use_the_agent_format() -> None:
    from agent.telemetry.slis import LATENCY_EDGES_US as AGENT_EDGES
    from agent.telemetry.slis import latency_quantiles

    assert LATENCY_EDGES_US == AGENT_EDGES
    scenario = Scenario(seed=1, window_samples=2000, versions=(
        VersionBehaviour(version=2, model=MODEL, drift_shift=2.0, error_rate=0.2, latency_ms=40.0),))
    base = default_baseline(seed=5)
    factory = WindowFactory(scenario, {MODEL: base})
    calm, calm_slis = factory.variant("sim-00000", MODEL, 1, 0)
    drifted, bad_slis = factory.variant("sim-00000", MODEL, 2, 0)
    calm_report = score_summary(base, Summary.from_dict({"layout": 1, "features": calm}))
    drift_report = score_summary(base, Summary.from_dict({"layout": 1, "features": drifted}))
    assert calm_report.level == "ok" and drift_report.level == "alert"
    assert calm_slis["requests"] == 2000 and "errors" not in calm_slis
    assert 0.15 < bad_slis["errors"]["inference_failed"] / bad_slis["requests"] < 0.25
    p50 = latency_quantiles(bad_slis)["p50"]
    assert p50 is not None and 30_000 < p50 < 55_000
    assert factory.variant("sim-00000", MODEL, 2, 0) is factory.variant("sim-00000", MODEL, 2, 0)


def test_windows_use_the_bundle_baseline_the_server_scores_against(bundle: bytes) -> None:
    from fleet_server.simulator import bundle_baseline

    key, base = bundle_baseline(bundle)
    assert key == (MODEL, 2)
    scenario = Scenario(window_samples=500, versions=(VersionBehaviour(version=2, drift_shift=3.0),))
    factory = WindowFactory(scenario, {key: base})
    assert factory.baseline(MODEL, 2) is base and factory.baseline(MODEL, 1) is not base
    features, _ = factory.variant("sim-00001", MODEL, 2, 3)
    assert list(features) == list(base.names)  # the bundle's features, in its layout order
    assert score_summary(base, Summary.from_dict({"layout": 1, "features": features})).level == "alert"


# -- over real brokers, ingested by the real server --------------------------------------------------------------


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    eng = create_db_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    upgrade(eng)
    yield eng
    eng.dispose()


class Server:
    """The server's side for these tests: the real ingestion service, plus a paho client publishing commands."""

    def __init__(self, broker: BrokerService, engine: Engine) -> None:
        self.engine = engine
        self.broker = broker
        self.settings = FleetSettings(
            database_url=engine.url.render_as_string(hide_password=False), mqtt_host=broker.host,
            mqtt_port=broker.port, ingest_ack_interval_s=0.05, mqtt_client_id=f"fleet-{uuid.uuid4().hex[:8]}",
            mqtt_protocol="5" if broker.kind == "mosquitto" else "3.1.1")
        self.service = MqttIngestService(self.settings, BatchWriter(engine, Ingestor(
            max_frame_bytes=self.settings.ingest_max_frame_bytes)))
        self.service.start()
        assert self.service.wait_subscribed(10)
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"cmd-{uuid.uuid4().hex[:8]}",
                                  protocol=paho.MQTTv311)
        connected = threading.Event()
        self.client.on_connect = lambda *a: connected.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert connected.wait(10)

    def send(self, cmd: Command) -> None:
        self.client.publish(device_topic(cmd.device_id, Channel.COMMANDS), encode(cmd), qos=1).wait_for_publish(5)

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params))

    def events(self, device: str, command_id: str) -> list[tuple[str, str | None]]:
        return [(r.kind, r.reason) for r in self.rows(
            "SELECT kind, reason FROM events WHERE device_id = :d AND command_id = :c ORDER BY seq",
            d=device, c=command_id)]

    def wait_events(self, device: str, command_id: str, count: int, timeout: float = 15.0) -> list[
            tuple[str, str | None]]:
        wait_until(lambda: len(self.events(device, command_id)) >= count, timeout, what=f"{count} events")
        return self.events(device, command_id)

    def status(self, device: str) -> str | None:
        rows = self.rows("SELECT last_status FROM devices WHERE id = :d", d=device)
        return rows[0].last_status if rows else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.service.stop()


@pytest.fixture
def server(broker: BrokerService, sqlite_engine: Engine) -> Iterator[Server]:
    s = Server(broker, sqlite_engine)
    yield s
    s.close()


def start_fleet(scenario: Scenario, broker: BrokerService, **kw: Any) -> SimulatedFleet:
    fleet = SimulatedFleet(scenario, broker.host, broker.port, **kw)
    fleet.start()
    assert fleet.wait_connected(30)
    return fleet


@pytest.mark.integration
def test_frames_are_ingested_by_the_real_service(broker: BrokerService, server: Server) -> None:
    scenario = Scenario(seed=2, groups=(DeviceGroup(count=4, installed={MODEL: 1}, labels={"site": "lab"}),),
                        heartbeat_s=0.2, window_s=0.2)
    fleet = start_fleet(scenario, broker, mode="per_device")
    try:
        ids = fleet.device_ids

        def ingested() -> bool:
            rows = server.rows("SELECT COUNT(*) AS n FROM devices WHERE last_status = 'online' AND uptime_s > 0 "
                               "AND agent_version = 'sim-0.1'")
            windows = server.rows("SELECT device_id, COUNT(*) AS n FROM drift_windows GROUP BY device_id")
            return rows[0].n == 4 and len(windows) == 4 and all(w.n >= 2 for w in windows)

        wait_until(ingested, 20, what="status, heartbeats and windows of 4 devices in the database")
        window = server.rows("SELECT model, version, samples, slis FROM drift_windows LIMIT 1")[0]
        assert (window.model, window.version, window.samples) == (MODEL, 1, 200)
        models = server.rows("SELECT models FROM devices WHERE id = :d", d=ids[0])[0].models
        assert '"version": 1' in models or '"version":1' in models
        wait_until(lambda: fleet.stats().acks_received >= 8, 10, what="acks from the server")
        assert server.service.metrics.rejected == {} and fleet.stats().invalid_inbound == 0
        fleet.go_offline(ids[0])  # per-device mode: no DISCONNECT, the broker publishes the last will
        wait_until(lambda: server.status(ids[0]) == "offline", 30, what="the last will")
        assert server.status(ids[1]) == "online"
    finally:
        fleet.stop()
    wait_until(lambda: all(server.status(d) == "offline" for d in ids), 10, what="offline statuses at stop")


@pytest.mark.integration
def test_signed_deploy_reaches_the_database_as_the_exact_event_sequence(broker: BrokerService, server: Server,
                                                                        keys: Keys, bundle: bytes) -> None:
    scenario = Scenario(groups=(DeviceGroup(count=2, installed={MODEL: 1}, latency=FAST),), heartbeat_s=30,
                        window_s=3600)
    fleet = start_fleet(scenario, broker, trust_root=keys.root_bytes())
    try:
        dev = fleet.device_ids[0]
        cmd = command(keys, bundle, dev)
        server.send(cmd)
        assert server.wait_events(dev, cmd.command_id, 5) == [(k, None) for k in DEPLOY_OK]
        seqs = [r.seq for r in server.rows("SELECT seq FROM events WHERE device_id = :d ORDER BY seq", d=dev)]
        assert seqs == list(range(5))
        wait_until(lambda: '"version": 2' in str(server.rows("SELECT models FROM devices WHERE id = :d", d=dev)[0]
                                                 .models).replace('"version":2', '"version": 2'),
                   10, what="the status after the version change")
        assert fleet.versions(MODEL) == {dev: 2, fleet.device_ids[1]: 1}
        assert server.service.metrics.deploy_rule_violations == 0
        # A duplicate delivery of the same command: answered once more, never applied again.
        server.send(cmd)
        assert server.wait_events(dev, cmd.command_id, 6)[-1] == ("healthy", None)
        stats = fleet.stats()
        assert stats.commands_duplicate == 1 and stats.version_changes == 1
        assert fleet.kinds(dev, cmd.command_id) == [*DEPLOY_OK, "healthy"]
        wait_until(lambda: fleet.unacked() == 0, 10, what="every event acknowledged by the server")
    finally:
        fleet.stop()


@pytest.mark.integration
def test_wrong_device_and_badly_signed_orders_are_rejected_over_mqtt(broker: BrokerService, server: Server,
                                                                     keys: Keys, bundle: bytes) -> None:
    scenario = Scenario(groups=(DeviceGroup(count=1, installed={MODEL: 1}, latency=FAST),), heartbeat_s=30,
                        window_s=3600)
    fleet = start_fleet(scenario, broker, trust_root=keys.root_bytes())
    try:
        dev = fleet.device_ids[0]
        stolen = command(keys, bundle, dev, order_device="sim-77777")
        forged = command(keys, bundle, dev, signers=[Keys().orders[0]])
        server.send(stolen)
        server.send(forged)
        assert server.wait_events(dev, stolen.command_id, 1) == [("rejected", "order")]
        assert server.wait_events(dev, forged.command_id, 1) == [("rejected", "signature")]
        assert fleet.versions(MODEL) == {dev: 1}
    finally:
        fleet.stop()


@pytest.mark.integration
def test_cancel_before_and_after_install_over_mqtt(broker: BrokerService, server: Server, keys: Keys,
                                                   bundle: bytes) -> None:
    slow = Latencies(downloading=0.0, verified=30.0, installed=0.0, healthy=0.0, jitter=0.0)
    scenario = Scenario(groups=(DeviceGroup(name="slow", count=1, installed={MODEL: 1}, latency=slow),
                                DeviceGroup(name="fast", count=1, installed={MODEL: 1}, latency=FAST)),
                        heartbeat_s=30, window_s=3600)
    fleet = start_fleet(scenario, broker, trust_root=keys.root_bytes())
    try:
        slow_dev, fast_dev = fleet.device_ids
        first = command(keys, bundle, slow_dev)
        server.send(first)
        server.wait_events(slow_dev, first.command_id, 2)  # received, downloading
        stop = command(keys, bundle, slow_dev, kind="cancel", cancels=first.command_id)
        server.send(stop)
        assert server.wait_events(slow_dev, stop.command_id, 2) == [("received", None), ("cancelled", None)]
        assert server.wait_events(slow_dev, first.command_id, 3) == [
            ("received", None), ("downloading", None), ("cancelled", None)]
        done = command(keys, bundle, fast_dev)
        server.send(done)
        server.wait_events(fast_dev, done.command_id, 5)
        late = command(keys, bundle, fast_dev, kind="cancel", cancels=done.command_id)
        server.send(late)
        assert server.wait_events(fast_dev, late.command_id, 2) == [("received", None), ("rejected", "too_late")]
        assert fleet.versions(MODEL) == {slow_dev: 1, fast_dev: 2}
    finally:
        fleet.stop()


@pytest.mark.integration
def test_failure_outcomes_follow_the_seeded_fractions_on_the_wire(broker: BrokerService, server: Server,
                                                                  keys: Keys, bundle: bytes) -> None:
    fractions = Fractions(fail=0.25, reject=0.125, rollback=0.125, silent=0.125)
    scenario = Scenario(seed=11, groups=(DeviceGroup(count=8, installed={MODEL: 1}, latency=FAST),),
                        fractions=fractions, heartbeat_s=30, window_s=3600)
    fleet = start_fleet(scenario, broker, trust_root=keys.root_bytes())
    try:
        cmds = {}
        for plan in fleet.plans:
            cmds[plan.device_id] = command(keys, bundle, plan.device_id)
            server.send(cmds[plan.device_id])
        wait_until(lambda: fleet.stats().commands_received == 8, 15, what="all commands delivered")
        expected = {Outcome.OK: DEPLOY_OK[-1], Outcome.FAIL: "failed", Outcome.REJECT: "rejected",
                    Outcome.ROLLBACK: "rolled_back"}
        finals: dict[str, str] = {}
        for plan in fleet.plans:
            if plan.outcome is Outcome.SILENT:
                continue
            device, cmd_id = plan.device_id, cmds[plan.device_id].command_id
            server.wait_events(device, cmd_id, 1)

            def finished(device: str = device, cmd_id: str = cmd_id) -> bool:
                return server.events(device, cmd_id)[-1][0] in ("healthy", "failed", "rejected", "rolled_back")

            wait_until(finished, 15, what=f"{device} to finish")
            kinds = [k for k, _ in server.events(device, cmd_id)]
            finals[plan.device_id] = kinds[-1]
            assert kinds[-1] == expected[plan.outcome], plan
        assert sorted(finals.values()) == sorted(["healthy"] * 3 + ["failed"] * 2 + ["rejected", "rolled_back"])
        silent = [p.device_id for p in fleet.plans if p.outcome is Outcome.SILENT]
        assert len(silent) == 1 and fleet.stats().commands_ignored == 1
        assert server.events(silent[0], cmds[silent[0]].command_id) == []
        same_plans = SimulatedFleet(scenario, broker.host, broker.port).plans
        assert [p.outcome for p in same_plans] == [p.outcome for p in fleet.plans]
    finally:
        fleet.stop()


@pytest.mark.integration
def test_offline_device_answers_a_command_sent_while_it_was_away(broker: BrokerService, server: Server,
                                                                 keys: Keys, bundle: bytes) -> None:
    scenario = Scenario(groups=(DeviceGroup(count=1, installed={MODEL: 1}, latency=FAST),), heartbeat_s=30,
                        window_s=3600)
    fleet = start_fleet(scenario, broker, trust_root=keys.root_bytes(), mode="per_device")
    try:
        dev = fleet.device_ids[0]
        wait_until(lambda: server.status(dev) == "online", 10, what="online")
        fleet.go_offline(dev)
        wait_until(lambda: server.status(dev) == "offline", 30, what="the last will")
        cmd = command(keys, bundle, dev)
        server.send(cmd)  # QoS 1 to a persistent session: mosquitto queues it; the embedded broker does not
        fleet.go_online(dev)
        assert fleet.wait_connected(10)
        if broker.queues_offline:
            assert server.wait_events(dev, cmd.command_id, 5) == [(k, None) for k in DEPLOY_OK]
            assert fleet.stats().commands_received == 1
        else:
            def resend_until_received() -> bool:  # what the command bridge does until an event names the command
                if server.events(dev, cmd.command_id):
                    return True
                server.send(cmd)
                return False

            wait_until(resend_until_received, 15, interval=0.3, what="the resent command to be received")
            assert server.wait_events(dev, cmd.command_id, 5) == [(k, None) for k in DEPLOY_OK]
        assert server.status(dev) == "online"
    finally:
        fleet.stop()


@pytest.mark.integration
def test_planned_offline_devices_leave_with_their_will_and_come_back(broker: BrokerService, server: Server) -> None:
    scenario = Scenario(seed=3, groups=(DeviceGroup(count=4, installed={MODEL: 1}),), heartbeat_s=30, window_s=3600,
                        fractions=Fractions(offline=0.5), offline=OfflinePlan(after_s=0.3, for_s=1.5))
    away = {p.device_id for p in plan_devices(scenario) if p.offline}
    assert len(away) == 2
    fleet = start_fleet(scenario, broker, mode="per_device")
    try:
        seen_offline: set[str] = set()

        def both_left() -> bool:
            seen_offline.update(d for d in away if server.status(d) == "offline")
            return seen_offline == away

        wait_until(both_left, 30, what="the planned devices' last wills")
        wait_until(lambda: all(server.status(d) == "online" for d in fleet.device_ids), 15, what="their return")
        assert fleet.connected_count() == 4
        assert all(link.connects >= 2 for link in fleet.links if link.client_id in away)
    finally:
        fleet.stop()


@pytest.mark.integration
def test_multiplexed_mode_500_devices_start_and_heartbeat(broker: BrokerService, server: Server) -> None:
    scenario = Scenario(seed=5, groups=(DeviceGroup(count=500, installed={MODEL: 1}),), heartbeat_s=1.0,
                        window_s=3600)
    fleet = start_fleet(scenario, broker, mode="multiplexed", devices_per_connection=100)
    try:
        assert len(fleet.links) == 5 and fleet.connected_count() == 500

        def all_seen() -> bool:
            row = server.rows("SELECT COUNT(*) AS n FROM devices WHERE last_status = 'online' AND uptime_s IS NOT NULL")
            return bool(row[0].n == 500)

        wait_until(all_seen, 30, interval=0.2, what="500 online devices with heartbeats")
        wait_until(lambda: fleet.stats().heartbeats_sent >= 1000, 30, what="a second round of heartbeats")
        dev = fleet.device_ids[123]
        fleet.go_offline(dev)  # multiplexed: the device publishes its own retained offline status
        wait_until(lambda: server.status(dev) == "offline", 15, what="offline status")
    finally:
        fleet.stop()


@pytest.mark.integration
def test_real_bundle_download_with_the_order_token(mosquitto: BrokerService, sqlite_engine: Engine, keys: Keys,
                                                   bundle: bytes) -> None:
    server = Server(mosquitto, sqlite_engine)
    http = FleetHttpSim().start()
    try:
        digest = "b" * 64
        url = http.add_bundle(digest, bundle, tokens={"good"})
        scenario = Scenario(groups=(DeviceGroup(count=2, installed={MODEL: 1}, latency=FAST),), heartbeat_s=30,
                            window_s=3600, download=Download(fraction=1.0, mode="full"))
        fleet = start_fleet(scenario, mosquitto, trust_root=keys.root_bytes())
        try:
            ok_dev, bad_dev = fleet.device_ids
            ok = command(keys, bundle, ok_dev, url=url, token="good")
            bad = command(keys, bundle, bad_dev, url=url, token="wrong")
            server.send(ok)
            server.send(bad)
            assert server.wait_events(ok_dev, ok.command_id, 5) == [(k, None) for k in DEPLOY_OK]
            assert server.wait_events(bad_dev, bad.command_id, 3)[-1] == ("failed", "download")
            stats = fleet.stats()
            assert stats.downloads_ok == 1 and stats.downloads_failed == 1 and stats.download_bytes == len(bundle)
            http.wait_idle()
            assert sorted((r.token, r.status) for r in http.records) == [("good", 200), ("wrong", 403)]
            ranged = fetch_bundle(url, "good", mode="range", range_bytes=100, expected_length=len(bundle),
                                  timeout_s=5)
            assert (ranged.error, ranged.status, ranged.received) == (None, 206, 100)
            http.wait_idle()
            assert http.records[-1].range_header == "bytes=0-99"
        finally:
            fleet.stop()
    finally:
        http.stop()
        server.close()


@pytest.mark.integration
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_registered_fleet_deploys_and_is_ingested_on_postgresql(mosquitto: BrokerService, engine: Engine,
                                                                keys: Keys, bundle: bytes) -> None:
    scenario = Scenario(seed=4, groups=(
        DeviceGroup(name="canary", count=3, labels={"ring": "canary"}, profile="raspberry-pi-4",
                    hardware={"board": "pi4"}, installed={MODEL: 1}, latency=FAST),
        DeviceGroup(name="rest", count=5, labels={"ring": "main"}, installed={MODEL: 1}, latency=FAST)),
        heartbeat_s=30, window_s=0.5)
    plans = plan_devices(scenario)
    assert register_devices(engine, plans) == {"created": 8, "updated": 0}
    assert register_devices(engine, plans) == {"created": 0, "updated": 8}  # idempotent
    server = Server(mosquitto, engine)
    fleet = start_fleet(scenario, mosquitto, trust_root=keys.root_bytes())
    try:
        rows = server.rows("SELECT d.id, d.firmware_profile, l.value FROM devices d JOIN device_labels l "
                           "ON l.device_id = d.id AND l.key = 'ring' ORDER BY d.id")
        assert [(r.firmware_profile, r.value) for r in rows[:3]] == [("raspberry-pi-4", "canary")] * 3
        assert len(rows) == 8
        audit = server.rows("SELECT action, target FROM audit_log WHERE action = 'device.register'")
        assert [(a.action, a.target) for a in audit] == [("device.register", "simulator:sim")] * 2
        dev = plans[0].device_id
        cmd = command(keys, bundle, dev)
        server.send(cmd)
        assert server.wait_events(dev, cmd.command_id, 5) == [(k, None) for k in DEPLOY_OK]
        wait_until(lambda: server.rows("SELECT COUNT(DISTINCT device_id) AS n FROM drift_windows")[0].n == 8, 15,
                   what="windows from every device")
        wait_until(lambda: fleet.unacked() == 0, 10, what="everything acknowledged")
    finally:
        fleet.stop()
        server.close()


@pytest.mark.integration
def test_simulate_command_registers_runs_and_reports(mosquitto: BrokerService, sqlite_engine: Engine, tmp_path: Path,
                                                     keys: Keys, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    import json

    from fleet_server.simulator import cli

    parser = argparse.ArgumentParser(prog="fleet-server")
    cli.add_parser(parser.add_subparsers(dest="command"))
    (tmp_path / "root.json").write_bytes(keys.root_bytes())
    (tmp_path / "fleet.toml").write_text('id_prefix = "cli"\nheartbeat_s = 0.2\n[[groups]]\ncount = 3\n'
                                         'labels = { site = "lab" }\n')
    db = sqlite_engine.url.render_as_string(hide_password=False)
    args = parser.parse_args(["simulate", "--scenario", str(tmp_path / "fleet.toml"), "--host", mosquitto.host,
                              "--port", str(mosquitto.port), "--trust-root", str(tmp_path / "root.json"),
                              "--register-db", db, "--duration", "1", "--stats-every", "0.3",
                              "--state", str(tmp_path / "state.json")])
    assert cli.run(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == {"registered": {"created": 3, "updated": 0}}
    assert lines[1]["connected"] == 3 and lines[1]["mode"] == "per_device"
    assert lines[-1]["final"]["heartbeats_sent"] >= 6 and lines[-1]["final"]["connects"] == 3
    assert any("stats" in line for line in lines)
    with sqlite_engine.connect() as conn:
        labels = conn.execute(sa.text("SELECT device_id, value FROM device_labels ORDER BY device_id")).all()
    assert [tuple(r) for r in labels] == [("cli-00000", "lab"), ("cli-00001", "lab"), ("cli-00002", "lab")]
    state = json.loads((tmp_path / "state.json").read_text())
    assert sorted(state["devices"]) == ["cli-00000", "cli-00001", "cli-00002"]
    bad = parser.parse_args(["simulate", "--scenario", str(tmp_path / "missing.toml")])
    assert cli.run(bad) == 2


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_register_via_the_devices_api(client: Any) -> None:
    from fleet_server.simulator import register_via_api
    from tests.server.support import TOKEN

    scenario = Scenario(id_prefix="api", groups=(DeviceGroup(count=3, labels={"ring": "canary"},
                                                             profile="raspberry-pi-5", hardware={"board": "pi5"}),))
    plans = plan_devices(scenario)
    assert register_via_api("http://testserver", TOKEN, plans, client=client) == {"created": 3, "updated": 0}
    assert register_via_api("http://testserver", TOKEN, plans, client=client) == {"created": 0, "updated": 3}
    body = client.get("/api/v1/devices/api-00001", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert body["labels"] == {"ring": "canary"} and body["firmware_profile"] == "raspberry-pi-5"
    with pytest.raises(RuntimeError, match="HTTP 401"):
        register_via_api("http://testserver", "wrong-token", plans, client=client)


def test_fleet_modes_preseed_and_introspection_before_start() -> None:
    scenario = Scenario(groups=(DeviceGroup(count=120, installed={MODEL: 1}),))
    auto = SimulatedFleet(scenario, installed={"sim-00005": {MODEL: 4}})
    assert auto.mode == "per_device" and len(auto.links) == 120
    assert [link.client_id for link in auto.links[:2]] == ["sim-00000", "sim-00001"]
    mux = SimulatedFleet(scenario, mode="multiplexed", devices_per_connection=50)
    assert len(mux.links) == 3 and mux.links[0].client_id == "sim-mux-0000"
    assert len(mux.links[2].topics) == 40  # 20 devices x (commands, acks)
    auto.preseed(["sim-00001", "sim-00002"], "other-model", 3)
    view = auto.device("sim-00001")
    assert view.models == {MODEL: 1, "other-model": 3} and not view.connected and view.outcome is Outcome.OK
    assert auto.versions(MODEL)["sim-00005"] == 4
    with pytest.raises(KeyError, match="no simulated device"):
        auto.device("sim-99999")
