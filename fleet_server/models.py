"""The server's tables (SQLModel) and API schemas, split by direction.

``X`` (``table=True``) is what is stored; ``XCreate`` is what a client sends; ``XPublic`` is what the API
returns. Alembic migrations (``fleet_server/migrations``) are generated from :data:`metadata` and a test
checks that they agree, on SQLite and PostgreSQL.

Conventions:

* Times set by the server (``received_at``, ``first_seen_at``, audit ``at``) are timezone-aware UTC datetimes
  (:class:`UTCDateTime`). Times reported by devices (``window_start``, ``Event.at``) stay unix seconds as on
  the wire: they are the device's clock, and range queries and hour buckets are arithmetic on them.
* Opaque device data (histograms, SLIs, event details) is JSON. On PostgreSQL it is ``json``, not ``jsonb``:
  ``jsonb`` reorders object keys, and the order of a drift summary's features is part of its layout.
* Sequence numbers and counters are BIGINT (the wire allows 0..2**63-1).
"""

from datetime import UTC, datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel

__all__ = [
    "AuditLog",
    "AuditLogPublic",
    "Baseline",
    "BaselineCreate",
    "BaselinePublic",
    "Device",
    "DevicePublic",
    "DriftRollupDaily",
    "DriftRollupHourly",
    "DriftWindowPublic",
    "DriftWindowRecord",
    "EventPublic",
    "EventRecord",
    "StreamState",
    "StreamStatePublic",
    "UTCDateTime",
    "metadata",
    "table_of",
    "utcnow",
]

SQLModel.metadata.naming_convention = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = SQLModel.metadata
"""The metadata Alembic migrates (every table of this module)."""

ID_LEN = 64  # the identifier rule of the wire contract: device ids, model names, stream names


def table_of(model: type[SQLModel]) -> sa.Table:
    """The Core table of a table model (for bulk statements)."""
    return cast(sa.Table, model.__table__)  # type: ignore[attr-defined]


def utcnow() -> datetime:
    """Now, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend. PostgreSQL stores ``timestamptz``; SQLite has no time
    zones, so the UTC wall time is stored and UTC is re-attached on read. Naive datetimes are refused: they
    are the classic source of off-by-hours bugs."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass a timezone-aware (UTC) datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# SQLite makes only an INTEGER PRIMARY KEY an auto-incrementing rowid alias.
_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


# -- devices ----------------------------------------------------------------------------------------------


class DeviceBase(SQLModel):
    id: str = Field(primary_key=True, max_length=ID_LEN)
    first_seen_at: datetime = Field(sa_type=UTCDateTime)
    last_seen_at: datetime = Field(sa_type=UTCDateTime)
    last_status: str | None = Field(default=None, max_length=16)
    """``online`` / ``offline`` from the retained status topic (``None``: never reported or cleared)."""
    last_status_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    agent_version: str | None = Field(default=None, max_length=64)
    schema_version: str | None = Field(default=None, max_length=16)
    """Wire schema version of the device's latest message, ``major.minor``."""
    models: list[dict[str, Any]] = Field(default_factory=list, sa_type=sa.JSON)
    """Models deployed, as in the latest ``Status`` (name, version, slot, healthy)."""
    uptime_s: float | None = None
    """From the latest heartbeat."""


class Device(DeviceBase, table=True):
    """A device the server has heard from (registered on first message; provisioning comes later)."""

    __tablename__ = "devices"


class DevicePublic(DeviceBase):
    pass


# -- telemetry --------------------------------------------------------------------------------------------


class DriftWindowBase(SQLModel):
    device_id: str = Field(max_length=ID_LEN, foreign_key="devices.id")
    stream: str = Field(max_length=ID_LEN)
    seq: int = Field(sa_type=sa.BigInteger)
    model: str = Field(max_length=ID_LEN)
    version: int = Field(sa_type=sa.BigInteger)
    window_start: float = Field(index=True)
    """Device clock, unix seconds (inclusive)."""
    window_end: float
    samples: int = Field(sa_type=sa.BigInteger)
    replaces_first: int | None = Field(default=None, sa_type=sa.BigInteger)
    replaces_last: int | None = Field(default=None, sa_type=sa.BigInteger)
    features: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    """Feature name -> histogram in the ``agent.drift`` dict layout (the wire's ``features``)."""
    slis: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    received_at: datetime = Field(sa_type=UTCDateTime)


class DriftWindowRecord(DriftWindowBase, table=True):
    """One stored drift window. Idempotent by (device_id, stream, seq): a redelivery never adds a row."""

    __tablename__ = "drift_windows"
    __table_args__ = (
        sa.UniqueConstraint("device_id", "stream", "seq"),
        sa.Index(None, "model", "version", "window_start"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=_BigId)


class DriftWindowPublic(DriftWindowBase):
    id: int


class StreamStateBase(SQLModel):
    device_id: str = Field(primary_key=True, max_length=ID_LEN, foreign_key="devices.id")
    stream: str = Field(primary_key=True, max_length=ID_LEN)
    ranges: list[list[int]] = Field(default_factory=list, sa_type=sa.JSON)
    """Every seq stored (or superseded by a merged window), as sorted inclusive ``[first, last]`` ranges:
    ``ReceivedTracker.to_ranges()``. The source of truth for idempotency and gaps."""
    received_count: int = Field(default=0, sa_type=sa.BigInteger)
    duplicates: int = Field(default=0, sa_type=sa.BigInteger)
    """Redeliveries of already-stored seqs (counted once per redelivery, never stored)."""
    high_water: int | None = Field(default=None, sa_type=sa.BigInteger)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class StreamState(StreamStateBase, table=True):
    """Ingestion bookkeeping per (device, stream): survives restarts, shared by replicas (row-locked)."""

    __tablename__ = "stream_states"


class StreamStatePublic(StreamStateBase):
    pass


class EventBase(SQLModel):
    device_id: str = Field(max_length=ID_LEN, foreign_key="devices.id")
    stream: str = Field(max_length=ID_LEN)
    seq: int = Field(sa_type=sa.BigInteger)
    kind: str = Field(max_length=32)
    at: float
    """Device clock, unix seconds."""
    command_id: str | None = Field(default=None, max_length=128, index=True)
    model: str | None = Field(default=None, max_length=ID_LEN)
    version: int | None = Field(default=None, sa_type=sa.BigInteger)
    reason: str | None = Field(default=None, max_length=1024)
    detail: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    received_at: datetime = Field(sa_type=UTCDateTime)


class EventRecord(EventBase, table=True):
    """One stored device event; idempotent by (device_id, stream, seq) like drift windows."""

    __tablename__ = "events"
    __table_args__ = (sa.UniqueConstraint("device_id", "stream", "seq"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=_BigId)


class EventPublic(EventBase):
    id: int


# -- rollups (retention) ----------------------------------------------------------------------------------


class DriftRollupBase(SQLModel):
    device_id: str = Field(max_length=ID_LEN, foreign_key="devices.id")
    model: str = Field(max_length=ID_LEN)
    version: int = Field(sa_type=sa.BigInteger)
    bucket_start: int = Field(sa_type=sa.BigInteger)
    """Unix seconds, a multiple of the bucket length (3600 or 86400); windows go by their ``window_start``."""
    windows: int = Field(sa_type=sa.BigInteger)
    """Raw window rows merged into this bucket."""
    samples: int = Field(sa_type=sa.BigInteger)
    first_window_start: float
    last_window_end: float
    features: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    """Exact merge (``agent.drift.Summary.merge``) of every window's features."""
    updated_at: datetime = Field(sa_type=UTCDateTime)


class DriftRollupHourly(DriftRollupBase, table=True):
    __tablename__ = "drift_rollups_hourly"
    __table_args__ = (
        sa.UniqueConstraint("device_id", "model", "version", "bucket_start"),
        sa.Index(None, "model", "version", "bucket_start"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=_BigId)


class DriftRollupDaily(DriftRollupBase, table=True):
    __tablename__ = "drift_rollups_daily"
    __table_args__ = (
        sa.UniqueConstraint("device_id", "model", "version", "bucket_start"),
        sa.Index(None, "model", "version", "bucket_start"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=_BigId)


# -- baselines --------------------------------------------------------------------------------------------


class BaselineCreate(SQLModel):
    """``PUT /api/v1/models/{model}/versions/{version}/baseline`` body."""

    summary: dict[str, Any]
    """The training baseline in the ``agent.drift`` dict layout (``{"layout": 1, "features": {...}}``)."""
    thresholds: dict[str, Any] = Field(default_factory=dict)
    """Drift score thresholds passed to the scorer (e.g. ``{"psi": 0.2}``)."""


class Baseline(SQLModel, table=True):
    """The drift baseline of a model version (until the bundle store provides it)."""

    __tablename__ = "baselines"

    model: str = Field(primary_key=True, max_length=ID_LEN)
    version: int = Field(primary_key=True, sa_type=sa.BigInteger)
    summary: dict[str, Any] = Field(sa_type=sa.JSON)
    thresholds: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    updated_at: datetime = Field(sa_type=UTCDateTime)
    updated_by: str = Field(max_length=128)


class BaselinePublic(SQLModel):
    model: str
    version: int
    features: list[str]
    thresholds: dict[str, Any]
    updated_at: datetime
    updated_by: str


# -- audit ------------------------------------------------------------------------------------------------


class AuditLogBase(SQLModel):
    at: datetime = Field(sa_type=UTCDateTime, index=True)
    actor: str = Field(max_length=128)
    """Who: a principal (``token:static``), or ``system:<job>`` for the server's own jobs."""
    action: str = Field(max_length=64)
    """What, as a stable dotted verb: ``baseline.put``, ``retention.run``."""
    target: str = Field(max_length=256)
    outcome: str = Field(max_length=16)
    """``ok``, ``denied`` or ``failed``."""
    detail: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)


class AuditLog(AuditLogBase, table=True):
    """Append-only record of every state-changing action (see :func:`fleet_server.audit.record`).

    Store-and-forward telemetry ingestion is not audited per message: its effect is counted in
    ``stream_states`` and the ingestion metrics instead.
    """

    __tablename__ = "audit_log"

    id: int | None = Field(default=None, primary_key=True, sa_type=_BigId)


class AuditLogPublic(AuditLogBase):
    id: int
