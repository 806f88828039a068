"""Cohort API: explicit members and label selectors, resolved membership with why, late joiners (checked with
``resolve_cohorts``, which the rollout loop calls), deletion refused while a rollout still targets the cohort,
audit. SQLite and PostgreSQL (``db_url``)."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from fleet_server.models import CohortMember
from fleet_server.registry.cohorts import resolve_cohorts
from tests.server.registry_support import audit_actions, put_rollout, register, rows
from tests.server.support import AUTH


def post(client: TestClient, body: dict[str, Any]) -> Any:
    r = client.post("/api/v1/cohorts", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    return r.json()


def members(client: TestClient, name: str, **params: Any) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    after = None
    while True:
        r = client.get(f"/api/v1/cohorts/{name}/devices", params={**params, **({"after": after} if after else {})},
                       headers=AUTH)
        assert r.status_code == 200, r.text
        out += [(d["device_id"], d["why"]) for d in r.json()["items"]]
        after = r.json()["next"]
        if after is None:
            return out


def resolved(engine: Engine, *names: str) -> list[str]:
    with engine.connect() as conn:
        return resolve_cohorts(conn, names)


def test_create_get_list_update_delete_and_audit(client: TestClient, engine: Engine) -> None:
    register(client, "cam-1", labels={"site": "berlin"})
    doc = post(client, {"name": "berlin", "description": "all of Berlin", "selector": {"site": "berlin"}})
    assert (doc["name"], doc["selector"], doc["explicit_members"], doc["size"]) == (
        "berlin", {"site": "berlin"}, 0, 1)
    assert doc["created_by"] == "token:bootstrap"
    for i in range(3):
        post(client, {"name": f"c{i}"})
    page = client.get("/api/v1/cohorts", params={"limit": 3}, headers=AUTH).json()
    assert [c["name"] for c in page["items"]] == ["berlin", "c0", "c1"] and page["next"] == "c1"
    page = client.get("/api/v1/cohorts", params={"limit": 3, "after": page["next"]}, headers=AUTH).json()
    assert [c["name"] for c in page["items"]] == ["c2"] and page["next"] is None
    r = client.patch("/api/v1/cohorts/berlin", json={"selector": {"site": "paris"}, "description": "moved"},
                     headers=AUTH)
    assert r.status_code == 200 and (r.json()["selector"], r.json()["size"]) == ({"site": "paris"}, 0)
    assert client.patch("/api/v1/cohorts/berlin", json={"selector": None}, headers=AUTH).status_code == 422
    assert client.patch("/api/v1/cohorts/ghost", json={}, headers=AUTH).status_code == 404
    assert client.delete("/api/v1/cohorts/berlin", headers=AUTH).status_code == 204
    assert client.get("/api/v1/cohorts/berlin", headers=AUTH).status_code == 404
    assert client.delete("/api/v1/cohorts/berlin", headers=AUTH).status_code == 404
    actions = [a for a in audit_actions(engine) if a[0].startswith("cohort.")]
    assert actions == [("cohort.create", "cohort:berlin")] + [("cohort.create", f"cohort:c{i}") for i in range(3)] + [
        ("cohort.update", "cohort:berlin"), ("cohort.delete", "cohort:berlin")]


def test_bad_names_selectors_and_duplicates_are_refused(client: TestClient) -> None:
    post(client, {"name": "pilots"})
    assert client.post("/api/v1/cohorts", json={"name": "pilots"}, headers=AUTH).status_code == 409
    for body in ({"name": "Pilots"}, {"name": ""}, {"name": "x", "selector": {"Site": "a"}},
                 {"name": "x", "selector": {"site": ""}}, {"name": "x", "selector": {f"k{i}": "v" for i in range(17)}},
                 {"name": "x", "description": "nul\x00"}, {"name": "x", "bogus": 1}):
        assert client.post("/api/v1/cohorts", json=body, headers=AUTH).status_code == 422, body
    assert client.post("/api/v1/cohorts", json={"name": "x"}).status_code == 401


def test_bulk_members_are_idempotent_and_unknown_devices_refuse_the_call(client: TestClient,
                                                                         engine: Engine) -> None:
    for d in ("a", "b", "c"):
        register(client, d)
    post(client, {"name": "pilots"})
    r = client.put("/api/v1/cohorts/pilots/members", json={"device_ids": ["a", "b", "a"]}, headers=AUTH)
    assert r.status_code == 200 and r.json() == {"cohort": "pilots", "added": 2, "already": 0}
    r = client.put("/api/v1/cohorts/pilots/members", json={"device_ids": ["b", "c"]}, headers=AUTH)
    assert r.json() == {"cohort": "pilots", "added": 1, "already": 1}
    r = client.put("/api/v1/cohorts/pilots/members", json={"device_ids": ["c", "ghost", "zombie"]}, headers=AUTH)
    assert r.status_code == 404 and "ghost, zombie" in r.json()["detail"]
    assert client.put("/api/v1/cohorts/nope/members", json={"device_ids": ["a"]}, headers=AUTH).status_code == 404
    assert client.put("/api/v1/cohorts/pilots/members", json={"device_ids": []}, headers=AUTH).status_code == 422
    assert sorted(r["device_id"] for r in rows(engine, CohortMember)) == ["a", "b", "c"]
    assert client.delete("/api/v1/cohorts/pilots/members/b", headers=AUTH).status_code == 204
    assert client.delete("/api/v1/cohorts/pilots/members/b", headers=AUTH).status_code == 404
    assert resolved(engine, "pilots") == ["a", "c"]
    adds = [a for a in audit_actions(engine) if a[0].startswith("cohort.members")]
    assert adds == [("cohort.members.add", "cohort:pilots")] * 2 + [("cohort.members.remove", "cohort:pilots")]


def test_resolved_membership_pages_say_why_and_leave_revoked_devices_out(client: TestClient,
                                                                         engine: Engine) -> None:
    for i in range(7):
        register(client, f"d{i}", labels={"site": "berlin" if i % 2 else "paris", "tier": "canary"})
    post(client, {"name": "mixed", "selector": {"site": "berlin", "tier": "canary"}})
    client.put("/api/v1/cohorts/mixed/members", json={"device_ids": ["d0", "d1", "d6"]}, headers=AUTH)
    want = [("d0", ["explicit"]), ("d1", ["explicit", "selector"]), ("d3", ["selector"]), ("d5", ["selector"]),
            ("d6", ["explicit"])]
    assert members(client, "mixed", limit=2) == want
    assert members(client, "mixed") == want
    assert resolved(engine, "mixed") == [d for d, _ in want]
    assert client.get("/api/v1/cohorts/mixed", headers=AUTH).json()["size"] == 5
    client.delete("/api/v1/devices/d1", headers=AUTH)
    assert [d for d, _ in members(client, "mixed")] == ["d0", "d3", "d5", "d6"] == resolved(engine, "mixed")
    assert client.get("/api/v1/cohorts/ghost/devices", headers=AUTH).status_code == 404


def test_late_joiners_are_in_the_cohort_from_then_on(client: TestClient, engine: Engine) -> None:
    register(client, "early", labels={"site": "berlin"})
    post(client, {"name": "berlin", "selector": {"site": "berlin"}})
    post(client, {"name": "pilots"})
    assert resolved(engine, "berlin") == ["early"] and resolved(engine, "pilots") == []
    # A device registered later with a matching label joins by selector; another by an explicit add.
    register(client, "late-label", labels={"site": "berlin"})
    register(client, "late-added")
    assert resolved(engine, "berlin") == ["early", "late-label"]
    client.put("/api/v1/cohorts/pilots/members", json={"device_ids": ["late-added"]}, headers=AUTH)
    assert resolved(engine, "pilots") == ["late-added"]
    assert resolved(engine, "berlin", "pilots") == ["early", "late-added", "late-label"]
    # A label change is a join (and a leave) as well.
    client.patch("/api/v1/devices/late-added", json={"labels": {"set": {"site": "berlin"}}}, headers=AUTH)
    client.patch("/api/v1/devices/early", json={"labels": {"remove": ["site"]}}, headers=AUTH)
    assert resolved(engine, "berlin") == ["late-added", "late-label"]


def test_cohort_targeted_by_an_unfinished_rollout_cannot_be_deleted(client: TestClient, engine: Engine) -> None:
    for name in ("c-draft", "c-running", "c-paused", "c-done", "c-free"):
        post(client, {"name": name})
    put_rollout(engine, "r1", "det", 1, status="draft", cohorts=["c-draft"])
    put_rollout(engine, "r2", "det", 2, status="running", cohorts=["c-running"])
    put_rollout(engine, "r3", "det", 3, status="paused", cohorts=["c-paused", "c-running"])
    put_rollout(engine, "r4", "det", 4, status="completed", cohorts=["c-done"])
    for name, users in (("c-draft", "r1"), ("c-running", "r2, r3"), ("c-paused", "r3")):
        r = client.delete(f"/api/v1/cohorts/{name}", headers=AUTH)
        assert r.status_code == 409 and users in r.json()["detail"], (name, r.text)
    assert client.delete("/api/v1/cohorts/c-done", headers=AUTH).status_code == 204
    assert client.delete("/api/v1/cohorts/c-free", headers=AUTH).status_code == 204
    assert client.get("/api/v1/cohorts/c-running", headers=AUTH).status_code == 200
