"""``fleet-server serve``: the HTTP API, MQTT ingestion and the retention schedule in one process.

Constructed with its settings; ``run()`` does the I/O. The database must already be at the newest migration
(``fleet-server db upgrade``): a server that migrates itself on start races its replicas, so it refuses instead
and says what to run.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from fleet_server.settings import FleetSettings

__all__ = ["FleetService", "NotMigratedError"]

log = logging.getLogger("fleet_server")


class NotMigratedError(RuntimeError):
    """The database schema is not at the newest revision."""


class FleetService:
    def __init__(self, settings: FleetSettings, *, host: str = "127.0.0.1", port: int = 8080,
                 retention_every_s: float = 3600.0) -> None:
        self.settings = settings
        self.host = host
        self.port = port
        self.retention_every_s = retention_every_s
        self._stop = threading.Event()
        self.ingest: Any = None

    def run(self) -> int:
        import uvicorn

        from fleet_server.app import create_app
        from fleet_server.db import create_db_engine
        from fleet_server.ingest import BatchWriter, Ingestor
        from fleet_server.migrate import current_revision, head_revision
        from fleet_server.mqtt import MqttIngestService

        s = self.settings
        engine = create_db_engine(s.database_url, busy_timeout_ms=s.database_busy_timeout_ms)
        current, head = current_revision(engine), head_revision()
        if current != head:
            engine.dispose()
            raise NotMigratedError(f"the database is at {current or 'an empty schema'}, not {head}: "
                                   "run `fleet-server db upgrade` first")
        self.ingest = MqttIngestService(s, BatchWriter(engine, Ingestor(max_frame_bytes=s.ingest_max_frame_bytes)))
        self.ingest.start()
        retention = threading.Thread(target=self._retention_loop, args=(engine,), name="retention", daemon=True)
        retention.start()
        app = create_app(s, engine=engine, metrics=self.ingest.metrics)
        server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level="info",
                                               access_log=False))
        log.info("fleet-server listening on http://%s:%d, ingesting from mqtt://%s:%s", self.host, self.port,
                 s.mqtt_host, s.mqtt_port)
        try:
            server.run()  # handles SIGINT/SIGTERM itself
        finally:
            self._stop.set()
            self.ingest.stop()
            engine.dispose()
        return 0

    def _retention_loop(self, engine: Any) -> None:
        from fleet_server.retention import run_retention

        while not self._stop.wait(self.retention_every_s):
            try:
                run_retention(engine, now=time.time(), raw_days=self.settings.retention_raw_days,
                              hourly_days=self.settings.retention_hourly_days)
            except Exception:  # the top of a task: log, keep the schedule
                log.exception("retention run failed")
