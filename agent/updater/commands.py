"""The wire side of updates: ``Command`` messages in, deployment ``Event`` messages out.

Transport-neutral: whoever owns the MQTT connection (the telemetry issue's client) hands every payload that
arrives on ``fleet/v1/{device}/commands`` to :meth:`CommandProcessor.on_message` and publishes what the
processor gives its ``publish`` callback. Tests drive it directly with encoded frames, so the same contract
that the fleet server speaks is exercised byte for byte.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.fsutil import atomic_write
from agent.protocol import (
    Channel,
    Command,
    Event,
    ProtocolError,
    decode_for_topic,
    device_topic,
    encode,
    validate_deploy_event,
)
from agent.updater.updater import InstallOutcome, UpdateEvent, Updater

__all__ = ["CommandProcessor", "EventSequence", "SequencedPublisher"]

MessageSink = Callable[[Callable[[int], bytes]], object]
"""Takes a function that builds a frame for a stream sequence number; the outbox's ``append("events", ...)``."""

log = logging.getLogger("edge_agent.commands")


class EventSequence:
    """The device's ``events`` stream sequence (persisted: numbers never repeat across restarts)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        try:
            self._next = int(json.loads(path.read_bytes())["next"])
        except FileNotFoundError:
            self._next = 0

    def take(self) -> int:
        with self._lock:
            seq = self._next
            self._path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self._path, json.dumps({"next": seq + 1}).encode())
            self._next = seq + 1
            return seq


class SequencedPublisher:
    """A :data:`MessageSink` without an outbox: numbers from an :class:`EventSequence`, sent straight away."""

    def __init__(self, sequence: EventSequence, publish: Callable[[str, bytes], None], topic: str) -> None:
        self._sequence, self._publish, self._topic = sequence, publish, topic

    def __call__(self, make: Callable[[int], bytes]) -> None:
        self._publish(self._topic, make(self._sequence.take()))


class CommandProcessor:
    """Decodes commands, applies their signed orders once, and encodes the resulting events."""

    def __init__(self, *, device_id: str, updater: Updater, sink: MessageSink,
                 clock: Callable[[], float] = time.time) -> None:
        self.device_id = device_id
        self.updater = updater
        self._sink = sink
        self._clock = clock
        self._commands_topic = device_topic(device_id, Channel.COMMANDS)
        self.dropped = 0

    def publish_event(self, ev: UpdateEvent) -> None:
        """The updater's ``events`` callback: validate and encode one deployment event; the sink numbers it."""
        detail = dict(ev.detail)
        if ev.message:
            detail["message"] = ev.message[:1024]
        at = self._clock()

        def make(seq: int) -> bytes:
            event = Event(device_id=self.device_id, stream_seq=seq, kind=ev.kind, at=at, command_id=ev.command_id,
                          model=ev.model, version=ev.version, reason=ev.reason, detail=detail)
            try:
                validate_deploy_event(event)
            except ProtocolError as exc:  # a bug on our side: still report, but say so in the log
                log.error("deployment event breaks the wire rules (%s): %s", exc, event)
            return encode(event)

        self._sink(make)

    def on_message(self, topic: str, payload: bytes) -> InstallOutcome | None:
        """Handle one payload from the commands topic; malformed input is counted and dropped, never raised."""
        if topic != self._commands_topic:
            self.dropped += 1
            log.warning("ignoring a message on %s (not this device's command topic)", topic)
            return None
        try:
            msg = decode_for_topic(topic, payload)
        except ProtocolError as exc:
            self.dropped += 1
            log.warning("dropping a malformed command: %s", exc)
            return None
        if not isinstance(msg, Command):
            self.dropped += 1
            log.warning("dropping a %s message on the command topic", type(msg).__name__)
            return None
        return self.updater.handle_order(msg.order)
