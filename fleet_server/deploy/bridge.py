"""The command bridge: signs deployment orders and cancels, stores them, publishes them, resends them until the
device acknowledges them or they expire.

Life of a command (one row of ``commands``, keyed by ``command_id``)::

    prepare (in the caller's transaction) -> pending -> acked    (an event naming its command_id was stored)
                                                     -> expired  (expires_at passed first; counted)

* :meth:`CommandBridge.prepare` runs inside the caller's transaction (the rollout loop's or an API action's): it
  skips command ids that already exist (a decision repeated after a crash creates no second command and consumes no
  sequence number), takes each device's ``devices.order_sequence + 1`` (row-locked on PostgreSQL) and writes the new
  sequences and the command rows in two executemany statements, so a command and its sequence commit together
  with the rollout state that decided it, or not at all.
* :meth:`CommandBridge.publish` runs after the commit: QoS 1 to ``fleet/v1/{device}/commands``. A command that
  could not be handed to a connected client is made due at once, so the next :meth:`resend_due` retries it.
  A crash between commit and publish loses nothing either: the row is pending, and :meth:`resend_due` sends it
  after ``command_resend_s``.
* :meth:`CommandBridge.resend_due` publishes every pending command whose ``next_send_at`` has come, byte for byte
  as first stored (the agent applies a ``command_id`` once), then waits ``command_resend_s * 2**min(sends - 1, 4)``
  (30 s, 60 s, 2 min, 4 min, then every 8 min with the default), and expires commands past ``expires_at``. A broker
  that queues nothing for offline devices therefore loses nothing: the device gets the command when it is back.
* :meth:`CommandBridge.acknowledge` marks commands acknowledged; the rollout loop calls it for every stored event
  that names a command id (``received`` first, but any event counts).

The publisher is injected (:class:`CommandPublisher`): :class:`fleet_server.deploy.mqtt.MqttCommandPublisher` in
the server, a list in unit tests. Without one (an API-only replica) commands are stored due at once and the replica
that runs the loop publishes them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Engine

from agent.protocol import Channel, device_topic
from fleet_server.db import is_postgresql
from fleet_server.deploy.signing import BundleInfo, OrderSigner
from fleet_server.models import BundleRecord, CommandRecord, Device, table_of
from fleet_server.rollouts import SendCancel, SendOrder

__all__ = [
    "BACKOFF_CAP",
    "BridgeMetrics",
    "CommandBridge",
    "CommandPublisher",
    "Outgoing",
    "ResendResult",
    "UnknownBundleError",
    "chunks",
    "resend_delay",
]

log = logging.getLogger(__name__)

BACKOFF_CAP = 16
"""The resend delay doubles per send up to this many times ``command_resend_s``."""
IN_CHUNK = 5000
"""Most values in one ``IN (...)`` list (SQLite and PostgreSQL both limit bound parameters)."""

_COMMANDS = table_of(CommandRecord)
_DEVICES = table_of(Device)
_BUNDLES = table_of(BundleRecord)

T = TypeVar("T")


def chunks(items: Sequence[T], size: int = IN_CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def resend_delay(resend_s: float, sends: int) -> float:
    """Seconds to wait after the ``sends``-th copy of a command (``sends >= 1``) before sending it again."""
    return float(resend_s * 2 ** min(max(sends - 1, 0), BACKOFF_CAP.bit_length() - 1))


class CommandPublisher(Protocol):
    """Publishes one command frame at QoS 1; ``True`` when a connected client took it."""

    def publish(self, topic: str, payload: bytes) -> bool: ...


class UnknownBundleError(LookupError):
    """An order names a bundle digest the ``bundles`` table does not hold."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A stored command to publish after its transaction committed."""

    command_id: str
    device_id: str
    kind: str
    frame: bytes

    @property
    def topic(self) -> str:
        return device_topic(self.device_id, Channel.COMMANDS)


@dataclass(frozen=True, slots=True)
class ResendResult:
    resent: int
    failed: int
    expired: int


@dataclass
class BridgeMetrics:
    """Counters since start (process-local; the durable figures are the ``commands`` rows)."""

    orders_signed: int = 0
    cancels_signed: int = 0
    published: int = 0
    resent: int = 0
    publish_failures: int = 0
    expired: int = 0
    acked: int = 0
    repeated: int = 0
    """Decisions whose command id already existed (after a crash or on a second replica): not signed again."""
    unknown_devices: int = 0
    """Orders for devices deleted from the registry meanwhile: skipped."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)


class CommandBridge:
    """Signs, stores, publishes and resends commands (see the module docstring)."""

    def __init__(self, engine: Engine, signer: OrderSigner, publisher: CommandPublisher | None = None, *,
                 resend_s: float = 30.0, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.signer = signer
        self.publisher = publisher
        self.resend_s = resend_s
        self.clock = clock
        self.metrics = BridgeMetrics()
        self._pg = is_postgresql(engine)
        self._bundles: dict[str, BundleInfo] = {}

    # -- issuing ------------------------------------------------------------------------------------------

    def bundle(self, conn: sa.Connection, digest: str) -> BundleInfo:
        """The bundle an order names (cached: a bundle digest's content never changes)."""
        info = self._bundles.get(digest)
        if info is None:
            row = conn.execute(sa.select(_BUNDLES.c.digest, _BUNDLES.c.model, _BUNDLES.c.version, _BUNDLES.c.length)
                               .where(_BUNDLES.c.digest == digest)).first()
            if row is None:
                raise UnknownBundleError(f"no bundle with digest {digest}")
            info = self._bundles[digest] = BundleInfo(row.digest, row.model, row.version, row.length)
        return info

    def existing(self, conn: sa.Connection, command_ids: Iterable[str]) -> set[str]:
        """The command ids of ``command_ids`` already stored."""
        ids = sorted(set(command_ids))
        found: set[str] = set()
        for part in chunks(ids):
            found.update(conn.execute(sa.select(_COMMANDS.c.command_id)
                                      .where(_COMMANDS.c.command_id.in_(part))).scalars())
        return found

    def _sequences(self, conn: sa.Connection, devices: Sequence[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for part in chunks(devices):
            q = sa.select(_DEVICES.c.id, _DEVICES.c.order_sequence).where(_DEVICES.c.id.in_(part)).order_by(
                _DEVICES.c.id)
            if self._pg:
                q = q.with_for_update()  # in id order: two writers never deadlock
            out.update({r.id: int(r.order_sequence) for r in conn.execute(q)})
        return out

    def prepare(self, conn: sa.Connection, *, rollout_id: str | None, orders: Sequence[SendOrder] = (),
                cancels: Sequence[SendCancel] = (), now: float) -> list[Outgoing]:
        """Sign and store ``orders`` and ``cancels`` inside the caller's transaction; return what to publish after
        it commits. Command ids already stored are skipped (idempotent); so are devices no longer registered."""
        wanted: dict[str, SendOrder | SendCancel] = {}
        decisions: list[SendOrder | SendCancel] = [*orders, *cancels]
        for d in decisions:
            wanted.setdefault(d.command_id, d)
        known = self.existing(conn, wanted)
        todo = [d for cid, d in wanted.items() if cid not in known]
        repeated = len(orders) + len(cancels) - len(todo)
        if not todo:
            self.metrics.add(repeated=repeated)
            return []
        sequences = self._sequences(conn, sorted({d.device for d in todo}))
        published = self.publisher is not None
        rows: list[dict[str, Any]] = []
        out: list[Outgoing] = []
        signed_orders = signed_cancels = unknown = 0
        for d in todo:
            if d.device not in sequences:
                unknown += 1
                log.warning("bridge: device %s is no longer registered; command %s not sent", d.device, d.command_id)
                continue
            seq = sequences[d.device] = sequences[d.device] + 1
            if isinstance(d, SendOrder):
                frame, expires_at = self.signer.deploy(
                    device_id=d.device, command_id=d.command_id, rollout_id=rollout_id or "manual",
                    bundle=self.bundle(conn, d.bundle_digest), sequence=seq, now=now,
                    allow_downgrade=d.allow_downgrade)
                kind = "deploy"
                signed_orders += 1
            else:
                frame, expires_at = self.signer.cancel(device_id=d.device, command_id=d.command_id,
                                                       cancels=d.command, rollout_id=rollout_id, sequence=seq, now=now)
                kind = "cancel"
                signed_cancels += 1
            rows.append({"command_id": d.command_id, "device_id": d.device, "rollout_id": rollout_id, "kind": kind,
                         "sequence": seq, "frame": frame, "state": "pending", "created_at": now,
                         "expires_at": expires_at, "sends": 1 if published else 0,
                         "last_sent_at": now if published else None,
                         "next_send_at": now + self.resend_s if published else now, "acked_at": None})
            out.append(Outgoing(d.command_id, d.device, kind, frame))
        if rows:
            conn.execute(
                sa.update(_DEVICES).where(_DEVICES.c.id == sa.bindparam("b_id"))
                .values(order_sequence=sa.bindparam("b_seq")),
                [{"b_id": dev, "b_seq": sequences[dev]} for dev in sorted({r["device_id"] for r in rows})])
            conn.execute(self._insert(_COMMANDS).on_conflict_do_nothing(index_elements=["command_id"]), rows)
        self.metrics.add(orders_signed=signed_orders, cancels_signed=signed_cancels, repeated=repeated,
                         unknown_devices=unknown)
        return out

    def publish(self, outgoing: Sequence[Outgoing]) -> int:
        """Publish stored commands (after their transaction committed). Those the publisher could not take are
        made due at once for :meth:`resend_due`. Returns how many were taken."""
        if not outgoing or self.publisher is None:
            return 0
        failed: list[str] = []
        for o in outgoing:
            if not self.publisher.publish(o.topic, o.frame):
                failed.append(o.command_id)
        if failed:
            self._make_due(failed)
        self.metrics.add(published=len(outgoing) - len(failed), publish_failures=len(failed))
        return len(outgoing) - len(failed)

    def send(self, *, rollout_id: str | None, orders: Sequence[SendOrder] = (), cancels: Sequence[SendCancel] = ()
             ) -> list[Outgoing]:
        """Prepare in a transaction of its own, then publish (for callers with no transaction to join)."""
        now = self.clock()
        with self.engine.connect().execution_options(sqlite_immediate=True) as conn, conn.begin():
            out = self.prepare(conn, rollout_id=rollout_id, orders=orders, cancels=cancels, now=now)
        self.publish(out)
        return out

    def _make_due(self, command_ids: Sequence[str]) -> None:
        now = self.clock()
        try:
            with self.engine.connect().execution_options(sqlite_immediate=True) as conn, conn.begin():
                for part in chunks(sorted(command_ids)):
                    conn.execute(sa.update(_COMMANDS).where(_COMMANDS.c.command_id.in_(part),
                                                            _COMMANDS.c.state == "pending")
                                 .values(next_send_at=now))
        except sa.exc.SQLAlchemyError as exc:  # the regular resend schedule still covers them
            log.warning("bridge: could not mark %d unsent commands due: %s", len(command_ids),
                        str(exc).splitlines()[0][:200])

    # -- resending and expiry -----------------------------------------------------------------------------

    def resend_due(self, now: float | None = None, *, limit: int = 5000) -> ResendResult:
        """Expire pending commands past their expiry, then publish up to ``limit`` pending commands that are due
        (oldest due first) and schedule each one's next copy with backoff. Rows are claimed in one transaction
        (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so two replicas never send the same copy) and published after
        it commits."""
        now = self.clock() if now is None else now
        with self.engine.connect().execution_options(sqlite_immediate=True) as conn, conn.begin():
            expired = conn.execute(sa.update(_COMMANDS).where(_COMMANDS.c.state == "pending",
                                                              _COMMANDS.c.expires_at <= now)
                                   .values(state="expired")).rowcount or 0
            if self.publisher is None:
                return ResendResult(0, 0, expired)
            q = (sa.select(_COMMANDS.c.command_id, _COMMANDS.c.device_id, _COMMANDS.c.kind, _COMMANDS.c.frame,
                           _COMMANDS.c.sends)
                 .where(_COMMANDS.c.state == "pending", _COMMANDS.c.next_send_at <= now)
                 .order_by(_COMMANDS.c.next_send_at, _COMMANDS.c.command_id).limit(limit))
            if self._pg:
                q = q.with_for_update(skip_locked=True)
            due = conn.execute(q).all()
            if due:
                conn.execute(
                    sa.update(_COMMANDS).where(_COMMANDS.c.command_id == sa.bindparam("b_id"))
                    .values(sends=sa.bindparam("b_sends"), last_sent_at=now, next_send_at=sa.bindparam("b_next")),
                    [{"b_id": r.command_id, "b_sends": r.sends + 1,
                      "b_next": now + resend_delay(self.resend_s, r.sends + 1)} for r in due])
        failed = 0
        for r in due:
            if not self.publisher.publish(device_topic(r.device_id, Channel.COMMANDS), bytes(r.frame)):
                failed += 1
        self.metrics.add(resent=len(due) - failed, publish_failures=failed, expired=expired)
        if expired:
            log.info("bridge: %d commands expired unacknowledged", expired)
        return ResendResult(len(due) - failed, failed, expired)

    # -- acknowledgements ---------------------------------------------------------------------------------

    def acknowledge(self, conn: sa.Connection, command_ids: Iterable[str], now: float) -> int:
        """Mark pending commands acknowledged (inside the caller's transaction); returns how many changed."""
        ids = sorted(set(command_ids))
        n = 0
        for part in chunks(ids):
            n += conn.execute(sa.update(_COMMANDS).where(_COMMANDS.c.command_id.in_(part),
                                                         _COMMANDS.c.state == "pending")
                              .values(state="acked", acked_at=now)).rowcount or 0
        self.metrics.add(acked=n)
        return n

    def _insert(self, table: sa.Table) -> Any:
        return pg_dialect.insert(table) if self._pg else sqlite_dialect.insert(table)
