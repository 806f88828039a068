"""Registry, cohorts, version tracking, bundles, rollouts, commands, users, API tokens and sessions.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 11:01:52.080772
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

UTC = sa.DateTime(timezone=True)
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite: INTEGER PRIMARY KEY = rowid alias

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "bundles",
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("file_sha256", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("profiles", sa.JSON(), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("signers", sa.JSON(), nullable=False),
        sa.Column("uploaded_at", UTC, nullable=False),
        sa.Column("uploaded_by", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("digest", name=op.f("pk_bundles")),
        sa.UniqueConstraint("model", "version", name=op.f("uq_bundles_model_version")),
    )
    with op.batch_alter_table("bundles", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_bundles_file_sha256"), ["file_sha256"], unique=False)

    op.create_table(
        "cohorts",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("description", sa.String(length=1024), nullable=False),
        sa.Column("selector", sa.JSON(), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("updated_at", UTC, nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_cohorts")),
    )
    op.create_table(
        "counters",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_counters")),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(length=256), nullable=True),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("updated_at", UTC, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("username", name=op.f("uq_users_username")),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=True),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("expires_at", UTC, nullable=True),
        sa.Column("revoked_at", UTC, nullable=True),
        sa.Column("last_used_at", UTC, nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_api_tokens_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_tokens_user_id"), ["user_id"], unique=False)

    op.create_table(
        "cohort_members",
        sa.Column("cohort", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("added_at", UTC, nullable=False),
        sa.Column("added_by", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(
            ["cohort"], ["cohorts.name"], name=op.f("fk_cohort_members_cohort_cohorts"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_cohort_members_device_id_devices"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("cohort", "device_id", name=op.f("pk_cohort_members")),
    )
    with op.batch_alter_table("cohort_members", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_cohort_members_device_id"), ["device_id"], unique=False)

    op.create_table(
        "commands",
        sa.Column("command_id", sa.String(length=128), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("rollout_id", sa.String(length=128), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("frame", sa.LargeBinary(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("sends", sa.Integer(), nullable=False),
        sa.Column("last_sent_at", sa.Float(), nullable=True),
        sa.Column("next_send_at", sa.Float(), nullable=False),
        sa.Column("acked_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_commands_device_id_devices"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("command_id", name=op.f("pk_commands")),
    )
    with op.batch_alter_table("commands", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_commands_device_id"), ["device_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_commands_rollout_id"), ["rollout_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_commands_state_next_send_at"), ["state", "next_send_at"], unique=False)

    op.create_table(
        "device_labels",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_device_labels_device_id_devices"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("device_id", "key", name=op.f("pk_device_labels")),
    )
    with op.batch_alter_table("device_labels", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_device_labels_key_value"), ["key", "value"], unique=False)

    op.create_table(
        "device_models",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("previous_version", sa.BigInteger(), nullable=True),
        sa.Column("healthy", sa.Boolean(), nullable=True),
        sa.Column("changed_at", UTC, nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_device_models_device_id_devices"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("device_id", "model", name=op.f("pk_device_models")),
    )
    with op.batch_alter_table("device_models", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_device_models_model_version"), ["model", "version"], unique=False)

    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("bundle_digest", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("cohorts", sa.JSON(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("phase", sa.Integer(), nullable=False),
        sa.Column("phase_started_at", sa.Float(), nullable=True),
        sa.Column("reason", sa.String(length=2048), nullable=True),
        sa.Column("halt_rule", sa.String(length=32), nullable=True),
        sa.Column("rollback_to", sa.JSON(), nullable=True),
        sa.Column("changed_at", sa.Float(), nullable=True),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("updated_at", UTC, nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["bundle_digest"], ["bundles.digest"], name=op.f("fk_rollouts_bundle_digest_bundles")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollouts")),
    )
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rollouts_status"), ["status"], unique=False)

    op.create_table(
        "sessions",
        sa.Column("id_hash", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("csrf_hash", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("expires_at", UTC, nullable=False),
        sa.Column("last_seen_at", UTC, nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_sessions_user_id_users"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id_hash", name=op.f("pk_sessions")),
    )
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sessions_expires_at"), ["expires_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_sessions_user_id"), ["user_id"], unique=False)

    op.create_table(
        "version_changes",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("from_version", sa.BigInteger(), nullable=True),
        sa.Column("to_version", sa.BigInteger(), nullable=False),
        sa.Column("at", UTC, nullable=False),
        sa.Column("rollout_id", sa.String(length=128), nullable=True),
        sa.Column("command_id", sa.String(length=128), nullable=True),
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_version_changes_device_id_devices"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_version_changes")),
    )
    with op.batch_alter_table("version_changes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_version_changes_device_id_at"), ["device_id", "at"], unique=False)
        batch_op.create_index(batch_op.f("ix_version_changes_model_to_version"), ["model", "to_version"], unique=False)

    op.create_table(
        "rollout_devices",
        sa.Column("rollout_id", sa.String(length=128), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("step", sa.String(length=16), nullable=False),
        sa.Column("since", sa.Float(), nullable=True),
        sa.Column("reason", sa.String(length=1024), nullable=True),
        sa.Column("command_id", sa.String(length=128), nullable=True),
        sa.Column("ordered_at", sa.Float(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("rollback", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_rollout_devices_device_id_devices"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["rollout_id"], ["rollouts.id"], name=op.f("fk_rollout_devices_rollout_id_rollouts"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("rollout_id", "device_id", name=op.f("pk_rollout_devices")),
    )
    with op.batch_alter_table("rollout_devices", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rollout_devices_command_id"), ["command_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_rollout_devices_device_id"), ["device_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_rollout_devices_rollout_id_step"), ["rollout_id", "step"], unique=False)

    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("heartbeat_at", UTC, nullable=True))
        batch_op.add_column(sa.Column("firmware_profile", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("hardware", sa.JSON(), nullable=False, server_default="{}"))
        batch_op.add_column(sa.Column("registered_at", UTC, nullable=True))
        batch_op.add_column(sa.Column("registered_by", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("revoked_at", UTC, nullable=True))
        batch_op.add_column(sa.Column("order_sequence", sa.BigInteger(), nullable=False, server_default="0"))
        batch_op.alter_column("first_seen_at", existing_type=UTC, nullable=True)
        batch_op.alter_column("last_seen_at", existing_type=UTC, nullable=True)
        batch_op.create_index(batch_op.f("ix_devices_last_seen_at"), ["last_seen_at"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_devices_last_status_last_seen_at"), ["last_status", "last_seen_at"], unique=False
        )


def downgrade() -> None:

    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_devices_last_status_last_seen_at"))
        batch_op.drop_index(batch_op.f("ix_devices_last_seen_at"))
        batch_op.alter_column("last_seen_at", existing_type=UTC, nullable=False)
        batch_op.alter_column("first_seen_at", existing_type=UTC, nullable=False)
        batch_op.drop_column("order_sequence")
        batch_op.drop_column("revoked_at")
        batch_op.drop_column("registered_by")
        batch_op.drop_column("registered_at")
        batch_op.drop_column("hardware")
        batch_op.drop_column("firmware_profile")
        batch_op.drop_column("heartbeat_at")

    with op.batch_alter_table("rollout_devices", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rollout_devices_rollout_id_step"))
        batch_op.drop_index(batch_op.f("ix_rollout_devices_device_id"))
        batch_op.drop_index(batch_op.f("ix_rollout_devices_command_id"))

    op.drop_table("rollout_devices")
    with op.batch_alter_table("version_changes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_version_changes_model_to_version"))
        batch_op.drop_index(batch_op.f("ix_version_changes_device_id_at"))

    op.drop_table("version_changes")
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sessions_user_id"))
        batch_op.drop_index(batch_op.f("ix_sessions_expires_at"))

    op.drop_table("sessions")
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rollouts_status"))

    op.drop_table("rollouts")
    with op.batch_alter_table("device_models", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_models_model_version"))

    op.drop_table("device_models")
    with op.batch_alter_table("device_labels", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_labels_key_value"))

    op.drop_table("device_labels")
    with op.batch_alter_table("commands", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_commands_state_next_send_at"))
        batch_op.drop_index(batch_op.f("ix_commands_rollout_id"))
        batch_op.drop_index(batch_op.f("ix_commands_device_id"))

    op.drop_table("commands")
    with op.batch_alter_table("cohort_members", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_cohort_members_device_id"))

    op.drop_table("cohort_members")
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_tokens_user_id"))

    op.drop_table("api_tokens")
    op.drop_table("users")
    op.drop_table("counters")
    op.drop_table("cohorts")
    with op.batch_alter_table("bundles", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_bundles_file_sha256"))

    op.drop_table("bundles")
