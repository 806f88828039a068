"""A stateful simulator of the fleet server's side of the update contract (python-tuf's RepositorySimulator idea).

It publishes bundles over real HTTP (:class:`tests.sim.fleet_http.FleetHttpSim`), signs deployment orders with
the orders key, wraps them in wire ``Command`` frames for ``fleet/v1/{device}/commands``, resends each command
until an event acknowledges its ``command_id``, and records the device's ``Event`` frames idempotently by
``stream_seq``. The real fleet server must pass the same contract tests (tests/updater/test_wire_contract.py).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from agent.protocol import Channel, Command, Event, decode_for_topic, device_topic, encode
from tests.sim.fleet_http import FleetHttpSim
from tests.updater.support import Keys, make_order


@dataclass
class FleetSim:
    keys: Keys
    http: FleetHttpSim
    sequence: int = 0
    events: dict[str, dict[int, Event]] = field(default_factory=dict)  # device -> seq -> event
    duplicates: int = 0
    pending: dict[str, bytes] = field(default_factory=dict)  # command_id -> frame, until acknowledged

    def publish(self, data: bytes, tokens: set[str] | None = None) -> str:
        return self.http.add_bundle(hashlib.sha256(data).hexdigest(), data, tokens=tokens or {"tok"})

    def command(self, device_id: str, data: bytes, *, kind: str = "deploy", **order_kw: Any) -> tuple[str, bytes]:
        """Sign an order for ``device_id`` and return (topic, frame) for its command topic."""
        self.sequence += 1
        order_kw.setdefault("sequence", self.sequence)
        order = make_order(self.keys, data, device_id=device_id, url=self.publish(data), token="tok",
                           action=kind, **order_kw)
        cmd_id = order["signed"]["command_id"]
        frame = encode(Command(device_id=device_id, command_id=cmd_id, kind=kind, order=order, sent_at=time.time()))
        self.pending[cmd_id] = frame
        return device_topic(device_id, Channel.COMMANDS), frame

    def resend(self, command_id: str) -> bytes:
        return self.pending[command_id]

    def receive(self, topic: str, frame: bytes) -> Event:
        """Ingest one event frame from a device: idempotent by (device, stream_seq); acks its command."""
        msg = decode_for_topic(topic, frame)
        assert isinstance(msg, Event)
        per = self.events.setdefault(msg.device_id, {})
        if msg.stream_seq in per:
            self.duplicates += 1
        per[msg.stream_seq] = msg
        if msg.command_id is not None and msg.kind in ("healthy", "rolled_back", "rejected", "failed", "cancelled"):
            self.pending.pop(msg.command_id, None)
        return msg

    def kinds(self, device_id: str, command_id: str | None = None) -> list[str]:
        per = self.events.get(device_id, {})
        return [per[s].kind for s in sorted(per) if command_id is None or per[s].command_id == command_id]
