"""Alembic environment: migrates :data:`fleet_server.models.metadata`.

Run through ``fleet-server db upgrade`` (:mod:`fleet_server.migrate`), which passes the database URL (or an
open connection, in tests) in the Alembic config; no ``alembic.ini`` is needed.
"""

from __future__ import annotations

from alembic import context

from fleet_server.db import create_db_engine
from fleet_server.models import metadata

config = context.config


def _configure(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=metadata,
        compare_type=True,
        render_as_batch=True,  # SQLite can only ALTER by rebuilding the table
    )


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_db_engine(config.get_main_option("sqlalchemy.url") or "")
    try:
        with engine.connect() as conn:
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
