"""Version tracking: real ingestion of statuses updates ``device_models`` and writes ``version_changes``
attributed to the rollout order that installed the version (null for sideloads and the agent's own
rollbacks); the version API (distribution, who is behind, change history). SQLite and PostgreSQL
(``db_url``); one test through real brokers (mosquitto and the embedded one) with the MQTT ingestion service,
and one with a real agent process that installs a signed bundle and reports its new version by itself."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy.engine import Engine

from agent.protocol import Channel, Command, Status, device_topic, encode, message_topic
from fleet_server.db import create_db_engine
from fleet_server.ingest import BatchWriter, Ingestor
from fleet_server.migrate import upgrade
from fleet_server.models import DeviceModel, VersionChange, table_of
from fleet_server.mqtt import MqttIngestService
from fleet_server.registry.versions import ChangeDraft, ModelReport, diff_models
from fleet_server.settings import FleetSettings
from tests.server.registry_support import put_bundle, put_rollout, register, rows, set_step, status_with
from tests.server.support import AUTH, event, frame
from tests.services.mqtt import wait_until

DIGEST_V1 = hashlib.sha256(b"det:1").hexdigest()


def models(engine: Engine, device: str) -> dict[str, tuple[int, int | None]]:
    return {r["model"]: (r["version"], r["previous_version"]) for r in rows(engine, DeviceModel, device_id=device)}


def changes(engine: Engine, device: str | None = None) -> list[tuple[Any, ...]]:
    vc = table_of(VersionChange)
    q = sa.select(vc.c.device_id, vc.c.model, vc.c.from_version, vc.c.to_version, vc.c.rollout_id, vc.c.command_id)
    if device is not None:
        q = q.where(vc.c.device_id == device)
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(q.order_by(vc.c.id))]


def test_diff_models_is_pure_and_replays_reports_in_order() -> None:
    at = [datetime(2026, 1, 1, 0, 0, s, tzinfo=UTC) for s in range(4)]
    current = {"d": {"m": {"version": 1, "previous_version": None, "healthy": True, "changed_at": at[0]}}}
    snapshot = repr(current)
    reports = [ModelReport("d", (("m", 2, True), ("n", 5, True)), at[1]),
               ModelReport("d", (("m", 1, False),), at[2]), ModelReport("d", (("m", 1, False),), at[3])]
    upserts, deletes, found = diff_models(current, reports)
    assert repr(current) == snapshot
    assert found == [ChangeDraft("d", "m", 1, 2, at[1]), ChangeDraft("d", "n", None, 5, at[1]),
                     ChangeDraft("d", "m", 2, 1, at[2])]
    assert upserts == [{"device_id": "d", "model": "m", "version": 1, "previous_version": 2, "healthy": False,
                        "changed_at": at[2]}]
    assert deletes == []  # n appeared and went within the batch: nothing stored to delete
    assert diff_models(current, [ModelReport("d", (("m", 1, True),), at[3])]) == ([], [], [])


def test_status_updates_versions_and_a_redelivered_status_changes_nothing(client: TestClient, engine: Engine,
                                                                          writer: BatchWriter) -> None:
    register(client, "cam-1")
    writer.write([frame(status_with("cam-1", [("det", 1)]))])
    assert models(engine, "cam-1") == {"det": (1, None)}
    assert changes(engine) == [("cam-1", "det", None, 1, None, None)]
    writer.write([frame(status_with("cam-1", [("det", 1)]))])  # retained: seen again on every reconnect
    writer.write([frame(Status.offline("cam-1"))])  # the last will says nothing about models
    assert models(engine, "cam-1") == {"det": (1, None)} and len(changes(engine)) == 1
    writer.write([frame(status_with("cam-1", [("det", 2), ("cls", 4)]))])
    assert models(engine, "cam-1") == {"det": (2, 1), "cls": (4, None)}
    writer.write([frame(status_with("cam-1", [("det", 2)], healthy=False))])
    assert models(engine, "cam-1") == {"det": (2, 1)}  # cls no longer served: its row goes
    (det,) = rows(engine, DeviceModel, device_id="cam-1")
    assert det["healthy"] is False
    assert changes(engine) == [("cam-1", "det", None, 1, None, None), ("cam-1", "det", 1, 2, None, None),
                               ("cam-1", "cls", None, 4, None, None)]


def test_change_is_attributed_to_the_rollout_order_that_installed_it(client: TestClient, engine: Engine,
                                                                     writer: BatchWriter) -> None:
    for d in ("a", "b", "c", "d"):
        register(client, d)
    writer.write([frame(status_with(d, [("det", 1)])) for d in ("a", "b", "c", "d")])
    put_rollout(engine, "r-1", "det", 2, devices={
        "a": {"step": "installed", "command_id": "c-a"},  # the rollout loop already saw 'installed'
        "b": {"step": "verified", "command_id": "c-b"},  # not yet: the device's event in the batch says so
        "c": {"step": "verified", "command_id": "c-c"},  # not yet, and the event comes after the status
        "d": {"step": "downloading", "command_id": "c-d"},  # still downloading: a 2 now is a sideload
    })
    writer.write([frame(status_with("a", [("det", 2)])),
                  frame(status_with("b", [("det", 2)])), frame(event("b", 0, "installed", command_id="c-b",
                                                                     model="det", version=2)),
                  frame(status_with("c", [("det", 2)])), frame(status_with("d", [("det", 2)]))])
    got = {c[0]: c[4:] for c in changes(engine) if c[3] == 2}
    assert got == {"a": ("r-1", "c-a"), "b": ("r-1", "c-b"), "c": (None, None), "d": (None, None)}
    writer.write([frame(event("c", 0, "installed", command_id="c-c", model="det", version=2))])
    got = {c[0]: c[4:] for c in changes(engine) if c[3] == 2}
    assert got["c"] == ("r-1", "c-c") and got["d"] == (None, None)  # attributed late, once its event came
    r = client.get("/api/v1/version-changes", params={"rollout": "r-1"}, headers=AUTH).json()
    assert sorted(c["device_id"] for c in r["items"]) == ["a", "b", "c"]


def test_sideloads_and_agent_rollbacks_have_no_rollout_and_an_order_is_credited_once(
        client: TestClient, engine: Engine, writer: BatchWriter) -> None:
    register(client, "cam-1")
    writer.write([frame(status_with("cam-1", [("det", 1)]))])
    put_rollout(engine, "r-1", "det", 2, devices={"cam-1": {"step": "installed", "command_id": "c-1"}})
    writer.write([frame(status_with("cam-1", [("det", 2)]))])
    set_step(engine, "r-1", "cam-1", "rolled_back")  # health check failed: the agent went back by itself
    writer.write([frame(status_with("cam-1", [("det", 1)]))])
    writer.write([frame(status_with("cam-1", [("det", 3)]))])  # edge-agent install PATH (sideload)
    set_step(engine, "r-1", "cam-1", "healthy")
    writer.write([frame(status_with("cam-1", [("det", 2)]))])  # back to 2 by hand: not the rollout's doing again
    assert changes(engine, "cam-1") == [
        ("cam-1", "det", None, 1, None, None), ("cam-1", "det", 1, 2, "r-1", "c-1"),
        ("cam-1", "det", 2, 1, None, None), ("cam-1", "det", 1, 3, None, None), ("cam-1", "det", 3, 2, None, None)]


def test_rollback_order_is_attributed_to_its_rollout(client: TestClient, engine: Engine,
                                                     writer: BatchWriter) -> None:
    register(client, "cam-1")
    writer.write([frame(status_with("cam-1", [("det", 2)]))])
    put_rollout(engine, "r-1", "det", 2, status="rolled_back",
                rollback_to={"model": "det", "version": 1, "bundle_digest": DIGEST_V1},
                devices={"cam-1": {"step": "healthy", "command_id": "c-rb", "rollback": True}})
    writer.write([frame(status_with("cam-1", [("det", 1)]))])
    assert changes(engine, "cam-1")[-1] == ("cam-1", "det", 2, 1, "r-1", "c-rb")


def _versions_fleet(client: TestClient, engine: Engine, writer: BatchWriter) -> None:
    """det: 3 devices on 1, 2 on 2, 1 on 3 (one of them revoked); cls on two; a cohort of four."""
    spec = {"a": [("det", 1)], "b": [("det", 1), ("cls", 7)], "c": [("det", 1)], "d": [("det", 2)],
            "e": [("det", 2), ("cls", 8)], "f": [("det", 3)], "g": [], "x": [("det", 1)]}
    for d in spec:
        register(client, d, labels={"site": "berlin"} if d in "abdg" else {})
    writer.write([frame(status_with(d, m)) for d, m in spec.items()])
    client.delete("/api/v1/devices/x", headers=AUTH)
    client.post("/api/v1/cohorts", json={"name": "berlin", "selector": {"site": "berlin"}}, headers=AUTH)


def test_version_distribution_fleet_wide_and_per_cohort(client: TestClient, engine: Engine,
                                                        writer: BatchWriter) -> None:
    _versions_fleet(client, engine, writer)

    def dist(**params: Any) -> list[tuple[str, int, int]]:
        r = client.get("/api/v1/versions", params=params, headers=AUTH)
        assert r.status_code == 200, r.text
        return [(i["model"], i["version"], i["devices"]) for i in r.json()["items"]]

    assert dist() == [("cls", 8, 1), ("cls", 7, 1), ("det", 3, 1), ("det", 2, 2), ("det", 1, 3)]
    assert dist(model="det") == [("det", 3, 1), ("det", 2, 2), ("det", 1, 3)]
    assert dist(cohort="berlin") == [("cls", 7, 1), ("det", 2, 1), ("det", 1, 2)]
    assert dist(model="nope") == []
    assert client.get("/api/v1/versions", params={"cohort": "ghost"}, headers=AUTH).status_code == 404


def test_devices_behind_the_latest_version(client: TestClient, engine: Engine, writer: BatchWriter) -> None:
    _versions_fleet(client, engine, writer)

    def behind(model: str = "det", **params: Any) -> tuple[Any, Any, list[tuple[str, int | None]]]:
        out: list[tuple[str, int | None]] = []
        after, doc = None, {}
        while True:
            r = client.get(f"/api/v1/versions/{model}/behind",
                           params={**params, "limit": 2, **({"after": after} if after else {})}, headers=AUTH)
            assert r.status_code == 200, r.text
            doc = r.json()
            out += [(i["device_id"], i["version"]) for i in doc["items"]]
            after = doc["next"]
            if after is None:
                return doc["latest"], doc["latest_source"], out

    assert behind() == (3, "seen", [("a", 1), ("b", 1), ("c", 1), ("d", 2), ("e", 2)])
    put_bundle(engine, "det", 2)
    assert behind() == (2, "bundles", [("a", 1), ("b", 1), ("c", 1), ("f", 3)])
    assert behind(latest=1) == (1, "param", [("d", 2), ("e", 2), ("f", 3)])
    assert behind(cohort="berlin") == (2, "bundles", [("a", 1), ("b", 1)])
    assert behind(cohort="berlin", include_missing="true") == (2, "bundles", [("a", 1), ("b", 1), ("g", None)])
    assert behind("unknown-model") == (None, None, [])
    r = client.get("/api/v1/versions/det/behind", params={"cohort": "ghost"}, headers=AUTH)
    assert r.status_code == 404


def test_version_changes_newest_first_filtered_and_paged(client: TestClient, engine: Engine,
                                                         writer: BatchWriter) -> None:
    for d in ("a", "b"):
        register(client, d)
    for v in (1, 2, 3):
        writer.write([frame(status_with("a", [("det", v), ("cls", v)])), frame(status_with("b", [("det", v)]))])

    def pages(**params: Any) -> list[tuple[str, str, int]]:
        out: list[tuple[str, str, int]] = []
        after = None
        while True:
            r = client.get("/api/v1/version-changes", params={**params, "limit": 2, **({"after": after} if after
                                                                                      else {})}, headers=AUTH)
            assert r.status_code == 200, r.text
            out += [(c["device_id"], c["model"], c["to_version"]) for c in r.json()["items"]]
            after = r.json()["next"]
            if after is None:
                return out

    every = pages()
    assert len(every) == 9 and every[0] == ("b", "det", 3) and every[-1][2] == 1
    assert pages(device="a", model="det") == [("a", "det", 3), ("a", "det", 2), ("a", "det", 1)]
    assert pages(model="cls") == [("a", "cls", 3), ("a", "cls", 2), ("a", "cls", 1)]
    assert pages(rollout="none-such") == []
    assert client.get("/api/v1/version-changes", params={"after": "x"}, headers=AUTH).status_code == 422


@pytest.mark.integration
def test_a_status_over_a_real_broker_updates_device_models(broker: Any, engine: Engine) -> None:
    settings = FleetSettings(mqtt_host=broker.host, mqtt_port=broker.port, ingest_ack_interval_s=0.05,
                             mqtt_client_id="fleet-versions", mqtt_protocol="5" if broker.kind == "mosquitto"
                             else "3.1.1")
    svc = MqttIngestService(settings, BatchWriter(engine, Ingestor(max_frame_bytes=settings.ingest_max_frame_bytes)))
    svc.start()
    device = paho.Client(CallbackAPIVersion.VERSION2, client_id="cam-mqtt")
    try:
        assert svc.wait_subscribed(15)
        device.connect(broker.host, broker.port)
        device.loop_start()
        for v in (4, 5):
            msg = status_with("cam-mqtt", [("det", v)])
            device.publish(message_topic(msg), encode(msg), qos=1, retain=True).wait_for_publish(5)
            wait_until(lambda v=v: models(engine, "cam-mqtt").get("det", (0, None))[0] == v, 15,  # type: ignore[misc]
                       what=f"det {v} in device_models")
        assert models(engine, "cam-mqtt") == {"det": (5, 4)}
        assert [c[2:4] for c in changes(engine, "cam-mqtt")] == [(None, 4), (4, 5)]
        assert svc.metrics.statuses >= 2
    finally:
        device.publish(device_topic("cam-mqtt", Channel.STATUS), b"", qos=1, retain=True).wait_for_publish(5)
        device.loop_stop()
        device.disconnect()
        svc.stop()


# -- a real agent reports the version it installed ---------------------------------------------------------


@pytest.fixture
def agent_server(mosquitto: Any, tmp_path: Path) -> Iterator[tuple[Engine, MqttIngestService]]:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    engine = create_db_engine(url)
    upgrade(engine)
    settings = FleetSettings(database_url=url, mqtt_host=mosquitto.host, mqtt_port=mosquitto.port,
                             ingest_ack_interval_s=0.05, mqtt_client_id="fleet-agent-e2e")
    svc = MqttIngestService(settings, BatchWriter(engine, Ingestor(max_frame_bytes=settings.ingest_max_frame_bytes)))
    svc.start()
    assert svc.wait_subscribed(15)
    yield engine, svc
    svc.stop()
    engine.dispose()


@pytest.mark.integration
def test_real_agent_publishes_a_fresh_status_after_an_install(short_tmp: Path, mosquitto: Any,
                                                              agent_server: tuple[Engine, MqttIngestService]) -> None:
    """Without the agent publishing its status when a model starts serving, the server would only learn the
    new version at the agent's next reconnect."""
    from agent.demo import MODELS_DIR
    from agent.localapi import LocalClient
    from tests.conftest import REPO
    from tests.sim.fleet_http import FleetHttpSim
    from tests.updater.support import Keys, make_bundle, make_order

    engine, _svc = agent_server
    keys = Keys()
    (short_tmp / "root.json").write_bytes(keys.root_bytes())
    cfg = short_tmp / "agent.toml"
    cfg.write_text(
        f'device_id = "pi-ver"\nstate_dir = "{short_tmp}/state"\nprofile = "generic-x86-64"\nlog_format = "json"\n'
        f'[api]\nsocket_path = "{short_tmp}/api.sock"\nsocket_mode = "0600"\n'
        f'[[models]]\npath = "{MODELS_DIR}/cancer_mlp_int8.onnx"\n'
        f'[updates]\ntrust_root = "{short_tmp}/root.json"\ntick_s = 0.1\n'
        f'[mqtt]\nhost = "{mosquitto.host}"\nport = {mosquitto.port}\nack_timeout_s = 2.0\n')
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    commander = paho.Client(CallbackAPIVersion.VERSION2, client_id="e2e-commander")
    try:
        LocalClient(short_tmp / "api.sock").wait_ready(alive=lambda: proc.poll() is None)
        wait_until(lambda: models(engine, "pi-ver") == {"cancer-mlp": (1, None)}, 30,
                   what="the agent's first status at the server")
        data = make_bundle(keys, version=2)
        put_rollout(engine, "r-e2e", "cancer-mlp", 2, devices={"pi-ver": {"step": "ordered",
                                                                          "command_id": "cmd-ver"}})
        commander.connect(mosquitto.host, mosquitto.port)
        commander.loop_start()
        with FleetHttpSim() as http:
            url = http.add_bundle(hashlib.sha256(data).hexdigest(), data, tokens={"tok"})
            order = make_order(keys, data, device_id="pi-ver", url=url, token="tok", sequence=1,
                               command_id="cmd-ver")
            cmd = Command(device_id="pi-ver", command_id="cmd-ver", kind="deploy", order=order, sent_at=time.time())
            commander.publish(device_topic("pi-ver", Channel.COMMANDS), encode(cmd), qos=1).wait_for_publish(5)
            try:
                wait_until(lambda: models(engine, "pi-ver") == {"cancer-mlp": (2, 1)}, 60,
                           what="version 2 in device_models without a reconnect")
                wait_until(lambda: changes(engine, "pi-ver")[-1][4:] == ("r-e2e", "cmd-ver"), 30,
                           what="the change attributed to the rollout")
            except AssertionError:
                proc.send_signal(signal.SIGTERM)
                _, err = proc.communicate(timeout=30)
                raise AssertionError(f"changes {changes(engine, 'pi-ver')}; agent log:\n{err.decode()[-3000:]}") \
                    from None
        assert changes(engine, "pi-ver") == [("pi-ver", "cancer-mlp", None, 1, None, None),
                                             ("pi-ver", "cancer-mlp", 1, 2, "r-e2e", "cmd-ver")]
    finally:
        commander.loop_stop()
        commander.disconnect()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
