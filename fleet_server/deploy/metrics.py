"""Prometheus text for the rollout machinery (appended to ``GET /metrics``).

Durable figures come from the database, so every replica reports the same fleet-wide numbers: rollouts by status,
devices of live rollouts by step, commands by state and kind, and the loop's lag (age of the oldest stored event
the loop has not consumed yet). Process-local counters (what this replica's bridge published and resent, its
loop's ticks and errors) are added when the bridge and loop run in this process.
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from fleet_server.deploy.bridge import CommandBridge
from fleet_server.deploy.loop import EVENTS_CURSOR, RolloutLoop
from fleet_server.deploy.store import ROLLOUT_DEVICES, ROLLOUTS
from fleet_server.models import CommandRecord, Counter, EventRecord, table_of
from fleet_server.prometheus import metric_lines
from fleet_server.rollouts import DeviceStep, RolloutStatus

__all__ = ["rollout_metrics"]

_COMMANDS = table_of(CommandRecord)
_COUNTERS = table_of(Counter)
_EVENTS = table_of(EventRecord)


def rollout_metrics(engine: Engine, *, loop: RolloutLoop | None = None, bridge: CommandBridge | None = None,
                    now: float | None = None) -> str:
    """The rollout metrics in the Prometheus text exposition format (a few aggregate queries)."""
    now = time.time() if now is None else now
    with engine.connect() as conn:
        statuses: dict[str, int] = dict(conn.execute(
            sa.select(ROLLOUTS.c.status, sa.func.count()).group_by(ROLLOUTS.c.status)).all())
        live = sa.select(ROLLOUTS.c.id).where(ROLLOUTS.c.status.in_([RolloutStatus.RUNNING.value,
                                                                      RolloutStatus.PAUSED.value]))
        steps: dict[str, int] = dict(conn.execute(sa.select(ROLLOUT_DEVICES.c.step, sa.func.count())
                                  .where(ROLLOUT_DEVICES.c.rollout_id.in_(live))
                                  .group_by(ROLLOUT_DEVICES.c.step)).all())
        commands = {(k, s): n for k, s, n in conn.execute(
            sa.select(_COMMANDS.c.kind, _COMMANDS.c.state, sa.func.count())
            .group_by(_COMMANDS.c.kind, _COMMANDS.c.state)).all()}
        cursor = conn.execute(sa.select(_COUNTERS.c.value).where(_COUNTERS.c.name == EVENTS_CURSOR)).scalar() or 0
        oldest = conn.execute(sa.select(sa.func.min(_EVENTS.c.received_at)).where(_EVENTS.c.id > cursor)).scalar()
    lag = max(0.0, now - oldest.timestamp()) if oldest is not None else 0.0
    lines: list[str] = []
    lines += metric_lines("fleet_rollouts", "gauge", "Rollouts by status.",
                    [(f'{{status="{s.value}"}}', statuses.get(s.value, 0)) for s in RolloutStatus])
    lines += metric_lines("fleet_rollout_devices", "gauge", "Devices of running and paused rollouts, by step.",
                    [(f'{{step="{s.value}"}}', steps.get(s.value, 0)) for s in DeviceStep
                     if s is not DeviceStep.NOT_STARTED])
    lines += metric_lines("fleet_rollout_commands", "gauge", "Stored commands by kind and state.",
                    [(f'{{kind="{k}",state="{s}"}}', commands.get((k, s), 0))
                     for k in ("deploy", "cancel") for s in ("pending", "acked", "expired")])
    lines += metric_lines("fleet_rollout_orders_sent_total", "counter", "Signed commands ever stored, by kind.",
                    [(f'{{kind="{k}"}}', sum(n for (kk, _), n in commands.items() if kk == k))
                     for k in ("deploy", "cancel")])
    lines += metric_lines("fleet_rollout_loop_lag_seconds", "gauge",
                    "Age of the oldest stored event the rollout loop has not consumed (0: none).",
                    [("", round(lag, 3))])
    if bridge is not None:
        m = bridge.metrics
        lines += metric_lines("fleet_rollout_bridge_published_total", "counter",
                        "Command copies published by this replica (first sends and resends).",
                        [('{copy="first"}', m.published), ('{copy="resend"}', m.resent)])
        lines += metric_lines("fleet_rollout_bridge_publish_failures_total", "counter",
                        "Publishes the MQTT client did not take (retried by the resend schedule).",
                        [("", m.publish_failures)])
        lines += metric_lines("fleet_rollout_bridge_expired_total", "counter",
                        "Commands this replica marked expired (never acknowledged).", [("", m.expired)])
    if loop is not None:
        lm = loop.metrics
        age = now - lm.last_tick_at if lm.last_tick_at is not None else -1.0
        lines += metric_lines("fleet_rollout_loop_ticks_total", "counter", "Rollout loop ticks in this replica.",
                        [("", lm.ticks)])
        lines += metric_lines("fleet_rollout_loop_tick_errors_total", "counter", "Ticks that failed (logged).",
                        [("", lm.tick_errors)])
        lines += metric_lines("fleet_rollout_loop_last_tick_age_seconds", "gauge",
                        "Seconds since the last tick (-1: none yet).", [("", round(age, 3))])
        lines += metric_lines("fleet_rollout_loop_tick_seconds", "gauge", "Duration of the last tick.",
                        [("", round(lm.last_tick_s, 6))])
        lines += metric_lines("fleet_rollout_decisions_total", "counter", "Decisions carried out, by type.",
                        [(f'{{decision="{k}"}}', v) for k, v in sorted(lm.decisions.items())])
    return "\n".join(lines) + "\n"
