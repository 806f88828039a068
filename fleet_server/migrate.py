"""Schema migrations (Alembic) driven from code: ``fleet-server db upgrade`` and the tests call these.

The migration scripts live in ``fleet_server/migrations`` (shipped inside the package, so no ``alembic.ini``
is needed). To write a new revision after changing :mod:`fleet_server.models`::

    python -c "from fleet_server.migrate import revision; revision('sqlite:///./dev.db', 'what changed')"

then review the generated file (autogenerate does not see triggers or data migrations).
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from fleet_server.db import normalize_url

__all__ = ["MIGRATIONS_DIR", "alembic_config", "current_revision", "head_revision", "revision", "upgrade"]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str | None = None, *, connection: sa.Connection | None = None) -> Config:
    """An Alembic config for ``url`` (or an open ``connection``), pointing at the packaged scripts."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser interpolation: a literal % in a password must be doubled.
        rendered = normalize_url(url).render_as_string(hide_password=False)
        cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def upgrade(target: str | Engine, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` on the database at ``target`` (a URL or an engine)."""
    if isinstance(target, Engine):
        with target.begin() as conn:
            command.upgrade(alembic_config(connection=conn), revision)
    else:
        command.upgrade(alembic_config(target), revision)


def head_revision() -> str | None:
    """The newest revision in the packaged scripts."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (``None``: never migrated)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def revision(url: str, message: str) -> None:
    """Autogenerate a new revision from the difference between the database at ``url`` (upgraded to head
    first) and the models. A development tool."""
    upgrade(url)
    command.revision(alembic_config(url), message=message, autogenerate=True)
