"""The FastAPI application, built by :func:`create_app` from a settings object (nothing at import time).

Probes (no authentication, for load balancers and orchestrators):

* ``GET /healthz``: the process serves HTTP (liveness).
* ``GET /readyz``: the database answers and its schema is at the packaged migration head (readiness);
  503 otherwise, with the reason.

Everything else lives under ``/api/v1`` and requires a role (:func:`fleet_server.api.require_role`).
``GET /metrics`` (role ``viewer``) exposes the ingestion counters in the Prometheus text format when an
ingestion service runs in the process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy.engine import Engine

from agent import __version__
from fleet_server.api import (
    Principal,
    audit,
    auth,
    bundles,
    cohorts,
    devices,
    drift,
    require_role,
    rollouts,
    users,
    versions,
)
from fleet_server.api import http as http_conformance
from fleet_server.api.deps import public
from fleet_server.auth.policy import check_route_policies
from fleet_server.db import DatabaseUnavailableError, create_db_engine, ping, session_factory
from fleet_server.ingest import IngestMetrics
from fleet_server.migrate import current_revision, head_revision
from fleet_server.settings import FleetSettings

__all__ = ["create_app"]


def create_app(settings: FleetSettings, *, engine: Engine | None = None,
               metrics: IngestMetrics | None = None) -> FastAPI:
    """Build the app. ``engine`` defaults to one made from ``settings.database_url`` (disposed at shutdown);
    ``metrics`` are the counters of an ingestion service running alongside, if any."""
    owned = engine is None
    db = engine if engine is not None else create_db_engine(
        settings.database_url, busy_timeout_ms=settings.database_busy_timeout_ms,
        pool_size=settings.database_pool_size)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        if owned:
            db.dispose()

    app = FastAPI(title="fleet-server", version=__version__, lifespan=lifespan,
                  description="Device registry, staged rollouts and telemetry for edge-agent fleets.")
    app.state.settings = settings
    app.state.engine = db
    app.state.sessions = session_factory(db)
    app.state.metrics = metrics
    head = head_revision()

    @app.get("/healthz", tags=["probes"], dependencies=[Depends(public)])
    def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/readyz", tags=["probes"], dependencies=[Depends(public)])
    def readyz(request: Request) -> Response:
        eng: Engine = request.app.state.engine
        try:
            ping(eng)
            current = current_revision(eng)
        except DatabaseUnavailableError as exc:
            return JSONResponse({"status": "unavailable", "database": str(exc)}, status_code=503)
        if current != head:
            return JSONResponse({"status": "unavailable", "database": "ok",
                                 "schema": f"at {current}, expected {head}: run 'fleet-server db upgrade'"},
                                status_code=503)
        return JSONResponse({"status": "ok", "database": "ok", "schema": current})

    @app.get("/metrics", tags=["probes"], response_class=PlainTextResponse)
    def prometheus(request: Request, _: Annotated[Principal, Depends(require_role("viewer"))]) -> Any:
        m: IngestMetrics | None = request.app.state.metrics
        text = m.prometheus() if m is not None else ""
        from fleet_server.bundles import bundle_metrics
        from fleet_server.deploy.metrics import rollout_metrics
        from fleet_server.models import utcnow
        from fleet_server.registry.metrics import registry_metrics

        eng: Engine = request.app.state.engine
        with eng.connect() as conn:  # devices by state (online/offline/stale/never/revoked)
            text += registry_metrics(conn, utcnow(), request.app.state.settings.device_stale_after_s)
        text += bundle_metrics()
        deploy = getattr(request.app.state, "deploy", None)  # the bridge and loop, when they run in this process
        text += deploy.metrics(eng) if deploy is not None else rollout_metrics(eng)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    for module in (auth, users, audit, devices, cohorts, versions, bundles, rollouts, drift):
        app.include_router(module.router)
    app.include_router(bundles.download_router)
    from fleet_server import console

    app.include_router(console.router)
    http_conformance.install(app)  # 405 Allow lists every method of the path; bad UTF-8 bodies are 422
    check_route_policies(app)  # deny by default: a route without a policy stops the app from being built
    return app
