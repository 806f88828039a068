"""The app factory, probes and the auth placeholder."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from fleet_server.app import create_app
from fleet_server.db import create_db_engine
from fleet_server.settings import FleetSettings
from tests.server.support import AUTH, TOKEN


def test_importing_the_app_creates_no_engine_and_reads_no_settings() -> None:
    import importlib

    import fleet_server.app as app_module

    importlib.reload(app_module)
    assert not [n for n, v in vars(app_module).items() if isinstance(v, (Engine, FleetSettings))]


def test_healthz_and_readyz_when_migrated(client: TestClient) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "database": "ok", "schema": "0002"}


def test_readyz_refuses_an_unmigrated_database(db_url: str) -> None:
    engine = create_db_engine(db_url)
    try:
        with TestClient(create_app(FleetSettings(database_url=db_url), engine=engine)) as c:
            r = c.get("/readyz")
        assert r.status_code == 503 and "fleet-server db upgrade" in r.json()["schema"]
    finally:
        engine.dispose()


def test_readyz_reports_an_unreachable_database() -> None:
    # Port 9 (discard) on localhost: nothing listens. Building the app must not touch the database.
    app = create_app(FleetSettings(database_url="postgresql://nobody@127.0.0.1:9/none"))
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["status"] == "unavailable" and "unreachable" in r.json()["database"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-0123456789"},
                                     {"Authorization": f"Basic {TOKEN}"}])
def test_api_denies_missing_or_wrong_token(client: TestClient, headers: dict[str, str]) -> None:
    r = client.get("/api/v1/drift", params={"model": "m", "version": 1}, headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_api_denies_everyone_when_no_token_is_configured(db_url: str, engine: Engine) -> None:
    with TestClient(create_app(FleetSettings(database_url=db_url), engine=engine)) as c:
        assert c.get("/api/v1/drift", params={"model": "m", "version": 1}, headers=AUTH).status_code == 401
        assert c.get("/metrics", headers=AUTH).status_code == 401


def test_api_admits_the_static_token(client: TestClient) -> None:
    r = client.get("/api/v1/drift", params={"model": "m", "version": 1}, headers=AUTH)
    assert r.status_code == 200 and r.json()["windows"] == 0 and r.json()["summary"] is None


def test_every_api_route_requires_a_role(client: TestClient) -> None:
    """Every route under /api and /metrics requires a role, except logging in (the role x route matrix in
    test_rbac_matrix.py checks each one's answers)."""
    from fleet_server.auth.policy import PUBLIC, iter_routes

    routes = [r for r in iter_routes(client.app) if r.path.startswith(("/api/", "/metrics"))]  # type: ignore[arg-type]
    assert len(routes) > 40  # the walk sees the included routers (not a vacuous pass)
    open_routes = [r.path for r in routes if r.policy in (None, PUBLIC) and r.path != "/api/v1/auth/login"]
    assert open_routes == []


def test_metrics_expose_the_ingestion_counters(db_url: str, engine: Engine) -> None:
    from fleet_server.ingest import BatchWriter, Ingestor
    from tests.server.support import baseline, frame, raw, window

    writer = BatchWriter(engine, Ingestor(max_frame_bytes=256 * 1024))
    w = frame(window("cam-1", 0, baseline()))
    writer.write([w, w, raw("fleet/v1/cam-1/drift", b"\x07")])
    app = create_app(FleetSettings(database_url=db_url, api_token=TOKEN), engine=engine,
                     metrics=writer.ingestor.metrics)
    with TestClient(app) as c:
        text = c.get("/metrics", headers=AUTH).text
    assert 'fleet_ingest_stored_total{stream="drift"} 1' in text
    assert "fleet_ingest_duplicates_total 1" in text
    assert 'fleet_ingest_rejected_total{reason="malformed"} 1' in text
