"""The server's MQTT ingestion adapter (paho-mqtt 2.x; ``deploy/mqtt.py`` publishes commands, same client set-up).

:class:`MqttIngestService` owns one connection and feeds ingestion:

* **Session.** QoS 1 subscriptions to ``fleet/v1/+/drift``, ``+/events``, ``+/status`` and ``+/heartbeat`` with a
  persistent session (MQTT 5: ``clean_start=False`` and a session expiry; 3.1.1: ``clean_session=False``), so
  the broker queues device traffic while the server restarts. With ``mqtt_shared_group`` (MQTT 5) the filters
  are ``$share/{group}/fleet/v1/+/...`` and the broker spreads the traffic over the replicas in the group; the
  stream-state row locks keep ingestion exact when two replicas see the same (device, stream).
* **Batching.** paho's network thread only puts each message (topic, payload, arrival time) on a bounded
  queue. One writer thread takes up to ``ingest_batch_size`` messages, waiting at most
  ``ingest_ack_interval_s`` after the first one, writes them in one transaction (:class:`BatchWriter`) and then
  publishes the resulting acks (QoS 1) on each device's ``fleet/v1/{id}/acks``. A full queue blocks the network
  thread: back-pressure to the broker, which holds the rest in the session.
* **Database down.** The writer retries the same batch with capped, jittered backoff; nothing is acked
  meanwhile, so devices keep their messages.
* **Errors.** Settings paho cannot use (TLS files, ...) raise :class:`MqttError` from :meth:`start`. A lost
  connection is retried by paho (``reconnect_delay_set``) and shows in :meth:`stats`.

Tests and the demo pass ``client_factory`` to substitute the paho client.
"""

from __future__ import annotations

import logging
import queue
import random
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.protocol import Ack, Channel, device_topic, encode, shared_subscription, subscription
from fleet_server.db import DatabaseUnavailableError
from fleet_server.ingest import BatchWriter, IngestMetrics, Received
from fleet_server.settings import FleetSettings

__all__ = ["INGEST_CHANNELS", "ClientFactory", "MqttError", "MqttIngestService", "paho_client"]

log = logging.getLogger(__name__)

INGEST_CHANNELS = (Channel.DRIFT, Channel.EVENTS, Channel.STATUS, Channel.HEARTBEAT)
"""Device -> server channels the service subscribes to."""

ClientFactory = Callable[[str, MQTTProtocolVersion, bool], paho.Client]
"""``(client_id, protocol, clean_session) -> paho Client``."""


class MqttError(RuntimeError):
    """The MQTT connection cannot be set up with these settings (or the broker refused it)."""


def paho_client(client_id: str, protocol: MQTTProtocolVersion, persistent: bool) -> paho.Client:
    """A paho client with the VERSION2 callback API; ``persistent`` only matters for 3.1.1."""
    if protocol == MQTTProtocolVersion.MQTTv5:
        return paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    return paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                       clean_session=not persistent)


def configured_client(settings: FleetSettings, client_id: str, *, persistent: bool,
                      factory: ClientFactory = paho_client) -> paho.Client:
    """A client made by ``factory`` with the settings' protocol, TLS and credentials (no callbacks, not
    connected); :class:`MqttError` when the TLS files or credentials are unusable."""
    s = settings
    protocol = MQTTProtocolVersion.MQTTv5 if s.mqtt_protocol == "5" else MQTTProtocolVersion.MQTTv311
    client = factory(client_id, protocol, persistent)
    try:
        if s.mqtt_tls:
            client.tls_set(ca_certs=str(s.mqtt_ca_file) if s.mqtt_ca_file else None,
                           certfile=str(s.mqtt_cert_file) if s.mqtt_cert_file else None,
                           keyfile=str(s.mqtt_key_file) if s.mqtt_key_file else None,
                           tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if s.mqtt_username is not None:
            client.username_pw_set(s.mqtt_username, s.mqtt_password)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise MqttError(f"MQTT settings unusable: {exc}") from exc
    return client


class MqttIngestService:
    """Subscribe, batch, write, acknowledge. ``start()`` connects; ``stop()`` flushes and disconnects."""

    def __init__(self, settings: FleetSettings, writer: BatchWriter, *,
                 client_factory: ClientFactory = paho_client, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.settings = settings
        self.writer = writer
        self._factory = client_factory
        self._clock = clock
        self._sleep = sleep
        self._queue: queue.Queue[Received] = queue.Queue(maxsize=settings.ingest_queue_size)
        self._stopping = threading.Event()
        self._subscribed = threading.Event()
        self._client: paho.Client | None = None
        self._worker: threading.Thread | None = None
        self._connected = False
        self._connects = 0
        self._last_error = ""
        self._publish_failures = 0
        self._dropped_on_stop = 0

    @property
    def metrics(self) -> IngestMetrics:
        return self.writer.ingestor.metrics

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        s = self.settings
        protocol = MQTTProtocolVersion.MQTTv5 if s.mqtt_protocol == "5" else MQTTProtocolVersion.MQTTv311
        client = configured_client(s, s.mqtt_client_id, persistent=True, factory=self._factory)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.reconnect_delay_set(1, 30)
        client.max_queued_messages_set(100_000)
        props = None
        if protocol == MQTTProtocolVersion.MQTTv5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves it untyped
            props.SessionExpiryInterval = s.mqtt_session_expiry_s
        try:
            if protocol == MQTTProtocolVersion.MQTTv5:
                client.connect_async(s.mqtt_host, s.mqtt_port, keepalive=s.mqtt_keepalive_s, clean_start=False,
                                     properties=props)
            else:
                client.connect_async(s.mqtt_host, s.mqtt_port, keepalive=s.mqtt_keepalive_s)
        except (OSError, ValueError) as exc:
            raise MqttError(f"cannot connect to {s.mqtt_host}:{s.mqtt_port}: {exc}") from exc
        self._client = client
        self._stopping.clear()
        self._worker = threading.Thread(target=self._run, name="fleet-ingest", daemon=True)
        self._worker.start()
        client.loop_start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued (one last attempt), publish its acks, then disconnect."""
        self._stopping.set()
        if self._worker is not None:
            self._worker.join(timeout)
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
        self._connected = False

    def wait_subscribed(self, timeout: float) -> bool:
        """Block until the subscriptions are granted (``False`` on timeout)."""
        return self._subscribed.wait(timeout)

    def stats(self) -> dict[str, Any]:
        return {"connected": self._connected, "connects": self._connects, "queued": self._queue.qsize(),
                "last_error": self._last_error, "publish_failures": self._publish_failures,
                "dropped_on_stop": self._dropped_on_stop, **self.metrics.snapshot()}

    # -- paho callbacks (network thread) ----------------------------------------------------------------

    def _filters(self) -> list[str]:
        group = self.settings.mqtt_shared_group
        return [shared_subscription(group, ch) if group else subscription(ch) for ch in INGEST_CHANNELS]

    def _on_connect(self, client: paho.Client, userdata: object, flags: paho.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            self._last_error = f"connection refused: {reason_code}"
            log.error("mqtt: %s", self._last_error)
            return
        self._connected = True
        self._connects += 1
        log.info("mqtt: connected to %s:%s (session present: %s)", self.settings.mqtt_host,
                 self.settings.mqtt_port, flags.session_present)
        if self.settings.mqtt_protocol == "5":
            client.subscribe([(f, SubscribeOptions(qos=1)) for f in self._filters()])
        else:
            client.subscribe([(f, 1) for f in self._filters()])

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int, reason_codes: list[ReasonCode],
                      properties: Properties | None) -> None:
        failed = [str(rc) for rc in reason_codes if rc.is_failure]
        if failed:
            self._last_error = f"subscription refused: {', '.join(failed)}"
            log.error("mqtt: %s", self._last_error)
            return
        self._subscribed.set()

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: paho.DisconnectFlags,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        self._connected = False
        if not self._stopping.is_set():
            self._last_error = f"disconnected: {reason_code}"
            log.warning("mqtt: %s; paho reconnects", self._last_error)

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        item = Received(message.topic, bytes(message.payload), self._clock())
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if self._stopping.is_set():
                    self._dropped_on_stop += 1  # the device resends: it was never acked
                    return

    # -- the writer thread ------------------------------------------------------------------------------

    def _collect(self) -> list[Received]:
        s = self.settings
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + s.ingest_ack_interval_s
        while len(batch) < s.ingest_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            left = deadline - time.monotonic()
            if left <= 0 or self._stopping.is_set():
                break
            try:
                batch.append(self._queue.get(timeout=left))
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while not (self._stopping.is_set() and self._queue.empty()):
            batch = self._collect()
            if batch:
                self._write(batch)

    def _write(self, batch: list[Received]) -> None:
        delay = 0.5
        decoded = self.writer.ingestor.decode_all(batch)  # once: retries must not count rejects twice
        while True:
            try:
                result = self.writer.write_decoded(decoded, batch_size=len(batch))
            except DatabaseUnavailableError as exc:
                self._last_error = f"database: {exc}"
                if self._stopping.is_set():
                    log.error("mqtt: dropping %d messages at shutdown, database unavailable", len(batch))
                    return
                log.error("mqtt: database unavailable, retrying the batch in %.1f s: %s", delay, exc)
                self._sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not cryptography
                delay = min(delay * 2, 10.0)
                continue
            except Exception:  # top of the writer thread: it must survive; the batch is not acked
                log.exception("mqtt: unexpected error writing a batch of %d; dropped (devices resend)", len(batch))
                return
            self._publish(result.acks)
            return

    def _publish(self, acks: tuple[Ack, ...]) -> None:
        client = self._client
        if client is None:
            return
        for ack in acks:
            info = client.publish(device_topic(ack.device_id, Channel.ACKS), encode(ack), qos=1)
            if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
                self._publish_failures += 1
            else:
                self.metrics.acks_sent += 1
