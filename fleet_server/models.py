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
    "ApiToken",
    "AuditLog",
    "AuditLogPublic",
    "Baseline",
    "BaselineCreate",
    "BaselinePublic",
    "BundleRecord",
    "Cohort",
    "CohortMember",
    "CommandRecord",
    "Counter",
    "Device",
    "DeviceLabel",
    "DeviceModel",
    "DevicePublic",
    "DriftRollupDaily",
    "DriftRollupHourly",
    "DriftWindowPublic",
    "DriftWindowRecord",
    "EventPublic",
    "EventRecord",
    "RolloutDevice",
    "RolloutRecord",
    "SessionRecord",
    "StreamState",
    "StreamStatePublic",
    "UTCDateTime",
    "User",
    "VersionChange",
    "VersionChangePublic",
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
    first_seen_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    """First message received (``None``: pre-registered, never heard from)."""
    last_seen_at: datetime | None = Field(default=None, sa_type=UTCDateTime, index=True)
    """Latest message of any kind received; "stale since" is this plus ``device_stale_after_s``."""
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
    heartbeat_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    """When the latest heartbeat was received."""
    firmware_profile: str | None = Field(default=None, max_length=ID_LEN)
    """The firmware profile the device runs (``agent.profiles`` names): bundles must support it."""
    hardware: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    """Free-form hardware facts (board, cpu, memory_mb, accelerator...)."""
    registered_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    """When the device was registered through the API (``None``: registered by its first message)."""
    registered_by: str | None = Field(default=None, max_length=128)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    """Decommissioned: the device gets no orders and its messages are refused."""


class Device(DeviceBase, table=True):
    """A device: registered through the API, or by its first message when ``ingest_auto_register`` is on.
    Labels live in :class:`DeviceLabel` (one row per key, indexed for cohort selectors)."""

    __tablename__ = "devices"
    __table_args__ = (sa.Index(None, "last_status", "last_seen_at"),)

    order_sequence: int = Field(default=0, sa_type=sa.BigInteger)
    """The sequence of the newest order signed for this device (orders must increase per device)."""


class DeviceLabel(SQLModel, table=True):
    """One label of one device (``site=berlin``): cohorts select devices by labels."""

    __tablename__ = "device_labels"
    __table_args__ = (sa.Index(None, "key", "value"),)

    device_id: str = Field(primary_key=True, max_length=ID_LEN, foreign_key="devices.id", ondelete="CASCADE")
    key: str = Field(primary_key=True, max_length=ID_LEN)
    value: str = Field(max_length=ID_LEN)


class DeviceModel(SQLModel, table=True):
    """The version of one model a device serves now and the one before (from its ``Status`` reports)."""

    __tablename__ = "device_models"
    __table_args__ = (sa.Index(None, "model", "version"),)

    device_id: str = Field(primary_key=True, max_length=ID_LEN, foreign_key="devices.id", ondelete="CASCADE")
    model: str = Field(primary_key=True, max_length=ID_LEN)
    version: int = Field(sa_type=sa.BigInteger)
    previous_version: int | None = Field(default=None, sa_type=sa.BigInteger)
    healthy: bool | None = None
    changed_at: datetime = Field(sa_type=UTCDateTime)
    """When the server saw ``version`` become active."""


class VersionChangeBase(SQLModel):
    device_id: str = Field(max_length=ID_LEN, foreign_key="devices.id", ondelete="CASCADE")
    model: str = Field(max_length=ID_LEN)
    from_version: int | None = Field(default=None, sa_type=sa.BigInteger)
    to_version: int = Field(sa_type=sa.BigInteger)
    at: datetime = Field(sa_type=UTCDateTime)
    rollout_id: str | None = Field(default=None, max_length=128)
    """The rollout that installed ``to_version`` (``None``: sideloaded, or rolled back by the agent itself)."""
    command_id: str | None = Field(default=None, max_length=128)


class VersionChange(VersionChangeBase, table=True):
    """Every version change of every model on every device, with its time and rollout."""

    __tablename__ = "version_changes"
    __table_args__ = (sa.Index(None, "device_id", "at"), sa.Index(None, "model", "to_version"))

    id: int | None = Field(default=None, primary_key=True, sa_type=_BigId)


class VersionChangePublic(VersionChangeBase):
    id: int


# -- cohorts ----------------------------------------------------------------------------------------------


class Cohort(SQLModel, table=True):
    """A named group of devices: explicit members (:class:`CohortMember`) plus every device whose labels match
    ``selector`` (all of its ``key: value`` pairs; ``{}`` selects none). Membership is resolved at each use,
    so a device that joins later is in the cohort, under the same gates."""

    __tablename__ = "cohorts"

    name: str = Field(primary_key=True, max_length=ID_LEN)
    description: str = Field(default="", max_length=1024)
    selector: dict[str, str] = Field(default_factory=dict, sa_type=sa.JSON)
    created_at: datetime = Field(sa_type=UTCDateTime)
    created_by: str = Field(max_length=128)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class CohortMember(SQLModel, table=True):
    """An explicit member of a cohort."""

    __tablename__ = "cohort_members"

    cohort: str = Field(primary_key=True, max_length=ID_LEN, foreign_key="cohorts.name", ondelete="CASCADE")
    device_id: str = Field(primary_key=True, max_length=ID_LEN, foreign_key="devices.id", ondelete="CASCADE",
                           index=True)
    added_at: datetime = Field(sa_type=UTCDateTime)
    added_by: str = Field(max_length=128)


# -- bundles ----------------------------------------------------------------------------------------------


class BundleRecord(SQLModel, table=True):
    """An uploaded, verified bundle. ``digest`` is the sha256 of its manifest (what orders name); the file is
    stored under its own sha256 (``file_sha256``) in ``bundle_dir``. A (model, version) is immutable."""

    __tablename__ = "bundles"
    __table_args__ = (sa.UniqueConstraint("model", "version"),)

    digest: str = Field(primary_key=True, max_length=64)
    file_sha256: str = Field(max_length=64, index=True)
    model: str = Field(max_length=ID_LEN)
    version: int = Field(sa_type=sa.BigInteger)
    length: int = Field(sa_type=sa.BigInteger)
    profiles: list[str] = Field(default_factory=list, sa_type=sa.JSON)
    """Firmware profiles the bundle declares it supports."""
    manifest: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    signers: list[str] = Field(default_factory=list, sa_type=sa.JSON)
    """Key ids of the valid release signatures found on upload."""
    uploaded_at: datetime = Field(sa_type=UTCDateTime)
    uploaded_by: str = Field(max_length=128)


# -- rollouts ---------------------------------------------------------------------------------------------


class RolloutRecord(SQLModel, table=True):
    """A rollout: its definition (``spec``: phases, pacing, gates, timeouts as the API took them) and its
    state (the :class:`fleet_server.rollouts.RolloutState` fields). ``revision`` increases with every write
    (optimistic concurrency between the API and the rollout loop)."""

    __tablename__ = "rollouts"

    id: str = Field(primary_key=True, max_length=128)
    name: str = Field(default="", max_length=256)
    bundle_digest: str = Field(max_length=64, foreign_key="bundles.digest")
    model: str = Field(max_length=ID_LEN)
    version: int = Field(sa_type=sa.BigInteger)
    cohorts: list[str] = Field(default_factory=list, sa_type=sa.JSON)
    spec: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    status: str = Field(max_length=16, index=True)
    phase: int = 0
    phase_started_at: float | None = None
    reason: str | None = Field(default=None, max_length=2048)
    halt_rule: str | None = Field(default=None, max_length=32)
    rollback_to: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    changed_at: float | None = None
    created_at: datetime = Field(sa_type=UTCDateTime)
    created_by: str = Field(max_length=128)
    updated_at: datetime = Field(sa_type=UTCDateTime)
    revision: int = Field(default=0, sa_type=sa.BigInteger)


class RolloutDevice(SQLModel, table=True):
    """One device in one rollout: the :class:`fleet_server.rollouts.DeviceState` fields (times are unix
    seconds, as the pure policy takes them). Rows exist from the first order on; ``not_started`` devices
    have none."""

    __tablename__ = "rollout_devices"
    __table_args__ = (sa.Index(None, "rollout_id", "step"),)

    rollout_id: str = Field(primary_key=True, max_length=128, foreign_key="rollouts.id", ondelete="CASCADE")
    device_id: str = Field(primary_key=True, max_length=ID_LEN, foreign_key="devices.id", ondelete="CASCADE",
                           index=True)
    step: str = Field(max_length=16)
    since: float | None = None
    reason: str | None = Field(default=None, max_length=1024)
    command_id: str | None = Field(default=None, max_length=128, index=True)
    ordered_at: float | None = None
    attempts: int = 0
    rollback: bool = False


class CommandRecord(SQLModel, table=True):
    """A signed command to one device, kept until the device acknowledges it (any event naming its
    ``command_id``) or it expires; the bridge publishes it again at ``next_send_at`` until then."""

    __tablename__ = "commands"
    __table_args__ = (sa.Index(None, "state", "next_send_at"),)

    command_id: str = Field(primary_key=True, max_length=128)
    device_id: str = Field(max_length=ID_LEN, foreign_key="devices.id", ondelete="CASCADE", index=True)
    rollout_id: str | None = Field(default=None, max_length=128, index=True)
    kind: str = Field(max_length=16)
    """``deploy`` or ``cancel``."""
    sequence: int = Field(sa_type=sa.BigInteger)
    frame: bytes = Field(sa_type=sa.LargeBinary)
    """The encoded wire ``Command`` exactly as published (resent byte for byte)."""
    state: str = Field(max_length=16)
    """``pending`` (not yet acknowledged), ``acked`` or ``expired``."""
    created_at: float
    expires_at: float
    sends: int = 0
    last_sent_at: float | None = None
    next_send_at: float
    acked_at: float | None = None


class Counter(SQLModel, table=True):
    """A named counter or cursor (e.g. the last ``events.id`` the rollout loop consumed)."""

    __tablename__ = "counters"

    name: str = Field(primary_key=True, max_length=64)
    value: int = Field(default=0, sa_type=sa.BigInteger)


# -- users, tokens, sessions ------------------------------------------------------------------------------


class User(SQLModel, table=True):
    """A person who uses the API or the console, with one role (``viewer`` < ``operator`` <
    ``release_manager`` < ``admin``). Passwords are stored as scrypt hashes."""

    __tablename__ = "users"

    id: int | None = Field(default=None, primary_key=True)
    username: str = Field(max_length=64, unique=True)
    password_hash: str | None = Field(default=None, max_length=256)
    """``None``: the user cannot log in to the console (API tokens only)."""
    role: str = Field(max_length=32)
    disabled: bool = False
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class ApiToken(SQLModel, table=True):
    """A bearer token of a user. Only its sha256 is stored; the token is shown once at creation. Acts with
    its user's current role (capped by ``role`` when set)."""

    __tablename__ = "api_tokens"

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="users.id", ondelete="CASCADE", index=True)
    name: str = Field(max_length=128)
    token_hash: str = Field(max_length=64, unique=True)
    prefix: str = Field(max_length=16)
    """The first characters of the token, to tell tokens apart in listings."""
    role: str | None = Field(default=None, max_length=32)
    created_at: datetime = Field(sa_type=UTCDateTime)
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class SessionRecord(SQLModel, table=True):
    """A console session (server-side). The cookie holds a random id; only its sha256 is stored. Logout,
    disabling the user or changing their role ends it at once."""

    __tablename__ = "sessions"

    id_hash: str = Field(primary_key=True, max_length=64)
    user_id: int = Field(foreign_key="users.id", ondelete="CASCADE", index=True)
    csrf_hash: str = Field(max_length=64)
    role: str = Field(max_length=32)
    """The user's role at login: a session whose user's role changed since is refused."""
    created_at: datetime = Field(sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime, index=True)
    last_seen_at: datetime = Field(sa_type=UTCDateTime)


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
    """Who: a principal (``token:bootstrap``), or ``system:<job>`` for the server's own jobs."""
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
