"""The command bridge's MQTT adapter: one paho client that publishes command frames at QoS 1.

A connection of its own (client id ``{mqtt_client_id}-cmd``, clean session: it subscribes to nothing), with the
same broker, TLS and credential settings as ingestion (:mod:`fleet_server.mqtt`). paho reconnects by itself; a
publish while disconnected returns ``False`` and the bridge's resend schedule covers it. At most ``max_inflight``
(default 20) publishes wait for their PUBACK at once: mosquitto's default Receive Maximum, which paho does not read
from the broker by itself (a client exceeding it may be disconnected). ``pending()`` and
``flush()`` expose the QoS 1 handshake (PUBACKs outstanding), for shutdown and for the benchmark.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fleet_server.mqtt import ClientFactory, MqttError, configured_client, paho_client
from fleet_server.settings import FleetSettings

__all__ = ["MqttCommandPublisher"]

log = logging.getLogger(__name__)


class MqttCommandPublisher:
    """``start()`` connects (asynchronously), ``publish()`` hands a frame to paho, ``stop()`` flushes and
    disconnects."""

    def __init__(self, settings: FleetSettings, *, client_factory: ClientFactory = paho_client,
                 max_inflight: int = 20) -> None:
        self.settings = settings
        self._factory = client_factory
        self._max_inflight = max_inflight
        self._client: paho.Client | None = None
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self._outstanding = 0
        self.published = 0
        self.acknowledged = 0
        self.failures = 0
        self.connects = 0
        self.last_error = ""
        self._stopping = False

    @property
    def client_id(self) -> str:
        return f"{self.settings.mqtt_client_id[:60]}-cmd"

    def start(self) -> None:
        s = self.settings
        client = configured_client(s, self.client_id, persistent=False, factory=self._factory)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.reconnect_delay_set(1, 30)
        client.max_inflight_messages_set(self._max_inflight)
        client.max_queued_messages_set(100_000)
        try:
            client.connect_async(s.mqtt_host, s.mqtt_port, keepalive=s.mqtt_keepalive_s)
        except (OSError, ValueError) as exc:
            raise MqttError(f"cannot connect to {s.mqtt_host}:{s.mqtt_port}: {exc}") from exc
        self._client = client
        self._stopping = False
        client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def publish(self, topic: str, payload: bytes) -> bool:
        client = self._client
        if client is None or not self._connected.is_set():
            self.failures += 1
            return False
        with self._lock:
            self._outstanding += 1
        info = client.publish(topic, payload, qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            with self._lock:
                self._outstanding -= 1
            self.failures += 1
            return False
        self.published += 1
        return True

    def pending(self) -> int:
        """Publishes not yet acknowledged by the broker (PUBACK)."""
        with self._lock:
            return self._outstanding

    def flush(self, timeout: float) -> bool:
        """Wait until the broker acknowledged every publish (``False`` on timeout)."""
        deadline = time.monotonic() + timeout
        while self.pending() > 0:
            if time.monotonic() > deadline or not self._connected.is_set():
                return False
            time.sleep(0.005)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        if self._client is None:
            return
        self.flush(timeout)
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()
        self._client = None
        self._connected.clear()

    def stats(self) -> dict[str, Any]:
        return {"connected": self.connected, "connects": self.connects, "published": self.published,
                "acknowledged": self.acknowledged, "failures": self.failures, "pending": self.pending(),
                "last_error": self.last_error}

    # -- paho callbacks (network thread) -----------------------------------------------------------------

    def _on_connect(self, client: paho.Client, userdata: object, flags: paho.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            self.last_error = f"connection refused: {reason_code}"
            log.error("mqtt commands: %s", self.last_error)
            return
        self.connects += 1
        receive_max = getattr(properties, "ReceiveMaximum", None) if properties is not None else None
        if isinstance(receive_max, int) and receive_max < self._max_inflight:
            log.warning("mqtt commands: the broker accepts %d publishes in flight, fewer than the %d configured",
                        receive_max, self._max_inflight)
        with self._lock:
            self._outstanding = 0  # paho resends its own in-flight messages; the bridge resends the rest
        self._connected.set()
        log.info("mqtt commands: connected to %s:%s", self.settings.mqtt_host, self.settings.mqtt_port)

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: paho.DisconnectFlags,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        self._connected.clear()
        if self._stopping:
            return
        self.last_error = f"disconnected: {reason_code}"
        log.warning("mqtt commands: %s; paho reconnects", self.last_error)

    def _on_publish(self, client: paho.Client, userdata: object, mid: int, reason_code: ReasonCode,
                    properties: Properties) -> None:
        with self._lock:
            self._outstanding = max(0, self._outstanding - 1)
        self.acknowledged += 1
