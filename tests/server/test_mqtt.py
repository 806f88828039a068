"""The MQTT adapter over a real broker (mosquitto): subscribe with a persistent session, batch, store, ack."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol import Ack, decode_for_topic, encode, message_topic
from fleet_server.db import create_db_engine
from fleet_server.ingest import BatchWriter, Ingestor
from fleet_server.migrate import upgrade
from fleet_server.mqtt import MqttIngestService
from fleet_server.settings import FleetSettings
from tests.server.support import baseline, heartbeat, window

BASE = baseline()


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.integration
def test_server_ingests_over_mosquitto_and_catches_up_after_a_restart(mosquitto: Any, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    engine = create_db_engine(url)
    upgrade(engine)
    settings = FleetSettings(database_url=url, mqtt_host=mosquitto.host, mqtt_port=mosquitto.port,
                             ingest_ack_interval_s=0.05)

    def service() -> MqttIngestService:
        ingestor = Ingestor(max_frame_bytes=settings.ingest_max_frame_bytes)
        svc = MqttIngestService(settings, BatchWriter(engine, ingestor))
        svc.start()
        assert svc.wait_subscribed(10)
        return svc

    acks: list[Ack] = []
    lock = threading.Lock()
    device = paho.Client(CallbackAPIVersion.VERSION2, client_id="cam-1")

    def on_message(client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        ack = decode_for_topic(msg.topic, msg.payload)
        assert isinstance(ack, Ack)
        with lock:
            acks.append(ack)

    device.on_message = on_message
    device.connect(mosquitto.host, mosquitto.port)
    device.loop_start()
    device.subscribe("fleet/v1/cam-1/acks", qos=1)

    def publish(*seqs: int) -> None:
        for seq in seqs:
            w = window("cam-1", seq, BASE, rows=20)
            device.publish(message_topic(w), encode(w), qos=1).wait_for_publish(5)

    svc = service()
    try:
        publish(0, 1, 1, 3)
        device.publish(message_topic(heartbeat("cam-1")), encode(heartbeat("cam-1")), qos=1)
        wait_for(lambda: any(a.seqs == ((0, 1), (3, 3)) for a in acks))
        assert [a for a in acks if a.seqs == ((0, 1), (3, 3))][-1].missing == ((2, 2),)
        assert svc.metrics.duplicates == 1 and svc.metrics.heartbeats == 1
    finally:
        svc.stop()
    # While the server is away the broker queues for its persistent session; a new process catches up.
    publish(2, 4)
    svc = service()
    try:
        wait_for(lambda: any(a.seqs == ((0, 4),) and a.missing == () for a in acks))
        assert svc.stats()["connected"] is True
    finally:
        svc.stop()
        device.loop_stop()
        device.disconnect()
    with engine.connect() as conn:
        seqs = conn.execute(sa.text("SELECT seq FROM drift_windows ORDER BY seq")).scalars().all()
        dups = conn.execute(sa.text("SELECT duplicates FROM stream_states")).scalar_one()
    assert seqs == [0, 1, 2, 3, 4] and dups == 1
    engine.dispose()


def test_subscriptions_plain_and_shared(tmp_path: Path) -> None:
    from fleet_server.mqtt import MqttIngestService

    engine = create_db_engine(f"sqlite:///{tmp_path / 'f.db'}")
    writer = BatchWriter(engine, Ingestor(max_frame_bytes=1024))
    plain = MqttIngestService(FleetSettings(), writer)
    assert plain._filters() == ["fleet/v1/+/drift", "fleet/v1/+/events", "fleet/v1/+/status", "fleet/v1/+/heartbeat"]
    shared = MqttIngestService(FleetSettings(mqtt_shared_group="ingest"), writer)
    assert shared._filters()[0] == "$share/ingest/fleet/v1/+/drift" and len(shared._filters()) == 4
    engine.dispose()


def test_writer_thread_retries_a_batch_while_the_database_is_down(tmp_path: Path) -> None:
    """Nothing is acked while the database is unavailable; the same batch is retried with backoff, and
    rejects are counted once, not once per retry."""
    from fleet_server.db import DatabaseUnavailableError
    from fleet_server.mqtt import MqttIngestService
    from tests.server.support import frame, raw

    engine = create_db_engine(f"sqlite:///{tmp_path / 'f.db'}")
    upgrade(engine)
    writer = BatchWriter(engine, Ingestor(max_frame_bytes=256 * 1024))
    real = writer.write_decoded
    failures = [DatabaseUnavailableError("down"), DatabaseUnavailableError("still down")]

    def flaky(*args: Any, **kw: Any) -> Any:
        if failures:
            raise failures.pop(0)
        return real(*args, **kw)

    writer.write_decoded = flaky  # type: ignore[method-assign]
    published: list[tuple[str, bytes]] = []

    class FakeClient:
        def publish(self, topic: str, payload: bytes, qos: int) -> Any:
            published.append((topic, payload))
            return paho.MQTTMessageInfo(1)

    sleeps: list[float] = []
    svc = MqttIngestService(FleetSettings(), writer, sleep=sleeps.append)
    svc._client = FakeClient()  # type: ignore[assignment]
    svc._write([frame(window("cam-1", 0, BASE)), raw("fleet/v1/cam-1/drift", b"junk")])
    assert len(sleeps) == 2 and sleeps[1] > sleeps[0] * 0.9
    assert [t for t, _ in published] == ["fleet/v1/cam-1/acks"]
    assert svc.metrics.rejected["malformed"] == 1 and svc.metrics.windows_stored == 1 and svc.metrics.acks_sent == 1
    engine.dispose()
