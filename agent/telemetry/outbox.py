"""The device's store-and-forward outbox: SQLite (WAL), written before publish, deleted on the *server's* Ack.

Every sequenced message the device sends (``events``, ``drift``; see ``docs/wire-contract.md``, "Sequences,
acknowledgements and gaps") goes through here::

    seq = outbox.append("events", lambda seq: encode(Event(device_id=dev, stream_seq=seq, kind="received", ...)))

:meth:`Outbox.append` allocates the stream's next sequence number, calls ``make_message(seq)`` to build the frame
*with* that number, checks the frame (it must decode to the stream's message type carrying ``stream_seq == seq``)
and stores it and the advanced counter in **one transaction**. Only then may it be published, so a number is
never used twice, even across ``kill -9`` or power loss. A message leaves the outbox only when the fleet server
acknowledges it (:meth:`Outbox.ack` with an ``Ack``'s ranges): the broker's PUBACK means nothing here, because a
broker's queue for an offline subscriber is bounded (mosquitto) or absent (the embedded broker).

Durability: WAL journal with ``synchronous=FULL``. Under ``NORMAL`` a commit is not durable until the next
checkpoint, so after a power cut the last appends can roll back *after they were published*; the rolled-back
counter would then hand out a number the server already stored, and the server would discard the new message as
a duplicate. ``FULL`` costs one fsync of the WAL per transaction (about 0.2 ms on the CI VM's disk; a device adds
a window a minute and acks are batched), which is the price of never reusing a number.

Bounds (:class:`OutboxLimits`), enforced in the transaction of every :meth:`Outbox.append` and by
:meth:`Outbox.expire`:

1. age: messages older than ``max_age_s`` are dropped (counted as ``dropped_age``);
2. bytes: while the stored payloads exceed ``max_bytes``, the oldest run of drift windows that are consecutive in
   sequence and share (model, version) is **merged** (exact histogram merge with ``agent.drift.Summary.merge``)
   into one coarser window with a new sequence number whose ``replaces`` states the range it stands for. Events
   are never merged;
3. only when nothing more can be merged is the oldest message dropped (the one standing for the oldest sequence
   numbers): drift windows first, then events (counted as ``dropped_bytes``). :meth:`Outbox.stats` reports every
   counter per stream.

Poison: a message the server refuses for good must not block the rest. It is **parked** (moved to the ``parked``
table, out of the send path) when the server has asked for it again ``poison_after`` times although the device
resent it each time (``missing`` without progress), or when the server marked it rejected ``poison_after`` times.

Thread safety: one connection guarded by a lock; any thread may call any method. ``make_message`` runs inside the
append transaction and must not call back into the outbox.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Self

from agent.drift import LAYOUT_VERSION, DriftLayoutError, Summary
from agent.fsutil import fsync_dir
from agent.protocol import (
    DriftWindow,
    Event,
    ProtocolError,
    SeqRange,
    Stream,
    decode,
    encode,
    validate_ranges,
)

__all__ = [
    "DRAIN_BURST_S",
    "SCHEMA_VERSION",
    "STREAM_PRIORITY",
    "AckResult",
    "Outbox",
    "OutboxClosedError",
    "OutboxError",
    "OutboxLimits",
    "OutboxMessage",
    "OutboxMessageError",
    "OutboxStats",
    "ParkedMessage",
    "StreamStats",
]

SCHEMA_VERSION: Final = 1
"""``PRAGMA user_version`` of the outbox database this code writes."""

STREAM_PRIORITY: Final[tuple[str, ...]] = (Stream.EVENTS.value, Stream.DRIFT.value)
"""Drain order across streams: events first (they answer commands the server keeps resending), then drift."""

_DROP_ORDER: Final[tuple[str, ...]] = (Stream.DRIFT.value, Stream.EVENTS.value)
"""Which stream loses its oldest message first when the byte bound cannot be met by merging."""

_MESSAGE_TYPES: Final[Mapping[str, type[Event] | type[DriftWindow]]] = MappingProxyType(
    {Stream.EVENTS.value: Event, Stream.DRIFT.value: DriftWindow}
)

DRAIN_BURST_S: Final = 0.5
"""Default burst of :meth:`Outbox.drain_batch`: this many seconds' worth of messages may leave at once."""

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS streams (
    stream          TEXT PRIMARY KEY,
    next_seq        INTEGER NOT NULL,
    acked           INTEGER NOT NULL DEFAULT 0,
    dropped_age     INTEGER NOT NULL DEFAULT 0,
    dropped_bytes   INTEGER NOT NULL DEFAULT 0,
    merged_windows  INTEGER NOT NULL DEFAULT 0,
    merges          INTEGER NOT NULL DEFAULT 0,
    parked_total    INTEGER NOT NULL DEFAULT 0,
    parked_dropped  INTEGER NOT NULL DEFAULT 0,
    resend_requests INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages (
    stream       TEXT    NOT NULL,
    seq          INTEGER NOT NULL,
    created_at   REAL    NOT NULL,
    size         INTEGER NOT NULL,
    model        TEXT,
    version      INTEGER,
    cover_first  INTEGER NOT NULL,
    mergeable    INTEGER NOT NULL,
    windows      INTEGER NOT NULL DEFAULT 1,
    resend       INTEGER NOT NULL DEFAULT 0,
    last_sent_at REAL,
    missing_hits INTEGER NOT NULL DEFAULT 0,
    rejections   INTEGER NOT NULL DEFAULT 0,
    payload      BLOB    NOT NULL,
    PRIMARY KEY (stream, seq)
);
CREATE INDEX IF NOT EXISTS messages_by_age ON messages (created_at, size);
CREATE INDEX IF NOT EXISTS messages_resend ON messages (stream, seq) WHERE resend = 1;
CREATE TABLE IF NOT EXISTS parked (
    stream     TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    created_at REAL    NOT NULL,
    parked_at  REAL    NOT NULL,
    reason     TEXT    NOT NULL,
    payload    BLOB    NOT NULL,
    PRIMARY KEY (stream, seq)
);
"""


class OutboxError(Exception):
    """The outbox cannot do what was asked (database error, closed, inconsistent message). Telemetry only: the
    agent logs it and keeps serving models."""


class OutboxClosedError(OutboxError):
    """The outbox is not open."""


class OutboxMessageError(OutboxError, ValueError):
    """``make_message`` returned a frame that is not the stream's message type with ``stream_seq == seq``."""


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    """Bounds and the poison policy. The defaults suit a device with a few hundred MiB of free flash."""

    max_bytes: int = 32 * 1024 * 1024
    """Upper bound of the stored payload bytes (merge drift windows first, then drop the oldest)."""
    max_age_s: float = 7 * 86400.0
    """Messages older than this are dropped: the server's gap policy has given up on them long before."""
    merge_max: int = 16
    """A merged window stands for at most this many original windows (coarsening stops there: 16 five-minute
    windows make one of 80 minutes; past that the oldest are dropped)."""
    poison_after: int = 5
    """K: park a message after K fruitless resend requests (``missing``) or K rejections."""
    missing_grace_s: float = 60.0
    """A resend gets this long to reach the server before a further ``missing`` for it counts against it."""
    max_parked: int = 1000
    """Parked messages kept for inspection; the oldest beyond this are deleted (counted)."""

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        if not (self.max_age_s > 0 and math.isfinite(self.max_age_s)):
            raise ValueError("max_age_s must be a positive number of seconds")
        if self.merge_max < 2:
            raise ValueError("merge_max must be at least 2")
        if self.poison_after < 1:
            raise ValueError("poison_after must be at least 1")
        if not self.missing_grace_s >= 0:
            raise ValueError("missing_grace_s must be >= 0")
        if self.max_parked < 0:
            raise ValueError("max_parked must be >= 0")


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """A stored frame, ready to publish on the stream's channel."""

    stream: str
    seq: int
    payload: bytes
    created_at: float
    resend: bool
    """The server asked for it again (``missing``) or rejected it; :meth:`Outbox.mark_sent` clears the flag."""


@dataclass(frozen=True, slots=True)
class ParkedMessage:
    """A message taken out of the send path because the server refused it for good."""

    stream: str
    seq: int
    payload: bytes
    created_at: float
    parked_at: float
    reason: str
    """``"missing"`` (asked for K times despite resends) or ``"rejected"`` (rejected K times)."""


@dataclass(frozen=True, slots=True)
class AckResult:
    """What one :meth:`Outbox.ack` did."""

    acked: int = 0
    """Messages deleted because the server stored them."""
    resend: int = 0
    """Messages newly flagged for resend (``missing`` or rejected)."""
    parked: int = 0
    """Messages parked as poison."""


@dataclass(frozen=True, slots=True)
class StreamStats:
    """Counters of one stream; the ``*_total``-like counters survive restarts (they live in the database)."""

    stream: str
    next_seq: int
    pending: int
    pending_bytes: int
    oldest_created_at: float | None
    acked: int
    dropped_age: int
    dropped_bytes: int
    merged_windows: int
    """Windows folded into merged windows (each merged window counts once more if it is merged again)."""
    merges: int
    """Merged windows created."""
    parked: int
    """Currently parked."""
    parked_total: int
    parked_dropped: int
    resend_requests: int

    @property
    def dropped(self) -> int:
        """Messages lost on the device (age + bytes): the server will see them as gaps."""
        return self.dropped_age + self.dropped_bytes


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """Everything :meth:`Outbox.stats` reports."""

    streams: Mapping[str, StreamStats] = field(default_factory=dict)
    total_bytes: int = 0

    @property
    def pending(self) -> int:
        return sum(s.pending for s in self.streams.values())

    @property
    def dropped(self) -> int:
        return sum(s.dropped for s in self.streams.values())


@dataclass(slots=True)
class _Row:
    seq: int
    cover_first: int
    model: str | None
    version: int | None
    size: int
    created_at: float
    windows: int


def _check_stream(stream: str) -> str:
    if stream not in _MESSAGE_TYPES:
        raise ValueError(f"unknown stream {stream!r}; the outbox carries {sorted(_MESSAGE_TYPES)}")
    return stream


def _ranges(value: Iterable[Sequence[int]], what: str) -> tuple[SeqRange, ...]:
    try:
        return validate_ranges([tuple(r) for r in value], what)
    except ProtocolError as exc:
        raise ValueError(str(exc)) from exc


class _UnmergeableError(Exception):
    """Two windows' ``slis`` cannot be merged honestly (unknown or different format)."""


_SLIS_FORMAT: Final = 1
"""The ``slis`` format the outbox knows how to merge exactly (``agent.telemetry.slis``, ``format`` key)."""


def _merge_slis(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """SLIs of two merged windows (associative, so runs merge pairwise).

    Format 1 of ``agent.telemetry.slis`` merges exactly: counters (ints, zero ones omitted) add up, the ``errors``
    map adds per code, the ``latency_us`` histogram adds per bin (``sum`` adds, ``max`` is the max), strings such
    as ``meta`` entries are kept when both sides agree. Without a ``format`` key the same rules apply, and other
    numbers take the maximum (a percentile of the merged window is at most the larger per-window percentile, so it
    stays an upper bound). An unknown or different ``format`` refuses the merge (the windows are dropped instead,
    never merged wrongly)."""
    fmt_a, fmt_b = a.get("format"), b.get("format")
    if fmt_a != fmt_b or fmt_a not in (None, _SLIS_FORMAT):
        raise _UnmergeableError(f"slis formats {fmt_a!r} and {fmt_b!r}")
    return _merge_maps(a, b, top=True)


def _merge_maps(a: Mapping[str, Any], b: Mapping[str, Any], *, top: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in sorted(set(a) | set(b)):
        if top and key == "format":
            out[key] = a[key]
            continue
        if top and key == "latency_us":
            out[key] = _merge_latency([h for h in (a.get(key), b.get(key)) if h is not None])
            continue
        present = [m[key] for m in (a, b) if key in m]
        if all(type(v) is int for v in present):
            out[key] = sum(present)
        elif all(isinstance(v, Mapping) for v in present):
            out[key] = present[0] if len(present) == 1 else _merge_maps(present[0], present[1])
        elif all(type(v) in (int, float) for v in present):
            out[key] = max(float(v) for v in present)
        elif len(present) == 2 and present[0] == present[1]:
            out[key] = present[0]
    return out


def _merge_latency(hists: Sequence[object]) -> dict[str, Any]:
    dense: dict[int, int] = {}
    total, top = 0.0, 0.0
    for hist in hists:
        if not isinstance(hist, Mapping):
            raise _UnmergeableError("slis.latency_us is not a map")
        first, counts = hist.get("first"), hist.get("counts")
        if type(first) is not int or first < 0 or not isinstance(counts, list):
            raise _UnmergeableError("slis.latency_us needs an int 'first' and a list 'counts'")
        for i, count in enumerate(counts):
            if type(count) is not int or count < 0:
                raise _UnmergeableError(f"slis.latency_us.counts[{i}] is not a count")
            dense[first + i] = dense.get(first + i, 0) + count
        hist_sum, hist_max = hist.get("sum", 0.0), hist.get("max", 0.0)
        if type(hist_sum) not in (int, float) or type(hist_max) not in (int, float):
            raise _UnmergeableError("slis.latency_us sum/max are not numbers")
        total += float(hist_sum)
        top = max(top, float(hist_max))
    nonzero = sorted(i for i, c in dense.items() if c)
    if not nonzero:
        return {"first": 0, "counts": [], "sum": round(total, 1), "max": top}
    lo, hi = nonzero[0], nonzero[-1]
    return {"first": lo, "counts": [dense.get(i, 0) for i in range(lo, hi + 1)], "sum": round(total, 1), "max": top}


class Outbox:
    """The durable, bounded, per-stream sequenced queue. ``Outbox(path).open()`` (or ``with Outbox(path) as ob``).

    ``clock`` is wall-clock unix seconds (ages, drain pacing); tests pass a fake.
    """

    def __init__(self, path: Path, *, limits: OutboxLimits | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.limits = limits or OutboxLimits()
        self._clock = clock
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._in_tx = False
        self._drain_tokens = 0.0
        self._drain_last: float | None = None

    # -- lifecycle -----------------------------------------------------------------------------------

    def open(self) -> Self:
        """Create or open the database (directory mode 0700), switch to WAL + ``synchronous=FULL``, create the
        schema and apply the age bound. Idempotent."""
        with self._lock:
            if self._db is not None:
                return self
            created = not self.path.exists()
            try:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
            except (OSError, sqlite3.Error) as exc:
                raise OutboxError(f"cannot open the outbox {self.path}: {exc}") from exc
            try:
                mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise OutboxError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
                db.execute("PRAGMA synchronous=FULL")
                version = int(db.execute("PRAGMA user_version").fetchone()[0])
                if version > SCHEMA_VERSION:
                    raise OutboxError(
                        f"{self.path} has outbox schema {version}, newer than this agent's {SCHEMA_VERSION}; "
                        "upgrade the agent (do not delete the file: sequence numbers must not restart)"
                    )
                db.executescript(_SCHEMA)  # CREATE ... IF NOT EXISTS: idempotent, each statement atomic
                db.execute("BEGIN IMMEDIATE")
                for stream in _MESSAGE_TYPES:
                    db.execute("INSERT OR IGNORE INTO streams (stream, next_seq) VALUES (?, 0)", (stream,))
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                db.close()
                raise OutboxError(f"{self.path} is not a usable outbox database: {exc}") from exc
            except BaseException:
                db.close()
                raise
            if created:
                with contextlib.suppress(OSError):
                    os.chmod(self.path, 0o600)
                    fsync_dir(self.path.parent)
            self._db = db
        self.expire()
        return self

    def close(self) -> None:
        """Close the connection (idempotent). Everything committed is already durable."""
        with self._lock:
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
                self._db = None

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------------------------

    def append(self, stream: str, make_message: Callable[[int], bytes]) -> int:
        """Allocate the stream's next sequence number, build the frame with it and store both in one transaction.

        Returns the sequence number. If ``make_message`` raises or returns a frame that does not decode to the
        stream's message type with ``stream_seq == seq`` (:class:`OutboxMessageError`), nothing is stored and the
        number is not used. The bounds are enforced in the same transaction.
        """
        _check_stream(stream)
        now = self._clock()
        with self._tx() as db:
            seq = int(db.execute("SELECT next_seq FROM streams WHERE stream = ?", (stream,)).fetchone()[0])
            payload = make_message(seq)
            model, version, cover_first, mergeable = self._inspect(stream, seq, payload)
            db.execute(
                "INSERT INTO messages (stream, seq, created_at, size, model, version, cover_first, mergeable, "
                "windows, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (stream, seq, now, len(payload), model, version, cover_first, int(mergeable), seq - cover_first + 1,
                 payload),
            )
            db.execute("UPDATE streams SET next_seq = ? WHERE stream = ?", (seq + 1, stream))
            self._enforce(db, now)
        return seq

    @staticmethod
    def _inspect(stream: str, seq: int, payload: object) -> tuple[str | None, int | None, int, bool]:
        if not isinstance(payload, bytes):
            raise OutboxMessageError(f"make_message must return bytes (an encoded frame), not {type(payload).__name__}")
        try:
            msg = decode(payload)
        except ProtocolError as exc:
            raise OutboxMessageError(f"{stream} message {seq} does not decode: {exc}") from exc
        expected = _MESSAGE_TYPES[stream]
        if not isinstance(msg, expected):
            raise OutboxMessageError(f"stream {stream!r} carries {expected.__name__}, not {type(msg).__name__}")
        if msg.stream_seq != seq:
            raise OutboxMessageError(f"{stream} message built with stream_seq {msg.stream_seq}, allocated {seq}")
        if isinstance(msg, DriftWindow):
            replaces = msg.replaces
            if replaces is None:
                return msg.model, msg.version, seq, True
            return msg.model, msg.version, replaces[0], replaces[1] == seq - 1
        return None, None, seq, False

    def ack(self, stream: str, seqs: Iterable[Sequence[int]], missing: Iterable[Sequence[int]] = (),
            rejected: Iterable[Sequence[int]] = ()) -> AckResult:
        """Apply the server's Ack for ``stream`` in one transaction.

        ``seqs``: ranges the server stored; those messages are deleted (anything else stays, whatever the broker
        said). ``missing``: ranges the server asks for again; messages still held are flagged for resend (one
        the device no longer holds, acked or evicted, is ignored). A message asked for again more than
        ``missing_grace_s`` after the device resent it counts one fruitless try. ``rejected``: ranges the server
        received but refused; each counts one try and is flagged for resend. After ``poison_after`` tries of
        either kind the message is parked. Ranges are inclusive ``(first, last)`` pairs, sorted and disjoint.
        """
        _check_stream(stream)
        stored = _ranges(seqs, "seqs")
        again = _ranges(missing, "missing")
        refused = _ranges(rejected, "rejected")
        now = self._clock()
        limits = self.limits
        with self._tx() as db:
            acked = 0
            for first, last in stored:
                acked += db.execute("DELETE FROM messages WHERE stream = ? AND seq BETWEEN ? AND ?",
                                    (stream, first, last)).rowcount
            resend = 0
            for first, last in again:
                resend += db.execute(
                    "UPDATE messages SET resend = 1, missing_hits = missing_hits + "
                    "(CASE WHEN last_sent_at IS NOT NULL AND ? - last_sent_at >= ? THEN 1 ELSE 0 END) "
                    "WHERE stream = ? AND seq BETWEEN ? AND ? AND resend = 0 "
                    "AND (last_sent_at IS NULL OR ? - last_sent_at >= ?)",
                    (now, limits.missing_grace_s, stream, first, last, now, limits.missing_grace_s),
                ).rowcount
            for first, last in refused:
                resend += db.execute(
                    "UPDATE messages SET resend = 1, rejections = rejections + 1 "
                    "WHERE stream = ? AND seq BETWEEN ? AND ?", (stream, first, last)).rowcount
            parked = self._park(db, stream, now)
            db.execute("UPDATE streams SET acked = acked + ?, resend_requests = resend_requests + ? "
                       "WHERE stream = ?", (acked, resend, stream))
        return AckResult(acked=acked, resend=resend, parked=parked)

    def _park(self, db: sqlite3.Connection, stream: str, now: float) -> int:
        k = self.limits.poison_after
        moved = db.execute(
            "INSERT OR REPLACE INTO parked (stream, seq, created_at, parked_at, reason, payload) "
            "SELECT stream, seq, created_at, ?, CASE WHEN rejections >= ? THEN 'rejected' ELSE 'missing' END, payload "
            "FROM messages WHERE stream = ? AND (missing_hits >= ? OR rejections >= ?)",
            (now, k, stream, k, k)).rowcount
        if not moved:
            return 0
        db.execute("DELETE FROM messages WHERE stream = ? AND (missing_hits >= ? OR rejections >= ?)", (stream, k, k))
        over = int(db.execute("SELECT COUNT(*) FROM parked").fetchone()[0]) - self.limits.max_parked
        if over > 0:
            victims = db.execute("SELECT stream, seq FROM parked ORDER BY parked_at, seq LIMIT ?", (over,)).fetchall()
            for victim_stream, victim_seq in victims:
                db.execute("DELETE FROM parked WHERE stream = ? AND seq = ?", (victim_stream, victim_seq))
                db.execute("UPDATE streams SET parked_dropped = parked_dropped + 1 WHERE stream = ?",
                           (victim_stream,))
        db.execute("UPDATE streams SET parked_total = parked_total + ? WHERE stream = ?", (moved, stream))
        return moved

    def mark_sent(self, messages: Iterable[OutboxMessage]) -> None:
        """Record that these messages were (re)published: clears their resend flag and starts the grace period
        of the poison rule. Messages without the flag cost nothing (no write)."""
        now = self._clock()
        resent = [(now, m.stream, m.seq) for m in messages if m.resend]
        if not resent:
            return
        with self._tx() as db:
            db.executemany("UPDATE messages SET resend = 0, last_sent_at = ? WHERE stream = ? AND seq = ?", resent)

    def expire(self) -> int:
        """Apply the age (and byte) bound now; returns how many messages were dropped for age."""
        now = self._clock()
        with self._tx() as db:
            return self._enforce(db, now)

    # -- bounds --------------------------------------------------------------------------------------

    def _enforce(self, db: sqlite3.Connection, now: float) -> int:
        cutoff = now - self.limits.max_age_s
        expired = 0
        for stream in _MESSAGE_TYPES:
            n = db.execute("DELETE FROM messages WHERE stream = ? AND created_at < ?", (stream, cutoff)).rowcount
            if n:
                db.execute("UPDATE streams SET dropped_age = dropped_age + ? WHERE stream = ?", (n, stream))
                expired += n
        total = int(db.execute("SELECT COALESCE(SUM(size), 0) FROM messages").fetchone()[0])
        while total > self.limits.max_bytes:
            freed = self._merge_oldest_run(db)
            if freed is None:
                break
            total -= freed
        while total > self.limits.max_bytes:
            victim = None
            for stream in _DROP_ORDER:
                victim = db.execute("SELECT stream, seq, size FROM messages WHERE stream = ? "
                                    "ORDER BY cover_first, seq LIMIT 1", (stream,)).fetchone()
                if victim is not None:
                    break
            if victim is None:
                break
            db.execute("DELETE FROM messages WHERE stream = ? AND seq = ?", (victim[0], victim[1]))
            db.execute("UPDATE streams SET dropped_bytes = dropped_bytes + 1 WHERE stream = ?", (victim[0],))
            total -= int(victim[2])
        return expired

    def _oldest_run(self, db: sqlite3.Connection) -> list[_Row]:
        """The oldest run of >= 2 drift windows that can be merged: consecutive coverage (each window stands for
        exactly ``cover_first..seq`` and starts right after the previous one), same (model, version), together
        standing for at most ``merge_max`` original windows."""
        cap = self.limits.merge_max
        run: list[_Row] = []
        total = 0
        cursor = db.execute(
            "SELECT seq, cover_first, model, version, size, created_at, windows FROM messages "
            "WHERE stream = ? AND mergeable = 1 AND windows < ? ORDER BY seq", (Stream.DRIFT.value, cap))
        for seq, cover_first, model, version, size, created_at, windows in cursor:
            row = _Row(int(seq), int(cover_first), model, version, int(size), float(created_at), int(windows))
            prev = run[-1] if run else None
            if (prev is not None and row.cover_first == prev.seq + 1 and total + row.windows <= cap
                    and (row.model, row.version) == (prev.model, prev.version)):
                run.append(row)
                total += row.windows
                continue
            if len(run) >= 2:
                break
            run, total = [row], row.windows
        cursor.close()
        return run if len(run) >= 2 else []

    def _merge_oldest_run(self, db: sqlite3.Connection) -> int | None:
        """Merge the oldest mergeable run into one window; bytes freed, or ``None`` if nothing can be merged."""
        run = self._oldest_run(db)
        if not run:
            return None
        windows: list[DriftWindow] = []
        summary: Summary | None = None
        slis: dict[str, Any] = {}
        for i, row in enumerate(run):
            payload = db.execute("SELECT payload FROM messages WHERE stream = ? AND seq = ?",
                                 (Stream.DRIFT.value, row.seq)).fetchone()[0]
            try:
                window = decode(bytes(payload))
                if not isinstance(window, DriftWindow):
                    raise OutboxMessageError("not a drift window")
                part = Summary.from_dict({"layout": LAYOUT_VERSION, "features": window.features})
                merged_slis = dict(window.slis) if summary is None else _merge_slis(slis, window.slis)
                merged_summary = part if summary is None else summary.merge(part)
            except (ProtocolError, DriftLayoutError, OutboxMessageError, _UnmergeableError):
                if len(windows) >= 2:
                    run = run[:i]
                    break
                # The window at i cannot be merged with what precedes it: take the run's head out of merging
                # (this loop ends because every attempt merges windows or marks one unmergeable).
                bad = run[i] if i == 0 else run[0]
                db.execute("UPDATE messages SET mergeable = 0 WHERE stream = ? AND seq = ?",
                           (Stream.DRIFT.value, bad.seq))
                return 0
            windows.append(window)
            summary, slis = merged_summary, merged_slis
        assert summary is not None
        seq = int(db.execute("SELECT next_seq FROM streams WHERE stream = ?", (Stream.DRIFT.value,)).fetchone()[0])
        first = windows[0]
        features: Any = summary.to_dict()["features"]
        try:
            merged = DriftWindow(
                device_id=first.device_id, stream_seq=seq, model=first.model, version=first.version,
                window_start=min(w.window_start for w in windows), window_end=max(w.window_end for w in windows),
                samples=sum(w.samples for w in windows), replaces=(run[0].cover_first, run[-1].seq),
                features=features, slis=slis,
            )
            payload = encode(merged)
        except (ProtocolError, DriftLayoutError):
            db.execute("UPDATE messages SET mergeable = 0 WHERE stream = ? AND seq = ?",
                       (Stream.DRIFT.value, run[0].seq))
            return 0
        for row in run:
            db.execute("DELETE FROM messages WHERE stream = ? AND seq = ?", (Stream.DRIFT.value, row.seq))
        db.execute(
            "INSERT INTO messages (stream, seq, created_at, size, model, version, cover_first, mergeable, windows, "
            "payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (Stream.DRIFT.value, seq, min(r.created_at for r in run), len(payload), merged.model, merged.version,
             run[0].cover_first, int(run[-1].seq == seq - 1), sum(r.windows for r in run), payload),
        )
        db.execute("UPDATE streams SET next_seq = ?, merged_windows = merged_windows + ?, merges = merges + 1 "
                   "WHERE stream = ?", (seq + 1, len(run), Stream.DRIFT.value))
        return sum(r.size for r in run) - len(payload)

    # -- reading -------------------------------------------------------------------------------------

    def pending(self, stream: str, limit: int = 100, *, after: int = -1) -> list[OutboxMessage]:
        """Up to ``limit`` stored (not parked) messages of ``stream`` with ``seq > after``, in sequence order."""
        _check_stream(stream)
        with self._lock:
            rows = self._require_open().execute(
                "SELECT seq, payload, created_at, resend FROM messages WHERE stream = ? AND seq > ? "
                "ORDER BY seq LIMIT ?", (stream, after, max(0, limit))).fetchall()
        return [OutboxMessage(stream, int(seq), bytes(p), float(t), bool(r)) for seq, p, t, r in rows]

    def drain_batch(self, rate: float, *, after: Mapping[str, int] | None = None, limit: int | None = None,
                    burst: float | None = None) -> list[OutboxMessage]:
        """The next messages to publish, paced to ``rate`` messages per second (a token bucket holding at most
        ``burst`` messages, default :data:`DRAIN_BURST_S` seconds' worth, at least 1).

        Resend requests come first (the server is waiting for them), then messages with ``seq > after[stream]``
        (the caller's send cursor; default: from the oldest), streams in :data:`STREAM_PRIORITY` order, each in
        sequence order. ``limit`` caps the batch (e.g. the room left in the caller's in-flight window). Call it
        every tick; after a reconnect, :meth:`reset_drain` starts from a full bucket.
        """
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError("rate must be a positive number of messages per second")
        cap = max(1.0, burst if burst is not None else rate * DRAIN_BURST_S)
        now = self._clock()
        with self._lock:
            if self._drain_last is None:
                self._drain_tokens = cap
            else:
                self._drain_tokens = min(cap, self._drain_tokens + max(0.0, now - self._drain_last) * rate)
            self._drain_last = now
            room = int(self._drain_tokens + 1e-9)  # 0.3 s * 10/s is 2.9999999999999996 in floats
            if limit is not None:
                room = min(room, max(0, limit))
            if room <= 0:
                return []
            db = self._require_open()
            batch: list[OutboxMessage] = []
            for stream in STREAM_PRIORITY:
                rows = db.execute("SELECT seq, payload, created_at FROM messages WHERE stream = ? AND resend = 1 "
                                  "ORDER BY seq LIMIT ?", (stream, room - len(batch))).fetchall()
                batch += [OutboxMessage(stream, int(s), bytes(p), float(t), True) for s, p, t in rows]
            for stream in STREAM_PRIORITY:
                if len(batch) >= room:
                    break
                cursor = (after or {}).get(stream, -1)
                rows = db.execute("SELECT seq, payload, created_at FROM messages WHERE stream = ? AND seq > ? "
                                  "AND resend = 0 ORDER BY seq LIMIT ?",
                                  (stream, cursor, room - len(batch))).fetchall()
                batch += [OutboxMessage(stream, int(s), bytes(p), float(t), False) for s, p, t in rows]
            self._drain_tokens -= len(batch)
        return batch

    def reset_drain(self) -> None:
        """Forget the pacing state: the next :meth:`drain_batch` starts with a full bucket (one burst)."""
        with self._lock:
            self._drain_last = None

    def parked(self, stream: str | None = None, limit: int = 100) -> list[ParkedMessage]:
        """Parked messages, oldest first (for inspection and support bundles)."""
        with self._lock:
            db = self._require_open()
            if stream is None:
                rows = db.execute("SELECT stream, seq, payload, created_at, parked_at, reason FROM parked "
                                  "ORDER BY parked_at, stream, seq LIMIT ?", (limit,)).fetchall()
            else:
                rows = db.execute("SELECT stream, seq, payload, created_at, parked_at, reason FROM parked "
                                  "WHERE stream = ? ORDER BY parked_at, seq LIMIT ?",
                                  (_check_stream(stream), limit)).fetchall()
        return [ParkedMessage(s, int(q), bytes(p), float(c), float(a), str(r)) for s, q, p, c, a, r in rows]

    def stats(self) -> OutboxStats:
        """Counters per stream (pending, bytes, oldest, acked, dropped by age/bytes, merged, parked)."""
        with self._lock:
            db = self._require_open()
            out: dict[str, StreamStats] = {}
            for row in db.execute(
                    "SELECT stream, next_seq, acked, dropped_age, dropped_bytes, merged_windows, merges, parked_total, "
                    "parked_dropped, resend_requests FROM streams ORDER BY stream").fetchall():
                stream = str(row[0])
                count, size, oldest = db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(created_at) FROM messages WHERE stream = ?",
                    (stream,)).fetchone()
                parked = int(db.execute("SELECT COUNT(*) FROM parked WHERE stream = ?", (stream,)).fetchone()[0])
                out[stream] = StreamStats(
                    stream=stream, next_seq=int(row[1]), pending=int(count), pending_bytes=int(size),
                    oldest_created_at=None if oldest is None else float(oldest), acked=int(row[2]),
                    dropped_age=int(row[3]), dropped_bytes=int(row[4]), merged_windows=int(row[5]),
                    merges=int(row[6]), parked=parked, parked_total=int(row[7]), parked_dropped=int(row[8]),
                    resend_requests=int(row[9]),
                )
        return OutboxStats(streams=MappingProxyType(out), total_bytes=sum(s.pending_bytes for s in out.values()))

    # -- plumbing ------------------------------------------------------------------------------------

    def _require_open(self) -> sqlite3.Connection:
        if self._db is None:
            raise OutboxClosedError(f"the outbox {self.path} is not open")
        return self._db

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction under the lock; sqlite3 errors become :class:`OutboxError`."""
        with self._lock:
            db = self._require_open()
            if self._in_tx:
                raise OutboxError("re-entrant outbox call: make_message must not use the outbox")
            self._in_tx = True
            try:
                try:
                    db.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as exc:
                    raise OutboxError(f"outbox database error: {exc}") from exc
                try:
                    yield db
                    db.execute("COMMIT")
                except BaseException as exc:
                    with contextlib.suppress(sqlite3.Error):
                        if db.in_transaction:
                            db.execute("ROLLBACK")
                    if isinstance(exc, sqlite3.Error):
                        raise OutboxError(f"outbox database error: {exc}") from exc
                    raise
            finally:
                self._in_tx = False
