"""Drift and telemetry-completeness API.

* ``GET /api/v1/drift``: the exact merge of the windows of one model version (optionally some devices, a time
  range), scored against the registered baseline when there is one, with the top drifting features.
* ``GET /api/v1/drift/compare``: two device groups (e.g. canary vs control) merged separately and scored
  against each other and against the baseline.
* ``PUT/GET /api/v1/models/{model}/versions/{version}/baseline``: the baseline (a drift summary and
  thresholds) until the bundle store provides it.
* ``GET /api/v1/telemetry/completeness``: per device, what was received by sequence number and by time.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Path, Query, status
from pydantic import BaseModel

from agent.drift import DriftLayoutError, DriftReport, DriftThresholds, Summary, score_summary
from agent.protocol import MAX_SEQ, is_valid_identifier
from fleet_server import audit
from fleet_server.api.deps import ID_PATTERN, Operator, Viewer
from fleet_server.api.errors import error_responses
from fleet_server.db import SessionDep
from fleet_server.models import (
    Baseline,
    BaselineCreate,
    BaselinePublic,
    Device,
    DriftWindowRecord,
    StreamState,
    table_of,
    utcnow,
)
from fleet_server.telemetry import Merged, QueryTooLargeError, load_merged, stream_completeness, time_coverage

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["drift"])


DEFAULT_RANGE_S = 86400.0
UNPROCESSABLE = 422  # the request is well-formed but its values cannot be used

ModelName = Annotated[str, Query(pattern=ID_PATTERN, description="model name")]
ModelVersion = Annotated[int, Query(ge=0, le=MAX_SEQ, description="model version")]
Since = Annotated[datetime | None, Query(description="ISO 8601 or unix seconds; default: until - 24 h")]
Until = Annotated[datetime | None, Query(description="ISO 8601 or unix seconds (exclusive); default: now")]


class GroupPublic(BaseModel):
    """One merged group of windows."""

    devices: list[str]
    windows: int
    samples: int
    skipped: int
    sources: dict[str, int]
    first_window_start: float | None
    last_window_end: float | None
    summary: dict[str, Any] | None
    """The merged histograms in the ``agent.drift`` layout (``None``: no window matched)."""
    scores: dict[str, Any] | None
    """``DriftReport.to_dict()`` against the baseline (``None``: no baseline, or nothing to score)."""
    top_drifting: list[dict[str, Any]]
    scores_error: str | None = None


class DriftPublic(GroupPublic):
    model: str
    version: int
    since: float
    until: float
    baseline: bool


class ComparePublic(BaseModel):
    model: str
    version: int
    since: float
    until: float
    baseline: bool
    group_a: GroupPublic
    group_b: GroupPublic
    a_vs_b: dict[str, Any] | None
    """Group A scored with group B as the reference (the canary against its control)."""
    a_vs_b_top: list[dict[str, Any]]
    a_vs_b_error: str | None = None


class StreamCompletenessPublic(BaseModel):
    stream: str
    received: int
    expected: int
    ratio: float
    gaps: list[list[int]]
    gap_count: int
    duplicates: int
    high_water: int | None


class TimeCoveragePublic(BaseModel):
    windows: int
    windows_represented: int
    window_s: float | None
    first_start: float | None
    last_end: float | None
    expected: int
    covered_s: float
    ratio: float
    gaps: list[list[float]]


class CompletenessPublic(BaseModel):
    device: str
    streams: list[StreamCompletenessPublic]
    drift_time: TimeCoveragePublic
    """Coverage of the raw windows still held (``retention_raw_days``)."""


def _range(since: datetime | None, until: datetime | None) -> tuple[float, float]:
    def unix(d: datetime) -> float:
        return (d if d.tzinfo is not None else d.replace(tzinfo=UTC)).timestamp()

    end = unix(until) if until is not None else time.time()
    start = unix(since) if since is not None else end - DEFAULT_RANGE_S
    if start >= end:
        raise HTTPException(UNPROCESSABLE, "since must be before until")
    return start, end


def _device_list(values: list[str] | None, name: str = "devices") -> list[str] | None:
    """Repeated and comma-separated device ids, sorted and unique; 422 naming a value that is not a device id."""
    if not values:
        return None
    out = sorted({v.strip() for item in values for v in item.split(",") if v.strip()})
    for v in out:
        if not is_valid_identifier(v):
            raise HTTPException(UNPROCESSABLE, f"{name}: {v[:80]!r} is not a device id (1-64 characters of a-z, "
                                               "0-9, '.', '_' or '-')")
    return out or None


def _baseline(session: SessionDep, model: str, version: int) -> tuple[Summary, DriftThresholds] | None:
    row = session.get(Baseline, (model, version))
    if row is None:
        return None
    return Summary.from_dict(row.summary), DriftThresholds.from_dict(row.thresholds)


def _top(report: DriftReport) -> list[dict[str, Any]]:
    return [dict(report.feature(name).to_dict()) for name in report.top]


def _score(reference: Summary, current: Summary | None,
           thresholds: DriftThresholds) -> tuple[DriftReport | None, str | None]:
    if current is None:
        return None, None
    try:
        return score_summary(reference, current, thresholds), None
    except DriftLayoutError as exc:
        return None, f"cannot score against the reference: {exc}"


def _group(merged: Merged, base: tuple[Summary, DriftThresholds] | None) -> GroupPublic:
    report, error = _score(base[0], merged.summary, base[1]) if base is not None else (None, None)
    return GroupPublic(
        devices=sorted(merged.devices), windows=merged.windows, samples=merged.samples, skipped=merged.skipped,
        sources=merged.sources, first_window_start=merged.first_window_start,
        last_window_end=merged.last_window_end,
        summary=merged.summary.to_dict() if merged.summary is not None else None,
        scores=report.to_dict() if report is not None else None,
        top_drifting=_top(report) if report is not None else [], scores_error=error,
    )


def _load(session: SessionDep, **kw: Any) -> Merged:
    try:
        return load_merged(session, **kw)
    except QueryTooLargeError as exc:
        raise HTTPException(UNPROCESSABLE, str(exc)) from None


@router.get("/drift", response_model=DriftPublic, responses=error_responses(404, 422))
def get_drift(*, session: SessionDep, _: Viewer, model: ModelName, version: ModelVersion,
              devices: Annotated[list[str] | None, Query(description="device ids (repeat or comma-separate)")] = None,
              since: Since = None, until: Until = None) -> DriftPublic:
    """Merged histograms of ``model``/``version`` over ``[since, until)``, scored against the baseline."""
    start, end = _range(since, until)
    merged = _load(session, model=model, version=version, devices=_device_list(devices), since=start, until=end)
    base = _baseline(session, model, version)
    group = _group(merged, base)
    return DriftPublic(model=model, version=version, since=start, until=end, baseline=base is not None,
                       **group.model_dump())


@router.get("/drift/compare", response_model=ComparePublic, responses=error_responses(404, 422))
def compare_drift(*, session: SessionDep, _: Viewer, model: ModelName, version: ModelVersion,
                  group_a: Annotated[list[str], Query(description="device ids of group A (e.g. canary)")],
                  group_b: Annotated[list[str], Query(description="device ids of group B (e.g. control)")],
                  since: Since = None, until: Until = None) -> ComparePublic:
    """Two device groups merged separately, each scored against the baseline, and A against B."""
    start, end = _range(since, until)
    a_ids, b_ids = _device_list(group_a, "group_a"), _device_list(group_b, "group_b")
    if a_ids is None or b_ids is None:
        raise HTTPException(UNPROCESSABLE, "group_a and group_b need at least one device")
    if set(a_ids) & set(b_ids):
        raise HTTPException(UNPROCESSABLE,
                            f"devices in both groups: {sorted(set(a_ids) & set(b_ids))}")
    a = _load(session, model=model, version=version, devices=a_ids, since=start, until=end)
    b = _load(session, model=model, version=version, devices=b_ids, since=start, until=end)
    base = _baseline(session, model, version)
    thresholds = base[1] if base is not None else DriftThresholds()
    a_vs_b, error = (None, None) if b.summary is None else _score(b.summary, a.summary, thresholds)
    return ComparePublic(model=model, version=version, since=start, until=end, baseline=base is not None,
                         group_a=_group(a, base), group_b=_group(b, base),
                         a_vs_b=a_vs_b.to_dict() if a_vs_b is not None else None,
                         a_vs_b_top=_top(a_vs_b) if a_vs_b is not None else [], a_vs_b_error=error)


@router.put("/models/{model}/versions/{version}/baseline", response_model=BaselinePublic,
            responses=error_responses(422))
def put_baseline(*, session: SessionDep, who: Operator, body: BaselineCreate,
                 model: Annotated[str, Path(pattern=ID_PATTERN)],
                 version: Annotated[int, Path(ge=0, le=MAX_SEQ)]) -> BaselinePublic:
    """Register (or replace) the drift baseline of a model version. Audited."""
    try:
        summary = Summary.from_dict(body.summary)
        thresholds = DriftThresholds.from_dict(body.thresholds)
    except DriftLayoutError as exc:
        raise HTTPException(UNPROCESSABLE, str(exc)) from None
    now = utcnow()
    row = session.get(Baseline, (model, version))
    replaced = row is not None
    if row is None:
        row = Baseline(model=model, version=version, summary={}, updated_at=now, updated_by=who.actor)
    row.summary = summary.to_dict()
    row.thresholds = thresholds.to_dict()
    row.updated_at = now
    row.updated_by = who.actor
    session.add(row)
    audit.record(session, actor=who.actor, action="baseline.put", target=f"model:{model}/{version}", at=now,
                 detail={"features": len(summary), "replaced": replaced})
    session.commit()
    return BaselinePublic(model=model, version=version, features=list(summary.names),
                          thresholds=row.thresholds, updated_at=now, updated_by=who.actor)


@router.get("/models/{model}/versions/{version}/baseline", response_model=BaselinePublic,
            responses=error_responses(404))
def get_baseline(*, session: SessionDep, _: Viewer, model: Annotated[str, Path(pattern=ID_PATTERN)],
                 version: Annotated[int, Path(ge=0, le=MAX_SEQ)]) -> BaselinePublic:
    row = session.get(Baseline, (model, version))
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no baseline for {model} version {version}")
    return BaselinePublic(model=model, version=version, features=list(row.summary.get("features", {})),
                          thresholds=row.thresholds, updated_at=row.updated_at, updated_by=row.updated_by)


@router.get("/telemetry/completeness", response_model=CompletenessPublic, responses=error_responses(404, 422))
def completeness(*, session: SessionDep, _: Viewer, device: Annotated[str, Query(pattern=ID_PATTERN)],
                 since: Since = None, until: Until = None,
                 max_gaps: Annotated[int, Query(ge=1, le=10000)] = 1000) -> CompletenessPublic:
    """Windows and events received vs expected (by sequence number), and drift coverage by time."""
    if session.get(Device, device) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown device {device!r}")
    st = table_of(StreamState)
    states = [StreamState.model_validate(dict(r)) for r in session.execute(
        sa.select(st).where(st.c.device_id == device).order_by(st.c.stream)).mappings()]
    w = table_of(DriftWindowRecord)
    q = sa.select(w.c.window_start, w.c.window_end, w.c.replaces_first, w.c.replaces_last).where(
        w.c.device_id == device)
    if since is not None or until is not None:
        start, end = _range(since, until)
        q = q.where(w.c.window_start >= start, w.c.window_start < end)
    spans = [(r[0], r[1], r[2], r[3]) for r in session.execute(q.order_by(w.c.window_start, w.c.seq))]
    cov = time_coverage(spans, max_gaps=max_gaps)
    streams = []
    for s in states:
        c = stream_completeness(s, max_gaps=max_gaps)
        streams.append(StreamCompletenessPublic(
            stream=c.stream, received=c.received, expected=c.expected, ratio=c.ratio,
            gaps=[list(g) for g in c.gaps], gap_count=c.gap_count, duplicates=c.duplicates,
            high_water=c.high_water))
    return CompletenessPublic(device=device, streams=streams, drift_time=TimeCoveragePublic(
        windows=cov.windows, windows_represented=cov.windows_represented, window_s=cov.window_s,
        first_start=cov.first_start, last_end=cov.last_end, expected=cov.expected, covered_s=cov.covered_s,
        ratio=cov.ratio, gaps=[list(g) for g in cov.gaps]))
