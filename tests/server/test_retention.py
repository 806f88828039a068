"""Retention: raw windows roll up into hourly then daily summaries exactly; nothing is lost or counted twice."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from agent.drift import Summary
from agent.protocol import DriftWindow
from fleet_server.ingest import BatchWriter
from fleet_server.retention import DAY, HOUR, run_retention
from tests.conftest import REPO
from tests.server.support import AUTH, T0, assert_same_summary, baseline, frame, window

BASE = baseline(features=3, bins=8)
STEP = 1200.0  # one window per 20 minutes


def merged(windows: list[DriftWindow]) -> Summary:
    out = Summary.from_dict({"layout": 1, "features": windows[0].features})
    for w in windows[1:]:
        out = out.merge(Summary.from_dict({"layout": 1, "features": w.features}))
    return out


def fleet_view(client: TestClient) -> dict[str, Any]:
    r = client.get("/api/v1/drift", headers=AUTH,
                   params={"model": "m", "version": 1, "since": T0, "until": T0 + 4 * DAY})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def count(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar_one())


def test_rollup_is_exact_and_idempotent(client: TestClient, writer: BatchWriter, engine: Engine) -> None:
    windows = [window(f"cam-{d}", i, BASE, rows=5 + (i % 7), start=T0 + i * STEP, seed=1000 * d + i)
               for d in range(2) for i in range(int(3 * DAY / STEP))]  # 3 days, 2 devices
    for i in range(0, len(windows), 200):
        writer.write([frame(w) for w in windows[i:i + 200]])
    before = fleet_view(client)
    assert before["windows"] == len(windows) and before["sources"]["raw"] == len(windows)

    # Now is day 3 + 10 s: raw kept 1 day (days 0 and 1 roll up to hours), hourly kept 2 days (day 0 to days).
    report = run_retention(engine, now=T0 + 3 * DAY + 10, raw_days=1, hourly_days=2)
    assert report.raw_cutoff == T0 + 2 * DAY and report.hourly_cutoff == T0 + DAY
    day0 = [w for w in windows if w.window_start < T0 + DAY]
    day1 = [w for w in windows if T0 + DAY <= w.window_start < T0 + 2 * DAY]
    assert report.raw_rolled == len(day0) + len(day1) and report.unmergeable == 0
    assert report.hourly_rolled == 2 * 24 and count(engine, "drift_rollups_daily") == 2
    assert count(engine, "drift_rollups_hourly") == 2 * 24 and count(engine, "drift_windows") == len(windows) // 3

    after = fleet_view(client)
    assert after["windows"] == before["windows"] and after["samples"] == before["samples"]
    assert after["sources"] == {"raw": len(windows) // 3, "hourly": 48, "daily": 2}
    assert_same_summary(after["summary"], merged(windows))
    assert {f: h["counts"] for f, h in after["summary"]["features"].items() if "edges" in h} == {
        f: h["counts"] for f, h in before["summary"]["features"].items() if "edges" in h}

    with engine.connect() as conn:
        daily = conn.execute(sa.text("SELECT device_id, windows, samples, features FROM drift_rollups_daily "
                                     "WHERE device_id = 'cam-1'")).mappings().one()
        hour = conn.execute(sa.text("SELECT windows, samples, features FROM drift_rollups_hourly WHERE "
                                    "device_id = 'cam-0' AND bucket_start = :b"), {"b": int(T0 + DAY + 5 * HOUR)}
                            ).mappings().one()
    cam1_day0 = [w for w in day0 if w.device_id == "cam-1"]
    assert daily["windows"] == len(cam1_day0) and daily["samples"] == sum(w.samples for w in cam1_day0)
    features = daily["features"] if isinstance(daily["features"], dict) else json.loads(daily["features"])
    assert_same_summary({"layout": 1, "features": features}, merged(cam1_day0))
    in_hour = [w for w in day1 if w.device_id == "cam-0" and T0 + DAY + 5 * HOUR <= w.window_start
               < T0 + DAY + 6 * HOUR]
    assert hour["windows"] == len(in_hour) == 3

    again = run_retention(engine, now=T0 + 3 * DAY + 10, raw_days=1, hourly_days=2)
    assert (again.raw_rolled, again.hourly_rolled) == (0, 0)
    assert fleet_view(client)["windows"] == len(windows)
    with engine.connect() as conn:
        audit = conn.execute(sa.text("SELECT actor, action FROM audit_log")).all()
    assert [tuple(a) for a in audit] == [("system:retention", "retention.run")] * 2


def test_late_windows_merge_into_an_existing_rollup(writer: BatchWriter, engine: Engine) -> None:
    writer.write([frame(window("cam-0", i, BASE, start=T0 + i * 600.0)) for i in range(3)])
    run_retention(engine, now=T0 + 10 * DAY, raw_days=1, hourly_days=30)
    writer.write([frame(window("cam-0", 3, BASE, start=T0 + 1800.0))])  # late arrival, same hour
    report = run_retention(engine, now=T0 + 10 * DAY, raw_days=1, hourly_days=30)
    assert report.raw_rolled == 1 and report.hourly_rows_touched == 1
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT windows FROM drift_rollups_hourly")).scalars().all() == [4]


def test_unmergeable_windows_stay_raw(writer: BatchWriter, engine: Engine) -> None:
    other = baseline(features=3, bins=5, seed=7)
    writer.write([frame(window("cam-0", 0, BASE)), frame(window("cam-0", 1, other))])
    report = run_retention(engine, now=T0 + 10 * DAY, raw_days=1, hourly_days=30)
    assert report.raw_rolled == 1 and report.unmergeable == 1 and count(engine, "drift_windows") == 1


def test_cli_db_retention(db_url: str, writer: BatchWriter) -> None:
    writer.write([frame(window("cam-0", i, BASE)) for i in range(3)])  # T0 is long past: all roll up
    r = subprocess.run([sys.executable, "-m", "fleet_server", "db", "retention", "--database-url", db_url],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["raw_rolled"] == 3
