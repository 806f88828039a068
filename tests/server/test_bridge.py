"""The command bridge against the real pieces: orders signed with the orders key verify on the device's side
(``agent.bundle.verify_order`` under the fleet's trust root), go through a real mosquitto and the embedded broker,
are resent with backoff until an event acknowledges them or they expire, are never created twice, and a real
agent (CommandProcessor + Updater + HTTP download) installs from them and reports back through the real ingestion
to the rollout loop."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from agent.bundle import read_manifest
from agent.protocol import Event, decode
from agent.updater.commands import CommandProcessor, EventSequence, SequencedPublisher
from agent.updater.fetch import FetchConfig, HttpFetcher
from fleet_server.app import create_app
from fleet_server.bundles.tokens import issue_download_token, verify_download_token
from fleet_server.deploy.bridge import resend_delay
from fleet_server.deploy.mqtt import MqttCommandPublisher
from fleet_server.deploy.runtime import DeployRuntime
from fleet_server.ingest import BatchWriter, Received
from fleet_server.models import CommandRecord, Device, RolloutDevice, table_of
from fleet_server.rollouts import SendCancel, SendOrder, cancel_command_id, order_command_id
from tests.server.deploy_support import (
    DIGEST,
    OLD_DIGEST,
    PUBLIC,
    SECRET,
    CapturePublisher,
    Clock,
    CommandSubscriber,
    Devices,
    add_bundle,
    add_cohort,
    add_devices,
    deploy_settings,
    make_bridge,
    make_loop,
    verified,
)
from tests.server.support import AUTH
from tests.services.mqtt import wait_until
from tests.sim.fleet_http import FleetHttpSim
from tests.updater.conftest import make_device
from tests.updater.support import Keys, make_bundle

COMMANDS = table_of(CommandRecord)


def order(device: str, *, rollout: str = "ro-test", attempt: int = 1, digest: str = DIGEST, version: int = 2,
          rollback: bool = False) -> SendOrder:
    return SendOrder(device, order_command_id(rollout, device, attempt, rollback=rollback), "cancer-mlp", version,
                     digest, rollback, 0, attempt, rollback)


def command_rows(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        return {r["command_id"]: dict(r) for r in conn.execute(sa.select(COMMANDS)).mappings()}


def sequence_of(engine: Engine, device: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(table_of(Device).c.order_sequence)
                                .where(table_of(Device).c.id == device)).scalar_one())


@dataclass
class Env:
    engine: Engine
    db_url: str
    tmp: Path
    keys: Keys = field(default_factory=Keys)
    clock: Clock = field(default_factory=Clock)


@pytest.fixture
def env(engine: Engine, db_url: str, tmp_path: Path) -> Env:
    return Env(engine, db_url, tmp_path)


@pytest.mark.integration
def test_published_orders_and_cancels_verify_against_the_trust_root(broker: Any, env: Env) -> None:
    engine, db_url, tmp_path, keys, clock = env.engine, env.db_url, env.tmp, env.keys, env.clock
    settings = deploy_settings(db_url, tmp_path, keys, mqtt_host=broker.host, mqtt_port=broker.port,
                               mqtt_protocol="3.1.1" if broker.kind == "embedded" else "5")
    add_devices(engine, ["cam-1", "cam-2", "cam-3"])
    add_bundle(engine)
    add_bundle(engine, digest=OLD_DIGEST, version=1, length=3000)
    sub = CommandSubscriber(broker.host, broker.port)
    publisher = MqttCommandPublisher(settings)
    publisher.start()
    try:
        assert publisher.wait_connected(10)
        bridge = make_bridge(engine, settings, publisher, clock)
        sent = bridge.send(rollout_id="ro-test", orders=[order("cam-1"), order("cam-2"), order("cam-3")])
        assert len(sent) == 3
        wait_until(lambda: len(sub.commands()) == 3, 10, what="three orders on the command topics")
        for topic, cmd in sub.commands():
            assert topic == f"fleet/v1/{cmd.device_id}/commands"
            o = verified(cmd, keys, now=clock.now)
            assert (o.action, o.device_id, o.sequence, o.rollout_id) == ("deploy", cmd.device_id, 1, "ro-test")
            assert (o.model, o.version, o.bundle_digest, o.bundle_length) == ("cancer-mlp", 2, DIGEST, 4096)
            assert o.url == f"{PUBLIC}/bundles/{DIGEST}" and o.allow_downgrade is False
            assert o.command_id == cmd.command_id == order_command_id("ro-test", cmd.device_id, 1)
            assert o.issued_at == clock.now and o.expires_at == clock.now + settings.command_ttl_s
            assert o.token_expires_at == int(clock.now + settings.download_token_ttl_s)
            claims = verify_download_token(SECRET, o.token or "", digest=DIGEST, now=clock.now)
            assert claims.device_id == cmd.device_id
        assert [sequence_of(engine, d) for d in ("cam-1", "cam-2", "cam-3")] == [1, 1, 1]

        clock.advance(5)
        deploy_id = order_command_id("ro-test", "cam-1", 1)
        cancel = SendCancel("cam-1", deploy_id, cancel_command_id("cam-1", deploy_id))
        back = order("cam-2", rollback=True, digest=OLD_DIGEST, version=1)
        bridge.send(rollout_id="ro-test", orders=[back], cancels=[cancel])
        wait_until(lambda: len(sub.commands()) == 5, 10, what="the cancel and the rollback order")
        by_id = {cmd.command_id: cmd for _, cmd in sub.commands()}
        c = verified(by_id[cancel.command_id], keys, now=clock.now, last_sequence=1)
        assert (c.action, c.cancels, c.sequence, c.device_id) == ("cancel", deploy_id, 2, "cam-1")
        r = verified(by_id[back.command_id], keys, now=clock.now, last_sequence=1)
        assert (r.action, r.version, r.bundle_digest, r.bundle_length, r.allow_downgrade) == (
            "deploy", 1, OLD_DIGEST, 3000, True)
        assert r.sequence == 2
        rows = command_rows(engine)
        assert {row["state"] for row in rows.values()} == {"pending"}
        assert {row["kind"] for row in rows.values()} == {"deploy", "cancel"}
        # stored byte for byte as published: a resend is the same frame
        assert all(bytes(rows[cmd.command_id]["frame"]) == frame
                   for (_, frame), (_, cmd) in zip(sub.frames, sub.commands(), strict=True))
    finally:
        publisher.stop()
        sub.close()


def test_sequence_is_the_devices_order_sequence_plus_one_across_rollouts(env: Env) -> None:
    engine, db_url, tmp_path, keys, clock = env.engine, env.db_url, env.tmp, env.keys, env.clock
    settings = deploy_settings(db_url, tmp_path, keys)
    add_devices(engine, ["cam-1", "cam-2"])
    add_bundle(engine)
    pub = CapturePublisher()
    bridge = make_bridge(engine, settings, pub, clock)
    bridge.send(rollout_id="ro-a", orders=[order("cam-1", rollout="ro-a")])
    bridge.send(rollout_id="ro-b", orders=[order("cam-1", rollout="ro-b"), order("cam-2", rollout="ro-b")])
    seqs = [(c.device_id, verified(c, keys, now=clock.now).sequence) for c in pub.commands()]
    assert seqs == [("cam-1", 1), ("cam-1", 2), ("cam-2", 1)]
    assert (sequence_of(engine, "cam-1"), sequence_of(engine, "cam-2")) == (2, 1)


def test_repeated_decision_after_a_crash_creates_no_second_command(env: Env) -> None:
    engine, db_url, tmp_path, keys, clock = env.engine, env.db_url, env.tmp, env.keys, env.clock
    settings = deploy_settings(db_url, tmp_path, keys)
    add_devices(engine, ["cam-1"])
    add_bundle(engine)
    pub = CapturePublisher()
    bridge = make_bridge(engine, settings, pub, clock)
    first = bridge.send(rollout_id="ro-test", orders=[order("cam-1")])
    again = bridge.send(rollout_id="ro-test", orders=[order("cam-1"), order("cam-1")])
    assert len(first) == 1 and again == []
    assert len(command_rows(engine)) == 1 and len(pub.sent) == 1
    assert sequence_of(engine, "cam-1") == 1  # no sequence number burnt by the repeat
    assert bridge.metrics.repeated == 2


def test_command_resent_with_backoff_until_an_event_acknowledges_it(env: Env, writer: BatchWriter) -> None:
    engine, db_url, tmp_path, keys, clock = env.engine, env.db_url, env.tmp, env.keys, env.clock
    settings = deploy_settings(db_url, tmp_path, keys, command_resend_s=30.0)
    add_devices(engine, ["cam-1"])
    add_bundle(engine)
    pub = CapturePublisher()
    bridge = make_bridge(engine, settings, pub, clock)
    loop = make_loop(engine, settings, bridge, clock)
    (out,) = bridge.send(rollout_id="ro-test", orders=[order("cam-1")])
    start = clock.now
    assert bridge.resend_due(start + 29.9).resent == 0
    sent_at = [start]
    for expected_gap in (30, 60, 120, 240, 480, 480, 480):
        t = sent_at[-1] + expected_gap
        assert bridge.resend_due(t - 0.01).resent == 0, f"resent before the {expected_gap} s gap"
        assert bridge.resend_due(t).resent == 1
        sent_at.append(t)
    assert len(pub.sent) == 8 and all(frame == out.frame for _, frame in pub.sent)
    assert [resend_delay(30.0, n) for n in range(1, 8)] == [30, 60, 120, 240, 480, 480, 480]
    row = command_rows(engine)[out.command_id]
    assert (row["sends"], row["last_sent_at"], row["state"]) == (8, sent_at[-1], "pending")

    clock.now = sent_at[-1] + 1
    Devices(writer, clock).event("cam-1", "received", out.command_id)
    loop.consume_events(clock.now)
    row = command_rows(engine)[out.command_id]
    assert (row["state"], row["acked_at"]) == ("acked", clock.now)
    assert bridge.resend_due(clock.now + 10 * 86400).resent == 0
    assert len(pub.sent) == 8


def test_unacknowledged_command_expires_and_is_counted(env: Env) -> None:
    engine, db_url, tmp_path, keys, clock = env.engine, env.db_url, env.tmp, env.keys, env.clock
    settings = deploy_settings(db_url, tmp_path, keys, command_ttl_s=600.0, command_resend_s=60.0)
    add_devices(engine, ["cam-1"])
    add_bundle(engine)
    pub = CapturePublisher()
    bridge = make_bridge(engine, settings, pub, clock)
    (out,) = bridge.send(rollout_id="ro-test", orders=[order("cam-1")])
    assert verified(pub.commands()[0], keys, now=clock.now).expires_at == clock.now + 600
    result = bridge.resend_due(clock.now + 600)
    assert (result.expired, result.resent) == (1, 0)
    assert command_rows(engine)[out.command_id]["state"] == "expired"
    assert bridge.metrics.expired == 1
    assert bridge.resend_due(clock.now + 7200).resent == 0
    assert len(pub.sent) == 1


def test_command_the_client_could_not_take_is_due_at_once(env: Env) -> None:
    engine, db_url, tmp_path, keys, clock = env.engine, env.db_url, env.tmp, env.keys, env.clock
    settings = deploy_settings(db_url, tmp_path, keys)
    add_devices(engine, ["cam-1"])
    add_bundle(engine)
    pub = CapturePublisher()
    pub.up = False
    bridge = make_bridge(engine, settings, pub, clock)
    (out,) = bridge.send(rollout_id="ro-test", orders=[order("cam-1")])
    assert pub.sent == [] and bridge.metrics.publish_failures == 1
    pub.up = True
    assert bridge.resend_due(clock.now).resent == 1
    assert pub.sent == [(out.topic, out.frame)]


def test_without_a_publisher_commands_are_stored_due_for_the_loop_replica(env: Env) -> None:
    engine, db_url, tmp_path, keys, clock = env.engine, env.db_url, env.tmp, env.keys, env.clock
    settings = deploy_settings(db_url, tmp_path, keys)
    add_devices(engine, ["cam-1"])
    add_bundle(engine)
    make_bridge(engine, settings, None, clock).send(rollout_id="ro-test", orders=[order("cam-1")])
    pub = CapturePublisher()
    assert make_bridge(engine, settings, pub, clock).resend_due(clock.now).resent == 1
    assert verified(pub.commands()[0], keys, now=clock.now).device_id == "cam-1"


@pytest.mark.integration
def test_device_offline_at_the_first_publish_gets_the_resend(broker: Any, env: Env) -> None:
    """The embedded broker queues nothing for offline subscribers (and mosquitto's queue is bounded): the resend
    schedule is what delivers."""
    engine, db_url, tmp_path, keys, clock = env.engine, env.db_url, env.tmp, env.keys, env.clock
    settings = deploy_settings(db_url, tmp_path, keys, mqtt_host=broker.host, mqtt_port=broker.port,
                               mqtt_protocol="3.1.1" if broker.kind == "embedded" else "5")
    add_devices(engine, ["cam-9"])
    add_bundle(engine)
    publisher = MqttCommandPublisher(settings)
    publisher.start()
    sub: CommandSubscriber | None = None
    try:
        assert publisher.wait_connected(10)
        bridge = make_bridge(engine, settings, publisher, clock)
        (out,) = bridge.send(rollout_id="ro-test", orders=[order("cam-9")])
        assert publisher.flush(10)
        sub = CommandSubscriber(broker.host, broker.port, client_id="cam-9")  # comes online after the publish
        assert bridge.resend_due(clock.now + settings.command_resend_s).resent == 1
        wait_until(lambda: len(sub.commands()) >= 1, 10, what="the resent order")
        (_, cmd), *_ = sub.commands()
        assert cmd.command_id == out.command_id
        assert verified(cmd, keys, now=clock.now).device_id == "cam-9"
    finally:
        publisher.stop()
        if sub is not None:
            sub.close()


@pytest.mark.integration
def test_real_agent_accepts_bridge_frames_and_its_events_make_the_rollout_device_healthy(
        env: Env, writer: BatchWriter) -> None:
    """Bridge -> Command frame -> the agent's real CommandProcessor and Updater (real HTTP download, real
    verification, install and health check) -> Event frames -> the real ingestion (BatchWriter) -> the rollout
    loop: the device ends healthy, its command acknowledged, the rollout completed."""
    engine, db_url, tmp_path, keys, clock = env.engine, env.db_url, env.tmp, env.keys, env.clock
    data = make_bundle(keys, version=1)
    manifest_bytes, _ = read_manifest(io.BytesIO(data))
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    dev = make_device(tmp_path / "device", keys, fetcher=HttpFetcher(FetchConfig(read_timeout_s=5,
                                                                                  stall_window_s=2)))
    with FleetHttpSim() as http:
        settings = deploy_settings(db_url, tmp_path, keys, public_url=f"{http.base_url}/v1")
        token = issue_download_token(SECRET, device_id="dev-1", digest=digest,
                                     expires_at=int(clock.now + settings.download_token_ttl_s))
        http.add_bundle(digest, data, {token})
        add_devices(engine, ["dev-1"])
        add_cohort(engine, "lab", ["dev-1"])
        add_bundle(engine, digest=digest, model="cancer-mlp", version=1, length=len(data))
        pub = CapturePublisher()
        bridge = make_bridge(engine, settings, pub, clock)
        loop = make_loop(engine, settings, bridge, clock)
        sent: list[tuple[str, bytes]] = []
        events = SequencedPublisher(EventSequence(dev.state / "orders" / "event_seq"),
                                    lambda t, b: sent.append((t, b)), "fleet/v1/dev-1/events")
        proc = CommandProcessor(device_id="dev-1", updater=dev.updater, sink=events)
        dev.updater._events = proc.publish_event
        app = create_app(settings, engine=engine)
        app.state.deploy = DeployRuntime(bridge, loop, pub, clock)
        with TestClient(app) as client:
            created = client.post("/api/v1/rollouts", headers=AUTH, json={
                "name": "real agent", "bundle": digest, "cohorts": ["lab"],
                "phases": [{"count": 1, "min_finished": 1, "success_threshold": 1.0}]})
            assert created.status_code == 201, created.text
            rid = created.json()["id"]
            assert client.post(f"/api/v1/rollouts/{rid}/start", headers=AUTH).status_code == 200
            loop.tick()
            (topic, frame), = pub.sent
            assert topic == "fleet/v1/dev-1/commands"
            outcome = proc.on_message(topic, frame)
            assert outcome is not None and outcome.status == "healthy", outcome
            assert dev.serving() == 1
            assert [decode_kind(b) for _, b in sent] == ["received", "downloading", "verified", "installed",
                                                         "healthy"]
            clock.advance(1)
            writer.write([Received(t, b, clock.now) for t, b in sent])
            loop.tick()
            doc = client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()
            assert doc["status"] == "completed", doc
            assert {k: v for k, v in doc["steps"].items() if v} == {"healthy": 1}
        with engine.connect() as conn:
            rd = conn.execute(sa.select(table_of(RolloutDevice))).mappings().one()
        assert (rd["device_id"], rd["step"]) == ("dev-1", "healthy")
        assert command_rows(engine)[rd["command_id"]]["state"] == "acked"
        assert bridge.resend_due(clock.now + 86400).resent == 0
    dev.host.close()


def decode_kind(frame: bytes) -> str:
    ev = decode(frame)
    assert isinstance(ev, Event)
    return ev.kind
