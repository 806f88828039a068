"""Device state (online, offline, stale, never, revoked) and the device list query.

State is derived, never stored, from what ingestion records (``last_status`` from the retained status topic
and its last will, ``last_seen_at`` from any message) and the time of the question:

* ``revoked``: decommissioned through the API (``revoked_at`` set); wins over everything else;
* ``never``: registered but never heard from (``last_seen_at`` is null);
* ``offline``: its retained status says so (the agent's clean stop, or the broker's last will);
* ``stale``: not marked offline, but silent (no message of any kind) for more than ``device_stale_after_s``;
* ``online``: not marked offline and heard from within ``device_stale_after_s``.

``stale_since`` is ``last_seen_at + device_stale_after_s`` once that moment is past (also for an offline
device: it says since when the server has had no sign of life), else null.

The list (:func:`list_devices`) pages by device id (keyset); every filter is a condition on an index
(``devices (last_status, last_seen_at)``, ``device_labels (key, value)``, ``cohort_members``,
``device_models (model, version)``, the ``devices`` primary key for ``q``), labels and models of the page come
in one query each, never one per row.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles

from fleet_server.db import is_postgresql
from fleet_server.models import CohortMember, Device, DeviceLabel, DeviceModel, table_of
from fleet_server.registry.cohorts import cohort_selector, membership_condition, membership_exists

__all__ = [
    "DeviceFilter",
    "DeviceState",
    "device_state",
    "labels_of",
    "list_devices",
    "models_of",
    "stale_since",
    "state_condition",
]


class DeviceState(enum.StrEnum):
    """Where a device stands now (see the module docstring)."""

    ONLINE = "online"
    OFFLINE = "offline"
    STALE = "stale"
    NEVER = "never"
    REVOKED = "revoked"


def stale_since(last_seen_at: datetime | None, now: datetime, stale_after_s: float) -> datetime | None:
    """``last_seen_at + stale_after_s`` when that is not in the future, else ``None``."""
    if last_seen_at is None:
        return None
    at = last_seen_at + timedelta(seconds=stale_after_s)
    return at if at <= now else None


def device_state(row: Mapping[str, Any], now: datetime, stale_after_s: float) -> DeviceState:
    """The state of a device row (``revoked_at``, ``last_seen_at``, ``last_status``) at ``now``."""
    if row.get("revoked_at") is not None:
        return DeviceState.REVOKED
    seen = row.get("last_seen_at")
    if seen is None:
        return DeviceState.NEVER
    if row.get("last_status") == "offline":
        return DeviceState.OFFLINE
    if stale_since(seen, now, stale_after_s) is not None:
        return DeviceState.STALE
    return DeviceState.ONLINE


class _Unindexed(sa.sql.expression.ColumnElement[Any]):
    """A column that SQLite must not look up through an index (``+col``, SQLite's documented way to take a
    term away from the planner); the plain column elsewhere."""

    inherit_cache = True

    def __init__(self, column: sa.ColumnElement[Any]) -> None:
        self.column = column
        self.type = column.type


@compiles(_Unindexed)
def _unindexed_default(element: _Unindexed, compiler: Any, **kw: Any) -> str:
    text: str = compiler.process(element.column, **kw)
    return text


@compiles(_Unindexed, "sqlite")
def _unindexed_sqlite(element: _Unindexed, compiler: Any, **kw: Any) -> str:
    return "+" + str(compiler.process(element.column, **kw))


def state_condition(state: DeviceState, now: datetime, stale_after_s: float, *, table: sa.FromClause | None = None,
                    indexed: bool = True) -> sa.ColumnElement[bool]:
    """The SQL condition equivalent to ``device_state(row, now, stale_after_s) == state`` on ``table`` (default:
    ``devices``). ``indexed=False`` keeps SQLite from answering it through the state indexes (a filter, not
    the driver of the query)."""
    d = table if table is not None else table_of(Device)
    status: sa.ColumnElement[Any] = d.c.last_status if indexed else _Unindexed(d.c.last_status)
    last_seen: sa.ColumnElement[Any] = d.c.last_seen_at if indexed else _Unindexed(d.c.last_seen_at)
    if state is DeviceState.REVOKED:
        return d.c.revoked_at.is_not(None)
    live = d.c.revoked_at.is_(None)
    if state is DeviceState.NEVER:
        return sa.and_(live, last_seen.is_(None))
    if state is DeviceState.OFFLINE:
        return sa.and_(live, status == "offline", last_seen.is_not(None))
    cutoff = now - timedelta(seconds=stale_after_s)
    # stale: last_seen_at + stale_after_s <= now, i.e. last_seen_at <= cutoff (as stale_since has it).
    seen = last_seen <= cutoff if state is DeviceState.STALE else last_seen > cutoff
    # Written as an OR of two index ranges on (last_status, last_seen_at): NULL status (cleared, or a device
    # that never sent one) counts as "not marked offline".
    return sa.and_(live, sa.or_(sa.and_(status == "online", seen), sa.and_(status.is_(None), seen)))


@dataclass(frozen=True)
class DeviceFilter:
    """The device list's filters (all optional; all given must hold)."""

    state: DeviceState | None = None
    cohort: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    model: str | None = None
    version: int | None = None
    profile: str | None = None
    q: str | None = None
    """A prefix of the device id."""


def _prefix_upper(prefix: str) -> str:
    """The smallest string above every string starting with ``prefix`` (ids are ASCII below ``\\x7f``)."""
    return prefix + "\x7f"


def _binary_collation(conn: sa.Connection) -> bool:
    """Whether ``devices.id`` sorts bytewise (SQLite always; PostgreSQL in a C/POSIX database), so that a
    prefix is one index range. Cached per pooled connection."""
    if not is_postgresql(conn):
        return True
    key = "fleet_registry_c_collation"
    cached = conn.info.get(key)
    if cached is None:
        collation = conn.execute(sa.text(
            "SELECT datcollate FROM pg_database WHERE datname = current_database()")).scalar_one()
        cached = conn.info[key] = str(collation) in ("C", "POSIX")
    return bool(cached)


def _id_conditions(conn: sa.Connection, f: DeviceFilter, after: str | None) -> list[sa.ColumnElement[bool]]:
    """``after`` and the ``q`` prefix: ranges of the primary key."""
    d = table_of(Device)
    out: list[sa.ColumnElement[bool]] = []
    if after is not None:
        out.append(d.c.id > after)
    if f.q:
        escaped = f.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        if _binary_collation(conn):  # one index range; under a linguistic collation the LIKE alone decides
            out += [d.c.id >= f.q, d.c.id < _prefix_upper(f.q)]
        out.append(d.c.id.like(escaped + "%", escape="\\"))
    return out


def _conditions(conn: sa.Connection, f: DeviceFilter, now: datetime, stale_after_s: float,
                after: str | None) -> list[sa.ColumnElement[bool]]:
    """PostgreSQL: every filter as a semi-join (``IN``); its planner picks the driver from its statistics."""
    d, labels, models = table_of(Device), table_of(DeviceLabel), table_of(DeviceModel)
    out = _id_conditions(conn, f, after)
    if f.state is not None:
        out.append(state_condition(f.state, now, stale_after_s))
    else:
        out.append(d.c.revoked_at.is_(None))
    for key, value in sorted(f.labels.items()):
        sub = sa.select(labels.c.device_id).where(labels.c.key == key, labels.c.value == value)
        if after is not None:
            sub = sub.where(labels.c.device_id > after)
        out.append(d.c.id.in_(sub))
    if f.cohort is not None:
        out.append(membership_condition(f.cohort, cohort_selector(conn, f.cohort), d.c.id))
    if f.model is not None or f.version is not None:
        sub = sa.select(models.c.device_id)
        if f.model is not None:
            sub = sub.where(models.c.model == f.model)
        if f.version is not None:
            sub = sub.where(models.c.version == f.version)
        out.append(d.c.id.in_(sub))
    if f.profile is not None:
        out.append(d.c.firmware_profile == f.profile)
    return out


DRIVE_MAX = 5_000
"""SQLite: a filter matching at most this many devices drives the page (its ids, in order, looked up by primary
key); when every filter matches more, the page walks the primary key and checks each device, which then
reaches ``limit`` matches within ``limit * devices / DRIVE_MAX`` rows."""


@dataclass(frozen=True)
class _Branch:
    """Part of a driver: the rows of ``table`` meeting ``where`` name devices by ``id_column`` (an index answers
    ``where``, so counting them never reads the table)."""

    table: sa.FromClause
    id_column: sa.ColumnElement[Any]
    where: tuple[sa.ColumnElement[bool], ...]


def _state_branches(state: DeviceState, now: datetime, stale_after_s: float) -> list[_Branch]:
    """A superset of the devices in ``state`` (revocation is left to the per-device check), as index ranges:
    online and stale are one range per status value (``online``, NULL), never overlapping."""
    d2 = table_of(Device).alias("d2")
    cutoff = now - timedelta(seconds=stale_after_s)
    if state is DeviceState.NEVER:
        return [_Branch(d2, d2.c.id, (d2.c.last_seen_at.is_(None),))]
    if state is DeviceState.OFFLINE:
        return [_Branch(d2, d2.c.id, (d2.c.last_status == "offline", d2.c.last_seen_at.is_not(None)))]
    seen = d2.c.last_seen_at <= cutoff if state is DeviceState.STALE else d2.c.last_seen_at > cutoff
    return [_Branch(d2, d2.c.id, (d2.c.last_status == "online", seen)),
            _Branch(d2, d2.c.id, (d2.c.last_status.is_(None), seen))]


def _count(conn: sa.Connection, branches: list[_Branch], cap: int) -> int:
    """How many rows ``branches`` have, counting at most ``cap`` per branch (``SELECT 1``: index only)."""
    return sum(int(conn.execute(sa.select(sa.func.count()).select_from(
        sa.select(sa.literal(1)).select_from(b.table).where(*b.where).limit(cap).subquery())).scalar_one())
        for b in branches)


def _ids(branches: list[_Branch]) -> sa.Select[Any] | sa.CompoundSelect[Any]:
    parts = [sa.select(b.id_column).where(*b.where) for b in branches]
    return parts[0] if len(parts) == 1 else sa.union_all(*parts)


def _sqlite_conditions(conn: sa.Connection, f: DeviceFilter, now: datetime, stale_after_s: float,
                       after: str | None) -> list[sa.ColumnElement[bool]]:
    """SQLite: a query plan chosen here, not by SQLite's planner, which without ``ANALYZE`` statistics takes
    every index equality for selective (and collects 70 000 online devices to sort them for a page of 100).

    Every filter is a per-device check (a correlated ``EXISTS`` through a primary key, or a plain predicate
    that no index answers), so the page walks ``devices`` in id order. The filter that matches the fewest
    devices, if at most :data:`DRIVE_MAX` (counted through its index, the count capped there), also becomes
    ``id IN (its ids)``: SQLite then visits just those ids, in order."""
    d, labels, models = table_of(Device), table_of(DeviceLabel), table_of(DeviceModel)
    members = table_of(CohortMember)
    out = _id_conditions(conn, f, after)
    drivers: list[list[_Branch]] = []
    if f.state is not None:
        out.append(state_condition(f.state, now, stale_after_s, indexed=False))
        if f.state is not DeviceState.REVOKED:  # revoked_at has no index
            drivers.append(_state_branches(f.state, now, stale_after_s))
    else:
        out.append(d.c.revoked_at.is_(None))
    for key, value in sorted(f.labels.items()):
        out.append(sa.exists().where(labels.c.device_id == d.c.id, labels.c.key == key, labels.c.value == value))
        drivers.append([_Branch(labels, labels.c.device_id, (labels.c.key == key, labels.c.value == value))])
    if f.cohort is not None:
        selector = cohort_selector(conn, f.cohort)
        out.append(membership_exists(f.cohort, selector, d.c.id))
        branches = [_Branch(members, members.c.device_id, (members.c.cohort == f.cohort,))]
        if selector:  # a superset: explicit members and the devices carrying the selector's first pair
            k, v = sorted(selector.items())[0]
            branches.append(_Branch(labels, labels.c.device_id, (labels.c.key == k, labels.c.value == v)))
        drivers.append(branches)
    if f.model is not None or f.version is not None:
        dm = sa.exists().where(models.c.device_id == d.c.id)
        if f.model is not None:
            dm = dm.where(models.c.model == f.model)
        if f.version is not None:
            dm = dm.where(models.c.version == f.version)
        out.append(dm)
        if f.model is not None:  # (model, version) is indexed; version alone is not
            where = (models.c.model == f.model,) + ((models.c.version == f.version,) if f.version is not None else ())
            drivers.append([_Branch(models, models.c.device_id, where)])
    if f.profile is not None:
        out.append(d.c.firmware_profile == f.profile)
    best: tuple[int, list[_Branch]] | None = None
    for branches in drivers:
        n = _count(conn, branches, DRIVE_MAX + 1)
        if n <= DRIVE_MAX and (best is None or n < best[0]):
            best = (n, branches)
    if best is not None:
        out.append(d.c.id.in_(_ids(best[1])))
    return out


LIST_COLUMNS = ("id", "first_seen_at", "last_seen_at", "last_status", "last_status_at", "agent_version",
                "schema_version", "heartbeat_at", "firmware_profile", "registered_at", "revoked_at")


def list_devices(conn: sa.Connection, f: DeviceFilter, *, now: datetime, stale_after_s: float, after: str | None,
                 limit: int) -> tuple[list[dict[str, Any]], bool]:
    """One page of devices matching ``f`` ordered by id after ``after``, and whether more follow. Raises
    :class:`~fleet_server.registry.cohorts.UnknownCohortError` for a cohort filter naming no cohort."""
    d = table_of(Device)
    where = (_conditions(conn, f, now, stale_after_s, after) if is_postgresql(conn)
             else _sqlite_conditions(conn, f, now, stale_after_s, after))
    q = sa.select(*(d.c[c] for c in LIST_COLUMNS)).where(*where).order_by(d.c.id).limit(limit + 1)
    rows = [dict(r) for r in conn.execute(q).mappings()]
    return rows[:limit], len(rows) > limit


def labels_of(conn: sa.Connection, ids: Sequence[str]) -> dict[str, dict[str, str]]:
    """``{device_id: {key: value}}`` for ``ids`` (one query)."""
    if not ids:
        return {}
    labels = table_of(DeviceLabel)
    out: dict[str, dict[str, str]] = {}
    for r in conn.execute(sa.select(labels.c.device_id, labels.c.key, labels.c.value)
                          .where(labels.c.device_id.in_(ids)).order_by(labels.c.device_id, labels.c.key)):
        out.setdefault(r.device_id, {})[r.key] = r.value
    return out


def models_of(conn: sa.Connection, ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """``{device_id: [device_models row, ...]}`` for ``ids``, by model name (one query)."""
    if not ids:
        return {}
    models = table_of(DeviceModel)
    out: dict[str, list[dict[str, Any]]] = {}
    for r in conn.execute(sa.select(models).where(models.c.device_id.in_(ids))
                          .order_by(models.c.device_id, models.c.model)).mappings():
        out.setdefault(r["device_id"], []).append(dict(r))
    return out
