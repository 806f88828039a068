"""Fleet-server ingestion throughput: windows/s through the ingestor and the database, batched vs per-row commits.

Each window has 32 numeric features x 16 bins (quantile edges) + SLIs, encoded by ``agent.protocol.encode`` exactly
as a device sends it (frames are built before timing). "End to end" is what the MQTT writer thread does per
message: decode + validate the frame, plan (idempotency, supersession, acks), write in one transaction
(``BatchWriter``), and encode the acks. Measured on SQLite (WAL, a file in /tmp) and on a throwaway PostgreSQL
15 cluster with fsync on (tests/services/postgres.py), each with batches of ``--batch`` messages and with one
transaction per message (batch size 1) in the same run. Also reported: decode-only throughput (the CPU floor)
and the stored size of a window (bytes per row, indexes included), whence storage per device per day at one
window per 5 minutes.

Target (telemetry issue): >= 2 000 windows/s end to end.

Run: ``python -m bench.server_ingest [--quick]``. One JSON object per metric per line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from agent.drift import Edges, NumericHistogram, Summary
from agent.protocol import DriftWindow, encode, message_topic
from bench.common import emit
from fleet_server.db import create_db_engine
from fleet_server.ingest import BatchWriter, Ingestor, Received
from fleet_server.migrate import upgrade

FEATURES, BINS, WINDOW_S = 32, 16, 300.0
T0 = 1_750_000_000.0


def make_frames(devices: int, per_device: int, rows: int = 300, seed: int = 0) -> list[Received]:
    rng = np.random.default_rng(seed)
    base = Summary([(f"f{i:02d}", NumericHistogram.from_values(Edges.quantiles(train, BINS), train))
                    for i, train in enumerate(rng.normal(0, 1, (FEATURES, 20_000)))])
    out = []
    for seq in range(per_device):
        for d in range(devices):
            s = Summary.empty_like(base)
            s.add_rows(rng.normal(0.1, 1.0, (rows, FEATURES)))
            w = DriftWindow(device_id=f"dev-{d:05d}", stream_seq=seq, model="bench-model", version=1,
                            window_start=T0 + seq * WINDOW_S, window_end=T0 + (seq + 1) * WINDOW_S, samples=rows,
                            features=s.to_dict()["features"],
                            slis={"latency_ms": {"p50": 1.2, "p99": 4.5}, "errors": 0, "requests": rows})
            out.append(Received(message_topic(w), encode(w), T0))
    return out


def run(url: str, frames: list[Received], batch: int) -> tuple[float, int]:
    """Windows/s writing ``frames`` into a fresh database at ``url`` in batches of ``batch``."""
    engine = create_db_engine(url)
    upgrade(engine)
    writer = BatchWriter(engine, Ingestor(max_frame_bytes=256 * 1024))
    t0 = time.perf_counter()
    acks = 0
    for i in range(0, len(frames), batch):
        result = writer.write(frames[i:i + batch])
        acks += sum(len(encode(a)) > 0 for a in result.acks)
    elapsed = time.perf_counter() - t0
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT COUNT(*) FROM drift_windows")).scalar_one()
    engine.dispose()
    assert stored == len(frames), (stored, len(frames))
    return len(frames) / elapsed, acks


_SHARED: list[Received] = []


def _worker(url: str, part: int, parts: int, batch: int, sync: tuple[Any, Any]) -> None:
    start, done = sync
    engine = create_db_engine(url)
    writer = BatchWriter(engine, Ingestor(max_frame_bytes=256 * 1024))
    mine = _SHARED[part::parts]  # round robin per message, as an MQTT v5 shared subscription distributes
    start.wait()
    for i in range(0, len(mine), batch):
        for ack in writer.write(mine[i:i + batch]).acks:
            encode(ack)
    done.put(part)
    engine.dispose()


def run_parallel(url: str, frames: list[Received], batch: int, processes: int) -> float:
    """Windows/s with ``processes`` ingest processes sharing the traffic (replicas in one $share group)."""
    import multiprocessing as mp

    engine = create_db_engine(url)
    upgrade(engine)
    engine.dispose()
    _SHARED[:] = frames
    ctx = mp.get_context("fork")
    start, done = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, i, processes, batch, (start, done))) for i in range(processes)]
    for p in procs:
        p.start()
    time.sleep(1.0)  # let every process connect
    t0 = time.perf_counter()
    start.set()
    for _ in procs:
        done.get(timeout=600)
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.join()
    engine = create_db_engine(url)
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT COUNT(*) FROM drift_windows")).scalar_one()
        ranges = conn.execute(sa.text("SELECT ranges FROM stream_states")).scalars().all()
    engine.dispose()
    assert stored == len(frames), (stored, len(frames))
    assert all(len(r if isinstance(r, list) else json.loads(r)) == 1 for r in ranges)
    return len(frames) / elapsed


def decode_only(frames: list[Received]) -> float:
    ing = Ingestor(max_frame_bytes=256 * 1024)
    t0 = time.perf_counter()
    decoded = ing.decode_all(frames)
    elapsed = time.perf_counter() - t0
    assert len(decoded) == len(frames)
    return len(frames) / elapsed


def sqlite_row_bytes(path: Path, rows: int) -> dict[str, float]:
    """Bytes per window row: the whole file after VACUUM, and drift_windows + its indexes (dbstat)."""
    import sqlite3

    con = sqlite3.connect(path)
    con.execute("VACUUM")
    total = path.stat().st_size
    per_object: dict[str, int] = {}
    try:
        for name, size in con.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"):
            per_object[name] = size
    except sqlite3.OperationalError:  # SQLite built without dbstat
        pass
    con.close()
    windows = sum(v for k, v in per_object.items() if "drift_windows" in k)
    return {"file_bytes_per_row": total / rows, "table_and_indexes_bytes_per_row": windows / rows if windows else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                    help="ingest processes for the replica run (default: CPUs)")
    args = ap.parse_args()
    devices, per_device, single = (50, 20, 300) if args.quick else (100, 50, 1000)
    frames = make_frames(devices, per_device)
    one_by_one = frames[:single]
    frame_bytes = sum(len(f.payload) for f in frames) / len(frames)
    common: dict[str, Any] = {"features": FEATURES, "bins": BINS, "frame_bytes": round(frame_bytes),
                              "cpus": os.cpu_count()}
    emit("server_ingest", "decode_windows_per_s", value=decode_only(frames), baseline="none", baseline_value=0,
         target="(CPU floor)", windows=len(frames), **common)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        db = Path(tmp) / "batched.db"
        batched, _ = run(f"sqlite:///{db}", frames, args.batch)
        per_row, _ = run(f"sqlite:///{Path(tmp) / 'single.db'}", one_by_one, 1)
        emit("server_ingest", "sqlite_windows_per_s", value=batched, baseline="one transaction per window",
             baseline_value=per_row, target=">= 2000 windows/s", batch=args.batch, windows=len(frames), **common)
        if args.processes > 1:
            par = run_parallel(f"sqlite:///{Path(tmp) / 'parallel.db'}", frames, args.batch, args.processes)
            emit("server_ingest", "sqlite_windows_per_s_replicas", value=par, baseline="one process",
                 baseline_value=batched, target=">= 2000 windows/s", processes=args.processes, **common)
        sizes = sqlite_row_bytes(db, len(frames))
        per_day = 86400 / WINDOW_S
        emit("server_ingest", "sqlite_bytes_per_window", value=sizes["file_bytes_per_row"], baseline="none",
             baseline_value=0, target="(report)", drift_windows_and_indexes=round(
                 sizes["table_and_indexes_bytes_per_row"]),
             mb_per_device_per_day=round(sizes["file_bytes_per_row"] * per_day / 1e6, 3), **common)
    if args.no_postgres:
        return
    from tests.services.postgres import PostgresCluster, PostgresUnavailable

    try:
        cluster = PostgresCluster(durable=True)
    except PostgresUnavailable as exc:
        print(f'{{"bench": "server_ingest", "skipped": "postgresql", "reason": "{exc}"}}')
        return
    with cluster:
        batched, _ = run(cluster.create_database("batched"), frames, args.batch)
        per_row, _ = run(cluster.create_database("single"), one_by_one, 1)
        emit("server_ingest", "postgres_windows_per_s", value=batched, baseline="one transaction per window",
             baseline_value=per_row, target=">= 2000 windows/s", batch=args.batch, windows=len(frames), **common)
        if args.processes > 1:
            par = run_parallel(cluster.create_database("parallel"), frames, args.batch, args.processes)
            emit("server_ingest", "postgres_windows_per_s_replicas", value=par, baseline="one process",
                 baseline_value=batched, target=">= 2000 windows/s", processes=args.processes, **common)
        engine = create_db_engine(cluster.url("batched"))
        with engine.connect() as conn:
            size = conn.execute(sa.text("SELECT pg_total_relation_size('drift_windows')")).scalar_one()
        engine.dispose()
        emit("server_ingest", "postgres_bytes_per_window", value=size / len(frames), baseline="none",
             baseline_value=0, target="(report)", mb_per_device_per_day=round(size / len(frames) * 288 / 1e6, 3),
             **common)


if __name__ == "__main__":
    main()
