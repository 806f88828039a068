"""Device registry API over real ingestion: pre-registration, state from status/last will/heartbeats with an
honest "stale since", filters and id paging, the device detail with its history, label/profile/hardware
changes, revocation (out of cohorts, messages dropped), audit, metrics. SQLite and PostgreSQL (``db_url``)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from agent.protocol import Status
from fleet_server.ingest import BatchWriter, Ingestor
from fleet_server.models import Device, utcnow
from fleet_server.registry import devices as registry_devices
from fleet_server.registry.cohorts import resolve_cohorts
from fleet_server.registry.metrics import registry_metrics
from tests.server.registry_support import (
    audit_actions,
    put_rollout,
    register,
    rows,
    status_with,
)
from tests.server.support import AUTH, baseline, event, frame, heartbeat, window

BASE = baseline()
STALE_S = 180.0  # FleetSettings().device_stale_after_s


def get(client: TestClient, path: str, **params: Any) -> Any:
    r = client.get(path, params=params, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def ids(client: TestClient, **params: Any) -> list[str]:
    return [d["id"] for d in get(client, "/api/v1/devices", **params)["items"]]


def iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_pre_registered_device_is_never_seen_until_its_first_message(client: TestClient, engine: Engine,
                                                                     writer: BatchWriter) -> None:
    doc = register(client, "cam-1", firmware_profile="raspberry-pi-4", labels={"site": "berlin", "floor": "3"},
                   hardware={"board": "rpi4", "memory_mb": 4096})
    assert doc["state"] == "never" and doc["first_seen_at"] is None and doc["last_seen_at"] is None
    assert doc["stale_since"] is None and doc["registered_by"] == "token:bootstrap"
    assert (doc["firmware_profile"], doc["labels"], doc["hardware"]) == (
        "raspberry-pi-4", {"floor": "3", "site": "berlin"}, {"board": "rpi4", "memory_mb": 4096})
    assert ("device.register", "device:cam-1") in audit_actions(engine)
    t = time.time()
    writer.write([frame(heartbeat("cam-1"), at=t), frame(status_with("cam-1"), at=t + 0.5)])
    doc = get(client, "/api/v1/devices/cam-1")
    assert doc["state"] == "online" and doc["last_status"] == "online"
    assert iso(doc["first_seen_at"]).timestamp() == pytest.approx(t, abs=1e-3)
    assert iso(doc["heartbeat_at"]).timestamp() == pytest.approx(t, abs=1e-3)
    assert iso(doc["last_seen_at"]).timestamp() == pytest.approx(t + 0.5, abs=1e-3)
    assert (doc["agent_version"], doc["schema_version"], doc["uptime_s"]) == ("0.3.0", "1.0", 12.0)
    writer.write([frame(heartbeat("cam-1", 99.0), at=t + 2)])  # the first message stays the first
    doc = get(client, "/api/v1/devices/cam-1")
    assert iso(doc["first_seen_at"]).timestamp() == pytest.approx(t, abs=1e-3) and doc["uptime_s"] == 99.0


def test_registration_refuses_duplicates_bad_ids_unknown_profiles_and_bad_labels(client: TestClient,
                                                                                 engine: Engine) -> None:
    register(client, "cam-1")
    r = client.post("/api/v1/devices", json={"id": "cam-1"}, headers=AUTH)
    assert r.status_code == 409 and "already exists" in r.json()["detail"]
    bad = [{"id": "Cam-1"}, {"id": "a" * 65}, {"id": "cam 2"}, {"id": "cam-2", "firmware_profile": "toaster-9000"},
           {"id": "cam-2", "labels": {"Site": "x"}}, {"id": "cam-2", "labels": {"site": "a=b"}},
           {"id": "cam-2", "labels": {f"k{i}": "v" for i in range(33)}}, {"id": "cam-2", "extra": 1},
           {"id": "cam-2", "hardware": {"blob": "x" * 20000}}]
    for body in bad:
        r = client.post("/api/v1/devices", json=body, headers=AUTH)
        assert r.status_code == 422, (body, r.text)
    assert "toaster-9000" in client.post("/api/v1/devices", json=bad[3], headers=AUTH).json()["detail"]
    assert client.post("/api/v1/devices", json={"id": "cam-2"}).status_code == 401
    assert [d["id"] for d in rows(engine, Device)] == ["cam-1"]


def test_online_offline_stale_from_status_last_will_and_silence(client: TestClient, writer: BatchWriter) -> None:
    now = time.time()
    for d in ("on-1", "off-1", "stale-1", "quiet-1"):
        register(client, d)
    old = now - 1000.0
    writer.write([frame(status_with("on-1"), at=now), frame(status_with("off-1"), at=now - 5),
                  frame(Status.offline("off-1"), at=now - 1), frame(status_with("stale-1"), at=old)])
    states = {d["id"]: d for d in get(client, "/api/v1/devices")["items"]}
    assert {k: v["state"] for k, v in states.items()} == {
        "on-1": "online", "off-1": "offline", "stale-1": "stale", "quiet-1": "never"}
    assert states["on-1"]["stale_since"] is None
    assert iso(states["stale-1"]["stale_since"]) == iso(states["stale-1"]["last_seen_at"]) + timedelta(seconds=STALE_S)
    assert iso(states["stale-1"]["stale_since"]).timestamp() == pytest.approx(old + STALE_S, abs=1e-3)
    assert states["off-1"]["stale_since"] is None  # marked offline a second ago: no sign of staleness yet
    for state, want in (("online", ["on-1"]), ("offline", ["off-1"]), ("stale", ["stale-1"]), ("never", ["quiet-1"])):
        assert ids(client, status=state) == want, state
    # A heartbeat brings the stale device back online; the last will's models are not reported.
    writer.write([frame(heartbeat("stale-1"))])
    assert ids(client, status="stale") == [] and "stale-1" in ids(client, status="online")
    assert client.get("/api/v1/devices", params={"status": "asleep"}, headers=AUTH).status_code == 422


def _fleet(client: TestClient, engine: Engine, writer: BatchWriter) -> None:
    """12 devices: sites, floors, profiles, models, states; one cohort by selector plus an explicit member."""
    now = time.time()
    frames = []
    for i in range(12):
        dev = f"cam-{i:02d}"
        register(client, dev, firmware_profile="raspberry-pi-4" if i % 2 else "jetson-orin-nano",
                 labels={"site": "berlin" if i < 6 else "paris", "floor": str(i % 3)})
        if i < 10:
            frames.append(frame(status_with(dev, [("det", 1 + i % 2)] + ([("cls", 7)] if i % 4 == 0 else [])),
                                at=now if i < 8 else now - 1000))
    register(client, "cam_x")  # '_' in an id prefix is a character, not a wildcard
    register(client, "camax")
    writer.write(frames)
    r = client.post("/api/v1/cohorts", json={"name": "berlin-f0", "selector": {"site": "berlin", "floor": "0"}},
                    headers=AUTH)
    assert r.status_code == 201, r.text
    r = client.put("/api/v1/cohorts/berlin-f0/members", json={"device_ids": ["cam-11"]}, headers=AUTH)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("drive_max", [5000, 3, 0], ids=["driven", "mixed", "walked"])
def test_list_filters_each_use_their_index_and_combine(client: TestClient, engine: Engine, writer: BatchWriter,
                                                       drive_max: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same answers whichever plan SQLite gets (a filter's ids driving the page, or a walk by id with
    per-device checks); PostgreSQL plans for itself."""
    monkeypatch.setattr(registry_devices, "DRIVE_MAX", drive_max)
    _fleet(client, engine, writer)
    every = ids(client)
    assert every == sorted(every) and len(every) == 14
    assert ids(client, label="site=berlin") == [f"cam-{i:02d}" for i in range(6)]
    assert ids(client, label=["site=berlin", "floor=0"]) == ["cam-00", "cam-03"]
    assert ids(client, label=["site=berlin", "site=paris"]) == []  # one key, two values
    assert ids(client, cohort="berlin-f0") == ["cam-00", "cam-03", "cam-11"]
    assert ids(client, model="cls") == ["cam-00", "cam-04", "cam-08"]
    assert ids(client, model="det", version=2) == ["cam-01", "cam-03", "cam-05", "cam-07", "cam-09"]
    assert ids(client, version=7) == ["cam-00", "cam-04", "cam-08"]
    assert ids(client, profile="jetson-orin-nano") == [f"cam-{i:02d}" for i in range(0, 12, 2)]
    assert ids(client, q="cam-1") == ["cam-10", "cam-11"]
    assert ids(client, q="cam_") == ["cam_x"]
    assert ids(client, status="stale") == ["cam-08", "cam-09"]
    assert ids(client, status="never") == ["cam-10", "cam-11", "cam_x", "camax"]
    assert ids(client, status="online", label="site=paris", model="det", version=1) == ["cam-06"]
    assert ids(client, cohort="berlin-f0", status="never") == ["cam-11"]
    doc = get(client, "/api/v1/devices", q="cam-00")["items"][0]
    assert doc["models"] == [{"model": "cls", "version": 7}, {"model": "det", "version": 1}]
    assert doc["labels"] == {"floor": "0", "site": "berlin"}
    r = client.get("/api/v1/devices", params={"cohort": "nope"}, headers=AUTH)
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    for params in ({"label": "site"}, {"label": "Site=x"}, {"limit": 0}, {"limit": 1001}, {"q": "CAM"},
                   {"after": "not an id"}, {"version": -1}):
        assert client.get("/api/v1/devices", params=params, headers=AUTH).status_code == 422, params


def test_cursor_pages_cover_the_list_exactly_once(client: TestClient, engine: Engine, writer: BatchWriter) -> None:
    _fleet(client, engine, writer)
    for params in ({}, {"label": "site=paris"}, {"status": "online"}, {"cohort": "berlin-f0"}):
        seen: list[str] = []
        after = None
        while True:
            page = get(client, "/api/v1/devices", limit=2, **params, **({"after": after} if after else {}))
            assert len(page["items"]) <= 2
            seen += [d["id"] for d in page["items"]]
            after = page["next"]
            if after is None:
                break
        assert seen == ids(client, **params) and len(seen) == len(set(seen)), params


def test_detail_has_cohorts_models_and_deployment_history(client: TestClient, engine: Engine,
                                                          writer: BatchWriter) -> None:
    register(client, "cam-1", labels={"site": "berlin"})
    for body in ({"name": "berlin", "selector": {"site": "berlin"}}, {"name": "pilots"}):
        assert client.post("/api/v1/cohorts", json=body, headers=AUTH).status_code == 201
    client.put("/api/v1/cohorts/berlin/members", json={"device_ids": ["cam-1"]}, headers=AUTH)
    client.put("/api/v1/cohorts/pilots/members", json={"device_ids": ["cam-1"]}, headers=AUTH)
    t = time.time()
    writer.write([frame(status_with("cam-1", [("det", 1)]), at=t)])
    put_rollout(engine, "r-1", "det", 2, devices={"cam-1": {"step": "installed", "command_id": "c-1",
                                                            "ordered_at": t - 30}})
    writer.write([frame(event("cam-1", 0, "installed", command_id="c-1", model="det", version=2), at=t + 1),
                  frame(status_with("cam-1", [("det", 2)]), at=t + 2)])
    doc = get(client, "/api/v1/devices/cam-1")
    assert doc["cohorts"] == [{"name": "berlin", "why": ["explicit", "selector"]},
                              {"name": "pilots", "why": ["explicit"]}]
    (m,) = doc["models"]
    assert (m["model"], m["version"], m["previous_version"], m["healthy"], m["slot"]) == ("det", 2, 1, True, "a")
    hist = doc["history"]
    assert [(c["from_version"], c["to_version"], c["rollout_id"], c["command_id"])
            for c in hist["version_changes"]] == [(1, 2, "r-1", "c-1"), (None, 1, None, None)]
    (ro,) = hist["rollouts"]
    assert (ro["rollout_id"], ro["model"], ro["version"], ro["step"], ro["command_id"], ro["rollout_status"]) == (
        "r-1", "det", 2, "installed", "c-1", "running")
    assert [(e["kind"], e["command_id"]) for e in hist["events"]] == [("installed", "c-1")]
    short = get(client, "/api/v1/devices/cam-1", history_limit=1)["history"]
    assert len(short["version_changes"]) == 1 and short["version_changes"][0]["to_version"] == 2
    assert client.get("/api/v1/devices/ghost", headers=AUTH).status_code == 404
    assert client.get("/api/v1/devices/Bad!", headers=AUTH).status_code == 422


def test_patch_labels_profile_and_hardware_and_audit_only_real_changes(client: TestClient, engine: Engine) -> None:
    register(client, "cam-1", firmware_profile="raspberry-pi-4", labels={"site": "berlin", "floor": "1"},
             hardware={"board": "rpi4"})
    before = len(audit_actions(engine))
    r = client.patch("/api/v1/devices/cam-1", json={"labels": {"set": {"floor": "2", "zone": "a"},
                                                               "remove": ["site", "missing"]}}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["labels"] == {"floor": "2", "zone": "a"}
    r = client.patch("/api/v1/devices/cam-1", json={"labels": {"remove": ["zone"], "set": {"zone": "b"}}},
                     headers=AUTH)
    assert r.json()["labels"] == {"floor": "2", "zone": "b"}  # remove first, then set
    r = client.patch("/api/v1/devices/cam-1", json={"firmware_profile": None, "hardware": {"board": "rpi4b"}},
                     headers=AUTH)
    assert (r.json()["firmware_profile"], r.json()["hardware"]) == (None, {"board": "rpi4b"})
    r = client.patch("/api/v1/devices/cam-1", json={"firmware_profile": "raspberry-pi-5", "hardware": None},
                     headers=AUTH)
    assert (r.json()["firmware_profile"], r.json()["hardware"]) == ("raspberry-pi-5", {})
    assert audit_actions(engine)[before:] == [("device.update", "device:cam-1")] * 4
    r = client.patch("/api/v1/devices/cam-1", json={"firmware_profile": "raspberry-pi-5", "labels": {"set": {}}},
                     headers=AUTH)
    assert r.status_code == 200 and len(audit_actions(engine)) == before + 4  # nothing changed: no record
    many = {f"k{i:02d}": "v" for i in range(31)}
    r = client.patch("/api/v1/devices/cam-1", json={"labels": {"set": many}}, headers=AUTH)
    assert r.status_code == 409 and "at most 32" in r.json()["detail"]
    assert get(client, "/api/v1/devices/cam-1")["labels"] == {"floor": "2", "zone": "b"}  # nothing half-applied
    assert client.patch("/api/v1/devices/cam-1", json={"firmware_profile": "toaster"}, headers=AUTH).status_code == 422
    assert client.patch("/api/v1/devices/ghost", json={}, headers=AUTH).status_code == 404
    assert client.patch("/api/v1/devices/cam-1", json={"labels": {"set": {"a": "="}}},
                        headers=AUTH).status_code == 422


def test_label_change_moves_a_device_into_a_selector_cohort(client: TestClient, engine: Engine) -> None:
    register(client, "cam-1", labels={"site": "paris"})
    client.post("/api/v1/cohorts", json={"name": "berlin", "selector": {"site": "berlin"}}, headers=AUTH)
    with engine.connect() as conn:
        assert resolve_cohorts(conn, ["berlin"]) == []
    client.patch("/api/v1/devices/cam-1", json={"labels": {"set": {"site": "berlin"}}}, headers=AUTH)
    with engine.connect() as conn:
        assert resolve_cohorts(conn, ["berlin"]) == ["cam-1"]
    assert get(client, "/api/v1/devices/cam-1")["cohorts"] == [{"name": "berlin", "why": ["selector"]}]


def test_revoked_device_leaves_cohorts_and_its_messages_are_dropped_and_counted(
        client: TestClient, engine: Engine, writer: BatchWriter) -> None:
    register(client, "cam-1", labels={"site": "berlin"})
    register(client, "cam-2", labels={"site": "berlin"})
    client.post("/api/v1/cohorts", json={"name": "berlin", "selector": {"site": "berlin"}}, headers=AUTH)
    client.put("/api/v1/cohorts/berlin/members", json={"device_ids": ["cam-1"]}, headers=AUTH)
    writer.write([frame(status_with("cam-1", [("det", 1)]))])
    r = client.delete("/api/v1/devices/cam-1", headers=AUTH)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["state"] == "revoked" and doc["revoked_at"] is not None and doc["cohorts"] == []
    assert client.delete("/api/v1/devices/cam-1", headers=AUTH).status_code == 409
    assert client.delete("/api/v1/devices/ghost", headers=AUTH).status_code == 404
    with engine.connect() as conn:
        assert resolve_cohorts(conn, ["berlin"]) == ["cam-2"]
        assert resolve_cohorts(conn, ["berlin"], include_revoked=True) == ["cam-1", "cam-2"]
    assert ids(client) == ["cam-2"] and ids(client, status="revoked") == ["cam-1"]
    before = rows(engine, Device, id="cam-1")[0]
    result = writer.write([frame(window("cam-1", 0, BASE)), frame(heartbeat("cam-1")),
                           frame(status_with("cam-1", [("det", 2)])), frame(heartbeat("cam-2"))])
    assert result.stored == 0 and result.acks == ()
    assert writer.ingestor.metrics.rejected["revoked_device"] == 3
    after = rows(engine, Device, id="cam-1")[0]
    assert (after["last_seen_at"], after["models"]) == (before["last_seen_at"], before["models"])
    assert get(client, "/api/v1/devices/cam-1")["models"][0]["version"] == 1
    # A revoked device is not re-registered by auto-registration either.
    BatchWriter(engine, Ingestor(max_frame_bytes=256 * 1024)).write([frame(heartbeat("cam-1"))])
    assert rows(engine, Device, id="cam-1")[0]["revoked_at"] is not None
    assert ("device.revoke", "device:cam-1") in audit_actions(engine)


def test_older_and_newer_schema_minors_keep_working(client: TestClient, writer: BatchWriter) -> None:
    register(client, "old-1")
    register(client, "new-1")
    writer.write([frame(status_with("old-1", [("det", 1)], schema=(1, 0))),
                  frame(status_with("new-1", [("det", 1)], schema=(1, 7)))])
    docs = {d["id"]: d for d in get(client, "/api/v1/devices")["items"]}
    assert (docs["old-1"]["schema_version"], docs["new-1"]["schema_version"]) == ("1.0", "1.7")
    assert all(d["state"] == "online" and d["models"] == [{"model": "det", "version": 1}] for d in docs.values())


def test_device_routes_need_credentials_and_roles(client: TestClient) -> None:
    register(client, "cam-1")
    for method, path in (("get", "/api/v1/devices"), ("get", "/api/v1/devices/cam-1"),
                         ("patch", "/api/v1/devices/cam-1"), ("delete", "/api/v1/devices/cam-1")):
        r = client.request(method.upper(), path, json={} if method == "patch" else None)
        assert r.status_code == 401, (method, path)
        r = client.request(method.upper(), path, headers={"Authorization": "Bearer wrong"},
                           json={} if method == "patch" else None)
        assert r.status_code == 401, (method, path)


def test_registry_metrics_count_devices_by_state(client: TestClient, engine: Engine, writer: BatchWriter) -> None:
    now = time.time()
    for d in ("a", "b", "c", "d", "e"):
        register(client, d)
    writer.write([frame(status_with("a"), at=now), frame(status_with("b"), at=now - 1000),
                  frame(Status.offline("c"), at=now)])
    client.delete("/api/v1/devices/e", headers=AUTH)
    with engine.connect() as conn:
        text = registry_metrics(conn, utcnow(), STALE_S)
    for state, n in (("online", 1), ("offline", 1), ("stale", 1), ("never", 1), ("revoked", 1)):
        assert f'fleet_devices{{state="{state}"}} {n}\n' in text
    with engine.connect() as conn:  # an hour later everyone heard from is stale (offline stays offline)
        later = registry_metrics(conn, datetime.now(UTC) + timedelta(hours=1), STALE_S)
    assert 'fleet_devices{state="stale"} 2\n' in later and 'fleet_devices{state="offline"} 1\n' in later
    r = client.get("/metrics", headers=AUTH)
    assert r.status_code == 200 and 'fleet_devices{state="never"} 1' in r.text
