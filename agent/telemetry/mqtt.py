"""The agent's one MQTT connection (paho-mqtt 2.x; the only module of the agent that imports paho).

:class:`AgentMqtt` owns the connection to the broker and everything that travels on it:

* **Session.** Client id = device id, QoS 1, a persistent session (MQTT 5: ``clean_start=False`` with a session
  expiry; 3.1.1: ``clean_session=False``). MQTT 5 is tried first; a broker that refuses the protocol level gets
  3.1.1 from then on. A refusal is a CONNACK with 3.1.1 return code 1 / MQTT 5 reason 0x84, or, until a broker
  has once accepted MQTT 5, a TCP connection that ends or stays silent for ``probe_timeout_s`` without any
  CONNACK: a 3.1.1-only broker may not parse a version 5 CONNECT at all (the embedded amqtt broker waits for
  bytes that never come when the CONNECT carries a will).
* **Presence.** The last will is the retained ``Status.offline`` on ``fleet/v1/{id}/status``; on every connect the
  client publishes a retained online ``Status`` (``models()`` supplies the deployed models); :meth:`stop` publishes
  a retained offline status before its clean DISCONNECT (which suppresses the will).
* **Inbound.** It subscribes to ``fleet/v1/{id}/commands`` and ``fleet/v1/{id}/acks`` on every connect (a broker
  that lost the session, e.g. after a restart without persistence, gets the subscriptions again). An ``Ack`` is
  decoded and applied to the outbox here (messages leave the outbox only on the *server's* Ack), then handed to
  ``on_ack``; a command's topic and raw payload go to ``on_command`` (the updater decodes, verifies and
  de-duplicates by command id). A handler that raises is logged and counted, never kills the connection.
* **Outbound.** A publisher sends the outbox in sequence order at a controlled rate (``drain_rate`` messages/s,
  :meth:`~agent.telemetry.outbox.Outbox.drain_batch`) with at most ``max_in_flight`` messages sent but not yet
  acknowledged by the server. When a stream's acknowledgements stop progressing for ``ack_timeout_s`` the
  publisher goes back to the oldest unacknowledged message and sends again (go-back-N; the timeout doubles up to
  ``ack_timeout_max_s`` until the server acknowledges something), and it resends at once what the server's Ack
  lists as ``missing``. The server stores by (device, stream, seq), so a resend is at worst a counted duplicate.
* **Reconnect.** Capped exponential backoff with "equal jitter": the k-th retry waits a random time in
  ``[d/2, d]`` with ``d = min(reconnect_max_s, reconnect_min_s * 2**k)``; ``k`` restarts after a connection that
  stayed up for ``stable_s``. After a reconnect the outbox drains from its oldest message at the same paced rate.
* **Errors.** Every foreign error (socket, TLS, paho) becomes :class:`MqttError` (:class:`MqttConfigError` for
  settings, raised by :meth:`start`; :class:`MqttConnectionError` for a failed or lost connection, kept in
  :meth:`stats` and retried).

One worker thread runs everything (paho's network loop, callbacks, the publisher), so paho is touched by one thread
only; other threads call :meth:`publish_status`, :meth:`stats` and :meth:`stop` (and append to the outbox, which
the worker polls every ``tick_s``). Tests inject the
clock, the sleep, the jitter source and the paho client factory, and may drive :meth:`run_once` themselves.

Wiring in the agent service::

    outbox = Outbox(layout.outbox_db).open()
    mqtt = AgentMqtt(MqttSettings(host="broker.example", device_id=cfg.device_id, tls=TlsSettings(...)),
                     outbox, on_command=updater.on_command, models=host.model_states)
    mqtt.start()
    outbox.append("events", lambda seq: encode(Event(device_id=dev, stream_seq=seq, kind="received", ...)))
    hub = TelemetryHub(..., on_closed=lambda closed: outbox.append("drift", closed.encode))
    ...
    mqtt.stop(); outbox.close()
"""

from __future__ import annotations

import logging
import math
import random
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.protocol import (
    Ack,
    Channel,
    Heartbeat,
    ModelState,
    ProtocolError,
    RangeSet,
    SeqRange,
    Status,
    decode_for_topic,
    device_topic,
    encode,
    parse_device_topic,
    validate_device_id,
    validate_ranges,
)
from agent.telemetry.outbox import STREAM_PRIORITY, Outbox, OutboxError, OutboxMessage

__all__ = [
    "PROTOCOL_REFUSED_CODES",
    "AgentMqtt",
    "ClientFactory",
    "MqttConfigError",
    "MqttConnectionError",
    "MqttError",
    "MqttSettings",
    "MqttStats",
    "TlsSettings",
    "backoff_delay",
    "paho_client",
]

log = logging.getLogger("edge_agent.mqtt")

PROTOCOL_REFUSED_CODES: Final = frozenset({1, 0x84})
"""CONNACK codes meaning "protocol level not supported": 3.1.1 return code 1, MQTT 5 reason 0x84 (paho maps the
former to the latter when it speaks 5 to a 3.1.1-only broker)."""

ClientFactory = Callable[[str, MQTTProtocolVersion], paho.Client]
"""``(client_id, protocol) -> paho Client`` (tests pass fakes)."""


class MqttError(Exception):
    """Base of the MQTT adapter's errors."""


class MqttConfigError(MqttError, ValueError):
    """The settings cannot work (bad device id, unreadable CA/certificate/key, nonsense numbers)."""


class MqttConnectionError(MqttError):
    """A connection attempt failed or an established connection was lost (retried with backoff)."""


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """TLS to the broker: the fleet CA (``None``: the system store) and the device's certificate and key."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """Connection and publishing policy. The defaults are for a real fleet; tests shorten the timers."""

    host: str
    device_id: str
    port: int | None = None
    """Default: 8883 with TLS, 1883 without."""
    tls: TlsSettings | None = None
    username: str | None = None
    """Only for brokers that want one besides the certificate (mosquitto can take the CN as the username)."""
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    keepalive_s: int = 60
    session_expiry_s: int = 7 * 86400
    """MQTT 5 session expiry: the broker keeps the session (subscriptions, queued commands and acks) this long."""
    connect_timeout_s: float = 10.0
    """TCP/TLS connect timeout, and how long to wait for the CONNACK."""
    probe_timeout_s: float = 3.0
    """How long an MQTT 5 CONNECT may go unanswered before the broker is taken for a 3.1.1-only one (only until a
    broker has accepted MQTT 5 once)."""
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 120.0
    stable_s: float = 30.0
    """A connection that lasted this long resets the backoff."""
    drain_rate: float = 20.0
    """Stream messages published per second at most (a burst of half a second's worth is allowed)."""
    max_in_flight: int = 100
    """Stream messages sent and not yet acknowledged by the server, at most."""
    ack_timeout_s: float = 30.0
    ack_timeout_max_s: float = 600.0
    heartbeat_s: float | None = 60.0
    agent_version: str = ""
    tick_s: float = 0.05
    """Granularity of the worker loop (paho's select timeout)."""

    def __post_init__(self) -> None:
        try:
            validate_device_id(self.device_id)
        except ProtocolError as exc:
            raise MqttConfigError(str(exc)) from exc
        if not self.host:
            raise MqttConfigError("host must not be empty")
        if self.port is not None and not 0 < self.port < 65536:
            raise MqttConfigError(f"port {self.port} is not a TCP port")
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise MqttConfigError("protocol must be 'auto', '5' or '3.1.1'")
        positive = {"connect_timeout_s": self.connect_timeout_s, "probe_timeout_s": self.probe_timeout_s,
                    "reconnect_min_s": self.reconnect_min_s,
                    "reconnect_max_s": self.reconnect_max_s, "drain_rate": self.drain_rate,
                    "ack_timeout_s": self.ack_timeout_s, "ack_timeout_max_s": self.ack_timeout_max_s,
                    "tick_s": self.tick_s, "keepalive_s": self.keepalive_s}
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise MqttConfigError(f"{name} must be a positive number, got {value!r}")
        if self.heartbeat_s is not None and not (math.isfinite(self.heartbeat_s) and self.heartbeat_s > 0):
            raise MqttConfigError("heartbeat_s must be a positive number or None")
        if self.max_in_flight < 1:
            raise MqttConfigError("max_in_flight must be at least 1")
        if self.reconnect_max_s < self.reconnect_min_s or self.ack_timeout_max_s < self.ack_timeout_s:
            raise MqttConfigError("a maximum is below its minimum (reconnect_*_s or ack_timeout*_s)")

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return 8883 if self.tls is not None else 1883


@dataclass(frozen=True, slots=True)
class MqttStats:
    """A snapshot of the connection and its counters (since this object was created)."""

    connected: bool
    protocol: str | None
    """``"5"`` or ``"3.1.1"`` for the current (or last) connection."""
    session_present: bool
    connects: int
    disconnects: int
    connect_failures: int
    protocol_fallbacks: int
    published: int
    """Stream messages handed to the broker (including resends)."""
    go_backs: int
    """Times a stream went back to its oldest unacknowledged message after an ack timeout."""
    acks: int
    acks_invalid: int
    commands: int
    handler_errors: int
    ignored: int
    """Messages on topics that are not ours (wrong device, unknown channel)."""
    next_retry_s: float | None
    last_error: str | None


def paho_client(client_id: str, protocol: MQTTProtocolVersion) -> paho.Client:
    """The real paho client for one connection attempt (no automatic reconnect: :class:`AgentMqtt` does that)."""
    if protocol == MQTTProtocolVersion.MQTTv5:
        return paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                           reconnect_on_failure=False)
    return paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False, protocol=protocol,
                       reconnect_on_failure=False)


def backoff_delay(attempt: int, low: float, high: float, jitter: float) -> float:
    """Equal-jitter exponential backoff: ``d = min(high, low * 2**attempt)``, result in ``[d/2, d]``
    (``jitter`` in ``[0, 1)``)."""
    d = min(high, low * 2.0 ** min(attempt, 62))
    return d / 2 + jitter * d / 2


def _tls_context(tls: TlsSettings) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(tls.ca_file) if tls.ca_file is not None else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls.cert_file is not None:
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file is not None else None)
        elif tls.key_file is not None:
            raise MqttConfigError("a TLS key_file needs its cert_file")
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise MqttConfigError(f"TLS settings unusable: {exc}") from exc
    return ctx


def _rejected(extra: Mapping[str, Any]) -> tuple[SeqRange, ...]:
    """Optional ``rejected`` ranges an Ack may carry in ``extra`` (see ADR 0009); invalid ones are ignored."""
    value = extra.get("rejected")
    if value is None:
        return ()
    try:
        return validate_ranges(value, "rejected")
    except ProtocolError:
        return ()


@dataclass(slots=True)
class _StreamState:
    """Publisher state of one stream (in memory: after a restart the outbox drains from its oldest message)."""

    cursor: int = -1
    """Highest seq sent since the last reconnect or go-back."""
    sent: dict[int, float] = field(default_factory=dict)
    """Seqs sent and not yet acknowledged by the server -> when they were sent."""
    last_progress: float = 0.0
    timeout: float = 0.0


_DISCONNECTED: Final = "disconnected"
_CONNECTING: Final = "connecting"
_CONNECTED: Final = "connected"


class AgentMqtt:
    """The device's MQTT connection, presence, inbound handlers and outbox publisher (see the module docs)."""

    def __init__(
        self,
        settings: MqttSettings,
        outbox: Outbox,
        *,
        on_ack: Callable[[Ack], None] | None = None,
        on_command: Callable[[str, bytes], None] | None = None,
        models: Callable[[], Sequence[ModelState]] = tuple,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], object] | None = None,
        client_factory: ClientFactory = paho_client,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.outbox = outbox
        self._on_ack = on_ack
        self._on_command = on_command
        self._models = models
        self._clock = clock
        self._wall_clock = wall_clock
        self._stop_event = threading.Event()
        self._sleep: Callable[[float], object] = sleep if sleep is not None else self._stop_event.wait
        self._factory = client_factory
        self._jitter = jitter
        dev = settings.device_id
        self._status_topic = device_topic(dev, Channel.STATUS)
        self._heartbeat_topic = device_topic(dev, Channel.HEARTBEAT)
        self._commands_topic = device_topic(dev, Channel.COMMANDS)
        self._acks_topic = device_topic(dev, Channel.ACKS)
        self._stream_topics = {stream: device_topic(dev, Channel(stream)) for stream in STREAM_PRIORITY}
        self._protocol = (MQTTProtocolVersion.MQTTv311 if settings.protocol == "3.1.1"
                          else MQTTProtocolVersion.MQTTv5)
        self._v5_confirmed = False
        self._tcp_up = False
        self._tls: ssl.SSLContext | None = None
        self._prepared = False
        self._thread: threading.Thread | None = None
        self._connected_event = threading.Event()
        self._status_dirty = threading.Event()
        # worker state (touched only by the worker thread, or by the test driving run_once)
        self._client: paho.Client | None = None
        self._state: str = _DISCONNECTED
        self._attempt = 0
        self._next_attempt = 0.0
        self._connect_started = 0.0
        self._connected_since = 0.0
        self._started_at = clock()
        self._next_heartbeat = 0.0
        self._streams = {stream: _StreamState() for stream in STREAM_PRIORITY}
        # counters
        self._session_present = False
        self._connects = self._disconnects = self._connect_failures = self._fallbacks = 0
        self._published = self._go_backs = self._acks = self._acks_invalid = 0
        self._commands = self._handler_errors = self._ignored = 0
        self._last_error: MqttError | None = None

    # -- public API -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Check the settings (TLS files) and start the worker thread. Raises :class:`MqttConfigError`."""
        if self._thread is not None:
            return
        self._prepare()
        self._stop_event.clear()
        self._thread = threading.Thread(target=self._run, name="edge-agent-mqtt", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish a retained offline status, disconnect cleanly and stop the worker (idempotent)."""
        self._stop_event.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
        else:
            self._shutdown()

    def publish_status(self) -> None:
        """Publish a fresh retained online status (e.g. after a model swap) on the next tick."""
        self._status_dirty.set()

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected (or ``timeout`` seconds); True if connected."""
        return self._connected_event.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected_event.is_set()

    def stats(self) -> MqttStats:
        proto = None if self._connects == 0 and self._state != _CONNECTED else (
            "5" if self._protocol == MQTTProtocolVersion.MQTTv5 else "3.1.1")
        retry = None
        if self._state == _DISCONNECTED and self._attempt:
            retry = max(0.0, self._next_attempt - self._clock())
        return MqttStats(
            connected=self._state == _CONNECTED, protocol=proto, session_present=self._session_present,
            connects=self._connects, disconnects=self._disconnects, connect_failures=self._connect_failures,
            protocol_fallbacks=self._fallbacks, published=self._published, go_backs=self._go_backs,
            acks=self._acks, acks_invalid=self._acks_invalid, commands=self._commands,
            handler_errors=self._handler_errors, ignored=self._ignored, next_retry_s=retry,
            last_error=None if self._last_error is None else str(self._last_error),
        )

    # -- worker ---------------------------------------------------------------------------------------

    def _prepare(self) -> None:
        if not self._prepared:
            self._tls = _tls_context(self.settings.tls) if self.settings.tls is not None else None
            self._prepared = True

    def _run(self) -> None:
        try:
            while not self._stop_event.is_set():
                self.run_once()
        finally:
            self._shutdown()

    def run_once(self) -> None:
        """One step of the worker: wait for / attempt a connection, or run paho's loop once and publish."""
        self._prepare()
        now = self._clock()
        if self._state == _DISCONNECTED:
            wait = self._next_attempt - now
            if wait > 0:
                self._sleep(wait)
                return
            self._connect(now)
            return
        client = self._client
        assert client is not None
        try:
            rc = client.loop(timeout=self.settings.tick_s)
        except (OSError, ValueError) as exc:
            self._lost(client, MqttConnectionError(f"network error: {exc}"))
            return
        now = self._clock()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._lost(client, MqttConnectionError(f"connection lost: {paho.error_string(rc)}"))
            return
        if self._state == _CONNECTING:
            limit = self.settings.probe_timeout_s if self._probing() else self.settings.connect_timeout_s
            if now - self._connect_started > limit:
                self._lost(client, MqttConnectionError(f"no CONNACK within {limit} s"))
                return
        if self._state == _CONNECTED:
            self._tick(client, now)

    def _connect(self, now: float) -> None:
        s = self.settings
        self._tcp_up = False
        client = self._factory(s.device_id, self._protocol)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        will = Status.offline(s.device_id, agent_version=s.agent_version)
        try:
            client.will_set(self._status_topic, encode(will), qos=1, retain=True)
            if self._tls is not None:
                client.tls_set_context(self._tls)
            if s.username is not None:
                client.username_pw_set(s.username)
            client.connect_timeout = s.connect_timeout_s
            if self._protocol == MQTTProtocolVersion.MQTTv5:
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves it untyped
                props.SessionExpiryInterval = s.session_expiry_s
                client.connect(s.host, s.effective_port, s.keepalive_s, clean_start=False, properties=props)
            else:
                client.connect(s.host, s.effective_port, s.keepalive_s)
        except (OSError, ValueError) as exc:  # refused, unreachable, TLS handshake (ssl.SSLError is an OSError)
            self._client = client
            self._state = _CONNECTING
            self._lost(client, MqttConnectionError(f"cannot connect to {s.host}:{s.effective_port}: {exc}"))
            return
        self._client = client
        self._state = _CONNECTING
        self._tcp_up = True
        self._connect_started = now

    def _probing(self) -> bool:
        """Trying MQTT 5 on a broker that has not accepted it yet (a silent failure means "3.1.1 only")."""
        return (self.settings.protocol == "auto" and self._protocol == MQTTProtocolVersion.MQTTv5
                and not self._v5_confirmed)

    def _fall_back(self, client: paho.Client, why: str) -> None:
        log.info("broker refused MQTT 5 (%s); using MQTT 3.1.1", why)
        self._protocol = MQTTProtocolVersion.MQTTv311
        self._fallbacks += 1
        self._drop(client)
        self._state = _DISCONNECTED
        self._next_attempt = self._clock()

    def _handle_connect(self, client: paho.Client, userdata: object, flags: paho.ConnectFlags,
                        reason: ReasonCode, properties: Properties | None) -> None:
        if client is not self._client:
            return
        now = self._clock()
        if reason.is_failure:
            if reason.value in PROTOCOL_REFUSED_CODES and self._probing():
                self._fall_back(client, str(reason))
                return
            self._lost(client, MqttConnectionError(f"broker refused the connection: {reason}"))
            return
        self._state = _CONNECTED
        if self._protocol == MQTTProtocolVersion.MQTTv5:
            self._v5_confirmed = True
        self._connects += 1
        self._connected_since = now
        self._session_present = bool(flags.session_present)
        self._last_error = None
        if self._protocol == MQTTProtocolVersion.MQTTv5:
            client.subscribe([(self._commands_topic, SubscribeOptions(qos=1)),
                              (self._acks_topic, SubscribeOptions(qos=1))])
        else:
            client.subscribe([(self._commands_topic, 1), (self._acks_topic, 1)])
        self._publish_status(client, online=True)
        for st in self._streams.values():
            st.cursor, st.last_progress, st.timeout = -1, now, self.settings.ack_timeout_s
            st.sent.clear()
        self.outbox.reset_drain()
        self._next_heartbeat = now
        self._connected_event.set()
        log.info("connected to %s:%s (MQTT %s, session present: %s)", self.settings.host,
                 self.settings.effective_port, "5" if self._protocol == MQTTProtocolVersion.MQTTv5 else "3.1.1",
                 self._session_present)

    def _handle_disconnect(self, client: paho.Client, userdata: object, flags: paho.DisconnectFlags,
                           reason: ReasonCode, properties: Properties | None) -> None:
        if client is self._client and self._state != _DISCONNECTED:
            self._lost(client, MqttConnectionError(f"disconnected: {reason}"))

    def _lost(self, client: paho.Client, error: MqttConnectionError) -> None:
        """The current connection (attempt) is over: close it and schedule the next attempt with backoff."""
        if client is not self._client or self._state == _DISCONNECTED:
            return
        if self._state == _CONNECTING and self._tcp_up and self._probing():
            self._fall_back(client, f"no CONNACK: {error}")
            return
        now = self._clock()
        if self._state == _CONNECTED:
            self._disconnects += 1
            if now - self._connected_since >= self.settings.stable_s:
                self._attempt = 0
        else:
            self._connect_failures += 1
        self._drop(client)
        self._state = _DISCONNECTED
        self._connected_event.clear()
        self._last_error = error
        delay = backoff_delay(self._attempt, self.settings.reconnect_min_s, self.settings.reconnect_max_s,
                              self._jitter())
        self._attempt += 1
        self._next_attempt = now + delay
        log.warning("%s; retrying in %.1f s", error, delay)

    def _drop(self, client: paho.Client) -> None:
        """Forget a client without a DISCONNECT packet (which would suppress the last will)."""
        if client is self._client:
            self._client = None
        sock = client.socket()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                log.debug("closing a dead socket failed", exc_info=True)

    def _handle_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        if client is not self._client:
            return
        topic, payload = message.topic, bytes(message.payload)
        try:
            device_id, channel = parse_device_topic(topic)
        except ProtocolError:
            self._ignored += 1
            return
        if device_id != self.settings.device_id:
            self._ignored += 1
        elif channel is Channel.ACKS:
            self._handle_ack(topic, payload)
        elif channel is Channel.COMMANDS:
            self._commands += 1
            if self._on_command is not None:
                self._guarded("on_command", self._on_command, topic, payload)
        else:
            self._ignored += 1

    def _handle_ack(self, topic: str, payload: bytes) -> None:
        try:
            ack = decode_for_topic(topic, payload)
        except ProtocolError as exc:
            self._acks_invalid += 1
            log.warning("invalid ack ignored: %s", exc)
            return
        if not isinstance(ack, Ack) or ack.stream not in self._streams:
            self._acks_invalid += 1
            return
        self._acks += 1
        try:
            self.outbox.ack(ack.stream, ack.seqs, ack.missing, _rejected(ack.extra))
        except OutboxError as exc:  # the server repeats acks, so this one is not lost for good
            log.warning("could not apply an ack to the outbox: %s", exc)
        st = self._streams[ack.stream]
        stored = RangeSet.from_ranges(ack.seqs)
        done = [seq for seq in st.sent if seq in stored]
        for seq in done:
            del st.sent[seq]
        if done:
            st.last_progress = self._clock()
            st.timeout = self.settings.ack_timeout_s
        if self._on_ack is not None:
            self._guarded("on_ack", self._on_ack, ack)

    def _guarded(self, name: str, handler: Callable[..., None], *args: object) -> None:
        try:
            handler(*args)
        except Exception:  # a handler's bug must not take the connection down; logged with its traceback
            self._handler_errors += 1
            log.exception("%s handler failed", name)

    # -- publishing -----------------------------------------------------------------------------------

    def _publish_status(self, client: paho.Client, *, online: bool) -> paho.MQTTMessageInfo:
        s = self.settings
        status = Status(device_id=s.device_id, state="online" if online else "offline", agent_version=s.agent_version,
                        models=tuple(self._models()) if online else (), sent_at=self._wall_clock())
        return client.publish(self._status_topic, encode(status), qos=1, retain=True)

    def _tick(self, client: paho.Client, now: float) -> None:
        s = self.settings
        if self._status_dirty.is_set():
            self._status_dirty.clear()
            self._publish_status(client, online=True)
        if s.heartbeat_s is not None and now >= self._next_heartbeat:
            self._next_heartbeat = now + s.heartbeat_s
            beat = Heartbeat(device_id=s.device_id, sent_at=self._wall_clock(),
                             uptime_s=max(0.0, now - self._started_at))
            client.publish(self._heartbeat_topic, encode(beat), qos=1)
        self._publish_outbox(client, now)

    def _publish_outbox(self, client: paho.Client, now: float) -> None:
        s = self.settings
        for st in self._streams.values():
            if st.sent and now - st.last_progress >= st.timeout:
                st.cursor = -1
                st.sent.clear()
                st.last_progress = now
                st.timeout = min(st.timeout * 2, s.ack_timeout_max_s)
                self._go_backs += 1
        room = s.max_in_flight - sum(len(st.sent) for st in self._streams.values())
        if room <= 0:
            return
        try:
            batch = self.outbox.drain_batch(s.drain_rate, after={k: st.cursor for k, st in self._streams.items()},
                                            limit=room)
        except OutboxError as exc:
            log.warning("cannot read the outbox: %s", exc)
            return
        published: list[OutboxMessage] = []
        for msg in batch:
            info = client.publish(self._stream_topics[msg.stream], msg.payload, qos=1)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
            st = self._streams[msg.stream]
            if not st.sent:
                st.last_progress = now
            st.sent[msg.seq] = now
            st.cursor = max(st.cursor, msg.seq)
            published.append(msg)
        self._published += len(published)
        try:
            self.outbox.mark_sent(published)
        except OutboxError as exc:
            log.warning("cannot record resends in the outbox: %s", exc)

    # -- shutdown -------------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        client = self._client
        if client is not None and self._state == _CONNECTED:
            self._state = _DISCONNECTED  # our own DISCONNECT below is not a lost connection
            try:
                info = self._publish_status(client, online=False)
                deadline = self._clock() + 1.0
                while not info.is_published() and self._clock() < deadline:
                    if client.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        break
                client.disconnect()
                client.loop(timeout=0.05)
            except (OSError, ValueError, RuntimeError) as exc:
                log.debug("unclean MQTT shutdown: %s", exc)
        if client is not None:
            self._drop(client)
        self._state = _DISCONNECTED
        self._connected_event.clear()
