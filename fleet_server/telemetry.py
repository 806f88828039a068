"""Reading telemetry back: merged drift histograms and completeness (pure helpers + the queries).

Merging is exact because it is ``agent.drift.Summary.merge`` (integer counts add; moments combine with
Chan's formula). A query reads raw windows whose ``window_start`` lies in ``[since, until)`` plus the hourly
and daily rollups whose whole bucket lies in that interval (rollups hold windows that aged out of raw
retention, so the two never overlap). Windows whose features cannot be decoded or merged (not the layout,
or binned against another baseline) are counted as ``skipped``, never silently mixed in.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from agent.drift import LAYOUT_VERSION, DriftLayoutError, Summary
from agent.protocol import RangeSet, SeqRange
from fleet_server.models import DriftRollupDaily, DriftRollupHourly, DriftWindowRecord, StreamState, table_of

__all__ = [
    "MAX_WINDOWS_PER_QUERY",
    "Merged",
    "QueryTooLargeError",
    "StreamCompleteness",
    "TimeCoverage",
    "load_merged",
    "merge_rows",
    "stream_completeness",
    "time_coverage",
]

MAX_WINDOWS_PER_QUERY = 500_000
"""Rows (raw windows + rollups) one drift query may merge; narrow the query beyond that."""

HOUR, DAY = 3600, 86400


class QueryTooLargeError(ValueError):
    """The query would merge more rows than :data:`MAX_WINDOWS_PER_QUERY`."""


@dataclass
class Merged:
    """The exact merge of a set of windows (``summary`` is ``None`` when nothing matched)."""

    summary: Summary | None = None
    windows: int = 0
    """Device windows represented (a rollup row counts its windows)."""
    samples: int = 0
    skipped: int = 0
    devices: set[str] = field(default_factory=set)
    sources: dict[str, int] = field(default_factory=lambda: {"raw": 0, "hourly": 0, "daily": 0})
    first_window_start: float | None = None
    last_window_end: float | None = None

    def add(self, features: Mapping[str, Any], *, device_id: str, windows: int, samples: int, source: str,
            start: float, end: float) -> bool:
        """Merge one row's features; ``False`` (and counted in ``skipped``) if they do not merge."""
        try:
            part = Summary.from_dict({"layout": LAYOUT_VERSION, "features": features})
            merged = part if self.summary is None else self.summary.merge(part)
        except DriftLayoutError:
            self.skipped += windows
            return False
        self.summary = merged
        self.windows += windows
        self.samples += samples
        self.devices.add(device_id)
        self.sources[source] += 1
        self.first_window_start = start if self.first_window_start is None else min(self.first_window_start, start)
        self.last_window_end = end if self.last_window_end is None else max(self.last_window_end, end)
        return True


def merge_rows(rows: Iterable[Mapping[str, Any]] | sa.MappingResult, *, source: str = "raw",
               into: Merged | None = None) -> Merged:
    """Merge rows having ``device_id``, ``features``, ``samples``, ``window_start``/``window_end`` (raw) or
    ``windows``, ``first_window_start``/``last_window_end`` (rollups)."""
    out = into if into is not None else Merged()
    for r in rows:
        if source == "raw":
            out.add(r["features"], device_id=r["device_id"], windows=1, samples=r["samples"], source=source,
                    start=r["window_start"], end=r["window_end"])
        else:
            out.add(r["features"], device_id=r["device_id"], windows=r["windows"], samples=r["samples"],
                    source=source, start=r["first_window_start"], end=r["last_window_end"])
    return out


def load_merged(session: Session, *, model: str, version: int, devices: Sequence[str] | None, since: float,
                until: float) -> Merged:
    """Merge the raw windows and whole rollup buckets of ``model``/``version`` in ``[since, until)``, for
    ``devices`` (all devices when ``None``)."""
    w = table_of(DriftWindowRecord)
    raw = sa.select(w.c.device_id, w.c.features, w.c.samples, w.c.window_start, w.c.window_end).where(
        w.c.model == model, w.c.version == version, w.c.window_start >= since, w.c.window_start < until)
    if devices is not None:
        raw = raw.where(w.c.device_id.in_(devices))
    queries: list[tuple[str, sa.Select[Any]]] = [("raw", raw.order_by(w.c.window_start, w.c.id))]
    for source, table, span in (("hourly", DriftRollupHourly, HOUR), ("daily", DriftRollupDaily, DAY)):
        t = table_of(table)
        q = sa.select(t.c.device_id, t.c.features, t.c.samples, t.c.windows, t.c.first_window_start,
                      t.c.last_window_end).where(t.c.model == model, t.c.version == version,
                                                 t.c.bucket_start >= since, t.c.bucket_start + span <= until)
        if devices is not None:
            q = q.where(t.c.device_id.in_(devices))
        queries.append((source, q.order_by(t.c.bucket_start, t.c.id)))
    total = 0
    for _, q in queries:
        total += session.execute(sa.select(sa.func.count()).select_from(q.subquery())).scalar_one()
    if total > MAX_WINDOWS_PER_QUERY:
        raise QueryTooLargeError(f"the query matches {total} rows (limit {MAX_WINDOWS_PER_QUERY}); "
                                 "narrow the time range or the devices")
    merged = Merged()
    for source, q in queries:
        rows = session.execute(q.execution_options(yield_per=1000)).mappings()
        merge_rows(rows, source=source, into=merged)
    return merged


# -- completeness -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamCompleteness:
    """What the server holds of one (device, stream), by sequence number."""

    stream: str
    received: int
    expected: int
    """``high_water + 1``: every seq from 0 up to the highest received."""
    ratio: float
    gaps: tuple[SeqRange, ...]
    gap_count: int
    duplicates: int
    high_water: int | None


def stream_completeness(state: StreamState, *, max_gaps: int = 1000) -> StreamCompleteness:
    """Completeness of one stream from its persisted state (gaps: the oldest ``max_gaps``)."""
    rs = RangeSet.from_ranges((a, b) for a, b in state.ranges)
    high = rs.last
    expected = 0 if high is None else high + 1
    gaps = rs.missing(high) if high is not None else ()
    return StreamCompleteness(
        stream=state.stream, received=rs.count, expected=expected,
        ratio=1.0 if expected == 0 else rs.count / expected, gaps=tuple(gaps[:max_gaps]), gap_count=len(gaps),
        duplicates=state.duplicates, high_water=high,
    )


@dataclass(frozen=True)
class TimeCoverage:
    """Completeness of the drift stream by time, from the stored windows' spans."""

    windows: int
    """Stored windows (a merged window counts once)."""
    windows_represented: int
    """Windows the stored ones stand for (a window replacing ``a..b`` stands for ``b - a + 2``)."""
    window_s: float | None
    """Typical window length (median of the unmerged windows), seconds."""
    first_start: float | None
    last_end: float | None
    expected: int
    """``(last_end - first_start) / window_s`` rounded: windows expected over the span."""
    covered_s: float
    ratio: float
    gaps: tuple[tuple[float, float], ...]
    """Uncovered intervals longer than half a window, oldest first."""


def time_coverage(spans: Sequence[tuple[float, float, int | None, int | None]], *,
                  max_gaps: int = 1000) -> TimeCoverage:
    """Coverage from ``(window_start, window_end, replaces_first, replaces_last)`` rows sorted by start."""
    if not spans:
        return TimeCoverage(0, 0, None, None, None, 0, 0.0, 1.0, ())
    plain = [end - start for start, end, first, _ in spans if first is None and end > start]
    window_s = statistics.median(plain) if plain else None
    represented = sum(1 if first is None or last is None else last - first + 2 for _, _, first, last in spans)
    first_start = spans[0][0]
    last_end = max(end for _, end, _, _ in spans)
    covered = 0.0
    gaps: list[tuple[float, float]] = []
    reach = first_start
    tolerance = 0.5 * window_s if window_s else 0.0
    for start, end, _, _ in spans:
        if start > reach:
            if start - reach > tolerance:
                gaps.append((reach, start))
            covered += end - start
        else:
            covered += max(0.0, end - reach)
        reach = max(reach, end)
    span = last_end - first_start
    expected = round(span / window_s) if window_s else represented
    return TimeCoverage(
        windows=len(spans), windows_represented=represented, window_s=window_s, first_start=first_start,
        last_end=last_end, expected=expected, covered_s=covered,
        ratio=1.0 if span <= 0 else min(1.0, covered / span), gaps=tuple(gaps[:max_gaps]),
    )
