"""Version tracking: which version of each model every device serves, every change with its time and rollout.

Ingestion (:class:`fleet_server.ingest.BatchWriter`) calls :func:`record_model_reports` with the models of
each *online* ``Status`` in a batch (an offline status or last will says nothing about models), inside the
batch's transaction and after the batch has updated (so locked) the devices' rows:

* ``device_models`` holds one row per (device, model): the version served now, the one before, the agent's
  ``healthy`` flag and when the server saw the version become active. A model the device no longer reports
  (a first install rolled back, a model removed) loses its row.
* ``version_changes`` gets one row per model whose version changed, attributed (:func:`attribute`) to the
  rollout whose order installed it: a ``rollout_devices`` row of that device whose rollout targets this
  model and version (its ``rollback_to`` version for a rollback order) and whose device reached
  ``installed``/``healthy``, by its step or by the device's own ``installed``/``healthy`` event for that
  command. Sideloads and the agent's own rollbacks have no such row: their ``rollout_id`` is null. A command
  is credited at most once.
* Events arrive independently of statuses (they drain from the device's outbox), so an
  ``installed``/``healthy`` event that comes *after* the status that showed its version attributes the
  still-unattributed change afterwards (:func:`attribute_late`).

The rest are the queries behind ``/api/v1/versions`` and ``/api/v1/version-changes``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from fleet_server.db import is_postgresql
from fleet_server.models import (
    BundleRecord,
    Device,
    DeviceModel,
    EventRecord,
    RolloutDevice,
    RolloutRecord,
    VersionChange,
    table_of,
)
from fleet_server.registry.cohorts import cohort_selector, membership_condition

__all__ = [
    "INSTALLED_STEPS",
    "Candidate",
    "ChangeDraft",
    "ModelReport",
    "attribute",
    "attribute_late",
    "behind_page",
    "changes_page",
    "diff_models",
    "distribution",
    "latest_version",
    "record_model_reports",
    "unix_to_utc",
]

INSTALLED_STEPS: Final = frozenset({"installed", "healthy"})
"""Rollout device steps (and deploy event kinds) that mean the ordered version is on the device."""


@dataclass(frozen=True, slots=True)
class ModelReport:
    """The models an online ``Status`` reported: ``(name, version, healthy)`` each, received at ``at``."""

    device_id: str
    models: tuple[tuple[str, int, bool], ...]
    at: datetime


@dataclass(frozen=True, slots=True)
class ChangeDraft:
    """A version change found by :func:`diff_models` (before attribution)."""

    device_id: str
    model: str
    from_version: int | None
    to_version: int
    at: datetime


@dataclass(frozen=True, slots=True)
class Candidate:
    """A ``rollout_devices`` row of a device, with what its order installs (``version``: the rollout's version,
    or its ``rollback_to`` version for a rollback order)."""

    device_id: str
    rollout_id: str
    command_id: str | None
    step: str
    ordered_at: float | None
    model: str
    version: int | None


_ROW_KEYS = ("version", "previous_version", "healthy", "changed_at")


def diff_models(current: Mapping[str, Mapping[str, Mapping[str, Any]]], reports: Sequence[ModelReport]
                ) -> tuple[list[dict[str, Any]], list[tuple[str, str]], list[ChangeDraft]]:
    """Apply ``reports`` (in arrival order) to ``current`` (``{device: {model: device_models row}}``) and return
    the rows to upsert (full ``device_models`` rows), the ``(device, model)`` rows to delete and the version
    changes, in order. Pure; the inputs are not modified. A report that repeats what is stored changes
    nothing (statuses are retained and redelivered)."""
    state: dict[str, dict[str, dict[str, Any]]] = {
        dev: {m: {k: row.get(k) for k in _ROW_KEYS} for m, row in models.items()} for dev, models in current.items()}
    changes: list[ChangeDraft] = []
    touched: set[str] = set()
    for r in reports:
        rows = state.setdefault(r.device_id, {})
        touched.add(r.device_id)
        reported = {name: (version, healthy) for name, version, healthy in r.models}
        for name, (version, healthy) in reported.items():
            row = rows.get(name)
            if row is None or row["version"] != version:
                before = None if row is None else row["version"]
                rows[name] = {"version": version, "previous_version": before, "healthy": healthy, "changed_at": r.at}
                changes.append(ChangeDraft(r.device_id, name, before, version, r.at))
            elif row["healthy"] != healthy:
                row["healthy"] = healthy
        for name in [n for n in rows if n not in reported]:
            del rows[name]
    upserts: list[dict[str, Any]] = []
    deletes: list[tuple[str, str]] = []
    for dev in sorted(touched):
        before_rows, after_rows = current.get(dev, {}), state[dev]
        for name in sorted(after_rows):
            old = before_rows.get(name)
            new = after_rows[name]
            if old is None or any(old.get(k) != new[k] for k in _ROW_KEYS):
                upserts.append({"device_id": dev, "model": name, **new})
        deletes.extend((dev, name) for name in sorted(before_rows) if name not in after_rows)
    return upserts, deletes, changes


def attribute(change: ChangeDraft, candidates: Sequence[Candidate], *, confirmed: frozenset[tuple[str, str]],
              credited: frozenset[tuple[str, str]]) -> Candidate | None:
    """The rollout order that installed ``change``, or ``None`` (a sideload, the agent's own rollback).

    A candidate qualifies when it is the same device and model, its order installs ``change.to_version``, it
    was ordered no later than the change, the device reached ``installed``/``healthy`` for it (its ``step``,
    or a ``(device, command_id)`` in ``confirmed``: the device's own event) and its command has not been
    credited with a change already (``credited``). The newest order wins."""
    ok = [c for c in candidates
          if c.device_id == change.device_id and c.model == change.model and c.version == change.to_version
          and (c.ordered_at is None or c.ordered_at <= change.at.timestamp())
          and (c.step in INSTALLED_STEPS or (c.command_id is not None
                                             and (c.device_id, c.command_id) in confirmed))
          and (c.command_id is None or (c.device_id, c.command_id) not in credited)]
    if not ok:
        return None
    return max(ok, key=lambda c: (c.ordered_at if c.ordered_at is not None else float("-inf"), c.rollout_id))


# -- database side (ingestion) ---------------------------------------------------------------------------

_MODELS = table_of(DeviceModel)
_CHANGES = table_of(VersionChange)
_RD = table_of(RolloutDevice)
_ROLLOUTS = table_of(RolloutRecord)
_EVENTS = table_of(EventRecord)


def _target_version(rollback: bool, version: int, rollback_to: Any) -> int | None:
    if not rollback:
        return version
    target = rollback_to.get("version") if isinstance(rollback_to, Mapping) else None
    return target if isinstance(target, int) and not isinstance(target, bool) else None


def _candidates(conn: sa.Connection, where: sa.ColumnElement[bool]) -> list[Candidate]:
    q = (sa.select(_RD.c.device_id, _RD.c.rollout_id, _RD.c.command_id, _RD.c.step, _RD.c.ordered_at,
                   _RD.c.rollback, _ROLLOUTS.c.model, _ROLLOUTS.c.version, _ROLLOUTS.c.rollback_to)
         .join(_ROLLOUTS, _ROLLOUTS.c.id == _RD.c.rollout_id).where(where))
    return [Candidate(r.device_id, r.rollout_id, r.command_id, r.step, r.ordered_at, r.model,
                      _target_version(bool(r.rollback), r.version, r.rollback_to)) for r in conn.execute(q)]


def _confirmed(conn: sa.Connection, pairs: set[tuple[str, str]]) -> frozenset[tuple[str, str]]:
    """The ``(device, command_id)`` of ``pairs`` for which the device sent an installed/healthy event."""
    if not pairs:
        return frozenset()
    q = sa.select(_EVENTS.c.device_id, _EVENTS.c.command_id).where(
        _EVENTS.c.command_id.in_(sorted({c for _, c in pairs})), _EVENTS.c.kind.in_(sorted(INSTALLED_STEPS)))
    return frozenset((r.device_id, r.command_id) for r in conn.execute(q) if (r.device_id, r.command_id) in pairs)


def _credited(conn: sa.Connection, pairs: set[tuple[str, str]]) -> frozenset[tuple[str, str]]:
    """The ``(device, command_id)`` of ``pairs`` already credited with a version change."""
    if not pairs:
        return frozenset()
    q = sa.select(_CHANGES.c.device_id, _CHANGES.c.command_id).where(
        _CHANGES.c.device_id.in_(sorted({d for d, _ in pairs})),
        _CHANGES.c.command_id.in_(sorted({c for _, c in pairs})))
    return frozenset((r.device_id, r.command_id) for r in conn.execute(q) if (r.device_id, r.command_id) in pairs)


def _insert(conn: sa.Connection, table: sa.Table) -> Any:
    return pg_dialect.insert(table) if is_postgresql(conn) else sqlite_dialect.insert(table)


def record_model_reports(conn: sa.Connection, reports: Sequence[ModelReport]) -> list[dict[str, Any]]:
    """Update ``device_models`` and append ``version_changes`` for ``reports`` (see the module docstring).
    Runs inside the caller's transaction; returns the version change rows written."""
    if not reports:
        return []
    ids = sorted({r.device_id for r in reports})
    current: dict[str, dict[str, dict[str, Any]]] = {}
    for row in conn.execute(sa.select(_MODELS).where(_MODELS.c.device_id.in_(ids))).mappings():
        current.setdefault(row["device_id"], {})[row["model"]] = dict(row)
    upserts, deletes, changes = diff_models(current, reports)
    if deletes:
        conn.execute(sa.delete(_MODELS).where(_MODELS.c.device_id == sa.bindparam("b_d"),
                                              _MODELS.c.model == sa.bindparam("b_m")),
                     [{"b_d": d, "b_m": m} for d, m in deletes])
    if upserts:
        ins = _insert(conn, _MODELS)
        conn.execute(ins.on_conflict_do_update(index_elements=["device_id", "model"],
                                               set_={k: ins.excluded[k] for k in _ROW_KEYS}), upserts)
    if not changes:
        return []
    changed = sorted({c.device_id for c in changes})
    candidates = _candidates(conn, _RD.c.device_id.in_(changed))
    pairs = {(c.device_id, c.command_id) for c in candidates if c.command_id is not None}
    confirmed, credited = _confirmed(conn, pairs), set(_credited(conn, pairs))
    rows: list[dict[str, Any]] = []
    for ch in changes:
        who = attribute(ch, candidates, confirmed=confirmed, credited=frozenset(credited))
        if who is not None and who.command_id is not None:
            credited.add((who.device_id, who.command_id))
        rows.append({"device_id": ch.device_id, "model": ch.model, "from_version": ch.from_version,
                     "to_version": ch.to_version, "at": ch.at,
                     "rollout_id": who.rollout_id if who is not None else None,
                     "command_id": who.command_id if who is not None else None})
    conn.execute(sa.insert(_CHANGES), rows)
    return rows


def attribute_late(conn: sa.Connection, events: Sequence[Mapping[str, Any]]) -> int:
    """Attribute unattributed version changes to the rollout orders that ``events`` (event rows just stored)
    confirm as installed: for each ``installed``/``healthy`` event naming a command of a ``rollout_devices``
    row for this device, the device's latest change of that model, if it is to the order's version, has no
    rollout yet, happened no earlier than the order, and the command is not credited elsewhere. Returns the
    number of changes attributed."""
    wanted = {(e["device_id"], e["command_id"]): e for e in events
              if e.get("kind") in INSTALLED_STEPS and e.get("command_id") and e.get("model")
              and e.get("version") is not None}
    if not wanted:
        return 0
    candidates = _candidates(conn, sa.tuple_(_RD.c.device_id, _RD.c.command_id).in_(sorted(wanted)))
    credited = set(_credited(conn, set(wanted)))
    done = 0
    for c in sorted(candidates, key=lambda c: (c.device_id, c.rollout_id)):
        e = wanted[(c.device_id, str(c.command_id))]
        if c.model != e["model"] or c.version != e["version"] or (c.device_id, c.command_id) in credited:
            continue
        latest = conn.execute(sa.select(_CHANGES.c.id, _CHANGES.c.to_version, _CHANGES.c.rollout_id, _CHANGES.c.at)
                              .where(_CHANGES.c.device_id == c.device_id, _CHANGES.c.model == c.model)
                              .order_by(_CHANGES.c.id.desc()).limit(1)).first()
        if (latest is None or latest.to_version != c.version or latest.rollout_id is not None
                or (c.ordered_at is not None and latest.at.timestamp() < c.ordered_at)):
            continue
        conn.execute(sa.update(_CHANGES).where(_CHANGES.c.id == latest.id).values(
            rollout_id=c.rollout_id, command_id=c.command_id))
        credited.add((c.device_id, str(c.command_id)))
        done += 1
    return done


# -- queries (API) ----------------------------------------------------------------------------------------


def _live_devices_in(conn: sa.Connection, cohort: str | None, id_column: sa.ColumnElement[Any]
                     ) -> list[sa.ColumnElement[bool]]:
    """Conditions keeping devices that are not revoked (and in ``cohort`` when given)."""
    d = table_of(Device)
    out: list[sa.ColumnElement[bool]] = [id_column.in_(sa.select(d.c.id).where(d.c.revoked_at.is_(None)))]
    if cohort is not None:
        out.append(membership_condition(cohort, cohort_selector(conn, cohort), id_column))
    return out


def distribution(conn: sa.Connection, *, model: str | None, cohort: str | None) -> list[tuple[str, int, int]]:
    """``(model, version, devices)`` over devices that are not revoked (in ``cohort`` when given), by model
    and then newest version first. Raises ``UnknownCohortError`` for an unknown cohort."""
    q = (sa.select(_MODELS.c.model, _MODELS.c.version, sa.func.count().label("n"))
         .where(*_live_devices_in(conn, cohort, _MODELS.c.device_id))
         .group_by(_MODELS.c.model, _MODELS.c.version).order_by(_MODELS.c.model, _MODELS.c.version.desc()))
    if model is not None:
        q = q.where(_MODELS.c.model == model)
    return [(r.model, int(r.version), int(r.n)) for r in conn.execute(q)]


def latest_version(conn: sa.Connection, model: str) -> tuple[int | None, str | None]:
    """The latest version of ``model``: the highest among uploaded bundles (``"bundles"``), else the highest
    any device serves (``"seen"``), else ``(None, None)``."""
    bundles = table_of(BundleRecord)
    top = conn.execute(sa.select(sa.func.max(bundles.c.version)).where(bundles.c.model == model)).scalar_one()
    if top is not None:
        return int(top), "bundles"
    seen = conn.execute(sa.select(sa.func.max(_MODELS.c.version)).where(_MODELS.c.model == model)).scalar_one()
    return (int(seen), "seen") if seen is not None else (None, None)


def behind_page(conn: sa.Connection, *, model: str, latest: int, cohort: str | None, include_missing: bool,
                after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
    """Devices (not revoked; in ``cohort`` when given) that serve ``model`` at a version other than ``latest``
    (and, with ``include_missing``, those that do not serve it at all: ``version`` null), by device id."""
    d = table_of(Device)
    dm = _MODELS.alias("dm")
    q = (sa.select(d.c.id.label("device_id"), dm.c.version, dm.c.previous_version, dm.c.healthy, dm.c.changed_at)
         .select_from(d.outerjoin(dm, sa.and_(dm.c.device_id == d.c.id, dm.c.model == model)))
         .where(d.c.revoked_at.is_(None)))
    if cohort is not None:
        q = q.where(membership_condition(cohort, cohort_selector(conn, cohort), d.c.id))
    behind = dm.c.version != latest
    q = q.where(sa.or_(behind, dm.c.version.is_(None)) if include_missing else behind)
    if after is not None:
        q = q.where(d.c.id > after)
    rows = [dict(r) for r in conn.execute(q.order_by(d.c.id).limit(limit + 1)).mappings()]
    return rows[:limit], len(rows) > limit


def changes_page(conn: sa.Connection, *, device: str | None, model: str | None, rollout: str | None,
                 after: int | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
    """Version changes, newest first (by id), filtered; keyset paging on the id."""
    q = sa.select(_CHANGES)
    if device is not None:
        q = q.where(_CHANGES.c.device_id == device)
    if model is not None:
        q = q.where(_CHANGES.c.model == model)
    if rollout is not None:
        q = q.where(_CHANGES.c.rollout_id == rollout)
    if after is not None:
        q = q.where(_CHANGES.c.id < after)
    rows = [dict(r) for r in conn.execute(q.order_by(_CHANGES.c.id.desc()).limit(limit + 1)).mappings()]
    return rows[:limit], len(rows) > limit


def unix_to_utc(value: float | None) -> datetime | None:
    """A unix time (as the rollout tables and device events keep it) as an aware UTC datetime."""
    return None if value is None else datetime.fromtimestamp(value, UTC)
