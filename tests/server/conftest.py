"""Fixtures of the server tests: a migrated database on SQLite and PostgreSQL, the app, the ingest writer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from fleet_server.app import create_app
from fleet_server.db import create_db_engine
from fleet_server.ingest import BatchWriter, Ingestor
from fleet_server.migrate import upgrade
from fleet_server.settings import FleetSettings
from tests.server.support import TOKEN


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """A database migrated to head (SQLite file or fresh PostgreSQL database)."""
    eng = create_db_engine(db_url)
    upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def settings(db_url: str) -> FleetSettings:
    return FleetSettings(database_url=db_url, api_token=TOKEN)


@pytest.fixture
def client(settings: FleetSettings, engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(settings, engine=engine)) as c:
        yield c


@pytest.fixture
def writer(engine: Engine) -> BatchWriter:
    return BatchWriter(engine, Ingestor(max_frame_bytes=256 * 1024))
