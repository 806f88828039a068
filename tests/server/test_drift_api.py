"""The drift API: exact merges, scores against the baseline, canary vs control, completeness."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from agent.drift import Summary
from agent.protocol import DriftWindow
from fleet_server.ingest import BatchWriter
from tests.server.support import AUTH, T0, WINDOW_S, assert_same_summary, baseline, event, frame, window

BASE = baseline(features=4, bins=10)


def merged(windows: list[DriftWindow]) -> Summary:
    out = Summary.from_dict({"layout": 1, "features": windows[0].features})
    for w in windows[1:]:
        out = out.merge(Summary.from_dict({"layout": 1, "features": w.features}))
    return out


def drift(client: TestClient, **params: Any) -> dict[str, Any]:
    r = client.get("/api/v1/drift", params={"model": "m", "version": 1, "since": T0 - 3600,
                                            "until": T0 + 86400, **params}, headers=AUTH)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def put_baseline(client: TestClient, thresholds: dict[str, Any] | None = None) -> None:
    r = client.put("/api/v1/models/m/versions/1/baseline", headers=AUTH,
                   json={"summary": BASE.to_dict(), "thresholds": thresholds or {"min_samples": 100}})
    assert r.status_code == 200, r.text


def test_merge_is_exact_across_devices_and_windows(client: TestClient, writer: BatchWriter) -> None:
    windows = [window(f"cam-{d}", s, BASE, rows=50 + 7 * s + d, seed=100 * d + s) for d in range(3) for s in range(6)]
    writer.write([frame(w) for w in windows])
    body = drift(client)
    assert body["windows"] == 18 and body["devices"] == ["cam-0", "cam-1", "cam-2"]
    assert body["samples"] == sum(w.samples for w in windows)
    assert_same_summary(body["summary"], merged(windows))
    hist = body["summary"]["features"]["f00"]
    assert sum(hist["counts"]) + hist["underflow"] + hist["overflow"] + hist["nan"] == body["samples"]
    assert body["scores"] is None and body["baseline"] is False  # no baseline registered yet
    # Device and time filters.
    some = drift(client, devices="cam-0,cam-2")
    assert some["windows"] == 12
    assert_same_summary(some["summary"], merged([w for w in windows if w.device_id != "cam-1"]))
    early = drift(client, since=T0, until=T0 + 3 * WINDOW_S)
    assert early["windows"] == 9
    assert_same_summary(early["summary"], merged([w for w in windows if w.stream_seq < 3]))
    assert drift(client, version=2)["summary"] is None


def test_scores_against_the_baseline_name_the_drifting_features(client: TestClient, writer: BatchWriter) -> None:
    writer.write([frame(window(f"cam-{d}", s, BASE, rows=300, shift=1.5, seed=10 * d + s))
                  for d in range(2) for s in range(3)])
    put_baseline(client)
    body = drift(client)
    assert body["baseline"] is True and body["scores"]["level"] == "alert"
    top = {f["feature"]: f for f in body["top_drifting"]}
    assert {"f00", "f01", "f02", "f03"} <= set(top)  # (and "weather": devices see "snow", never trained on)
    assert all(top[f"f0{i}"]["psi"] > 0.25 and top[f"f0{i}"]["level"] == "alert" for i in range(4))


def test_no_drift_without_shift(client: TestClient, writer: BatchWriter) -> None:
    writer.write([frame(window("cam-0", s, BASE, rows=2000, seed=s)) for s in range(3)])
    put_baseline(client)
    body = drift(client)
    levels = {f["feature"]: f["level"] for f in body["scores"]["features"]}
    assert [levels[f"f0{i}"] for i in range(4)] == ["ok"] * 4
    assert not [f for f in body["top_drifting"] if f["feature"].startswith("f")]


def test_canary_vs_control(client: TestClient, writer: BatchWriter) -> None:
    canary = [window(f"canary-{d}", s, BASE, rows=300, shift=1.0, seed=d * 10 + s) for d in range(2) for s in range(3)]
    control = [window(f"ctl-{d}", s, BASE, rows=300, seed=50 + d * 10 + s) for d in range(3) for s in range(3)]
    writer.write([frame(w) for w in canary + control])
    put_baseline(client)
    r = client.get("/api/v1/drift/compare", headers=AUTH, params={
        "model": "m", "version": 1, "since": T0 - 1, "until": T0 + 86400,
        "group_a": ["canary-0", "canary-1"], "group_b": "ctl-0,ctl-1,ctl-2"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["group_a"]["windows"] == 6 and body["group_b"]["windows"] == 9
    assert_same_summary(body["group_a"]["summary"], merged(canary))
    assert_same_summary(body["group_b"]["summary"], merged(control))
    assert body["a_vs_b"]["level"] == "alert" and {f["feature"] for f in body["a_vs_b_top"]} >= {"f00", "f03"}
    assert body["group_b"]["scores"]["level"] != "alert" or "f00" not in body["group_b"]["scores"]["top"]
    bad = client.get("/api/v1/drift/compare", headers=AUTH, params={
        "model": "m", "version": 1, "group_a": "ctl-0", "group_b": "ctl-0"})
    assert bad.status_code == 422 and "both groups" in bad.text


def test_windows_from_another_baseline_are_skipped_not_mixed(client: TestClient, writer: BatchWriter) -> None:
    other = baseline(features=4, bins=6, seed=9)
    writer.write([frame(window("cam-0", 0, BASE)), frame(window("cam-1", 0, other))])
    body = drift(client)
    assert body["windows"] == 1 and body["skipped"] == 1 and body["devices"] == ["cam-0"]


def test_baseline_put_is_validated_and_audited(client: TestClient, engine: Engine) -> None:
    bad = BASE.to_dict()
    bad["features"]["f00"]["counts"][0] = -1  # type: ignore[index]
    r = client.put("/api/v1/models/m/versions/1/baseline", headers=AUTH, json={"summary": bad})
    assert r.status_code == 422 and "features['f00'].counts[0]" in r.text
    r = client.put("/api/v1/models/m/versions/1/baseline", headers=AUTH,
                   json={"summary": BASE.to_dict(), "thresholds": {"psi_warn": 0.5, "psi_alert": 0.1}})
    assert r.status_code == 422 and "psi_alert" in r.text
    r = client.put("/api/v1/models/Bad!/versions/1/baseline", headers=AUTH, json={"summary": BASE.to_dict()})
    assert r.status_code == 422
    assert client.put("/api/v1/models/m/versions/1/baseline", json={"summary": BASE.to_dict()}).status_code == 401
    put_baseline(client)
    put_baseline(client, {"psi_warn": 0.2, "psi_alert": 0.3})
    got = client.get("/api/v1/models/m/versions/1/baseline", headers=AUTH).json()
    assert got["features"] == ["f00", "f01", "f02", "f03", "weather"] and got["thresholds"]["psi_alert"] == 0.3
    with engine.connect() as conn:
        audit = conn.execute(sa.text("SELECT actor, action, target, outcome FROM audit_log ORDER BY id")).all()
    assert [tuple(a) for a in audit] == [("token:bootstrap", "baseline.put", "model:m/1", "ok")] * 2
    assert client.get("/api/v1/models/m/versions/2/baseline", headers=AUTH).status_code == 404


def test_completeness_by_sequence_and_by_time(client: TestClient, writer: BatchWriter) -> None:
    # Windows 0..11 every 5 minutes; 3 and 4 never arrive; 9..10 arrive merged into 11 (replaces 9..10).
    seqs = [0, 1, 2, 5, 6, 7, 8]
    msgs = [frame(window("cam-1", s, BASE)) for s in seqs]
    merged_w = window("cam-1", 11, BASE, start=T0 + 9 * WINDOW_S, replaces=(9, 10))
    merged_w = DriftWindow(**{**{f: getattr(merged_w, f) for f in (
        "device_id", "stream_seq", "model", "version", "window_start", "samples", "replaces", "features", "slis")},
        "window_end": T0 + 12 * WINDOW_S})
    writer.write([*msgs, frame(merged_w), frame(event("cam-1", 0)), frame(event("cam-1", 0))])
    r = client.get("/api/v1/telemetry/completeness", params={"device": "cam-1"}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    drift_s, events_s = body["streams"]
    assert drift_s == {"stream": "drift", "received": 10, "expected": 12, "ratio": 10 / 12, "gaps": [[3, 4]],
                       "gap_count": 1, "duplicates": 0, "high_water": 11}
    assert events_s["stream"] == "events" and events_s["received"] == 1 and events_s["duplicates"] == 1
    t = body["drift_time"]
    assert t["window_s"] == WINDOW_S and t["expected"] == 12 and t["windows"] == 8
    assert t["windows_represented"] == 10
    assert t["gaps"] == [[T0 + 3 * WINDOW_S, T0 + 5 * WINDOW_S]]
    assert abs(t["ratio"] - 10 / 12) < 1e-9
    assert client.get("/api/v1/telemetry/completeness", params={"device": "nobody"}, headers=AUTH).status_code == 404
