"""Alembic migrations agree with the models, on SQLite and PostgreSQL; the CLI applies them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Engine

from fleet_server.db import create_db_engine
from fleet_server.migrate import current_revision, head_revision
from fleet_server.models import metadata
from tests.conftest import REPO


def test_migrations_match_the_models(engine: Engine) -> None:
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    assert diff == []
    assert current_revision(engine) == head_revision() == "0002"


def test_audit_log_is_append_only_in_the_database(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO audit_log (at, actor, action, target, outcome, detail) "
                             "VALUES (CURRENT_TIMESTAMP, 'a', 'x.y', 't', 'ok', '{}')"))
    for stmt in ("UPDATE audit_log SET outcome = 'failed'", "DELETE FROM audit_log"):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(sa.text(stmt))
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT outcome FROM audit_log")).scalars().all() == ["ok"]


def test_duplicate_window_refused_by_unique_constraint(engine: Engine) -> None:
    row = {"device_id": "d1", "stream": "drift", "seq": 7, "model": "m", "version": 1, "window_start": 0.0,
           "window_end": 1.0, "samples": 1, "features": "{}", "slis": "{}", "received_at": "2026-01-01 00:00:00"}
    insert = sa.text("INSERT INTO drift_windows (device_id, stream, seq, model, version, window_start, window_end,"
                     " samples, features, slis, received_at) VALUES (:device_id, :stream, :seq, :model, :version,"
                     " :window_start, :window_end, :samples, :features, :slis, :received_at)")
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO devices (id, first_seen_at, last_seen_at, models) "
                             "VALUES ('d1', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, '[]')"))
        conn.execute(insert, row)
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(insert, row)


def test_cli_db_upgrade_applies_the_migrations(db_url: str) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fleet_server", *args], capture_output=True, text=True,
                              timeout=120, cwd=REPO, env={"PATH": "/usr/bin:/bin"})

    r = cli("db", "current", "--database-url", db_url)
    assert r.returncode == 1 and "never migrated" in r.stdout
    r = cli("db", "upgrade", "--database-url", db_url)
    assert r.returncode == 0, r.stderr
    assert "-> 0002" in r.stdout
    engine = create_db_engine(db_url)
    try:
        assert current_revision(engine) == "0002"
    finally:
        engine.dispose()
    r = cli("db", "upgrade", "--database-url", db_url)
    assert r.returncode == 0 and "already at 0002" in r.stdout
    assert cli("db", "current", "--database-url", db_url).returncode == 0


def test_cli_db_reports_unreachable_database() -> None:
    r = subprocess.run([sys.executable, "-m", "fleet_server", "db", "upgrade", "--database-url",
                        "postgresql://nobody@127.0.0.1:9/none"], capture_output=True, text=True, timeout=120,
                       cwd=REPO)
    assert r.returncode == 1 and "127.0.0.1" in r.stderr and "Traceback" not in r.stderr
