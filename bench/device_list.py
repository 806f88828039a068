"""Device list API latency at 100 000 devices, on SQLite and PostgreSQL.

The fleet: ``--devices`` devices (default 100 000) with three labels each (``site`` of 20, ``floor`` of 5,
``tier`` canary for 5 %), a ``det`` model row on every device and a ``cls`` row on 30 % (versions 1..3),
states 70 % online, 10 % offline (last will), 10 % stale, 10 % never heard from, and a cohort ``canary``
(selector ``tier=canary`` plus 1 000 explicit members). Rows are generated with bulk inserts (executemany);
PostgreSQL is then ``ANALYZE``d, as autovacuum would do after such a load. SQLite is not (no server does that
for it).

The server is the real app under uvicorn in its own process; the client is httpx over loopback with
keep-alive, one request at a time (the server process and the client share the machine's two cores).
Cases: the first page, filtered pages (a label and a state; a cohort; a model version), and a deep cursor page
(``after`` at the 90 000th id). Each case: a warm-up, then ``--repeats`` runs of ``--requests`` requests; the
figure is the median over runs of each run's p95 (and p50), with the min and max of the p95s beside it.

Target (issue 5): p95 < 50 ms at 100 000 devices, on SQLite and on PostgreSQL.

Run: ``python -m bench.device_list [--quick] [--no-postgres]``. One JSON object per metric per line, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from bench.common import emit
from fleet_server.db import create_db_engine, is_postgresql
from fleet_server.migrate import upgrade
from fleet_server.models import Cohort, CohortMember, Device, DeviceLabel, DeviceModel, table_of

TOKEN = "bench-token-0123456789abcdef"
STALE_S = 3600.0
TARGET_MS = 50.0
CHUNK = 10_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _copy(conn: sa.Connection, table: sa.Table, data: list[dict[str, Any]]) -> None:
    """PostgreSQL ``COPY ... FROM STDIN`` (psycopg 3) of ``data`` into ``table``: JSON columns as text, times as
    aware datetimes."""
    cols = list(data[0])
    json_cols = {c for c in cols if isinstance(table.c[c].type, sa.JSON)}
    raw = conn.connection.driver_connection
    assert raw is not None
    with raw.cursor() as cur, cur.copy(f"COPY {table.name} ({', '.join(cols)}) FROM STDIN") as copy:
        for row in data:
            copy.write_row([json.dumps(row[c]) if c in json_cols else row[c] for c in cols])


def generate(url: str, n: int, seed: int = 7) -> dict[str, Any]:
    """Create the fleet in a fresh database at ``url``; returns row counts and the seconds it took."""
    engine = create_db_engine(url)
    upgrade(engine)
    rng = random.Random(seed)
    now = datetime.now(UTC)
    t0 = time.perf_counter()
    devices: list[dict[str, Any]] = []
    labels: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    for i in range(n):
        dev = f"dev-{i:06d}"
        roll = rng.random()
        seen: datetime | None
        if roll < 0.7:
            status, seen = "online", now - timedelta(seconds=rng.uniform(0, 60))
        elif roll < 0.8:
            status, seen = "offline", now - timedelta(seconds=rng.uniform(0, 600))
        elif roll < 0.9:
            status, seen = "online", now - timedelta(seconds=rng.uniform(2 * STALE_S, 30 * STALE_S))
        else:
            status, seen = None, None
        devices.append({
            "id": dev, "first_seen_at": seen, "last_seen_at": seen, "last_status": status, "last_status_at": seen,
            "agent_version": "0.3.0" if seen else None, "schema_version": "1.0" if seen else None,
            "models": [], "uptime_s": None, "heartbeat_at": seen, "firmware_profile": rng.choice(
                ["raspberry-pi-4", "raspberry-pi-5", "jetson-orin-nano", "coral-dev-board"]),
            "hardware": {"memory_mb": rng.choice([2048, 4096, 8192])}, "registered_at": now,
            "registered_by": "bench", "revoked_at": None, "order_sequence": 0})
        labels += [{"device_id": dev, "key": "site", "value": f"site-{rng.randrange(20):02d}"},
                   {"device_id": dev, "key": "floor", "value": str(rng.randrange(5))},
                   {"device_id": dev, "key": "tier", "value": "canary" if rng.random() < 0.05 else "stable"}]
        if seen is not None:
            models.append({"device_id": dev, "model": "det", "version": rng.randint(1, 3), "previous_version": None,
                           "healthy": True, "changed_at": seen})
            if rng.random() < 0.3:
                models.append({"device_id": dev, "model": "cls", "version": rng.randint(1, 3),
                               "previous_version": None, "healthy": True, "changed_at": seen})
    members: list[dict[str, Any]] = [
        {"cohort": "canary", "device_id": f"dev-{i:06d}", "added_at": now, "added_by": "bench"}
        for i in sorted(rng.sample(range(n), min(1000, n)))]
    with engine.begin() as conn:
        for table, data in ((Device, devices), (DeviceLabel, labels), (DeviceModel, models)):
            if is_postgresql(engine):
                _copy(conn, table_of(table), data)
            else:
                for i in range(0, len(data), CHUNK):
                    conn.execute(sa.insert(table_of(table)), data[i:i + CHUNK])
        conn.execute(sa.insert(table_of(Cohort)).values(name="canary", description="", selector={"tier": "canary"},
                                                        created_at=now, created_by="bench", updated_at=now))
        conn.execute(sa.insert(table_of(CohortMember)), members)
    if is_postgresql(engine):
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("ANALYZE"))
    seconds = time.perf_counter() - t0
    engine.dispose()
    return {"devices": len(devices), "labels": len(labels), "device_models": len(models),
            "cohort_members": len(members), "generate_s": round(seconds, 2)}


def serve(url: str, port: int) -> None:
    """The app under uvicorn (runs in the child process)."""
    import uvicorn

    from fleet_server.app import create_app
    from fleet_server.settings import FleetSettings

    app = create_app(FleetSettings(database_url=url, api_token=TOKEN, device_stale_after_s=STALE_S))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


CASES: list[tuple[str, dict[str, Any]]] = [
    ("first page", {}),
    ("label + status", {"label": "site=site-07", "status": "online"}),
    ("cohort", {"cohort": "canary"}),
    ("model + version", {"model": "cls", "version": 2}),
    ("deep cursor (after 90%)", {}),  # "after" set from --devices
]


def measure(url: str, n: int, *, repeats: int, requests: int, warmup: int) -> list[dict[str, Any]]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.device_list", "--serve", url, str(port)],
                            stdout=subprocess.DEVNULL)
    results = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"},
                          timeout=30) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the server did not start")
                time.sleep(0.1)
            for name, case_params in CASES:
                params = {"after": f"dev-{int(n * 0.9):06d}"} if name.startswith("deep") else case_params
                first = client.get("/api/v1/devices", params=params)
                first.raise_for_status()
                items = len(first.json()["items"])
                for _ in range(warmup):
                    client.get("/api/v1/devices", params=params)
                p95s, p50s = [], []
                for _ in range(repeats):
                    samples = []
                    for _ in range(requests):
                        t0 = time.perf_counter()
                        r = client.get("/api/v1/devices", params=params)
                        samples.append((time.perf_counter() - t0) * 1000)
                        assert r.status_code == 200
                    samples.sort()
                    p95s.append(samples[min(len(samples) - 1, round(0.95 * (len(samples) - 1)))])
                    p50s.append(statistics.median(samples))
                results.append({"case": name, "params": params, "items": items,
                                "p95_ms": statistics.median(p95s), "p95_min_ms": min(p95s), "p95_max_ms": max(p95s),
                                "p50_ms": statistics.median(p50s)})
    finally:
        proc.terminate()
        proc.wait(30)
    return results


def report(backend: str, n: int, facts: dict[str, Any], results: list[dict[str, Any]]) -> None:
    for r in results:
        emit("device_list", f"{backend}_p95_ms", value=r["p95_ms"], baseline="none", baseline_value=0,
             target=f"< {TARGET_MS:.0f} ms", case=r["case"], items=r["items"], p50_ms=round(r["p50_ms"], 2),
             p95_min_ms=round(r["p95_min_ms"], 2), p95_max_ms=round(r["p95_max_ms"], 2), cpus=os.cpu_count(),
             **facts)


def table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    out = ["| Backend | Case | Items | p50 ms | p95 ms (median of runs) | p95 min..max | < 50 ms? |",
           "|---|---|---|---|---|---|---|"]
    for backend, r in rows:
        out.append(f"| {backend} | {r['case']} | {r['items']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                   f"{r['p95_min_ms']:.1f}..{r['p95_max_ms']:.1f} | {'yes' if r['p95_ms'] < TARGET_MS else 'NO'} |")
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--no-postgres", action="store_true")
    args = ap.parse_args()
    repeats, requests, warmup = (3, 40, 10) if args.quick else (7, 100, 30)
    n = args.devices
    rows: list[tuple[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="bench-devlist-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'fleet.db'}"
        facts = generate(url, n)
        results = measure(url, n, repeats=repeats, requests=requests, warmup=warmup)
        report("sqlite", n, facts, results)
        rows += [("SQLite", r) for r in results]
    if not args.no_postgres:
        from tests.services.postgres import PostgresCluster, PostgresUnavailable

        try:
            cluster = PostgresCluster(durable=True)
        except PostgresUnavailable as exc:
            print(f'{{"bench": "device_list", "skipped": "postgresql", "reason": "{exc}"}}')
        else:
            with cluster:
                url = cluster.create_database("devlist")
                facts = generate(url, n)
                results = measure(url, n, repeats=repeats, requests=requests, warmup=warmup)
                report("postgres", n, facts, results)
                rows += [("PostgreSQL", r) for r in results]
    print(f"\n{n} devices; {repeats} runs x {requests} requests per case (limit=100)\n")
    print(table(rows))


if __name__ == "__main__":
    main()
