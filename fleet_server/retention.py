"""Retention: raw drift windows are kept ``retention_raw_days``, then rolled up exactly into hourly summaries;
hourly summaries are kept ``retention_hourly_days``, then rolled up into daily ones (kept for good).

A rollup row holds, per (device, model, version, bucket), the exact merge (``agent.drift.Summary.merge``) of
the features of every window in the bucket, the number of windows and samples, and the first start / last end.
Windows go to the bucket of their ``window_start``. Cutoffs are aligned to bucket boundaries so every bucket is
rolled whole.

Each chunk is one transaction: merge into the rollup rows, delete the rows merged. A crash between chunks loses
nothing and counts nothing twice. On PostgreSQL a transaction-scoped advisory lock keeps two replicas from
running it at once. Windows whose features do not merge (not the layout, or binned against another baseline than
the rest of their bucket) stay raw and are reported as ``unmergeable``. SLIs are not rolled up (they have no
merge rule yet).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from agent.drift import LAYOUT_VERSION, DriftLayoutError, Summary
from fleet_server.db import is_postgresql
from fleet_server.models import AuditLog, DriftRollupDaily, DriftRollupHourly, DriftWindowRecord, table_of

__all__ = ["DAY", "HOUR", "RetentionReport", "Rollup", "add_to_rollups", "run_retention"]

log = logging.getLogger(__name__)

HOUR, DAY = 3600, 86400
_LOCK_KEY = 0x666C656574_01  # "fleet" + 1: the retention job's advisory lock


@dataclass
class RetentionReport:
    """What one run did."""

    raw_cutoff: float
    hourly_cutoff: float
    raw_rolled: int = 0
    """Raw windows merged into hourly rows (and deleted)."""
    hourly_rows_touched: int = 0
    hourly_rolled: int = 0
    """Hourly rows merged into daily rows (and deleted)."""
    daily_rows_touched: int = 0
    unmergeable: int = 0
    """Rows left in place because their features do not merge."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Rollup:
    """One rollup row being built: the exact merge of its parts."""

    summary: Summary
    windows: int
    samples: int
    first_window_start: float
    last_window_end: float
    ids: list[int] = field(default_factory=list)
    """Source rows merged in this run (deleted with the upsert)."""


def _features(data: Mapping[str, Any]) -> Summary:
    return Summary.from_dict({"layout": LAYOUT_VERSION, "features": data})


def add_to_rollups(rollups: dict[tuple[str, str, int, int], Rollup], row: Mapping[str, Any], span: int) -> bool:
    """Merge one source row (raw window or finer rollup) into its bucket in ``rollups`` (pure). ``False`` when its
    features do not merge; ``rollups`` is then unchanged."""
    start = row["window_start"] if "window_start" in row else row["bucket_start"]
    bucket = int(start // span) * span
    key = (row["device_id"], row["model"], row["version"], bucket)
    try:
        part = _features(row["features"])
        current = rollups.get(key)
        merged = part if current is None else current.summary.merge(part)
    except DriftLayoutError:
        return False
    windows = row.get("windows", 1)
    first = row.get("first_window_start", start)
    last = row.get("last_window_end", row.get("window_end", start))
    if current is None:
        rollups[key] = Rollup(merged, windows, row["samples"], first, last, [row["id"]])
    else:
        current.summary = merged
        current.windows += windows
        current.samples += row["samples"]
        current.first_window_start = min(current.first_window_start, first)
        current.last_window_end = max(current.last_window_end, last)
        current.ids.append(row["id"])
    return True


def _roll(engine: Engine, *, source: sa.Table, target: sa.Table, span: int, cutoff: float, chunk: int,
          order_col: str) -> tuple[int, int, int]:
    """Roll every ``source`` row with ``order_col < cutoff`` into ``target`` buckets of ``span`` seconds.
    Returns (rows rolled, target rows touched, rows left unmergeable)."""
    rolled = touched = unmergeable = 0
    last_id = 0
    pg = is_postgresql(engine)
    while True:
        with engine.connect().execution_options(sqlite_immediate=True) as conn, conn.begin():
            if pg:
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_LOCK_KEY)))
            rows = [dict(r) for r in conn.execute(
                sa.select(source).where(source.c[order_col] < cutoff, source.c.id > last_id)
                .order_by(source.c.id).limit(chunk)).mappings()]
            if not rows:
                return rolled, touched, unmergeable
            last_id = rows[-1]["id"]
            existing = _existing(conn, target, rows, span, pg)
            rollups: dict[tuple[str, str, int, int], Rollup] = {}
            for key, r in existing.items():
                rollups[key] = Rollup(_features(r["features"]), r["windows"], r["samples"], r["first_window_start"],
                                      r["last_window_end"])
            for row in rows:
                if not add_to_rollups(rollups, row, span):
                    unmergeable += 1
            now = datetime.now(UTC)
            inserts, updates, done = [], [], []
            for key, acc in rollups.items():
                if not acc.ids:
                    continue
                values = {"windows": acc.windows, "samples": acc.samples,
                          "first_window_start": acc.first_window_start, "last_window_end": acc.last_window_end,
                          "features": acc.summary.to_dict()["features"], "updated_at": now}
                if key in existing:
                    updates.append({"b_id": existing[key]["id"], **{f"b_{k}": v for k, v in values.items()}})
                else:
                    inserts.append({"device_id": key[0], "model": key[1], "version": key[2], "bucket_start": key[3],
                                    **values})
                done.extend(acc.ids)
            if inserts:
                conn.execute(sa.insert(target), inserts)
            if updates:
                cols = ("windows", "samples", "first_window_start", "last_window_end", "features", "updated_at")
                conn.execute(sa.update(target).where(target.c.id == sa.bindparam("b_id"))
                             .values({c: sa.bindparam(f"b_{c}") for c in cols}), updates)
            for i in range(0, len(done), 500):
                conn.execute(sa.delete(source).where(source.c.id.in_(done[i:i + 500])))
            rolled += len(done)
            touched += len(inserts) + len(updates)


def _existing(conn: sa.Connection, target: sa.Table, rows: Sequence[Mapping[str, Any]], span: int,
              pg: bool) -> dict[tuple[str, str, int, int], dict[str, Any]]:
    keys = {(r["device_id"], r["model"], r["version"],
             int((r["window_start"] if "window_start" in r else r["bucket_start"]) // span) * span) for r in rows}
    q = sa.select(target).where(sa.tuple_(target.c.device_id, target.c.model, target.c.version,
                                          target.c.bucket_start).in_(sorted(keys)))
    if pg:
        q = q.with_for_update()
    return {(r["device_id"], r["model"], r["version"], r["bucket_start"]): dict(r) for r in conn.execute(q).mappings()}


def run_retention(engine: Engine, *, now: float, raw_days: int, hourly_days: int, chunk: int = 2000,
                  actor: str = "system:retention") -> RetentionReport:
    """Roll raw windows older than ``raw_days`` into hourly rows, hourly rows older than ``hourly_days`` into
    daily rows; audit the run. ``now`` is unix seconds (pass the clock in)."""
    raw_cutoff = float(int((now - raw_days * DAY) // HOUR) * HOUR)
    hourly_cutoff = float(int((now - hourly_days * DAY) // DAY) * DAY)
    report = RetentionReport(raw_cutoff=raw_cutoff, hourly_cutoff=hourly_cutoff)
    rolled, touched, bad = _roll(engine, source=table_of(DriftWindowRecord), target=table_of(DriftRollupHourly),
                                 span=HOUR, cutoff=raw_cutoff, chunk=chunk, order_col="window_start")
    report.raw_rolled, report.hourly_rows_touched, report.unmergeable = rolled, touched, bad
    rolled, touched, bad = _roll(engine, source=table_of(DriftRollupHourly), target=table_of(DriftRollupDaily),
                                 span=DAY, cutoff=hourly_cutoff, chunk=chunk, order_col="bucket_start")
    report.hourly_rolled, report.daily_rows_touched = rolled, touched
    report.unmergeable += bad
    with engine.begin() as conn:
        conn.execute(sa.insert(table_of(AuditLog)), [{
            "at": datetime.fromtimestamp(now, UTC), "actor": actor, "action": "retention.run", "target": "drift",
            "outcome": "ok", "detail": report.as_dict()}])
    if report.unmergeable:
        log.warning("retention: %d rows could not be merged and stay in place", report.unmergeable)
    return report
