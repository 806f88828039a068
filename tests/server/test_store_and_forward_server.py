"""The store-and-forward acceptance of the telemetry issue against the REAL fleet server ingestion (MQTT adapter,
batched writer, database), not a test stub: every window stored exactly once after a broker outage with the agent
SIGKILLed three times, and after the server itself was away while devices published 1 500 windows."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from fleet_server.db import create_db_engine
from fleet_server.ingest import BatchWriter, Ingestor
from fleet_server.migrate import upgrade
from fleet_server.mqtt import MqttIngestService
from fleet_server.settings import FleetSettings
from tests.services.mqtt import MosquittoBroker, wait_until
from tests.telemetry.agent_harness import window_frame
from tests.telemetry.test_store_and_forward import DEV, Device, Harness

pytestmark = pytest.mark.integration


class FleetServer:
    """The fleet server's ingestion (persistent MQTT session, fixed client id) over a SQLite database."""

    def __init__(self, broker: MosquittoBroker, db: Path) -> None:
        self.url = f"sqlite:///{db}"
        self.engine = create_db_engine(self.url)
        upgrade(self.engine)
        self.settings = FleetSettings(database_url=self.url, mqtt_host=broker.host, mqtt_port=broker.port,
                                      ingest_ack_interval_s=0.05)
        self.svc: MqttIngestService | None = None

    def connect(self) -> None:
        self.svc = MqttIngestService(self.settings, BatchWriter(self.engine, Ingestor(
            max_frame_bytes=self.settings.ingest_max_frame_bytes)))
        self.svc.start()
        assert self.svc.wait_subscribed(15)

    def disconnect(self) -> None:
        if self.svc is not None:
            self.svc.stop()
            self.svc = None

    def seqs(self, device: str = DEV) -> list[int]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.text(
                "SELECT seq FROM drift_windows WHERE device_id = :d AND stream = 'drift' ORDER BY seq"),
                {"d": device}).scalars())

    def count(self, device: str = DEV) -> int:
        return len(self.seqs(device))


def test_outage_with_agent_killed_three_times_every_window_stored_once(mosquitto: MosquittoBroker,
                                                                       tmp_path: Path) -> None:
    n = 1000
    server = FleetServer(mosquitto, tmp_path / "fleet.db")
    server.connect()
    harness = Harness(mosquitto, tmp_path / "outbox.sqlite", n, "--produce-interval", "0.001",
                      "--drain-rate", "300", "--ack-timeout", "1.0")
    try:
        mosquitto.stop()  # broker down: the device keeps producing into its outbox
        for kill_at in (300, 650):
            harness.start()
            wait_until(lambda k=kill_at: harness.produced >= k, 30, what=f"{kill_at} windows produced")
            harness.kill()
        harness.start()
        wait_until(lambda: harness.saw("produced-all"), 30, what="all windows produced")
        mosquitto.start()
        wait_until(lambda: server.count() >= 200, 60, what="the drain to reach the server")
        harness.kill()  # and killed once more while draining
        assert server.count() < n
        harness.start()
        wait_until(lambda: server.count() == n, 90, what="every window in the fleet server's database")
        wait_until(lambda: harness.saw("drained"), 30, what="the device outbox to empty (server acks)")
        assert server.seqs() == list(range(n))  # exactly once each: the table's unique key forbids more
        assert harness.kills == 3
    finally:
        harness.close()
        server.disconnect()


def test_server_away_1500_windows_stored_after_it_returns(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    n = 1500
    server = FleetServer(mosquitto, tmp_path / "fleet.db")
    server.connect()  # its persistent session exists ...
    server.disconnect()  # ... then the fleet server goes away
    device = Device(mosquitto, tmp_path / "outbox.sqlite", max_in_flight=2000, drain_rate=3000.0,
                    ack_timeout_s=1.0, ack_timeout_max_s=2.0)
    mqtt = device.start()
    try:
        assert device.outbox is not None
        for _ in range(n):
            device.outbox.append("drift", lambda seq: window_frame(DEV, seq, time.time()))
        wait_until(lambda: mqtt.stats().published >= n, 30, what="the device to publish every window")
        time.sleep(0.5)
        server.connect()  # the server returns; mosquitto kept at most 1 000 for it (default settings)
        wait_until(lambda: server.count() == n, 90, what="all 1500 windows in the database")
        wait_until(lambda: device.outbox is not None and device.outbox.stats().pending == 0, 30,
                   what="the device outbox to empty")
        assert server.seqs() == list(range(n))
        assert "Outgoing messages are being dropped" in mosquitto.log_text()  # the broker did drop some
    finally:
        device.stop()
        server.disconnect()
