"""Telemetry ingestion: a pure core that decides, and a thin edge that writes.

Devices publish drift windows, events, status and heartbeats at QoS 1 and keep each sequenced message in
their outbox until the *server* acknowledges it (``docs/wire-contract.md``, "Sequences, acknowledgements and
gaps"). Ingestion therefore has to be idempotent by (device, stream, seq), write in batches, and answer each
batch with an :class:`~agent.protocol.Ack` per (device, stream) naming what is stored and what is missing.

* :class:`Ingestor` (pure, no I/O): :meth:`Ingestor.decode` turns raw MQTT messages into protocol messages
  (rejects are counted by reason, never raised); :meth:`Ingestor.plan` takes a batch plus the current device
  rows and stream states and returns a :class:`WritePlan`: rows to insert, ranges to supersede, device and
  stream-state updates, and the acks to publish once the plan is committed.
* :class:`BatchWriter` (the database edge): one transaction per batch. It locks the stream states the batch
  touches (``SELECT ... FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), so the trackers are rebuilt
  from the database every batch: a restart, or another replica sharing the subscription, can never make a
  message count twice. Inserts are executemany with ``ON CONFLICT DO NOTHING`` as a second line of defence.

Status and heartbeats update the device row (``first_seen_at`` on a pre-registered device's first message,
``heartbeat_at``); the models of each online ``Status`` feed version tracking in the same transaction
(:func:`fleet_server.registry.versions.record_model_reports`). Messages of revoked devices are dropped and
counted (``revoked_device``) like those of unknown devices.

The acks are returned only after the commit: an Ack promises the device that the message is durable.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Engine

from agent.protocol import (
    Ack,
    Channel,
    DecodeError,
    DriftWindow,
    Event,
    Heartbeat,
    Message,
    MessageTooLargeError,
    ProtocolError,
    RangeSet,
    ReceivedTracker,
    SeqRange,
    Status,
    Stream,
    TopicError,
    UnknownMessageTypeError,
    UnsupportedSchemaVersionError,
    decode_for_topic,
    is_deploy_event,
    parse_device_topic,
    validate_deploy_event,
)
from fleet_server.db import DatabaseUnavailableError, is_postgresql
from fleet_server.models import Device, DriftWindowRecord, EventRecord, StreamState, table_of
from fleet_server.prometheus import metric_lines
from fleet_server.registry.versions import ModelReport, attribute_late, record_model_reports

__all__ = [
    "ACK_MAX_RANGES",
    "BatchResult",
    "BatchWriter",
    "Decoded",
    "IngestMetrics",
    "Ingestor",
    "Received",
    "Reject",
    "StreamSnapshot",
    "WritePlan",
    "rejected_ack",
]

log = logging.getLogger(__name__)

ACK_MAX_RANGES = 1024
"""Most ranges in one Ack's ``seqs`` or ``missing`` (keeps every Ack far below the frame limit)."""

_STREAM_OF: Mapping[Channel, str] = {Channel.DRIFT: Stream.DRIFT.value, Channel.EVENTS: Stream.EVENTS.value}
_DEVICE_COLUMNS = ("first_seen_at", "last_seen_at", "last_status", "last_status_at", "agent_version",
                   "schema_version", "models", "uptime_s", "heartbeat_at")


class Reject(StrEnum):
    """Why a message was dropped (the ``reason`` label of the rejected counter)."""

    BAD_TOPIC = "bad_topic"
    """Not ``fleet/v1/<id>/<device channel>``, or the payload does not belong on that topic."""
    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    UNKNOWN_TYPE = "unknown_type"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_DEVICE = "unknown_device"
    """Device not registered and auto-registration is off."""
    REVOKED_DEVICE = "revoked_device"
    """Device revoked through the API (dropped like an unknown device)."""
    RANGE_CAP = "range_cap"
    """Would open a new received range beyond ``ingest_max_ranges`` for its stream."""
    DB_ERROR = "db_error"
    """The database refused this one message (isolated after its batch failed)."""


@dataclass(frozen=True, slots=True)
class Received:
    """One MQTT message as it arrived: topic, payload, and the server's wall clock at arrival (unix s)."""

    topic: str
    payload: bytes
    received_at: float


@dataclass(frozen=True, slots=True)
class Decoded:
    """A valid message for ``device_id``; ``message`` is ``None`` for a cleared (empty, retained) status."""

    device_id: str
    channel: Channel
    message: Message | None
    received_at: float


@dataclass(frozen=True, slots=True)
class StreamSnapshot:
    """The persisted state of one (device, stream), as read inside the batch's transaction."""

    ranges: tuple[SeqRange, ...] = ()
    duplicates: int = 0


@dataclass
class IngestMetrics:
    """Counters since start (process-local; the durable per-stream figures are in ``stream_states``)."""

    received: int = 0
    windows_stored: int = 0
    events_stored: int = 0
    duplicates: int = 0
    statuses: int = 0
    heartbeats: int = 0
    superseded_ranges: int = 0
    deploy_rule_violations: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    batches_failed: int = 0
    acks_sent: int = 0
    last_batch_size: int = 0
    last_lag_s: float = 0.0
    """Arrival to commit of the oldest message of the last batch, seconds."""
    max_lag_s: float = 0.0

    @property
    def malformed(self) -> int:
        return sum(self.rejected.values())

    def snapshot(self) -> dict[str, Any]:
        """Plain data for the API and logs."""
        return {
            "received": self.received, "windows_stored": self.windows_stored, "events_stored": self.events_stored,
            "duplicates": self.duplicates, "statuses": self.statuses, "heartbeats": self.heartbeats,
            "superseded_ranges": self.superseded_ranges, "deploy_rule_violations": self.deploy_rule_violations,
            "rejected": dict(sorted(self.rejected.items())), "batches": self.batches,
            "batches_failed": self.batches_failed, "acks_sent": self.acks_sent,
            "last_batch_size": self.last_batch_size, "last_lag_s": round(self.last_lag_s, 6),
            "max_lag_s": round(self.max_lag_s, 6),
        }

    def prometheus(self) -> str:
        """The counters in the Prometheus text exposition format."""
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float]]) -> None:
            lines.extend(metric_lines(f"fleet_ingest_{name}", kind, help_text, samples))

        metric("received_total", "counter", "MQTT messages received.", [("", self.received)])
        metric("stored_total", "counter", "Stream messages stored.",
               [('{stream="drift"}', self.windows_stored), ('{stream="events"}', self.events_stored)])
        metric("duplicates_total", "counter", "Redelivered stream messages (not stored again).",
               [("", self.duplicates)])
        metric("rejected_total", "counter", "Messages dropped, by reason.",
               [(f'{{reason="{r.value}"}}', self.rejected.get(r.value, 0)) for r in Reject])
        metric("batches_total", "counter", "Batches committed.", [("", self.batches)])
        metric("batches_failed_total", "counter", "Batches whose transaction failed.", [("", self.batches_failed)])
        metric("acks_sent_total", "counter", "Acks published.", [("", self.acks_sent)])
        metric("lag_seconds", "gauge", "Arrival to commit of the oldest message of the last batch.",
               [("", self.last_lag_s)])
        return "\n".join(lines) + "\n"


@dataclass
class WritePlan:
    """What one batch changes. Built by :meth:`Ingestor.plan`, executed by :class:`BatchWriter`."""

    windows: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    supersede: list[dict[str, Any]] = field(default_factory=list)
    """``{device_id, stream, first, last}``: stored windows replaced by a merged one; delete them."""
    devices: list[dict[str, Any]] = field(default_factory=list)
    """``{id, last_seen_at, ...}`` updates (all keys of ``_DEVICE_COLUMNS``)."""
    streams: list[dict[str, Any]] = field(default_factory=list)
    """Full ``stream_states`` rows for every (device, stream) touched."""
    model_reports: list[ModelReport] = field(default_factory=list)
    """The models of every online ``Status``, in arrival order (version tracking)."""
    acks: list[Ack] = field(default_factory=list)
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    statuses: int = 0
    heartbeats: int = 0
    deploy_rule_violations: int = 0


def _ts(unix: float) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


def _overlaps(ranges: Sequence[SeqRange], first: int, last: int) -> bool:
    return any(a <= last and b >= first for a, b in ranges)


def _tail(ranges: Sequence[SeqRange], limit: int) -> tuple[SeqRange, ...]:
    return tuple(ranges[-limit:]) if len(ranges) > limit else tuple(ranges)


def _subtract(ranges: Sequence[SeqRange], remove: Sequence[SeqRange]) -> Iterable[SeqRange]:
    """``ranges`` minus ``remove`` (both sorted, disjoint, inclusive)."""
    j = 0
    for first, last in ranges:
        start = first
        while j < len(remove) and remove[j][1] < start:
            j += 1
        k = j
        while k < len(remove) and remove[k][0] <= last:
            a, b = remove[k]
            if a > start:
                yield (start, a - 1)
            start = max(start, b + 1)
            k += 1
        if start <= last:
            yield (start, last)


def rejected_ack(device_id: str, stream: str, seq: int) -> Ack:
    """An Ack telling the device that ``seq`` was received but refused for good (``extra["rejected"]``, which
    the agent's outbox counts towards parking the message instead of resending it forever)."""
    return Ack(device_id=device_id, stream=stream, seqs=(), missing=(), extra={"rejected": [[seq, seq]]})


class Ingestor:
    """The pure core: decoding, idempotency, supersession, acks. Holds only limits and counters.

    ``max_frame_bytes`` caps accepted frames (larger: ``oversized``); ``max_ranges`` caps received ranges per
    stream (a message opening one more range is dropped as ``range_cap``: a device sending every other seq
    cannot grow the state without bound); ``auto_register`` admits devices on first message.
    """

    def __init__(self, *, max_frame_bytes: int, max_ranges: int = 10000, auto_register: bool = True,
                 metrics: IngestMetrics | None = None) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.max_ranges = max_ranges
        self.auto_register = auto_register
        self.metrics = metrics if metrics is not None else IngestMetrics()

    # -- decoding -------------------------------------------------------------------------------------

    def decode(self, raw: Received) -> Decoded | None:
        """Decode one message, or count why not and return ``None``. Never raises on peer input."""
        self.metrics.received += 1
        try:
            device_id, channel = parse_device_topic(raw.topic)
            if channel is Channel.STATUS and len(raw.payload) == 0:
                return Decoded(device_id, channel, None, raw.received_at)  # retained status cleared
            msg = decode_for_topic(raw.topic, raw.payload, max_size=self.max_frame_bytes)
        except ProtocolError as exc:
            reason = _reason(exc)
            self.metrics.rejected[reason.value] += 1
            log.warning("ingest: rejected message on %.120r (%s): %s", raw.topic, reason.value, str(exc)[:200])
            return None
        return Decoded(device_id, channel, msg, raw.received_at)

    def decode_all(self, batch: Iterable[Received]) -> list[Decoded]:
        return [d for d in (self.decode(r) for r in batch) if d is not None]

    def admits(self, device_id: str, *, known: bool) -> bool:
        """Whether messages from ``device_id`` are stored (known, or auto-registration on)."""
        return known or self.auto_register

    # -- planning -------------------------------------------------------------------------------------

    def plan(self, batch: Sequence[Decoded], *, devices: Mapping[str, Mapping[str, Any]],
             streams: Mapping[tuple[str, str], StreamSnapshot], now: float,
             revoked: Collection[str] = frozenset()) -> WritePlan:
        """Decide what ``batch`` (in arrival order) changes, given the current rows of its devices and the
        stream states of its (device, stream) pairs (missing pairs are empty). Messages of ``revoked``
        devices are dropped and counted like those of unknown devices. Pure: no I/O, no mutation of the
        inputs; counters are updated by :meth:`committed` once the plan is durable."""
        plan = WritePlan()
        trackers: dict[tuple[str, str], ReceivedTracker] = {}
        acked: dict[tuple[str, str], RangeSet] = {}
        refused: dict[tuple[str, str], RangeSet] = {}
        pending_windows: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
        pending_events: list[dict[str, Any]] = []
        device_rows: dict[str, dict[str, Any]] = {}

        for d in batch:
            if d.device_id in revoked:
                plan.rejected[Reject.REVOKED_DEVICE.value] += 1
                continue
            if d.device_id not in devices:
                plan.rejected[Reject.UNKNOWN_DEVICE.value] += 1
                continue
            row = device_rows.get(d.device_id)
            if row is None:
                row = device_rows[d.device_id] = {"id": d.device_id,
                                                  **{c: devices[d.device_id].get(c) for c in _DEVICE_COLUMNS}}
                if row["models"] is None:
                    row["models"] = []
            seen = _ts(d.received_at)
            if row["last_seen_at"] is None or seen > row["last_seen_at"]:
                row["last_seen_at"] = seen
            if row["first_seen_at"] is None:  # pre-registered through the API: this is its first message
                row["first_seen_at"] = seen
            msg = d.message
            if msg is None:  # cleared retained status
                row.update(last_status=None, last_status_at=seen)
                plan.statuses += 1
                continue
            row["schema_version"] = f"{msg.schema_version[0]}.{msg.schema_version[1]}"
            if isinstance(msg, Status):
                plan.statuses += 1
                row.update(last_status=msg.state, last_status_at=seen)
                if msg.state == "online":  # the last will (offline) carries no models: keep what we know
                    row["models"] = [m.to_wire() for m in msg.models]
                    plan.model_reports.append(ModelReport(
                        d.device_id, tuple((m.name, m.version, m.healthy) for m in msg.models), seen))
                if msg.agent_version:
                    row["agent_version"] = msg.agent_version
                continue
            if isinstance(msg, Heartbeat):
                plan.heartbeats += 1
                row["uptime_s"] = msg.uptime_s
                if row["heartbeat_at"] is None or seen > row["heartbeat_at"]:
                    row["heartbeat_at"] = seen
                continue
            if not isinstance(msg, DriftWindow | Event):  # decode_for_topic admits only device->server types
                continue
            key = (d.device_id, _STREAM_OF[d.channel])
            tracker = trackers.get(key)
            if tracker is None:
                snap = streams.get(key, StreamSnapshot())
                tracker = trackers[key] = ReceivedTracker.from_ranges(snap.ranges, duplicates=snap.duplicates)
                acked[key] = RangeSet()
            seq = msg.stream_seq
            if seq in tracker:
                tracker.record(seq)
                plan.duplicates += 1
                acked[key].add(seq)
                continue
            if tracker.range_count >= self.max_ranges and (seq - 1) not in tracker and (seq + 1) not in tracker:
                plan.rejected[Reject.RANGE_CAP.value] += 1
                refused.setdefault(key, RangeSet()).add(seq)
                continue
            tracker.record(seq)
            acked[key].add(seq)
            if isinstance(msg, Event):
                if is_deploy_event(msg):
                    try:
                        validate_deploy_event(msg)
                    except ProtocolError:
                        plan.deploy_rule_violations += 1  # stored and acked anyway (wire contract)
                pending_events.append(_event_row(msg, key[1], seen))
                continue
            if msg.replaces is not None:
                first, last = msg.replaces
                tracker.record_range(first, last)
                acked[key].add_range(first, last)
                pending = pending_windows.get(key, {})
                for s in [s for s in pending if first <= s <= last]:
                    del pending[s]
                if _overlaps(streams.get(key, StreamSnapshot()).ranges, first, last):
                    plan.supersede.append({"device_id": key[0], "stream": key[1], "first": first, "last": last})
            pending_windows.setdefault(key, {})[seq] = _window_row(msg, key[1], seen)

        for rows in pending_windows.values():
            plan.windows.extend(rows.values())
        plan.events = pending_events
        plan.devices = list(device_rows.values())
        stamp = _ts(now)
        for key, tracker in trackers.items():
            ranges = tracker.to_ranges()
            plan.streams.append({
                "device_id": key[0], "stream": key[1], "ranges": [list(r) for r in ranges],
                "received_count": tracker.received_count, "duplicates": tracker.duplicates,
                "high_water": tracker.high_water, "updated_at": stamp,
            })
            seqs = ranges if len(ranges) <= ACK_MAX_RANGES else _tail(acked[key].ranges(), ACK_MAX_RANGES)
            gaps = tracker.gaps()
            extra: dict[str, Any] = {}
            if key in refused:
                no = refused[key]
                gaps = tuple(g for g in _subtract(gaps, no.ranges()))
                extra["rejected"] = [list(r) for r in _tail(no.ranges(), ACK_MAX_RANGES)]
            plan.acks.append(Ack(device_id=key[0], stream=key[1], seqs=seqs, missing=_tail(gaps, ACK_MAX_RANGES),
                                 extra=extra))
        return plan

    def committed(self, plan: WritePlan, *, batch_size: int, oldest_received_at: float | None, now: float) -> None:
        """Count a plan whose transaction committed."""
        m = self.metrics
        m.windows_stored += len(plan.windows)
        m.events_stored += len(plan.events)
        m.duplicates += plan.duplicates
        m.statuses += plan.statuses
        m.heartbeats += plan.heartbeats
        m.superseded_ranges += len(plan.supersede)
        m.deploy_rule_violations += plan.deploy_rule_violations
        m.rejected.update(plan.rejected)
        m.batches += 1
        m.last_batch_size = batch_size
        if oldest_received_at is not None:
            m.last_lag_s = max(0.0, now - oldest_received_at)
            m.max_lag_s = max(m.max_lag_s, m.last_lag_s)


def _reason(exc: ProtocolError) -> Reject:
    if isinstance(exc, MessageTooLargeError):
        return Reject.OVERSIZED
    if isinstance(exc, UnknownMessageTypeError):
        return Reject.UNKNOWN_TYPE
    if isinstance(exc, UnsupportedSchemaVersionError):
        return Reject.UNSUPPORTED_VERSION
    if isinstance(exc, TopicError):
        return Reject.BAD_TOPIC
    if isinstance(exc, DecodeError):
        return Reject.MALFORMED
    return Reject.MALFORMED


def _window_row(msg: DriftWindow, stream: str, received: datetime) -> dict[str, Any]:
    first, last = msg.replaces if msg.replaces is not None else (None, None)
    return {
        "device_id": msg.device_id, "stream": stream, "seq": msg.stream_seq, "model": msg.model,
        "version": msg.version, "window_start": msg.window_start, "window_end": msg.window_end,
        "samples": msg.samples, "replaces_first": first, "replaces_last": last,
        "features": msg.features, "slis": msg.slis, "received_at": received,
    }


def _event_row(msg: Event, stream: str, received: datetime) -> dict[str, Any]:
    return {
        "device_id": msg.device_id, "stream": stream, "seq": msg.stream_seq, "kind": msg.kind, "at": msg.at,
        "command_id": msg.command_id, "model": msg.model, "version": msg.version,
        # PostgreSQL text cannot hold NUL; the contract allows any character in a reason.
        "reason": msg.reason.replace("\x00", "\ufffd") if msg.reason is not None else None,
        "detail": msg.detail, "received_at": received,
    }


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What a committed batch produced: the acks to publish and the plan's figures."""

    acks: tuple[Ack, ...]
    stored: int
    duplicates: int
    rejected: int


_DEVICES = table_of(Device)
_WINDOWS = table_of(DriftWindowRecord)
_EVENTS = table_of(EventRecord)
_STREAMS = table_of(StreamState)


class BatchWriter:
    """Writes batches through an :class:`Ingestor`: one transaction per batch, executemany inserts.

    ``write(batch)`` returns the acks to publish (after the commit). A database that cannot be reached
    raises :class:`~fleet_server.db.DatabaseUnavailableError` (retry the batch later; nothing was acked). A
    batch the database refuses for another reason is retried message by message, so one poisonous message
    is dropped (``db_error``) instead of blocking its neighbours forever.
    """

    def __init__(self, engine: Engine, ingestor: Ingestor, *, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.ingestor = ingestor
        self.clock = clock
        self._pg = is_postgresql(engine)

    def write(self, batch: Sequence[Received]) -> BatchResult:
        """Decode ``batch`` and write it (:meth:`write_decoded`)."""
        return self.write_decoded(self.ingestor.decode_all(batch), batch_size=len(batch))

    def write_decoded(self, decoded: Sequence[Decoded], *, batch_size: int | None = None) -> BatchResult:
        """Write already decoded messages in one transaction; safe to call again with the same messages after
        :class:`~fleet_server.db.DatabaseUnavailableError` (nothing was committed)."""
        if not decoded:
            return BatchResult((), 0, 0, 0)
        try:
            plan = self._transaction(decoded)
        except sa.exc.DBAPIError as exc:
            self.ingestor.metrics.batches_failed += 1
            if _unavailable(exc):
                raise DatabaseUnavailableError(str(exc).splitlines()[0][:300]) from exc
            if len(decoded) == 1:
                return BatchResult(self._refused(decoded[0], exc), 0, 0, 1)
            log.warning("ingest: batch of %d refused (%s); isolating the culprit", len(decoded),
                        str(exc).splitlines()[0][:200])
            return self._one_by_one(decoded)
        now = self.clock()
        self.ingestor.committed(plan, batch_size=batch_size if batch_size is not None else len(decoded), now=now,
                                oldest_received_at=min(d.received_at for d in decoded))
        return BatchResult(tuple(plan.acks), len(plan.windows) + len(plan.events), plan.duplicates,
                           sum(plan.rejected.values()))

    def _refused(self, d: Decoded, exc: Exception) -> tuple[Ack, ...]:
        """Count and log a message the database refused; tell the device (``rejected``) if it is sequenced."""
        self.ingestor.metrics.rejected[Reject.DB_ERROR.value] += 1
        log.error("ingest: database refused a message from %s: %s", d.device_id, str(exc).splitlines()[0][:300])
        if isinstance(d.message, DriftWindow | Event):
            return (rejected_ack(d.device_id, _STREAM_OF[d.channel], d.message.stream_seq),)
        return ()

    def _one_by_one(self, decoded: Sequence[Decoded]) -> BatchResult:
        acks: list[Ack] = []
        stored = dups = rejected = 0
        for d in decoded:
            try:
                plan = self._transaction([d])
            except sa.exc.DBAPIError as exc:
                if _unavailable(exc):
                    raise DatabaseUnavailableError(str(exc).splitlines()[0][:300]) from exc
                acks.extend(self._refused(d, exc))
                rejected += 1
                continue
            self.ingestor.committed(plan, batch_size=1, oldest_received_at=d.received_at, now=self.clock())
            acks.extend(plan.acks)
            stored += len(plan.windows) + len(plan.events)
            dups += plan.duplicates
            rejected += sum(plan.rejected.values())
        return BatchResult(tuple(acks), stored, dups, rejected)

    def _transaction(self, decoded: Sequence[Decoded]) -> WritePlan:
        ingestor = self.ingestor
        with self.engine.connect().execution_options(sqlite_immediate=True) as conn, conn.begin():
            now = self.clock()
            ids = sorted({d.device_id for d in decoded})
            devices = {r["id"]: dict(r) for r in conn.execute(
                sa.select(_DEVICES).where(_DEVICES.c.id.in_(ids))).mappings()}
            new = [i for i in ids if ingestor.admits(i, known=False) and i not in devices]
            if new:
                first_seen = {d.device_id: _ts(d.received_at) for d in reversed(decoded)}
                rows = [{"id": i, "first_seen_at": first_seen[i], "last_seen_at": first_seen[i], "models": []}
                        for i in new]
                conn.execute(self._insert(_DEVICES).on_conflict_do_nothing(index_elements=["id"]), rows)
                for r in rows:
                    devices[str(r["id"])] = {**r, **{c: r.get(c) for c in _DEVICE_COLUMNS if c not in r}}
            revoked = {i for i, r in devices.items() if r.get("revoked_at") is not None}
            keys = sorted({(d.device_id, _STREAM_OF[d.channel]) for d in decoded
                           if d.channel in _STREAM_OF and d.device_id in devices and d.device_id not in revoked})
            streams = self._lock_streams(conn, keys, now)
            plan = ingestor.plan(decoded, devices=devices, streams=streams, now=now, revoked=revoked)
            if plan.supersede:
                conn.execute(
                    sa.delete(_WINDOWS).where(
                        _WINDOWS.c.device_id == sa.bindparam("b_device"), _WINDOWS.c.stream == sa.bindparam("b_stream"),
                        _WINDOWS.c.seq.between(sa.bindparam("b_first"), sa.bindparam("b_last"))),
                    [{"b_device": s["device_id"], "b_stream": s["stream"], "b_first": s["first"], "b_last": s["last"]}
                     for s in plan.supersede])
            if plan.windows:
                conn.execute(self._insert(_WINDOWS).on_conflict_do_nothing(
                    index_elements=["device_id", "stream", "seq"]), plan.windows)
            if plan.events:
                conn.execute(self._insert(_EVENTS).on_conflict_do_nothing(
                    index_elements=["device_id", "stream", "seq"]), plan.events)
            if plan.devices:
                conn.execute(
                    sa.update(_DEVICES).where(_DEVICES.c.id == sa.bindparam("b_id")).values(
                        {c: sa.bindparam(f"b_{c}") for c in _DEVICE_COLUMNS}),
                    [{f"b_{k}": v for k, v in row.items()} for row in sorted(plan.devices, key=lambda r: r["id"])])
            if plan.streams:
                cols = ("ranges", "received_count", "duplicates", "high_water", "updated_at")
                conn.execute(
                    sa.update(_STREAMS).where(_STREAMS.c.device_id == sa.bindparam("b_device_id"),
                                              _STREAMS.c.stream == sa.bindparam("b_stream"))
                    .values({c: sa.bindparam(f"b_{c}") for c in cols}),
                    [{f"b_{k}": v for k, v in row.items()}
                     for row in sorted(plan.streams, key=lambda r: (r["device_id"], r["stream"]))])
            # Version tracking after the device rows are updated (so locked): one replica per device at a time.
            if plan.model_reports:
                record_model_reports(conn, plan.model_reports)
            if plan.events:
                attribute_late(conn, plan.events)
        return plan

    def _lock_streams(self, conn: sa.Connection, keys: list[tuple[str, str]],
                      now: float) -> dict[tuple[str, str], StreamSnapshot]:
        """Read (creating when absent) and lock the stream states of ``keys``."""
        if not keys:
            return {}
        found = self._select_streams(conn, keys)
        missing = [k for k in keys if k not in found]
        if missing:
            conn.execute(self._insert(_STREAMS).on_conflict_do_nothing(index_elements=["device_id", "stream"]),
                         [{"device_id": d, "stream": s, "ranges": [], "received_count": 0, "duplicates": 0,
                           "high_water": None, "updated_at": _ts(now)} for d, s in missing])
            found.update(self._select_streams(conn, missing))
        return found

    def _select_streams(self, conn: sa.Connection,
                        keys: list[tuple[str, str]]) -> dict[tuple[str, str], StreamSnapshot]:
        # Locks are always taken in (device_id, stream) order, so concurrent writers cannot deadlock.
        q = sa.select(_STREAMS.c.device_id, _STREAMS.c.stream, _STREAMS.c.ranges, _STREAMS.c.duplicates).where(
            sa.tuple_(_STREAMS.c.device_id, _STREAMS.c.stream).in_(keys)).order_by(_STREAMS.c.device_id,
                                                                                 _STREAMS.c.stream)
        if self._pg:
            q = q.with_for_update()
        return {(r.device_id, r.stream): StreamSnapshot(tuple((a, b) for a, b in r.ranges), r.duplicates)
                for r in conn.execute(q)}

    def _insert(self, table: sa.Table) -> Any:
        return pg_dialect.insert(table) if self._pg else sqlite_dialect.insert(table)


def _unavailable(exc: sa.exc.DBAPIError) -> bool:
    """Connection-level trouble (retry later), as opposed to the database refusing this data."""
    return bool(exc.connection_invalidated) or isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError)
