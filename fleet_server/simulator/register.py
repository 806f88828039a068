"""Pre-register simulated devices with the fleet server: directly in its database, or through its HTTP API.

:func:`register_devices` writes ``devices`` rows (firmware profile, hardware, ``registered_at``/``registered_by``)
and their ``device_labels`` in one transaction with one audit record (``device.register``, target
``simulator:{prefix}``, detail: how many were created and updated). It is idempotent: running it again makes the
rows match the scenario (profile, hardware, labels replaced) without duplicating anything, which is what a demo that
restarts against the same SQLite file needs. Bulk statements in chunks keep 10 000 devices to a few hundred ms.

:func:`register_via_api` does the same through ``POST /api/v1/devices`` (one request per device; ``409`` means
"already registered" and counts as existing), for a server in another process.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session

from fleet_server import audit
from fleet_server.models import Device, DeviceLabel, table_of
from fleet_server.simulator.scenario import DevicePlan

__all__ = ["RegisterResult", "register_devices", "register_via_api"]

_CHUNK = 500
_DEVICES = table_of(Device)
_LABELS = table_of(DeviceLabel)


class RegisterResult(dict[str, int]):
    """``{"created": n, "updated": m}``."""


def register_devices(engine: Engine, plans: Sequence[DevicePlan], *, actor: str = "simulator",
                     now: datetime | None = None) -> RegisterResult:
    """Create or update the devices of ``plans`` with their labels, profile and hardware (see the module docs)."""
    at = now or datetime.now(UTC)
    ids = [p.device_id for p in plans]
    created = updated = 0
    with Session(engine) as session:
        conn = session.connection()
        existing: set[str] = set()
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i:i + _CHUNK]
            existing.update(conn.execute(sa.select(_DEVICES.c.id).where(_DEVICES.c.id.in_(chunk))).scalars())
        new = [p for p in plans if p.device_id not in existing]
        old = [p for p in plans if p.device_id in existing]
        if new:
            conn.execute(sa.insert(_DEVICES), [
                {"id": p.device_id, "firmware_profile": p.profile, "hardware": dict(p.hardware), "models": [],
                 "registered_at": at, "registered_by": actor, "order_sequence": 0} for p in new])
            created = len(new)
        if old:
            conn.execute(
                sa.update(_DEVICES).where(_DEVICES.c.id == sa.bindparam("b_id"))
                .values(firmware_profile=sa.bindparam("b_profile"), hardware=sa.bindparam("b_hardware")),
                [{"b_id": p.device_id, "b_profile": p.profile, "b_hardware": dict(p.hardware)} for p in old])
            updated = len(old)
            for i in range(0, len(old), _CHUNK):
                chunk = [p.device_id for p in old[i:i + _CHUNK]]
                conn.execute(sa.delete(_LABELS).where(_LABELS.c.device_id.in_(chunk)))
        labels = [{"device_id": p.device_id, "key": k, "value": v} for p in plans for k, v in p.labels.items()]
        if labels:
            conn.execute(sa.insert(_LABELS), labels)
        prefix = ids[0].rsplit("-", 1)[0] if ids else "none"
        audit.record(session, actor=actor, action="device.register", target=f"simulator:{prefix}", at=at,
                     detail={"created": created, "updated": updated, "devices": len(ids)})
        session.commit()
    return RegisterResult(created=created, updated=updated)


def register_via_api(base_url: str, token: str, plans: Sequence[DevicePlan], *, timeout_s: float = 10.0,
                     client: Any | None = None) -> RegisterResult:
    """``POST /api/v1/devices`` for every plan (``{id, firmware_profile, hardware, labels}``) with a bearer token;
    ``201`` counts as created, ``409`` as already there; anything else raises ``RuntimeError``. ``client`` may be
    an ``httpx.Client`` (tests pass FastAPI's ``TestClient``)."""
    import httpx

    own = client is None
    http: Any = client if client is not None else httpx.Client(base_url=base_url, timeout=timeout_s)
    created = existing = 0
    try:
        for p in plans:
            resp = http.post("/api/v1/devices", headers={"Authorization": f"Bearer {token}"},
                             json={"id": p.device_id, "firmware_profile": p.profile, "hardware": dict(p.hardware),
                                   "labels": dict(p.labels)})
            if resp.status_code in (200, 201):
                created += 1
            elif resp.status_code == 409:
                existing += 1
            else:
                raise RuntimeError(f"registering {p.device_id}: HTTP {resp.status_code}: {resp.text[:300]}")
    finally:
        if own:
            http.close()
    return RegisterResult(created=created, updated=existing)
