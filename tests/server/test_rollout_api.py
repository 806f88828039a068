"""The rollouts API on a real database (SQLite and PostgreSQL): definitions validated by the policy's own spec (422
naming the field), unknown bundles and cohorts (404), incompatible firmware profiles (409 listing the devices), listing
and paging, every action audited, invalid transitions answered with the policy's message, abort and rollback
publishing their commands inside the request (through a real mosquitto and the embedded broker too), and a server
that cannot sign orders saying which settings to set."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from fleet_server.app import create_app
from fleet_server.db import create_db_engine
from fleet_server.deploy.mqtt import MqttCommandPublisher
from fleet_server.deploy.runtime import DeployRuntime
from fleet_server.ingest import BatchWriter
from fleet_server.models import AuditLog, CommandRecord, table_of
from fleet_server.settings import FleetSettings
from tests.conftest import REPO
from tests.server.auth_support import bearer, role_tokens
from tests.server.deploy_support import (
    DIGEST,
    HAPPY,
    OLD_DIGEST,
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
from tests.server.support import AUTH, TOKEN
from tests.services.mqtt import free_port, wait_until
from tests.updater.support import Keys

AUDIT = table_of(AuditLog)
PHASES = [{"count": 2, "min_soak_s": 60}, {"percent": 100}]


@dataclass
class Api:
    client: TestClient
    engine: Engine
    keys: Keys
    clock: Clock
    pub: CapturePublisher
    runtime: DeployRuntime | None

    def create(self, **body: Any) -> Any:
        doc = {"name": "r", "bundle": DIGEST, "cohorts": ["fleet"], "phases": PHASES, **body}
        return self.client.post("/api/v1/rollouts", headers=AUTH, json=doc)

    def created(self, **body: Any) -> str:
        r = self.create(**body)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def act(self, rid: str, action: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
            ) -> Any:
        return self.client.post(f"/api/v1/rollouts/{rid}/{action}", headers=headers or AUTH, json=body)

    def audits(self, action: str | None = None) -> list[dict[str, Any]]:
        q = sa.select(AUDIT).where(AUDIT.c.action.like("rollout.%")).order_by(AUDIT.c.id)
        if action is not None:
            q = q.where(AUDIT.c.action == action)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def tick(self) -> None:
        assert self.runtime is not None and self.runtime.loop is not None
        self.clock.advance(1)
        self.runtime.loop.tick()


def _setup(engine: Engine, devices: int = 5) -> list[str]:
    ids = [f"cam-{i}" for i in range(devices)]
    add_devices(engine, ids)
    add_cohort(engine, "fleet", ids)
    add_bundle(engine)
    return ids


@pytest.fixture
def api(engine: Engine, db_url: str, tmp_path: Path) -> Iterator[Api]:
    keys = Keys()
    settings = deploy_settings(db_url, tmp_path, keys)
    clock = Clock()
    pub = CapturePublisher()
    bridge = make_bridge(engine, settings, pub, clock)
    runtime = DeployRuntime(bridge, make_loop(engine, settings, bridge, clock), pub, clock)
    app = create_app(settings, engine=engine)
    app.state.deploy = runtime
    with TestClient(app) as client:
        yield Api(client, engine, keys, clock, pub, runtime)


def test_create_stores_a_draft_with_its_plan_and_is_audited(api: Api) -> None:
    _setup(api.engine, 10)
    r = api.create(phases=[{"count": 3, "min_soak_s": 600, "sli": {"max_error_rate": 0.02}}, {"percent": 50},
                           {"percent": 100}],
                   rate={"kind": "exponential", "base_per_minute": 5, "factor": 2, "every_healthy": 5,
                         "max_per_minute": 100},
                   window={"start": "22:00", "end": "04:00"}, max_concurrent=4,
                   timeouts={"receive_s": 900}, drift={"max_excess_over_control": 0.3, "min_devices": 2})
    assert r.status_code == 201, r.text
    doc = r.json()
    assert (doc["status"], doc["phase"], doc["phases"], doc["model"], doc["version"]) == ("draft", 1, 3,
                                                                                           "cancer-mlp", 2)
    assert doc["planned"] == [3, 5, 10] and doc["target"] == 10
    assert doc["steps"]["not_started"] == 10 and doc["tally"]["members"] == 3
    spec = doc["spec"]
    assert [p["drift"]["max_excess_over_control"] for p in spec["phases"]] == [0.3, 0.3, 0.3]
    assert spec["phases"][0]["sli"]["max_error_rate"] == 0.02 and spec["phases"][1]["sli"] is None
    assert spec["timeouts"] == {"receive_s": 900, "download_s": 3600, "install_s": 600, "health_s": 1800}
    assert spec["rate"]["kind"] == "exponential" and spec["window"] == {"start": "22:00", "end": "04:00"}
    (audit,) = api.audits("rollout.create")
    assert audit["target"] == f"rollout:{doc['id']}" and audit["outcome"] == "ok"
    assert audit["detail"]["target"] == 10
    assert api.client.get(f"/api/v1/rollouts/{doc['id']}", headers=AUTH).json()["spec"] == spec


@pytest.mark.parametrize(("body", "field"), [
    ({"phases": [{"count": 2, "percent": 10}]}, "phases[0].percent"),
    ({"phases": [{"min_soak_s": 5}]}, "phases[0].percent"),
    ({"window": {"start": "10:00", "end": "10:00"}}, "window.end"),
    ({"rate": {"kind": "exponential", "base_per_minute": 50, "max_per_minute": 10}}, "rate.max_per_minute"),
])
def test_invalid_definition_answers_422_naming_the_field(api: Api, body: dict[str, Any], field: str) -> None:
    _setup(api.engine)
    r = api.create(**body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(f"{field}: ")


@pytest.mark.parametrize("body", [
    {"phases": [{"count": 0}]}, {"phases": []}, {"cohorts": []}, {"bundle": "ABC"}, {"max_concurrent": 0},
    {"surprise": 1}, {"phases": [{"count": 1, "colour": "red"}]}, {"window": {"start": "24:00", "end": "01:00"}},
    {"phases": [{"percent": 101}]}, {"rate": {"kind": "linear", "per_minute": 5}},
])
def test_malformed_request_is_rejected_by_the_schema(api: Api, body: dict[str, Any]) -> None:
    _setup(api.engine)
    assert api.create(**body).status_code == 422


def test_unknown_bundle_or_cohort_is_404_naming_it(api: Api) -> None:
    _setup(api.engine)
    r = api.create(bundle="f" * 64)
    assert r.status_code == 404 and r.json()["detail"].startswith("bundle: no bundle")
    r = api.create(cohorts=["fleet", "nowhere"])
    assert r.status_code == 404 and r.json()["detail"] == "cohorts: unknown cohort(s): nowhere"


def test_bundle_not_supporting_the_cohorts_firmware_is_409_listing_the_devices(api: Api) -> None:
    _setup(api.engine, 3)
    add_devices(api.engine, ["pi-1"], profile="raspberry-pi-4")
    add_devices(api.engine, ["mystery"], profile=None)
    add_cohort(api.engine, "mixed", ["cam-0", "pi-1", "mystery"])
    r = api.create(cohorts=["mixed"])
    assert r.status_code == 409, r.text
    detail = r.json()["detail"]
    assert detail["count"] == 2
    assert {d["device"] for d in detail["devices"]} == {"pi-1", "mystery"}
    assert "raspberry-pi-4" in {d["why"] for d in detail["devices"] if d["device"] == "pi-1"}.pop()
    assert api.audits("rollout.create") == []


def test_list_filters_by_status_and_pages_newest_first(api: Api) -> None:
    _setup(api.engine)
    made = []
    for _ in range(5):
        made.append(api.created())
        api.clock.advance(1)
    assert api.act(made[1], "start").status_code == 200
    got: list[str] = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"after": after} if after else {})}
        page = api.client.get("/api/v1/rollouts", headers=AUTH, params=params).json()
        got += [i["id"] for i in page["items"]]
        after = page["next"]
        if after is None:
            break
    assert got == list(reversed(made))
    running = api.client.get("/api/v1/rollouts", headers=AUTH, params={"status": "running"}).json()
    assert [i["id"] for i in running["items"]] == [made[1]] and running["next"] is None
    assert api.client.get("/api/v1/rollouts", headers=AUTH, params={"after": "bm90LWEtY3Vyc29y"}).status_code == 422
    far = api.client.get("/api/v1/rollouts", headers=AUTH, params={"after": "1~ro-anything"}).json()
    assert far == {"items": [], "next": None}  # any well-formed cursor is a position
    assert api.client.get("/api/v1/rollouts", headers=AUTH, params={"status": "sideways"}).status_code == 422
    assert api.client.get("/api/v1/rollouts/ro-nothing", headers=AUTH).status_code == 404
    assert api.client.get("/api/v1/rollouts/ro-nothing/devices", headers=AUTH).status_code == 404


def test_per_device_states_are_paginated_and_filterable(api: Api, writer: BatchWriter) -> None:
    ids = _setup(api.engine, 5)
    rid = api.created(phases=[{"count": 5}])
    assert api.act(rid, "start").status_code == 200
    api.tick()
    orders = api.pub.commands()
    Devices(writer, api.clock).events([(orders[0].device_id, k, orders[0].command_id, None) for k in HAPPY])
    api.tick()
    seen: list[str] = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"after": after} if after else {})}
        page = api.client.get(f"/api/v1/rollouts/{rid}/devices", headers=AUTH, params=params).json()
        seen += [d["device_id"] for d in page["items"]]
        after = page["next"]
        if after is None:
            break
    assert seen == sorted(ids)
    healthy = api.client.get(f"/api/v1/rollouts/{rid}/devices", headers=AUTH, params={"step": "healthy"}).json()
    (only,) = healthy["items"]
    assert only["device_id"] == orders[0].device_id and only["attempts"] == 1
    assert only["command_id"] == orders[0].command_id
    assert only["since"].endswith(("Z", "+00:00"))


def test_actions_follow_the_state_machine_and_each_is_audited(api: Api) -> None:
    _setup(api.engine)
    rid = api.created()
    r = api.act(rid, "pause", {"reason": "too early"})
    assert r.status_code == 409
    assert r.json()["detail"] == "cannot pause a rollout that is draft (allowed from: running)"
    assert api.act(rid, "start", {"reason": "go"}).json()["status"] == "running"
    assert api.act(rid, "pause").json()["status"] == "paused"
    assert api.act(rid, "resume").json()["status"] == "running"
    assert api.act(rid, "start").status_code == 409
    r = api.act(rid, "abort", {"reason": "changed my mind"})
    assert r.json()["status"] == "aborted" and r.json()["reason"] == "changed my mind"
    assert api.act(rid, "resume").status_code == 409
    trail = [(a["action"], a["outcome"], a["detail"].get("reason")) for a in api.audits()]
    assert trail[1:] == [("rollout.pause", "failed", "too early"), ("rollout.start", "ok", "go"),
                         ("rollout.pause", "ok", trail[3][2]), ("rollout.resume", "ok", trail[4][2]),
                         ("rollout.start", "failed", trail[5][2]), ("rollout.abort", "ok", "changed my mind"),
                         ("rollout.resume", "failed", trail[7][2])]
    assert all(a["target"] == f"rollout:{rid}" and a["actor"] for a in api.audits())
    assert "cannot resume a rollout that is aborted" in api.audits()[-1]["detail"]["error"]
    assert api.act("ro-nothing", "start").status_code == 404


def test_roles_operator_steers_release_manager_starts(api: Api) -> None:
    _setup(api.engine)
    tokens = role_tokens(api.engine)
    rid = api.created()
    assert api.act(rid, "start", headers=bearer(tokens["operator"])).status_code == 403
    assert api.act(rid, "start", headers=bearer(tokens["release_manager"])).status_code == 200
    assert api.act(rid, "pause", headers=bearer(tokens["viewer"])).status_code == 403
    assert api.act(rid, "pause", headers=bearer(tokens["operator"])).status_code == 200
    assert api.client.get(f"/api/v1/rollouts/{rid}", headers=bearer(tokens["viewer"])).status_code == 200
    assert api.client.get(f"/api/v1/rollouts/{rid}").status_code == 401


def test_abort_mid_update_publishes_the_cancels_in_the_request(api: Api, writer: BatchWriter) -> None:
    _setup(api.engine, 3)
    rid = api.created(phases=[{"count": 3}])
    api.act(rid, "start")
    api.tick()
    o = {c.device_id: c for c in api.pub.commands()}
    Devices(writer, api.clock).events([("cam-0", k, o["cam-0"].command_id, None) for k in HAPPY]
                                      + [("cam-1", "received", o["cam-1"].command_id, None)])
    api.tick()
    api.pub.clear()
    r = api.act(rid, "abort")
    assert r.status_code == 200
    cancels = api.pub.commands()
    assert sorted(c.device_id for c in cancels) == ["cam-1", "cam-2"]
    assert {verified(c, api.keys, now=api.clock.now, last_sequence=1).cancels for c in cancels} == {
        o["cam-1"].command_id, o["cam-2"].command_id}
    assert api.audits("rollout.abort")[0]["detail"]["cancels"] == 2


def test_rollback_orders_the_previous_version_to_devices_on_the_new_one_in_the_request(
        api: Api, writer: BatchWriter) -> None:
    _setup(api.engine, 3)
    rid = api.created(phases=[{"count": 3, "min_soak_s": 3600}])
    assert api.act(rid, "rollback").status_code == 409  # draft
    api.act(rid, "start")
    r = api.act(rid, "rollback")
    assert r.status_code == 409 and "no earlier version" in r.json()["detail"]
    add_bundle(api.engine, digest=OLD_DIGEST, version=1, length=3000)
    api.tick()
    o = {c.device_id: c for c in api.pub.commands()}
    Devices(writer, api.clock).events([("cam-0", k, o["cam-0"].command_id, None) for k in HAPPY]
                                      + [("cam-1", "received", o["cam-1"].command_id, None)])
    api.tick()
    api.pub.clear()
    r = api.act(rid, "rollback", {"reason": "accuracy regression"})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["status"] == "rolled_back" and doc["rollback_to"]["version"] == 1
    sent = {(c.kind, c.device_id): c for c in api.pub.commands()}
    assert set(sent) == {("cancel", "cam-1"), ("cancel", "cam-2"), ("deploy", "cam-0")}
    back = verified(sent[("deploy", "cam-0")], api.keys, now=api.clock.now, last_sequence=1)
    assert (back.version, back.bundle_digest, back.allow_downgrade) == (1, OLD_DIGEST, True)
    assert api.audits("rollout.rollback")[-1]["outcome"] == "ok"


def test_rollouts_disabled_without_orders_key_say_which_settings_to_set(engine: Engine, db_url: str) -> None:
    _setup(engine)
    with TestClient(create_app(FleetSettings(database_url=db_url, api_token=TOKEN), engine=engine)) as client:
        r = client.post("/api/v1/rollouts", headers=AUTH, json={"name": "r", "bundle": DIGEST, "cohorts": ["fleet"],
                                                                 "phases": PHASES})
        assert r.status_code == 201
        rid = r.json()["id"]
        assert r.json()["rollouts_enabled"] is False
        r = client.post(f"/api/v1/rollouts/{rid}/start", headers=AUTH)
        assert r.status_code == 503
        assert "orders_key_file" in r.json()["detail"] and "download_token_secret" in r.json()["detail"]
        assert client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()["status"] == "draft"
        assert client.post(f"/api/v1/rollouts/{rid}/abort", headers=AUTH).json()["status"] == "aborted"


def test_api_only_replica_stores_commands_for_the_loop_replica(engine: Engine, db_url: str, tmp_path: Path,
                                                               writer: BatchWriter) -> None:
    """An app without a runtime of its own (no publisher): abort's cancels are stored due at once and the replica
    running the loop publishes them at its next tick."""
    keys = Keys()
    settings = deploy_settings(db_url, tmp_path, keys)
    _setup(engine, 2)
    clock = Clock()
    pub = CapturePublisher()
    bridge = make_bridge(engine, settings, pub, clock)
    loop = make_loop(engine, settings, bridge, clock)
    with TestClient(create_app(settings, engine=engine)) as client:
        rid = client.post("/api/v1/rollouts", headers=AUTH, json={"name": "r", "bundle": DIGEST, "cohorts": ["fleet"],
                                                                   "phases": [{"count": 2}]}).json()["id"]
        assert client.post(f"/api/v1/rollouts/{rid}/start", headers=AUTH).status_code == 200
        clock.advance(1)
        loop.tick()
        assert len(pub.sent) == 2
        pub.clear()
        assert client.post(f"/api/v1/rollouts/{rid}/abort", headers=AUTH).status_code == 200
    with engine.connect() as conn:
        due = conn.execute(sa.select(table_of(CommandRecord)).where(
            table_of(CommandRecord).c.kind == "cancel")).mappings().all()
    assert len(due) == 2 and all(r["sends"] == 0 for r in due)
    loop.tick(time.time() + 1)  # the API replica stamped them with its own (real) clock
    assert sorted(c.device_id for c in pub.commands()) == ["cam-0", "cam-1"]


@pytest.mark.integration
def test_abort_cancels_reach_devices_through_a_real_broker_at_once(broker: Any, engine: Engine, db_url: str,
                                                                   tmp_path: Path) -> None:
    keys = Keys()
    settings = deploy_settings(db_url, tmp_path, keys, mqtt_host=broker.host, mqtt_port=broker.port,
                               mqtt_protocol="3.1.1" if broker.kind == "embedded" else "5")
    _setup(engine, 2)
    clock = Clock()
    publisher = MqttCommandPublisher(settings)
    publisher.start()
    sub = CommandSubscriber(broker.host, broker.port)
    try:
        assert publisher.wait_connected(10)
        bridge = make_bridge(engine, settings, publisher, clock)
        app = create_app(settings, engine=engine)
        app.state.deploy = DeployRuntime(bridge, make_loop(engine, settings, bridge, clock), publisher, clock)
        with TestClient(app) as client:
            rid = client.post("/api/v1/rollouts", headers=AUTH, json={
                "name": "r", "bundle": DIGEST, "cohorts": ["fleet"], "phases": [{"count": 2}]}).json()["id"]
            client.post(f"/api/v1/rollouts/{rid}/start", headers=AUTH)
            clock.advance(1)
            app.state.deploy.loop.tick()
            wait_until(lambda: len(sub.commands()) == 2, 10, what="the orders")
            assert client.post(f"/api/v1/rollouts/{rid}/abort", headers=AUTH).status_code == 200
            wait_until(lambda: len(sub.commands()) == 4, 10, what="the cancels, without a tick")
        cancels = [cmd for _, cmd in sub.commands() if cmd.kind == "cancel"]
        assert sorted(c.device_id for c in cancels) == ["cam-0", "cam-1"]
        for c in cancels:
            assert verified(c, keys, now=clock.now, last_sequence=1).action == "cancel"
    finally:
        publisher.stop()
        sub.close()


def _serve(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleet_server", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.integration
def test_serve_refuses_an_unreadable_orders_key_with_the_reason(tmp_path: Path) -> None:
    env = {**os.environ, "FLEET_DATABASE_URL": f"sqlite:///{tmp_path / 'fleet.db'}", "FLEET_API_TOKEN": TOKEN,
           "FLEET_ORDERS_KEY_FILE": str(tmp_path / "missing.pem"), "FLEET_DOWNLOAD_TOKEN_SECRET": "s" * 40}
    assert _serve(["db", "upgrade"], env).returncode == 0
    r = _serve(["serve", "--port", str(free_port())], env)
    assert r.returncode == 1
    assert "orders_key_file" in r.stderr and "missing.pem" in r.stderr and "cannot be read" in r.stderr


@pytest.mark.integration
def test_serve_runs_the_loop_and_publishes_orders_through_mosquitto(mosquitto: Any, tmp_path: Path) -> None:
    """`fleet-server serve` as deployed: the API starts a rollout, the loop in the same process signs the orders
    and publishes them through a real mosquitto to the device's command topic."""
    keys = Keys()
    (tmp_path / "orders.pem").write_bytes(keys.orders[0].to_pem())
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    env = {**os.environ, "FLEET_DATABASE_URL": url, "FLEET_API_TOKEN": TOKEN,
           "FLEET_ORDERS_KEY_FILE": str(tmp_path / "orders.pem"), "FLEET_DOWNLOAD_TOKEN_SECRET": "s" * 40,
           "FLEET_MQTT_HOST": mosquitto.host, "FLEET_MQTT_PORT": str(mosquitto.port),
           "FLEET_ROLLOUT_INTERVAL_S": "0.2"}
    assert _serve(["db", "upgrade"], env).returncode == 0
    engine = create_db_engine(url)
    _setup(engine, 2)
    engine.dispose()
    sub = CommandSubscriber(mosquitto.host, mosquitto.port)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fleet_server", "serve", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None
        wait_until(ready, 30, what="the server")
        assert proc.poll() is None
        r = httpx.post(f"{base}/api/v1/rollouts", headers=AUTH, json={
            "name": "r", "bundle": DIGEST, "cohorts": ["fleet"], "phases": [{"count": 2}]})
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        assert r.json()["rollouts_enabled"] is True
        assert httpx.post(f"{base}/api/v1/rollouts/{rid}/start", headers=AUTH).status_code == 200
        wait_until(lambda: len(sub.commands()) >= 2, 30, what="the orders on the command topics")
        got = {cmd.device_id: cmd for _, cmd in sub.commands()}
        assert sorted(got) == ["cam-0", "cam-1"]
        for cmd in got.values():
            assert verified(cmd, keys, now=time.time()).rollout_id == rid
        doc = httpx.get(f"{base}/api/v1/rollouts/{rid}", headers=AUTH).json()
        assert doc["steps"]["ordered"] == 2
    finally:
        sub.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode in (0, -signal.SIGTERM), proc.stderr.read() if proc.stderr else ""
