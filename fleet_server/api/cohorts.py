"""Cohort API: named groups of devices, by explicit membership and by label selector.

* ``POST /api/v1/cohorts``, ``GET /api/v1/cohorts`` (paged by name).
* ``GET/PATCH/DELETE /api/v1/cohorts/{name}``. A cohort that a rollout in ``draft``, ``running`` or
  ``paused`` targets cannot be deleted (409): the rollout resolves its cohorts at every step.
* ``PUT /api/v1/cohorts/{name}/members``: add devices by id (bulk, idempotent);
  ``DELETE /api/v1/cohorts/{name}/members/{device_id}``: remove one.
* ``GET /api/v1/cohorts/{name}/devices``: the resolved membership, paged by device id, each with why
  (``explicit`` and/or ``selector``).

Membership is resolved at each use (:func:`fleet_server.registry.cohorts.resolve_cohorts`), so a device that
gets a matching label or an explicit add later is in the cohort, and in every rollout targeting it, from then
on. Reading needs ``viewer``, changing ``operator``; every change is audited.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Path, Query, Response, status

from fleet_server import audit
from fleet_server.api.deps import ID_PATTERN, Limit, Operator, Viewer
from fleet_server.api.errors import error_responses
from fleet_server.db import SessionDep
from fleet_server.models import Cohort, CohortMember, Device, RolloutRecord, table_of, utcnow
from fleet_server.registry.cohorts import cohort_devices_page, cohort_size
from fleet_server.registry.schemas import (
    CohortCreate,
    CohortDevicePublic,
    CohortDevicesPublic,
    CohortListPublic,
    CohortPublic,
    CohortUpdate,
    MembersAdd,
    MembersAddedPublic,
)

__all__ = ["ACTIVE_ROLLOUT_STATES", "router"]

router = APIRouter(prefix="/api/v1", tags=["cohorts"])


ACTIVE_ROLLOUT_STATES = ("draft", "running", "paused")
"""Rollouts in these states still resolve their cohorts: such a cohort cannot be deleted."""

CohortName = Annotated[str, Path(pattern=ID_PATTERN, description="cohort name")]
After = Annotated[str | None, Query(pattern=ID_PATTERN, description="the previous page's `next`")]


def _row(conn: sa.Connection, name: str) -> dict[str, Any]:
    c = table_of(Cohort)
    row = conn.execute(sa.select(c).where(c.c.name == name)).mappings().first()
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown cohort {name!r}")
    return dict(row)


def _explicit_counts(conn: sa.Connection, names: list[str]) -> dict[str, int]:
    if not names:
        return {}
    m = table_of(CohortMember)
    return {r.cohort: int(r.n) for r in conn.execute(
        sa.select(m.c.cohort, sa.func.count().label("n")).where(m.c.cohort.in_(names)).group_by(m.c.cohort))}


def _public(row: dict[str, Any], explicit: int, size: int | None = None) -> CohortPublic:
    return CohortPublic(name=row["name"], description=row["description"], selector=row["selector"] or {},
                        created_at=row["created_at"], created_by=row["created_by"], updated_at=row["updated_at"],
                        explicit_members=explicit, size=size)


def _full(conn: sa.Connection, name: str) -> CohortPublic:
    row = _row(conn, name)
    return _public(row, _explicit_counts(conn, [name]).get(name, 0), cohort_size(conn, name, row["selector"] or {}))


def _referencing_rollouts(conn: sa.Connection, name: str) -> list[str]:
    r = table_of(RolloutRecord)
    rows = conn.execute(sa.select(r.c.id, r.c.cohorts).where(r.c.status.in_(ACTIVE_ROLLOUT_STATES)))
    return sorted(x.id for x in rows if name in (x.cohorts or []))


@router.post("/cohorts", response_model=CohortPublic, status_code=status.HTTP_201_CREATED,
             responses=error_responses(409, 422))
def create_cohort(*, session: SessionDep, who: Operator, body: CohortCreate) -> CohortPublic:
    """Create a cohort (409 if the name exists)."""
    conn = session.connection()  # a write request: its transaction takes SQLite's write lock first (db.get_session)
    c = table_of(Cohort)
    if conn.execute(sa.select(c.c.name).where(c.c.name == body.name)).first() is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"cohort {body.name!r} already exists")
    now = utcnow()
    conn.execute(sa.insert(c).values(name=body.name, description=body.description, selector=dict(body.selector),
                                     created_at=now, created_by=who.actor, updated_at=now))
    audit.record(session, actor=who.actor, action="cohort.create", target=f"cohort:{body.name}", at=now,
                 detail={"selector": dict(body.selector)})
    try:
        session.commit()
    except sa.exc.IntegrityError:
        session.rollback()
        raise HTTPException(status.HTTP_409_CONFLICT, f"cohort {body.name!r} already exists") from None
    return _full(session.connection(), body.name)


@router.get("/cohorts", response_model=CohortListPublic, responses=error_responses(422))
def list_cohorts(*, session: SessionDep, _: Viewer, limit: Limit = 100, after: After = None) -> CohortListPublic:
    """Cohorts by name, with their explicit member counts (the resolved size: ``GET /cohorts/{name}``)."""
    start = after
    conn = session.connection()
    c = table_of(Cohort)
    q = sa.select(c)
    if start is not None:
        q = q.where(c.c.name > start)
    rows = [dict(r) for r in conn.execute(q.order_by(c.c.name).limit(limit + 1)).mappings()]
    more, rows = len(rows) > limit, rows[:limit]
    counts = _explicit_counts(conn, [r["name"] for r in rows])
    return CohortListPublic(items=[_public(r, counts.get(r["name"], 0)) for r in rows],
                            next=rows[-1]["name"] if more else None)


@router.get("/cohorts/{name}", response_model=CohortPublic, responses=error_responses(404))
def get_cohort(*, session: SessionDep, _: Viewer, name: CohortName) -> CohortPublic:
    """One cohort with its explicit member count and resolved size."""
    return _full(session.connection(), name)


@router.patch("/cohorts/{name}", response_model=CohortPublic, responses=error_responses(404, 422))
def update_cohort(*, session: SessionDep, who: Operator, name: CohortName, body: CohortUpdate) -> CohortPublic:
    """Change the description or the selector (a new selector applies at once, also to running rollouts)."""
    conn = session.connection()
    row = _row(conn, name)
    given = body.model_fields_set
    changes: dict[str, Any] = {}
    for key in ("description", "selector"):
        if key in given:
            value = dict(body.selector) if key == "selector" else body.description
            if value != row[key]:
                changes[key] = value
    if changes:
        now: datetime = utcnow()
        c = table_of(Cohort)
        conn.execute(sa.update(c).where(c.c.name == name).values(**changes, updated_at=now))
        audit.record(session, actor=who.actor, action="cohort.update", target=f"cohort:{name}", at=now,
                     detail={k: {"before": row[k], "after": v} for k, v in changes.items()})
        session.commit()
    else:
        session.rollback()
    return _full(session.connection(), name)


@router.delete("/cohorts/{name}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
               responses=error_responses(404, 409))
def delete_cohort(*, session: SessionDep, who: Operator, name: CohortName) -> Response:
    """Delete a cohort and its explicit memberships; 409 while a draft, running or paused rollout targets it."""
    conn = session.connection()
    row = _row(conn, name)
    users = _referencing_rollouts(conn, name)
    if users:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"cohort {name!r} is targeted by rollouts in draft/running/paused: {', '.join(users)}")
    explicit = _explicit_counts(conn, [name]).get(name, 0)
    m, c = table_of(CohortMember), table_of(Cohort)
    conn.execute(sa.delete(m).where(m.c.cohort == name))
    conn.execute(sa.delete(c).where(c.c.name == name))
    audit.record(session, actor=who.actor, action="cohort.delete", target=f"cohort:{name}",
                 detail={"selector": row["selector"], "explicit_members": explicit})
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.put("/cohorts/{name}/members", response_model=MembersAddedPublic,
            responses=error_responses(404, 409, 422))
def add_members(*, session: SessionDep, who: Operator, name: CohortName, body: MembersAdd) -> MembersAddedPublic:
    """Add devices to the cohort by id (up to 10 000 per call). Ids already in it are counted as ``already``;
    unknown ids refuse the whole call (404, listing them)."""
    conn = session.connection()
    _row(conn, name)
    wanted = sorted(set(body.device_ids))
    d, m = table_of(Device), table_of(CohortMember)
    known: set[str] = set()
    present: set[str] = set()
    for i in range(0, len(wanted), 500):
        chunk = wanted[i:i + 500]
        known.update(conn.execute(sa.select(d.c.id).where(d.c.id.in_(chunk))).scalars())
        present.update(conn.execute(sa.select(m.c.device_id).where(m.c.cohort == name,
                                                                   m.c.device_id.in_(chunk))).scalars())
    unknown = [i for i in wanted if i not in known]
    if unknown:
        shown = ", ".join(unknown[:20]) + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else "")
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"device_ids: unknown devices: {shown}")
    new = [i for i in wanted if i not in present]
    now = utcnow()
    if new:
        conn.execute(sa.insert(m), [{"cohort": name, "device_id": i, "added_at": now, "added_by": who.actor}
                                    for i in new])
        audit.record(session, actor=who.actor, action="cohort.members.add", target=f"cohort:{name}", at=now,
                     detail={"added": len(new), "devices": new[:100]})
        try:
            session.commit()
        except sa.exc.IntegrityError:  # a concurrent add of the same ids: retry is idempotent
            session.rollback()
            raise HTTPException(status.HTTP_409_CONFLICT, "a concurrent change added some of these devices; "
                                                          "retry") from None
    else:
        session.rollback()
    return MembersAddedPublic(cohort=name, added=len(new), already=len(wanted) - len(new))


@router.delete("/cohorts/{name}/members/{device_id}", status_code=status.HTTP_204_NO_CONTENT,
               response_class=Response, responses=error_responses(404))
def remove_member(*, session: SessionDep, who: Operator, name: CohortName,
                  device_id: Annotated[str, Path(pattern=ID_PATTERN, description="device id")]) -> Response:
    """Remove an explicit member (404 if it is not one; a device matching the selector stays in the cohort
    until its labels change)."""
    conn = session.connection()
    _row(conn, name)
    m = table_of(CohortMember)
    gone = conn.execute(sa.delete(m).where(m.c.cohort == name, m.c.device_id == device_id)).rowcount
    if not gone:
        session.rollback()
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"device {device_id!r} is not an explicit member of {name!r}")
    audit.record(session, actor=who.actor, action="cohort.members.remove", target=f"cohort:{name}",
                 detail={"device_id": device_id})
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/cohorts/{name}/devices", response_model=CohortDevicesPublic, responses=error_responses(404, 422))
def cohort_devices(*, session: SessionDep, _: Viewer, name: CohortName, limit: Limit = 100,
                   after: After = None) -> CohortDevicesPublic:
    """The devices the cohort resolves to now (revoked ones left out), by id, each with why."""
    conn = session.connection()
    row = _row(conn, name)
    page, more = cohort_devices_page(conn, name, row["selector"] or {}, after=after, limit=limit)
    return CohortDevicesPublic(items=[CohortDevicePublic(device_id=i, why=w) for i, w in page],
                               next=page[-1][0] if more else None)
