"""``GET /api/v1/summary`` (viewer): the fleet at a glance, for the console's dashboard and for scripts.

``{"devices": {"online": n, "offline": n, "stale": n, "never": n, "revoked": n}, "devices_total": n,
"rollouts": {"draft": n, "running": n, "paused": n, "completed": n, "aborted": n, "rolled_back": n},
"stale_after_s": s, "at": <ISO 8601 UTC>}``.

Device states follow the registry's one definition (:func:`fleet_server.registry.devices.state_condition`, the
same rules as the device list's ``status`` filter and the ``fleet_devices`` gauge), one indexed count per state;
``devices_total`` leaves revoked devices out, like the device list. Every state and status is present (zeros
included). The version distribution per model is ``GET /api/v1/versions``.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from fastapi import APIRouter
from pydantic import BaseModel

from fleet_server.api.deps import SettingsDep, Viewer
from fleet_server.api.errors import error_responses
from fleet_server.db import SessionDep
from fleet_server.models import Device, RolloutRecord, table_of, utcnow
from fleet_server.registry.devices import DeviceState, state_condition
from fleet_server.rollouts import RolloutStatus

__all__ = ["SummaryPublic", "fleet_summary", "router"]

router = APIRouter(prefix="/api/v1", tags=["summary"])



class SummaryPublic(BaseModel):
    """Counts of devices by state and rollouts by status, at ``at``."""

    devices: dict[str, int]
    """Every device state (``online``, ``offline``, ``stale``, ``never``, ``revoked``) -> devices in it now."""
    devices_total: int
    """Devices not revoked."""
    rollouts: dict[str, int]
    """Every rollout status -> rollouts in it."""
    stale_after_s: float
    """A device silent for longer than this is ``stale``."""
    at: datetime


def fleet_summary(conn: sa.Connection, now: datetime, stale_after_s: float) -> SummaryPublic:
    """The counts of :class:`SummaryPublic` at ``now`` (read-only)."""
    d, r = table_of(Device), table_of(RolloutRecord)
    devices = {
        s.value: int(conn.execute(sa.select(sa.func.count()).select_from(d)
                                  .where(state_condition(s, now, stale_after_s))).scalar_one())
        for s in DeviceState
    }
    counted = {str(row.status): int(row.n) for row in conn.execute(
        sa.select(r.c.status, sa.func.count().label("n")).group_by(r.c.status))}
    rollouts = {s.value: counted.get(s.value, 0) for s in RolloutStatus}
    total = sum(n for s, n in devices.items() if s != DeviceState.REVOKED.value)
    return SummaryPublic(devices=devices, devices_total=total, rollouts=rollouts, stale_after_s=stale_after_s,
                         at=now)


@router.get("/summary", response_model=SummaryPublic, responses=error_responses())
def get_summary(*, session: SessionDep, _: Viewer, settings: SettingsDep) -> SummaryPublic:
    """Devices by state and rollouts by status (the console's dashboard)."""
    return fleet_summary(session.connection(), utcnow(), settings.device_stale_after_s)
