"""Registry gauges for ``/metrics``: devices by state (Prometheus text exposition format)."""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa

from fleet_server.models import Device, table_of
from fleet_server.prometheus import metric_lines
from fleet_server.registry.devices import DeviceState

__all__ = ["registry_metrics"]


def registry_metrics(conn: sa.Connection, now: datetime, stale_after_s: float) -> str:
    """``fleet_devices{state="..."}`` for every :class:`~fleet_server.registry.devices.DeviceState` (zeros
    included, so a dashboard never sees a series vanish), from one aggregate query, same rules as
    :func:`~fleet_server.registry.devices.device_state`."""
    d = table_of(Device)
    cutoff = now - timedelta(seconds=stale_after_s)
    state = sa.case(
        (d.c.revoked_at.is_not(None), DeviceState.REVOKED.value),
        (d.c.last_seen_at.is_(None), DeviceState.NEVER.value),
        (d.c.last_status == "offline", DeviceState.OFFLINE.value),
        (d.c.last_seen_at <= cutoff, DeviceState.STALE.value),
        else_=DeviceState.ONLINE.value,
    ).label("state")
    per_device = sa.select(state).select_from(d).subquery()
    counts = {str(r.state): int(r.n) for r in conn.execute(
        sa.select(per_device.c.state, sa.func.count().label("n")).group_by(per_device.c.state))}
    lines = metric_lines("fleet_devices", "gauge",
                         "Registered devices by state (online, offline, stale, never heard from, revoked).",
                         [(f'{{state="{s.value}"}}', counts.get(s.value, 0)) for s in DeviceState])
    return "\n".join(lines) + "\n"
