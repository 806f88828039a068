"""MQTT for the simulator (paho-mqtt 2.x in external-loop mode; the simulator's only paho import).

:class:`MqttLink` is one MQTT connection driven by the :class:`~fleet_server.simulator.engine.Engine` thread:
paho's socket is registered with the engine's selector (``on_socket_open``/``close``/``register_write``), and the
engine calls ``loop_read``/``loop_write``/``loop_misc``. No paho thread, no socket pair: about 5 KB per connection,
so thousands fit in one process.

A link serves one device (client id = device id, retained ``Status.offline`` as last will: what the real agent does)
or many (the multiplexed mode: one client id for a group of devices, no per-device will). Both use MQTT 3.1.1
(mosquitto and the embedded amqtt broker both speak it) with a persistent session (``clean_session=False``), QoS 1,
and subscribe to the commands and acks topics of their devices on every connect, in chunks.

A lost connection is retried with capped, jittered exponential backoff. :meth:`MqttLink.drop` closes the socket
without a DISCONNECT (the broker then publishes the will: a device that lost power); :meth:`MqttLink.close` sends
the given final messages, waits for their PUBACKs (bounded) and disconnects cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import random
import selectors
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from fleet_server.simulator.engine import Engine
from fleet_server.simulator.stats import SimStats

__all__ = ["LinkSettings", "LinkState", "MqttLink"]

log = logging.getLogger("fleet_server.simulator")


class LinkState:
    IDLE: Final = "idle"
    CONNECTING: Final = "connecting"
    CONNECTED: Final = "connected"
    """CONNACK received; subscriptions may still be pending."""
    READY: Final = "ready"
    """Every SUBACK received: commands published now reach the device."""
    DOWN: Final = "down"
    """Lost; a reconnect is scheduled."""
    AWAY: Final = "away"
    """Deliberately offline (:meth:`MqttLink.drop`)."""
    CLOSING: Final = "closing"
    CLOSED: Final = "closed"


@dataclass(frozen=True)
class LinkSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    keepalive_s: int = 60
    max_inflight: int = 0
    """paho's in-flight window; 0 = unlimited. paho rescans its whole outgoing queue on every PUBACK when a window
    is set, which costs more CPU than anything else at thousands of devices; brokers PUBACK at once anyway."""
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 10.0
    subscribe_chunk: int = 64
    username: str | None = None
    password: str | None = None


class MqttLink:
    """One MQTT connection for one or more simulated devices (see the module docs). Engine thread only."""

    def __init__(self, engine: Engine, settings: LinkSettings, client_id: str, topics: Sequence[str], *,
                 stats: SimStats, on_message: Callable[[str, bytes], None], on_up: Callable[[], None],
                 on_ready: Callable[[], None], on_down: Callable[[], None],
                 will: tuple[str, bytes] | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.client_id = client_id
        self.topics = list(topics)
        self.stats = stats
        self._on_message = on_message
        self._on_up = on_up
        self._on_ready = on_ready
        self._on_down = on_down
        self.will = will
        self.state: str = LinkState.IDLE
        self.client: paho.Client | None = None
        self.connects = 0
        self._attempt = 0
        self._pending_subs: set[int] = set()
        self._finals: list[paho.MQTTMessageInfo] = []
        self._close_deadline = 0.0
        self._disconnect_sent = False
        self._retry_at: float | None = None

    @property
    def ready(self) -> bool:
        return self.state == LinkState.READY

    @property
    def up(self) -> bool:
        return self.state in (LinkState.CONNECTED, LinkState.READY)

    # -- engine selector hooks ------------------------------------------------------------------------------

    def on_readable(self) -> None:
        client = self.client
        if client is None:
            return
        rc = client.loop_read()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and client is self.client:
            self._lost(client, f"read: {paho.error_string(rc)}")
        elif self.state == LinkState.CLOSING:
            self._check_close(client)

    def on_writable(self) -> None:
        client = self.client
        if client is None:
            return
        rc = client.loop_write()
        if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN) and client is self.client \
                and self.state != LinkState.CLOSING:
            self._lost(client, f"write: {paho.error_string(rc)}")

    def misc(self) -> None:
        """Keepalive (PINGREQ) and, while closing, the wait for final PUBACKs."""
        client = self.client
        if client is None:
            return
        if self.state == LinkState.CLOSING:
            self._check_close(client)
            return
        rc = client.loop_misc()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and client is self.client and self.up:
            self._lost(client, "keepalive timeout")

    def _check_close(self, client: paho.Client) -> None:
        if not self._disconnect_sent and (all(info.is_published() for info in self._finals)
                                          or self.engine.clock() >= self._close_deadline):
            self._finals = []
            self._disconnect_sent = True
            client.disconnect()
        elif self.engine.clock() >= self._close_deadline + 1.0:
            self.force_close()

    # -- connection -----------------------------------------------------------------------------------------

    def connect(self) -> None:
        """Open the connection (blocking TCP connect, then the CONNECT packet goes out through the selector)."""
        if self.state in (LinkState.CLOSING, LinkState.CLOSED):
            return
        s = self.settings
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=False,
                             protocol=paho.MQTTv311)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_subscribe = self._handle_subscribe
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write
        client.max_inflight_messages_set(s.max_inflight)
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if self.will is not None:
            client.will_set(self.will[0], self.will[1], qos=1, retain=True)
        self.client = client
        self.state = LinkState.CONNECTING
        self._retry_at = None
        try:
            client.connect(s.host, s.port, s.keepalive_s)
        except (OSError, ValueError) as exc:
            self._lost(client, f"cannot connect to {s.host}:{s.port}: {exc}")

    def drop(self) -> None:
        """Go away without a DISCONNECT: the broker publishes the last will. :meth:`connect` comes back."""
        client, self.client = self.client, None
        was_up = self.up
        self.state = LinkState.AWAY
        if client is not None:
            self._forget(client)
        if was_up:
            self.stats.disconnects += 1
            self._on_down()

    def close(self, finals: Sequence[tuple[str, bytes]] = (), *, timeout: float = 2.0) -> None:
        """Publish ``finals`` (topic, payload: retained QoS 1), wait for their PUBACKs (at most ``timeout``
        seconds, checked by :meth:`misc`), then DISCONNECT cleanly (no will)."""
        client = self.client
        if client is None or not self.up:
            if client is not None:
                self._forget(client)
                self.client = None
            self.state = LinkState.CLOSED
            return
        self._finals = [client.publish(topic, payload, qos=1, retain=True) for topic, payload in finals]
        self.stats.published += len(self._finals)
        self._close_deadline = self.engine.clock() + timeout
        self._disconnect_sent = False
        self.state = LinkState.CLOSING

    def force_close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            self._forget(client)
        self.state = LinkState.CLOSED

    @property
    def closed(self) -> bool:
        return self.state == LinkState.CLOSED

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        """QoS 1 publish; ``False`` (nothing sent) unless connected."""
        client = self.client
        if client is None or not self.up:
            return False
        info = client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        self.stats.published += 1
        self.stats.published_bytes += len(payload)
        return True

    # -- internals ------------------------------------------------------------------------------------------

    def _forget(self, client: paho.Client) -> None:
        sock = client.socket()
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.engine.selector.unregister(sock)
            with contextlib.suppress(OSError):
                sock.close()

    def _lost(self, client: paho.Client, why: str) -> None:
        if client is not self.client or self.state in (LinkState.AWAY, LinkState.CLOSED, LinkState.DOWN):
            return
        if self.state == LinkState.CLOSING:
            self._forget(client)
            self.client = None
            self.state = LinkState.CLOSED
            return
        was_up = self.up
        self._forget(client)
        self.client = None
        self.state = LinkState.DOWN
        if was_up:
            self.stats.disconnects += 1
            self._on_down()
        else:
            self.stats.connect_failures += 1
        s = self.settings
        d = min(s.reconnect_max_s, s.reconnect_min_s * 2.0 ** min(self._attempt, 30))
        delay = d / 2 + random.random() * d / 2  # noqa: S311 - jitter, not cryptography
        self._attempt += 1
        log.debug("%s: %s; reconnecting in %.1f s", self.client_id, why, delay)
        self.engine.call_later(delay, self._retry)

    def _retry(self) -> None:
        if self.state == LinkState.DOWN:
            self.connect()

    def _socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self.engine.selector.register(sock, selectors.EVENT_READ, self)

    def _socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.engine.selector.unregister(sock)

    def _register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.engine.selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self)

    def _unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.engine.selector.modify(sock, selectors.EVENT_READ, self)

    def _handle_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if client is not self.client:
            return
        if reason.is_failure:
            self._lost(client, f"refused: {reason}")
            return
        self.state = LinkState.CONNECTED
        self.connects += 1
        self.stats.connects += 1
        self._attempt = 0
        self._pending_subs.clear()
        chunk = self.settings.subscribe_chunk
        for i in range(0, len(self.topics), chunk):
            rc, mid = client.subscribe([(t, 1) for t in self.topics[i:i + chunk]])
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._pending_subs.add(mid)
        self._on_up()
        if not self._pending_subs:
            self.state = LinkState.READY
            self._on_ready()

    def _handle_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        if client is not self.client:
            return
        if any(getattr(r, "is_failure", False) for r in reasons):
            log.warning("%s: subscription refused: %s", self.client_id, reasons)
        self._pending_subs.discard(mid)
        if not self._pending_subs and self.state == LinkState.CONNECTED:
            self.state = LinkState.READY
            self._on_ready()

    def _handle_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if client is not self.client:
            return
        if self.state == LinkState.CLOSING:
            self.client = None
            self.state = LinkState.CLOSED
            return
        self._lost(client, f"disconnected: {reason}")

    def _handle_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if client is not self.client:
            return
        self.stats.received += 1
        try:
            self._on_message(message.topic, bytes(message.payload))
        except Exception:  # a device handler's bug must not break paho's packet handling
            self.stats.handler_errors += 1
            log.exception("%s: handling a message on %s failed", self.client_id, message.topic)
