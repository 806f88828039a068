"""``fleet-server serve``: the HTTP API, MQTT ingestion, the rollout loop with its command bridge, and the
retention schedule in one process.

Constructed with its settings; ``run()`` does the I/O. The database must already be at the newest migration
(``fleet-server db upgrade``): a server that migrates itself on start races its replicas, so it refuses instead
and says what to run.

Rollouts run when ``orders_key_file`` and ``download_token_secret`` are set: the orders key is loaded at start (an
unreadable or wrong key stops the start with the reason), a second MQTT connection publishes commands, and the
rollout loop ticks every ``rollout_interval_s``. Without them the server logs that rollouts are disabled, and the
rollouts API answers 503 to actions that would send orders, naming the settings to set.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from fleet_server.settings import FleetSettings

__all__ = ["FleetService", "NotMigratedError", "StartupError"]

log = logging.getLogger("fleet_server")


class StartupError(RuntimeError):
    """The service cannot start with these settings or this database (the message says why and what to do)."""


class NotMigratedError(StartupError):
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
        self.deploy: Any = None
        self._server: Any = None

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
        try:
            self.deploy = self._start_rollouts(engine)
        except Exception:
            engine.dispose()
            raise
        self.ingest.start()
        retention = threading.Thread(target=self._retention_loop, args=(engine,), name="retention", daemon=True)
        retention.start()
        app = create_app(s, engine=engine, metrics=self.ingest.metrics)
        if self.deploy is not None:
            app.state.deploy = self.deploy
            self.deploy.loop.start()
        server = self._server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port,
                                                              log_level="info", access_log=False))
        log.info("fleet-server listening on http://%s:%d, ingesting from mqtt://%s:%s", self.host, self.port,
                 s.mqtt_host, s.mqtt_port)
        try:
            server.run()  # handles SIGINT/SIGTERM itself
        finally:
            self._stop.set()
            if self.deploy is not None:
                self.deploy.loop.stop()
                self.deploy.publisher.stop()
            self.ingest.stop()
            engine.dispose()
        return 0

    def stop(self) -> None:
        """Ask a running :meth:`run` (in another thread) to shut down cleanly; it returns once it has."""
        self._stop.set()
        if self._server is not None:
            self._server.should_exit = True

    def _start_rollouts(self, engine: Any) -> Any:
        """The rollout runtime (signer, command publisher, bridge, loop; the loop not started yet), or ``None``
        when the settings do not allow rollouts (logged)."""
        from fleet_server.deploy.bridge import CommandBridge
        from fleet_server.deploy.loop import RolloutLoop
        from fleet_server.deploy.mqtt import MqttCommandPublisher
        from fleet_server.deploy.runtime import DeployRuntime
        from fleet_server.deploy.signing import OrderSigner, RolloutsDisabledError, rollouts_disabled_reason
        from fleet_server.mqtt import MqttError

        s = self.settings
        reason = rollouts_disabled_reason(s)
        if reason is not None:
            log.warning("%s; the rollouts API answers 503 to actions that send orders", reason)
            return None
        try:
            signer = OrderSigner.from_settings(s)
        except RolloutsDisabledError as exc:
            raise StartupError(str(exc)) from None
        publisher = MqttCommandPublisher(s)
        try:
            publisher.start()
        except MqttError as exc:
            raise StartupError(f"command publisher: {exc}") from None
        bridge = CommandBridge(engine, signer, publisher, resend_s=s.command_resend_s)
        log.info("rollouts enabled: orders signed with key %s..., loop every %.2f s", signer.keyid[:16],
                 s.rollout_interval_s)
        return DeployRuntime(bridge, RolloutLoop(engine, bridge, s), publisher)

    def _retention_loop(self, engine: Any) -> None:
        from fleet_server.retention import run_retention

        while not self._stop.wait(self.retention_every_s):
            try:
                run_retention(engine, now=time.time(), raw_days=self.settings.retention_raw_days,
                              hourly_days=self.settings.retention_hourly_days)
            except Exception:  # the top of a task: log, keep the schedule
                log.exception("retention run failed")
