"""Initial schema: devices, drift windows, events, stream states, rollups, baselines, audit log.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite: INTEGER PRIMARY KEY = rowid alias
UTC = sa.DateTime(timezone=True)


def _id() -> sa.Column[int]:
    return sa.Column("id", BigId, nullable=False)


def _rollup(name: str) -> None:
    op.create_table(
        name,
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("bucket_start", sa.BigInteger(), nullable=False),
        sa.Column("windows", sa.BigInteger(), nullable=False),
        sa.Column("samples", sa.BigInteger(), nullable=False),
        sa.Column("first_window_start", sa.Float(), nullable=False),
        sa.Column("last_window_end", sa.Float(), nullable=False),
        sa.Column("features", sa.JSON(), nullable=False),
        sa.Column("updated_at", UTC, nullable=False),
        _id(),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name=op.f(f"fk_{name}_device_id_devices")),
        sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{name}")),
        sa.UniqueConstraint("device_id", "model", "version", "bucket_start",
                            name=op.f(f"uq_{name}_device_id_model_version_bucket_start")),
    )
    op.create_index(op.f(f"ix_{name}_model_version_bucket_start"), name, ["model", "version", "bucket_start"])


# The audit log is append-only: the database itself refuses UPDATE and DELETE (autogenerate does not see
# triggers; keep them when the table changes).
_PG_AUDIT = """
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END;
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
"""
# Drift histograms are large JSON values (~18 KB for 32 features x 16 bins). PostgreSQL compresses them in TOAST;
# lz4 (PostgreSQL 14+, when built with it) makes inserts ~2x faster than the default pglz for ~10 % more space.
# Servers without lz4 keep pglz.
_PG_LZ4 = """
DO $$ BEGIN
    ALTER TABLE drift_windows ALTER COLUMN features SET COMPRESSION lz4;
    ALTER TABLE drift_rollups_hourly ALTER COLUMN features SET COMPRESSION lz4;
    ALTER TABLE drift_rollups_daily ALTER COLUMN features SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR syntax_error OR invalid_parameter_value THEN
    RAISE NOTICE 'lz4 TOAST compression unavailable; keeping the default';
END $$;
"""
_SQLITE_AUDIT = (
    "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
    "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
)


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("first_seen_at", UTC, nullable=False),
        sa.Column("last_seen_at", UTC, nullable=False),
        sa.Column("last_status", sa.String(16), nullable=True),
        sa.Column("last_status_at", UTC, nullable=True),
        sa.Column("agent_version", sa.String(64), nullable=True),
        sa.Column("schema_version", sa.String(16), nullable=True),
        sa.Column("models", sa.JSON(), nullable=False),
        sa.Column("uptime_s", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
    )
    op.create_table(
        "drift_windows",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("stream", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("window_start", sa.Float(), nullable=False),
        sa.Column("window_end", sa.Float(), nullable=False),
        sa.Column("samples", sa.BigInteger(), nullable=False),
        sa.Column("replaces_first", sa.BigInteger(), nullable=True),
        sa.Column("replaces_last", sa.BigInteger(), nullable=True),
        sa.Column("features", sa.JSON(), nullable=False),
        sa.Column("slis", sa.JSON(), nullable=False),
        sa.Column("received_at", UTC, nullable=False),
        _id(),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name=op.f("fk_drift_windows_device_id_devices")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drift_windows")),
        sa.UniqueConstraint("device_id", "stream", "seq", name=op.f("uq_drift_windows_device_id_stream_seq")),
    )
    op.create_index(op.f("ix_drift_windows_model_version_window_start"), "drift_windows",
                    ["model", "version", "window_start"])
    op.create_index(op.f("ix_drift_windows_window_start"), "drift_windows", ["window_start"])
    op.create_table(
        "events",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("stream", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("command_id", sa.String(128), nullable=True),
        sa.Column("model", sa.String(64), nullable=True),
        sa.Column("version", sa.BigInteger(), nullable=True),
        sa.Column("reason", sa.String(1024), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("received_at", UTC, nullable=False),
        _id(),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name=op.f("fk_events_device_id_devices")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
        sa.UniqueConstraint("device_id", "stream", "seq", name=op.f("uq_events_device_id_stream_seq")),
    )
    op.create_index(op.f("ix_events_command_id"), "events", ["command_id"])
    op.create_table(
        "stream_states",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("stream", sa.String(64), nullable=False),
        sa.Column("ranges", sa.JSON(), nullable=False),
        sa.Column("received_count", sa.BigInteger(), nullable=False),
        sa.Column("duplicates", sa.BigInteger(), nullable=False),
        sa.Column("high_water", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", UTC, nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name=op.f("fk_stream_states_device_id_devices")),
        sa.PrimaryKeyConstraint("device_id", "stream", name=op.f("pk_stream_states")),
    )
    _rollup("drift_rollups_hourly")
    _rollup("drift_rollups_daily")
    op.create_table(
        "baselines",
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.Column("thresholds", sa.JSON(), nullable=False),
        sa.Column("updated_at", UTC, nullable=False),
        sa.Column("updated_by", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("model", "version", name=op.f("pk_baselines")),
    )
    op.create_table(
        "audit_log",
        sa.Column("at", UTC, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(256), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        _id(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index(op.f("ix_audit_log_at"), "audit_log", ["at"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_AUDIT)
        op.execute(_PG_LZ4)
    else:
        for stmt in _SQLITE_AUDIT:
            op.execute(stmt)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log")
        op.execute("DROP FUNCTION IF EXISTS audit_log_append_only()")
    for table in ("audit_log", "baselines", "drift_rollups_daily", "drift_rollups_hourly", "stream_states",
                  "events", "drift_windows", "devices"):
        op.drop_table(table)
