"""The rollout loop: applies the pure policy (:mod:`fleet_server.rollouts`) to the database, once per
``rollout_interval_s`` (and at once when woken by an API action).

One tick:

1. **Events.** Device events are stored by ingestion (idempotently; this loop never ingests). The loop reads the
   ``events`` rows after its cursor (``counters['rollout_loop.events']``, the last ``events.id`` consumed), marks
   every command an event names as acknowledged (:meth:`CommandBridge.acknowledge`), and feeds each deployment
   event to :func:`~fleet_server.rollouts.on_event` for the rollout device whose current ``command_id`` it names
   (events without a command id, the agent acting on its own, go to the device's rollouts of that model it
   installed). The event's time is the server's receive time. Cursor, acknowledgements and device states commit
   together.
2. **Rollouts.** For each live rollout (running, paused, aborted with devices still updating, completed or rolled
   back unless a later rollout of the same model started), in creation order, in one transaction that locks the
   rollout's row: resolve its cohorts now (late joiners included), add its devices still updating, read device
   states and presence, the devices other rollouts are updating (``busy_elsewhere``) and, when the current phase
   has gates, drift and SLI signals (:mod:`fleet_server.deploy.signals`); ``decide``; carry the decisions out
   (orders and cancels signed and stored by the bridge, halts, advances and completion audited by
   ``system:rollout-loop``); ``apply_decisions``; store the states with the revision check. After an ``Advance``
   it decides again at once. After the commit the new commands are published.
3. **Resends** of commands that are due, and expiry (:meth:`CommandBridge.resend_due`).

Failures never stop the loop: a rollout whose row or spec does not make sense is skipped (logged, counted) and
the others go on; a database outage fails the tick (logged), and the next tick starts over from the database.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Engine

from agent.protocol import DEPLOY_EVENT_KINDS
from fleet_server.db import is_postgresql
from fleet_server.deploy.bridge import CommandBridge, Outgoing, chunks
from fleet_server.deploy.signals import SignalReader
from fleet_server.deploy.specs import build_spec, state_from_row
from fleet_server.deploy.store import (
    ROLLOUT_DEVICES,
    ROLLOUTS,
    ConcurrentChangeError,
    audit,
    busy_by_rollout,
    busy_elsewhere,
    device_states,
    lock_rollout,
    presence,
    resolve_target,
    save_devices,
    save_state,
    union_target,
)
from fleet_server.models import Counter as CounterRecord
from fleet_server.models import EventRecord, table_of
from fleet_server.rollouts import (
    ON_NEW_VERSION_STEPS,
    Advance,
    Complete,
    Decision,
    DeviceState,
    DeviceStep,
    Halt,
    MarkTimedOut,
    RolloutSpec,
    RolloutState,
    RolloutStatus,
    SendCancel,
    SendOrder,
    Signals,
    Wait,
    apply_decisions,
    decide,
    on_event,
)
from fleet_server.settings import FleetSettings

__all__ = ["ACTOR", "EVENTS_CURSOR", "EvalResult", "LoopMetrics", "RolloutLoop", "live_statuses"]

log = logging.getLogger(__name__)

ACTOR = "system:rollout-loop"
"""Who the audit log names for what the loop does on its own (halts, advances, completion)."""
EVENTS_CURSOR = "rollout_loop.events"
"""The ``counters`` row holding the last ``events.id`` the loop consumed."""

_EVENTS = table_of(EventRecord)
_COUNTERS = table_of(CounterRecord)
_S = RolloutStatus


def live_statuses() -> tuple[str, ...]:
    return (_S.RUNNING.value, _S.PAUSED.value, _S.ABORTED.value, _S.COMPLETED.value, _S.ROLLED_BACK.value)


@dataclass
class LoopMetrics:
    """Counters since start (process-local)."""

    ticks: int = 0
    tick_errors: int = 0
    events_consumed: int = 0
    device_updates: int = 0
    evaluations: int = 0
    skipped_rollouts: int = 0
    conflicts: int = 0
    decisions: Counter[str] = field(default_factory=Counter)
    last_tick_at: float | None = None
    last_tick_s: float = 0.0


@dataclass(frozen=True)
class EvalResult:
    """What one evaluation of one rollout did."""

    rollout_id: str
    decisions: tuple[Decision, ...] = ()
    published: int = 0
    more: bool = False
    """Orders were held back for the next transaction (``orders_per_transaction``): evaluate again."""
    skipped: str | None = None
    """Why nothing was evaluated (locked by another replica, not live, a bad row...)."""


class RolloutLoop:
    """See the module docstring. ``tick()`` is one pass (tests call it with their own clock); ``start()`` runs
    it on a thread every ``settings.rollout_interval_s``."""

    def __init__(self, engine: Engine, bridge: CommandBridge, settings: FleetSettings, *,
                 clock: Callable[[], float] = time.time, signals: SignalReader | None = None,
                 events_batch: int = 5000, gap_grace_s: float = 10.0,
                 orders_per_transaction: int | None = None) -> None:
        self.engine = engine
        self.bridge = bridge
        self.settings = settings
        self.clock = clock
        self.signals = signals or SignalReader()
        self.events_batch = events_batch
        self.gap_grace_s = gap_grace_s
        self._pg = is_postgresql(engine)
        self.orders_per_transaction = orders_per_transaction or (10_000 if self._pg else 2000)
        """Most orders signed in one transaction: SQLite holds its one write lock while signing (about 0.5 s per
        2 000 orders), PostgreSQL only the rows involved."""
        self.metrics = LoopMetrics()
        self.waiting: dict[str, tuple[float | None, str]] = {}
        """Rollout id -> (until, reason) of its latest ``Wait``: what it waits for."""
        self._done_above: set[int] = set()
        self._bad: dict[str, str] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick_lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rollout-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        """Run the next tick now (an API action changed a rollout)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._wake.wait(self.settings.rollout_interval_s)
            self._wake.clear()

    # -- one tick -----------------------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> list[EvalResult]:
        """One pass: events, rollouts, resends. Never raises: failures are logged and counted."""
        with self._tick_lock:
            started = time.monotonic()
            now = self.clock() if now is None else now
            results: list[EvalResult] = []
            failed = False
            try:
                while self.consume_events(now) >= self.events_batch:
                    pass
            except Exception:  # the top of a task: log, count, go on with the next step
                failed = True
                log.exception("rollout loop: consuming events failed")
            try:
                results = self.evaluate_all(now)
            except Exception:
                failed = True
                log.exception("rollout loop: evaluating rollouts failed")
            try:
                self.bridge.resend_due(now)
            except Exception:
                failed = True
                log.exception("rollout loop: resending commands failed")
            m = self.metrics
            m.ticks += 1
            m.tick_errors += failed
            m.last_tick_at = now
            m.last_tick_s = time.monotonic() - started
            return results

    # -- events -------------------------------------------------------------------------------------------

    def _cursor(self, conn: sa.Connection) -> int:
        insert = pg_dialect.insert(_COUNTERS) if self._pg else sqlite_dialect.insert(_COUNTERS)
        conn.execute(insert.values(name=EVENTS_CURSOR, value=0).on_conflict_do_nothing(index_elements=["name"]))
        q = sa.select(_COUNTERS.c.value).where(_COUNTERS.c.name == EVENTS_CURSOR)
        if self._pg:
            q = q.with_for_update()
        return int(conn.execute(q).scalar_one())

    def consume_events(self, now: float) -> int:
        """Consume up to ``events_batch`` events after the cursor; returns how many rows were read.

        On PostgreSQL ids are not committed in order (two ingesting replicas), and a conflicting insert burns an id
        for good. So the cursor stops before a gap until the first event after it is ``gap_grace_s`` old; events
        above a gap are processed once (remembered in memory) and, after a restart inside the grace time, again:
        :func:`on_event` and acknowledging are idempotent."""
        with self.engine.connect().execution_options(sqlite_immediate=True) as conn, conn.begin():
            cursor = self._cursor(conn)
            rows = conn.execute(sa.select(_EVENTS.c.id, _EVENTS.c.device_id, _EVENTS.c.kind, _EVENTS.c.command_id,
                                          _EVENTS.c.model, _EVENTS.c.version, _EVENTS.c.reason, _EVENTS.c.received_at)
                                .where(_EVENTS.c.id > cursor).order_by(_EVENTS.c.id).limit(self.events_batch)).all()
            if not rows:
                return 0
            new_cursor, holding = cursor, False
            fresh = []
            for r in rows:
                if not holding:
                    if r.id == new_cursor + 1 or now - r.received_at.timestamp() >= self.gap_grace_s:
                        new_cursor = r.id
                    else:
                        holding = True
                if r.id not in self._done_above:
                    fresh.append(r)
            self._apply_events(conn, fresh, now)
            conn.execute(sa.update(_COUNTERS).where(_COUNTERS.c.name == EVENTS_CURSOR).values(value=new_cursor))
        self._done_above = {i for i in self._done_above if i > new_cursor}
        self._done_above.update(r.id for r in fresh if r.id > new_cursor)
        self.metrics.events_consumed += len(fresh)
        return len(rows) if not holding else 0

    def _apply_events(self, conn: sa.Connection, events: Sequence[Any], now: float) -> None:
        if not events:
            return
        self.bridge.acknowledge(conn, [e.command_id for e in events if e.command_id is not None], now)
        deploy = [e for e in events if e.kind in DEPLOY_EVENT_KINDS]
        cids = sorted({e.command_id for e in deploy if e.command_id is not None})
        autonomous = [e for e in deploy if e.command_id is None and e.kind in ("rolled_back", "failed")]
        keys: set[tuple[str, str]] = set()
        for part in chunks(cids):
            keys.update((r.rollout_id, r.device_id) for r in conn.execute(
                sa.select(ROLLOUT_DEVICES.c.rollout_id, ROLLOUT_DEVICES.c.device_id)
                .where(ROLLOUT_DEVICES.c.command_id.in_(part))))
        if autonomous:
            on_new = sorted(s.value for s in ON_NEW_VERSION_STEPS)
            for part in chunks(sorted({e.device_id for e in autonomous})):
                keys.update((r.rollout_id, r.device_id) for r in conn.execute(
                    sa.select(ROLLOUT_DEVICES.c.rollout_id, ROLLOUT_DEVICES.c.device_id)
                    .where(ROLLOUT_DEVICES.c.device_id.in_(part), ROLLOUT_DEVICES.c.step.in_(on_new))))
        if not keys:
            return
        rollout_ids = sorted({k[0] for k in keys})
        models: dict[str, str] = {}
        for rid in rollout_ids:  # lock in id order, as every writer of a rollout does
            row = lock_rollout(conn, rid)
            if row is not None:
                models[rid] = row["model"]
        states: dict[tuple[str, str], DeviceState] = {}
        for rid in models:
            devices = [d for r, d in keys if r == rid]
            for part in chunks(sorted(devices)):
                for r in conn.execute(sa.select(ROLLOUT_DEVICES).where(
                        ROLLOUT_DEVICES.c.rollout_id == rid, ROLLOUT_DEVICES.c.device_id.in_(part))).mappings():
                    try:
                        states[(rid, r["device_id"])] = DeviceState(
                            DeviceStep(r["step"]), r["since"], r["reason"], r["command_id"], r["ordered_at"],
                            r["attempts"], bool(r["rollback"]))
                    except ValueError as exc:
                        log.error("rollout loop: ignoring events for a bad row of rollout %s device %s: %s", rid,
                                  r["device_id"], exc)
        by_command: dict[str, list[tuple[str, str]]] = {}
        by_device: dict[str, list[tuple[str, str]]] = {}
        for key, st in states.items():
            if st.command_id is not None:
                by_command.setdefault(st.command_id, []).append(key)
            by_device.setdefault(key[1], []).append(key)
        changed: dict[tuple[str, str], DeviceState] = {}
        for e in deploy:
            at = e.received_at.timestamp()
            if e.command_id is not None:
                targets = by_command.get(e.command_id, [])
            else:
                targets = [k for k in by_device.get(e.device_id, [])
                           if e.model is None or models.get(k[0]) == e.model]
            for key in targets:
                st = changed.get(key) or states[key]
                new = on_event(st, e.kind, at, command_id=e.command_id, reason=e.reason)
                if new != st:
                    changed[key] = new
        for rid in models:
            mine = {d: st for (r, d), st in changed.items() if r == rid}
            if mine:
                save_devices(conn, rid, mine)
                conn.execute(sa.update(ROLLOUTS).where(ROLLOUTS.c.id == rid)
                             .values(revision=ROLLOUTS.c.revision + 1))
        self.metrics.device_updates += len(changed)

    # -- rollouts -----------------------------------------------------------------------------------------

    def live_rollouts(self, conn: sa.Connection) -> list[str]:
        """Rollouts the loop evaluates, oldest first (see the module docstring)."""
        rows = conn.execute(sa.select(ROLLOUTS.c.id, ROLLOUTS.c.model, ROLLOUTS.c.status, ROLLOUTS.c.created_at)
                            .where(ROLLOUTS.c.status != _S.DRAFT.value)
                            .order_by(ROLLOUTS.c.created_at, ROLLOUTS.c.id)).all()
        busy = busy_by_rollout(conn)
        newest: dict[str, Any] = {}
        for r in rows:
            newest[r.model] = r.created_at  # rows are in creation order: the last one wins
        out: list[str] = []
        for r in rows:
            if r.status in (_S.RUNNING.value, _S.PAUSED.value):
                out.append(r.id)
            elif r.status == _S.ABORTED.value:
                if busy.get(r.id):
                    out.append(r.id)
            elif r.status in (_S.COMPLETED.value, _S.ROLLED_BACK.value) and (
                    newest[r.model] == r.created_at or busy.get(r.id)):
                out.append(r.id)
        return out

    def evaluate_all(self, now: float) -> list[EvalResult]:
        with self.engine.connect() as conn:
            ids = self.live_rollouts(conn)
        results: list[EvalResult] = []
        for rid in ids:
            for _ in range(1000):  # a phase of N devices needs N / orders_per_transaction passes
                try:
                    res = self.evaluate(rid, now)
                except (sa.exc.OperationalError, sa.exc.InterfaceError):
                    raise  # the database is away: fail the tick
                except ConcurrentChangeError as exc:
                    self.metrics.conflicts += 1
                    log.info("rollout loop: %s; evaluated again next tick", exc)
                    break
                except Exception as exc:  # one bad rollout must not stop the others
                    self.metrics.skipped_rollouts += 1
                    why = f"{type(exc).__name__}: {str(exc)[:500]}"
                    if self._bad.get(rid) != why:  # logged when it starts or changes, not every tick
                        log.error("rollout loop: skipping rollout %s until it is fixed: %s", rid, why,
                                  exc_info=not isinstance(exc, ValueError))
                        self._bad[rid] = why
                    results.append(EvalResult(rid, skipped=why))
                    break
                if self._bad.pop(rid, None) is not None:
                    log.info("rollout loop: rollout %s is evaluated again", rid)
                results.append(res)
                if not res.more:
                    break
        return results

    def _spec(self, conn: sa.Connection, row: Mapping[str, Any], devices: Mapping[str, DeviceState]
              ) -> RolloutSpec:
        target, unknown = resolve_target(conn, list(row["cohorts"]))
        if unknown:
            log.warning("rollout loop: rollout %s targets deleted cohort(s) %s", row["id"], ", ".join(unknown))
        return build_spec(row["spec"], rollout_id=row["id"], model=row["model"], version=row["version"],
                          bundle_digest=row["bundle_digest"], target=union_target(target, devices))

    def _signals(self, conn: sa.Connection, spec: RolloutSpec, state: RolloutState,
                 devices: Mapping[str, DeviceState], now: float) -> Signals:
        if state.status is not _S.RUNNING:
            return Signals()
        phase = spec.phases[min(state.phase, len(spec.phases) - 1)]
        if phase.drift is None and phase.sli is None:
            return Signals()
        canary = [d for d, st in devices.items() if st.step in ON_NEW_VERSION_STEPS and not st.rollback]
        canary_set = set(canary)
        control = self.signals.control_group(spec.ranked, set(spec.target) - canary_set)
        return self.signals.read(conn, model=spec.model, version=spec.version, canary=canary, control=control,
                                 now=now, drift=phase.drift is not None, sli=phase.sli is not None)

    def evaluate(self, rollout_id: str, now: float) -> EvalResult:
        """Decide and carry out one rollout in one transaction (see the module docstring)."""
        outgoing: list[Outgoing] = []
        carried: list[Decision] = []
        more = False
        with self.engine.connect().execution_options(sqlite_immediate=True) as conn, conn.begin():
            row = lock_rollout(conn, rollout_id, skip_locked=True)
            if row is None:
                return EvalResult(rollout_id, skipped="locked by another transaction, or deleted")
            state = state_from_row(row)
            if state.status is _S.DRAFT:
                return EvalResult(rollout_id, skipped="draft")
            devices = device_states(conn, rollout_id)
            spec = self._spec(conn, row, devices)
            # Presence only orders not-started devices (online first): read it for those alone.
            waiting = [d for d in spec.target if d not in devices or devices[d].step is DeviceStep.NOT_STARTED]
            for device, (online, stale_since) in presence(conn, waiting, now=now,
                                                          stale_after_s=self.settings.device_stale_after_s).items():
                st = devices.get(device)
                if st is not None:
                    devices[device] = dataclasses.replace(st, online=online, stale_since=stale_since)
                elif not online:
                    devices[device] = DeviceState(online=False, stale_since=stale_since)
            busy = busy_elsewhere(busy_by_rollout(conn), rollout_id)
            signals = self._signals(conn, spec, state, devices, now)
            original = state
            changed_all: dict[str, DeviceState] = {}
            for _ in range(len(spec.phases) + 2):
                decisions = decide(spec, state, devices, now, signals, busy_elsewhere=busy)
                kept: list[Decision] = []
                orders: list[SendOrder] = []
                cancels: list[SendCancel] = []
                for d in decisions:
                    if isinstance(d, Wait):
                        self.waiting[rollout_id] = (d.until, d.reason)
                        continue
                    if isinstance(d, SendOrder):
                        if len(orders) >= self.orders_per_transaction:
                            more = True
                            continue
                        orders.append(d)
                    elif isinstance(d, SendCancel):
                        cancels.append(d)
                    kept.append(d)
                if not kept:
                    break
                outgoing += self.bridge.prepare(conn, rollout_id=rollout_id, orders=orders, cancels=cancels, now=now)
                for d in kept:
                    self.metrics.decisions[type(d).__name__] += 1
                    self._audit(conn, rollout_id, state, d, now)
                state, changed = apply_decisions(state, devices, kept, now)
                devices.update(changed)
                changed_all.update(changed)
                carried += kept
                if more or not any(isinstance(d, Advance) for d in kept):
                    break
                self.waiting.pop(rollout_id, None)
            if changed_all or state != original:
                save_devices(conn, rollout_id, changed_all)
                save_state(conn, rollout_id, state, revision=row["revision"], now=now)
        published = self.bridge.publish(outgoing)
        self.metrics.evaluations += 1
        return EvalResult(rollout_id, tuple(carried), published, more)

    def _audit(self, conn: sa.Connection, rollout_id: str, state: RolloutState, d: Decision, now: float) -> None:
        target = f"rollout:{rollout_id}"
        if isinstance(d, Halt):
            log.warning("rollout %s halted (%s): %s", rollout_id, d.rule.value, d.reason)
            audit(conn, actor=ACTOR, action="rollout.halt", target=target, at=now,
                  detail={"rule": d.rule.value, "reason": d.reason, "phase": state.phase + 1})
        elif isinstance(d, Advance):
            log.info("rollout %s advances to phase %d: %s", rollout_id, d.to_phase + 1, d.reason)
            audit(conn, actor=ACTOR, action="rollout.advance", target=target, at=now,
                  detail={"to_phase": d.to_phase + 1, "reason": d.reason})
        elif isinstance(d, Complete):
            log.info("rollout %s completed: %s", rollout_id, d.reason)
            audit(conn, actor=ACTOR, action="rollout.complete", target=target, at=now, detail={"reason": d.reason})
        elif isinstance(d, MarkTimedOut):
            log.info("rollout %s: device %s timed out (%s)", rollout_id, d.device, d.step.value)
