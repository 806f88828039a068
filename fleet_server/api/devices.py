"""Device registry API.

* ``POST /api/v1/devices`` (operator): pre-register a device (id, firmware profile, hardware, labels).
* ``GET /api/v1/devices`` (viewer): the fleet, filtered (state, cohort, labels, model/version, profile, id
  prefix) and paged by id.
* ``GET /api/v1/devices/{id}`` (viewer): everything about one device, with its cohorts and deployment history.
* ``PATCH /api/v1/devices/{id}`` (operator): labels (set/remove), firmware profile, hardware.
* ``DELETE /api/v1/devices/{id}`` (admin): revoke (decommission). The row stays, for history and audit; the
  device is in no cohort from then on, gets no orders, and ingestion drops its messages.

Every change writes one audit record in the same transaction. See docs/registry.md.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Path, Query, status
from pydantic import StringConstraints
from sqlmodel import Session

from agent.protocol import DEPLOY_EVENT_KINDS, MAX_SEQ
from fleet_server import audit
from fleet_server.api.deps import ID_PATTERN, Admin, Limit, Operator, SettingsDep, Viewer
from fleet_server.api.errors import error_responses
from fleet_server.db import SessionDep
from fleet_server.models import (
    Device,
    DeviceLabel,
    EventRecord,
    RolloutDevice,
    RolloutRecord,
    VersionChange,
    table_of,
    utcnow,
)
from fleet_server.registry.cohorts import UnknownCohortError, cohorts_of_device
from fleet_server.registry.devices import (
    DeviceFilter,
    DeviceState,
    device_state,
    labels_of,
    list_devices,
    models_of,
    stale_since,
)
from fleet_server.registry.labels import LABEL_KEY_PATTERN, LABEL_VALUE_PATTERN, MAX_LABELS
from fleet_server.registry.schemas import (
    CohortMembershipPublic,
    DeploymentEventPublic,
    DeviceCreate,
    DeviceDetailPublic,
    DeviceHistoryPublic,
    DeviceListPublic,
    DeviceModelPublic,
    DeviceSummaryPublic,
    DeviceUpdate,
    ModelVersionPublic,
    RolloutEntryPublic,
    VersionChangeItem,
    builtin_profile_names,
)
from fleet_server.registry.versions import unix_to_utc
from fleet_server.settings import FleetSettings

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["devices"])


UNPROCESSABLE = 422
_LABEL = f"^{LABEL_KEY_PATTERN.strip('^$')}={LABEL_VALUE_PATTERN.strip('^$')}$"

LabelFilter = Annotated[str, StringConstraints(pattern=_LABEL)]
DeviceIdPath = Annotated[str, Path(pattern=ID_PATTERN, description="device id")]
After = Annotated[str | None, Query(pattern=ID_PATTERN, description="the previous page's `next`")]
HistoryLimit = Annotated[int, Query(ge=1, le=1000, description="most entries of each history list")]


def _check_profile(name: str | None) -> None:
    if name is not None and name not in builtin_profile_names():
        raise HTTPException(UNPROCESSABLE, f"firmware_profile: unknown profile {name!r}; known: "
                                           f"{', '.join(sorted(builtin_profile_names()))}")


def _device_row(conn: sa.Connection, device_id: str) -> dict[str, Any]:
    d = table_of(Device)
    row = conn.execute(sa.select(d).where(d.c.id == device_id)).mappings().first()
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown device {device_id!r}")
    return dict(row)


def _common(row: dict[str, Any], labels: dict[str, str], now: datetime, stale_after_s: float) -> dict[str, Any]:
    return {
        "id": row["id"], "state": device_state(row, now, stale_after_s).value, "last_status": row["last_status"],
        "last_seen_at": row["last_seen_at"], "stale_since": stale_since(row["last_seen_at"], now, stale_after_s),
        "heartbeat_at": row["heartbeat_at"], "first_seen_at": row["first_seen_at"],
        "registered_at": row["registered_at"], "revoked_at": row["revoked_at"],
        "firmware_profile": row["firmware_profile"], "agent_version": row["agent_version"],
        "schema_version": row["schema_version"], "labels": labels,
    }


def _history(conn: sa.Connection, device_id: str, limit: int) -> DeviceHistoryPublic:
    rd, r = table_of(RolloutDevice), table_of(RolloutRecord)
    rollouts = [RolloutEntryPublic(
        rollout_id=x.rollout_id, name=x.name, model=x.model, version=x.version, rollout_status=x.status,
        step=x.step, since=unix_to_utc(x.since), reason=x.reason, command_id=x.command_id,
        ordered_at=unix_to_utc(x.ordered_at), attempts=x.attempts, rollback=bool(x.rollback))
        for x in conn.execute(
            sa.select(rd.c.rollout_id, r.c.name, r.c.model, r.c.version, r.c.status, rd.c.step, rd.c.since,
                      rd.c.reason, rd.c.command_id, rd.c.ordered_at, rd.c.attempts, rd.c.rollback, r.c.created_at)
            .join(r, r.c.id == rd.c.rollout_id).where(rd.c.device_id == device_id)
            .order_by(r.c.created_at.desc(), rd.c.rollout_id).limit(limit))]
    vc = table_of(VersionChange)
    changes = [VersionChangeItem.model_validate(dict(x)) for x in conn.execute(
        sa.select(vc).where(vc.c.device_id == device_id).order_by(vc.c.id.desc()).limit(limit)).mappings()]
    ev = table_of(EventRecord)
    events = [DeploymentEventPublic(
        id=x.id, seq=x.seq, kind=x.kind, at=datetime.fromtimestamp(x.at, UTC), command_id=x.command_id, model=x.model,
        version=x.version, reason=x.reason, detail=x.detail or {}, received_at=x.received_at)
        for x in conn.execute(sa.select(ev).where(ev.c.device_id == device_id,
                                                  ev.c.kind.in_(sorted(DEPLOY_EVENT_KINDS)))
                              .order_by(ev.c.id.desc()).limit(limit))]
    return DeviceHistoryPublic(rollouts=rollouts, version_changes=changes, events=events)


def _detail(conn: sa.Connection, row: dict[str, Any], settings: FleetSettings, now: datetime,
            history_limit: int = 100) -> DeviceDetailPublic:
    device_id = row["id"]
    stale_after = settings.device_stale_after_s
    labels = labels_of(conn, [device_id]).get(device_id, {})
    cohorts = [] if row["revoked_at"] is not None else cohorts_of_device(conn, device_id, labels)
    slots = {m.get("name"): m.get("slot") for m in (row["models"] or []) if isinstance(m, dict)}
    models = [DeviceModelPublic(model=m["model"], version=m["version"], previous_version=m["previous_version"],
                                healthy=m["healthy"], changed_at=m["changed_at"], slot=slots.get(m["model"]))
              for m in models_of(conn, [device_id]).get(device_id, [])]
    return DeviceDetailPublic(
        **_common(row, labels, now, stale_after), last_status_at=row["last_status_at"], uptime_s=row["uptime_s"],
        hardware=row["hardware"] or {}, registered_by=row["registered_by"],
        cohorts=[CohortMembershipPublic(name=n, why=w) for n, w in cohorts], models=models,
        history=_history(conn, device_id, history_limit))


def _commit(session: Session, conflict: str) -> None:
    try:
        session.commit()
    except sa.exc.IntegrityError:
        session.rollback()
        raise HTTPException(status.HTTP_409_CONFLICT, conflict) from None


@router.post("/devices", response_model=DeviceDetailPublic, status_code=status.HTTP_201_CREATED,
             responses=error_responses(409, 422))
def register_device(*, session: SessionDep, who: Operator, settings: SettingsDep,
                    body: DeviceCreate) -> DeviceDetailPublic:
    """Pre-register a device (it stays ``never`` until its first message). 409 if the id exists."""
    _check_profile(body.firmware_profile)
    conn = session.connection()  # a write request: its transaction takes SQLite's write lock first (db.get_session)
    d = table_of(Device)
    if conn.execute(sa.select(d.c.id).where(d.c.id == body.id)).first() is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"device {body.id!r} already exists")
    now = utcnow()
    conn.execute(sa.insert(d).values(id=body.id, firmware_profile=body.firmware_profile, hardware=body.hardware,
                                     models=[], registered_at=now, registered_by=who.actor, order_sequence=0))
    if body.labels:
        conn.execute(sa.insert(table_of(DeviceLabel)),
                     [{"device_id": body.id, "key": k, "value": v} for k, v in sorted(body.labels.items())])
    audit.record(session, actor=who.actor, action="device.register", target=f"device:{body.id}", at=now,
                 detail={"firmware_profile": body.firmware_profile, "labels": body.labels,
                         "hardware_keys": sorted(body.hardware)})
    _commit(session, f"device {body.id!r} already exists")
    return _detail(session.connection(), _device_row(session.connection(), body.id), settings, now)


@router.get("/devices", response_model=DeviceListPublic, responses=error_responses(404, 422))
def get_devices(
    *, session: SessionDep, _: Viewer, settings: SettingsDep,
    state: Annotated[DeviceState | None, Query(alias="status", description="device state")] = None,
    cohort: Annotated[str | None, Query(pattern=ID_PATTERN, description="in this cohort")] = None,
    label: Annotated[list[LabelFilter] | None, Query(max_length=MAX_LABELS,
                                                     description="`key=value`, repeatable; all must match")] = None,
    model: Annotated[str | None, Query(pattern=ID_PATTERN, description="serves this model")] = None,
    version: Annotated[int | None, Query(ge=0, le=MAX_SEQ, description="at this version (with `model`: of it)")
                       ] = None,
    profile: Annotated[str | None, Query(pattern=ID_PATTERN, description="firmware profile")] = None,
    q: Annotated[str | None, Query(pattern=ID_PATTERN, description="device id prefix")] = None,
    limit: Limit = 100, after: After = None,
) -> DeviceListPublic:
    """Devices by id, filtered; ``next`` is the cursor of the following page (null on the last). A cohort
    that does not exist: 404."""
    labels: dict[str, str] = {}
    for item in label or []:
        key, value = item.split("=", 1)
        if labels.setdefault(key, value) != value:
            return DeviceListPublic(items=[], next=None)  # one key, two values: nothing matches both
    now = utcnow()
    conn = session.connection()
    f = DeviceFilter(state=state, cohort=cohort, labels=labels, model=model, version=version, profile=profile, q=q)
    try:
        rows, more = list_devices(conn, f, now=now, stale_after_s=settings.device_stale_after_s, after=after,
                                  limit=limit)
    except UnknownCohortError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"cohort: {exc}") from None
    ids = [r["id"] for r in rows]
    labels_by, models_by = labels_of(conn, ids), models_of(conn, ids)
    items = [DeviceSummaryPublic(
        **_common(r, labels_by.get(r["id"], {}), now, settings.device_stale_after_s),
        models=[ModelVersionPublic(model=m["model"], version=m["version"]) for m in models_by.get(r["id"], [])])
        for r in rows]
    return DeviceListPublic(items=items, next=ids[-1] if more else None)


@router.get("/devices/{device_id}", response_model=DeviceDetailPublic, responses=error_responses(404))
def get_device(*, session: SessionDep, _: Viewer, settings: SettingsDep, device_id: DeviceIdPath,
               history_limit: HistoryLimit = 100) -> DeviceDetailPublic:
    """One device: state, profile, hardware, labels, cohorts (and why), models with their previous versions,
    and its deployment history (rollouts, version changes, deployment events; newest first)."""
    conn = session.connection()
    return _detail(conn, _device_row(conn, device_id), settings, utcnow(), history_limit)


@router.patch("/devices/{device_id}", response_model=DeviceDetailPublic,
              responses=error_responses(404, 409, 422))
def update_device(*, session: SessionDep, who: Operator, settings: SettingsDep, device_id: DeviceIdPath,
                  body: DeviceUpdate) -> DeviceDetailPublic:
    """Change labels (``remove`` first, then ``set``; more than 32 labels in the end: 409), the firmware profile
    (null clears it) or the hardware map (replaced whole; null clears it). A label change moves the device in
    or out of selector cohorts at once. Audited when something changed."""
    conn = session.connection()
    row = _device_row(conn, device_id)
    given = body.model_fields_set
    d, lt = table_of(Device), table_of(DeviceLabel)
    changed: dict[str, Any] = {}
    if "firmware_profile" in given and body.firmware_profile != row["firmware_profile"]:
        _check_profile(body.firmware_profile)
        changed["firmware_profile"] = body.firmware_profile
    hardware = body.hardware or {}
    if "hardware" in given and hardware != (row["hardware"] or {}):
        changed["hardware"] = hardware
    label_detail: dict[str, Any] = {}
    if body.labels is not None:
        current = labels_of(conn, [device_id]).get(device_id, {})
        after = {**{k: v for k, v in current.items() if k not in body.labels.remove}, **body.labels.set}
        if len(after) > MAX_LABELS:
            raise HTTPException(status.HTTP_409_CONFLICT,
                                f"labels: a device has at most {MAX_LABELS} labels ({len(after)} after this change)")
        if after != current:
            gone = sorted(set(current) - set(after) | {k for k, v in after.items() if k in current
                                                        and current[k] != v})
            if gone:
                conn.execute(sa.delete(lt).where(lt.c.device_id == device_id, lt.c.key.in_(gone)))
            new = [{"device_id": device_id, "key": k, "value": v} for k, v in sorted(after.items())
                   if current.get(k) != v]
            if new:
                conn.execute(sa.insert(lt), new)
            label_detail = {"before": current, "after": after}
    if changed:
        conn.execute(sa.update(d).where(d.c.id == device_id).values(**changed))
    now = utcnow()
    if changed or label_detail:
        detail: dict[str, Any] = {k: v for k, v in changed.items() if k != "hardware"}
        if "hardware" in changed:
            detail["hardware_keys"] = sorted(changed["hardware"])
        if label_detail:
            detail["labels"] = label_detail
        audit.record(session, actor=who.actor, action="device.update", target=f"device:{device_id}", at=now,
                     detail=detail)
        session.commit()
    else:
        session.rollback()
    conn = session.connection()
    return _detail(conn, _device_row(conn, device_id), settings, now)


@router.delete("/devices/{device_id}", response_model=DeviceDetailPublic, responses=error_responses(404, 409))
def revoke_device(*, session: SessionDep, who: Admin, settings: SettingsDep,
                  device_id: DeviceIdPath) -> DeviceDetailPublic:
    """Revoke (decommission) a device: it leaves every cohort, gets no further orders, and its MQTT messages
    are dropped (counted as ``revoked_device``). The row and its history stay. 409 if already revoked."""
    conn = session.connection()
    row = _device_row(conn, device_id)
    if row["revoked_at"] is not None:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"device {device_id!r} was revoked at {row['revoked_at'].isoformat()}")
    now = utcnow()
    d = table_of(Device)
    conn.execute(sa.update(d).where(d.c.id == device_id, d.c.revoked_at.is_(None)).values(revoked_at=now))
    audit.record(session, actor=who.actor, action="device.revoke", target=f"device:{device_id}", at=now,
                 detail={"state_before": device_state(row, now, settings.device_stale_after_s).value})
    session.commit()
    conn = session.connection()
    return _detail(conn, _device_row(conn, device_id), settings, now)

