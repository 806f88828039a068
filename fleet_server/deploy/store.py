"""Database reads and writes of the rollout machinery (Core statements; shared by the loop and the API).

Concurrency rules, the same for the rollout loop and the API's actions (``docs/adr/0015-...``):

* A rollout is changed only inside a transaction that first locks its row (:func:`lock_rollout`: ``SELECT ... FOR
  UPDATE`` on PostgreSQL; on SQLite the transaction starts with ``BEGIN IMMEDIATE``, which serialises writers).
* Every write of a rollout or its devices bumps ``rollouts.revision`` with ``UPDATE ... WHERE revision = :read``
  (:func:`save_state`); zero rows updated means someone else wrote in between, and the caller rolls back. The lock
  makes that impossible between well-behaved writers; the check is the second line of defence.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from fleet_server.db import is_postgresql
from fleet_server.deploy.bridge import chunks
from fleet_server.deploy.specs import state_to_row
from fleet_server.models import AuditLog, Cohort, Device, RolloutDevice, RolloutRecord, table_of
from fleet_server.registry.cohorts import resolve_cohorts
from fleet_server.rollouts import IN_FLIGHT_STEPS, DeviceState, DeviceStep, RolloutState

__all__ = [
    "ROLLOUTS",
    "ROLLOUT_DEVICES",
    "ConcurrentChangeError",
    "audit",
    "busy_by_rollout",
    "busy_elsewhere",
    "device_states",
    "in_flight_of",
    "lock_rollout",
    "presence",
    "resolve_target",
    "save_devices",
    "save_state",
    "ts",
    "union_target",
]

ROLLOUTS = table_of(RolloutRecord)
ROLLOUT_DEVICES = table_of(RolloutDevice)
_DEVICES = table_of(Device)
_COHORTS = table_of(Cohort)
_AUDIT = table_of(AuditLog)
_IN_FLIGHT = sorted(s.value for s in IN_FLIGHT_STEPS)


class ConcurrentChangeError(RuntimeError):
    """The rollout changed since it was read (its revision moved): roll back and try again."""


def ts(unix: float) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


def lock_rollout(conn: sa.Connection, rollout_id: str, *, skip_locked: bool = False) -> Mapping[str, Any] | None:
    """The rollout's row, locked for this transaction on PostgreSQL (``skip_locked``: ``None`` if another
    transaction holds it, as well as when it does not exist)."""
    q = sa.select(ROLLOUTS).where(ROLLOUTS.c.id == rollout_id)
    if is_postgresql(conn):
        q = q.with_for_update(skip_locked=skip_locked)
    row = conn.execute(q).mappings().first()
    return dict(row) if row is not None else None


def resolve_target(conn: sa.Connection, cohorts: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(device ids, unknown cohort names)``: the devices of the cohorts that still exist (a deleted cohort
    contributes nothing; the caller logs it)."""
    known = set(conn.execute(sa.select(_COHORTS.c.name).where(_COHORTS.c.name.in_(list(cohorts)))).scalars())
    unknown = sorted(set(cohorts) - known)
    return resolve_cohorts(conn, sorted(known)), unknown


def device_states(conn: sa.Connection, rollout_id: str) -> dict[str, DeviceState]:
    """Every ``rollout_devices`` row of the rollout as a :class:`DeviceState` (online until :func:`presence`
    says otherwise). A row that does not make sense raises ``ValueError`` naming the device."""
    out: dict[str, DeviceState] = {}
    for r in conn.execute(sa.select(ROLLOUT_DEVICES).where(ROLLOUT_DEVICES.c.rollout_id == rollout_id)).mappings():
        try:
            out[r["device_id"]] = DeviceState(DeviceStep(r["step"]), r["since"], r["reason"], r["command_id"],
                                              r["ordered_at"], r["attempts"], bool(r["rollback"]))
        except ValueError as exc:
            raise ValueError(f"rollout {rollout_id}: device {r['device_id']}: {exc}") from None
    return out


def presence(conn: sa.Connection, device_ids: Sequence[str], *, now: float,
             stale_after_s: float) -> dict[str, tuple[bool, float | None]]:
    """``device -> (online, stale_since)``: online when its retained status says so and it was heard from
    within ``stale_after_s``; ``stale_since`` is when it went quiet for that long (``None``: not stale or never
    heard from)."""
    out: dict[str, tuple[bool, float | None]] = {}
    for part in chunks(sorted(device_ids)):
        for r in conn.execute(sa.select(_DEVICES.c.id, _DEVICES.c.last_status, _DEVICES.c.last_seen_at)
                              .where(_DEVICES.c.id.in_(part))):
            seen = r.last_seen_at.timestamp() if r.last_seen_at is not None else None
            stale_since = seen + stale_after_s if seen is not None and seen + stale_after_s <= now else None
            out[r.id] = (r.last_status == "online" and seen is not None and stale_since is None, stale_since)
    return out


def busy_by_rollout(conn: sa.Connection) -> dict[str, set[str]]:
    """``rollout id -> devices it is updating`` (ordered ... installed), over every rollout whatever its status:
    a device an aborted rollout still updates is busy too."""
    out: dict[str, set[str]] = {}
    q = sa.select(ROLLOUT_DEVICES.c.rollout_id, ROLLOUT_DEVICES.c.device_id).where(
        ROLLOUT_DEVICES.c.step.in_(_IN_FLIGHT))
    for r in conn.execute(q):
        out.setdefault(r.rollout_id, set()).add(r.device_id)
    return out


def busy_elsewhere(busy: Mapping[str, Collection[str]], rollout_id: str) -> frozenset[str]:
    return frozenset(d for other, devices in busy.items() if other != rollout_id for d in devices)


def _insert(conn: sa.Connection, table: sa.Table) -> Any:
    return pg_dialect.insert(table) if is_postgresql(conn) else sqlite_dialect.insert(table)


def save_devices(conn: sa.Connection, rollout_id: str, changed: Mapping[str, DeviceState]) -> None:
    """Upsert the changed device states of one rollout (one executemany)."""
    if not changed:
        return
    rows = [{"rollout_id": rollout_id, "device_id": device, "step": st.step.value, "since": st.since,
             "reason": st.reason[:1024] if st.reason else st.reason, "command_id": st.command_id,
             "ordered_at": st.ordered_at, "attempts": st.attempts, "rollback": st.rollback}
            for device, st in sorted(changed.items())]
    stmt = _insert(conn, ROLLOUT_DEVICES)
    cols = ("step", "since", "reason", "command_id", "ordered_at", "attempts", "rollback")
    conn.execute(stmt.on_conflict_do_update(index_elements=["rollout_id", "device_id"],
                                            set_={c: stmt.excluded[c] for c in cols}), rows)


def save_state(conn: sa.Connection, rollout_id: str, state: RolloutState, *, revision: int, now: float,
               extra: Mapping[str, Any] | None = None) -> int:
    """Write the rollout's state and bump its revision, if it is still at ``revision``; returns the new revision
    or raises :class:`ConcurrentChangeError`."""
    values = {**state_to_row(state), **(extra or {}), "updated_at": ts(now), "revision": revision + 1}
    n = conn.execute(sa.update(ROLLOUTS).where(ROLLOUTS.c.id == rollout_id, ROLLOUTS.c.revision == revision)
                     .values(values)).rowcount
    if n != 1:
        raise ConcurrentChangeError(f"rollout {rollout_id} changed since it was read (revision {revision})")
    return revision + 1


def audit(conn: sa.Connection, *, actor: str, action: str, target: str, outcome: str = "ok",
          detail: Mapping[str, Any] | None = None, at: float) -> None:
    """One audit row in the caller's transaction (the Core twin of :func:`fleet_server.audit.record`)."""
    conn.execute(sa.insert(_AUDIT).values(at=ts(at), actor=actor, action=action, target=target, outcome=outcome,
                                          detail=dict(detail or {})))


def in_flight_of(devices: Mapping[str, DeviceState]) -> list[str]:
    return [d for d, st in devices.items() if st.step in IN_FLIGHT_STEPS]


def union_target(target: Iterable[str], devices: Mapping[str, DeviceState]) -> list[str]:
    """The resolved target plus the devices this rollout is still updating (a device that left the cohort, or was
    revoked, mid-update stays until it finishes or times out, so it is never "in progress" forever nor busy for
    other rollouts forever)."""
    out = set(target)
    out.update(in_flight_of(devices))
    return sorted(out)
