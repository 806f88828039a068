"""Counters of a simulated fleet (updated on the engine thread; read as a snapshot under the engine lock)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["SimStats"]


@dataclass
class SimStats:
    """What the simulated devices did since start. ``events_sent`` counts each event once (its first transmission),
    by kind, without the answers to duplicate commands (those are ``commands_duplicate``); ``resent`` counts stream
    messages sent again (go-back after an ack timeout, ``missing``, reconnect)."""

    commands_received: int = 0
    commands_duplicate: int = 0
    """Commands whose id was already known: answered with the latest event, not applied again."""
    commands_rejected: Counter[str] = field(default_factory=Counter)
    """Orders refused before ``received``, by reason (``signature``, ``order``, ``stale``...)."""
    commands_ignored: int = 0
    """Commands swallowed by silent devices."""
    commands_lost_offline: int = 0
    """Commands that reached the simulator for a device that was away (multiplexed mode; the server resends)."""
    events_sent: Counter[str] = field(default_factory=Counter)
    windows_sent: int = 0
    heartbeats_sent: int = 0
    statuses_sent: int = 0
    version_changes: int = 0
    acks_received: int = 0
    resent: int = 0
    go_backs: int = 0
    outbox_dropped: int = 0
    invalid_inbound: int = 0
    ignored: int = 0
    downloads_ok: int = 0
    downloads_failed: int = 0
    download_bytes: int = 0
    connects: int = 0
    disconnects: int = 0
    connect_failures: int = 0
    published: int = 0
    """MQTT PUBLISH packets handed to paho (everything: status, heartbeats, streams, resends)."""
    published_bytes: int = 0
    received: int = 0
    """MQTT messages received (commands and acks)."""
    handler_errors: int = 0

    def copy(self) -> SimStats:
        out = SimStats()
        for f in fields(self):
            value = getattr(self, f.name)
            setattr(out, f.name, Counter(value) if isinstance(value, Counter) else value)
        return out

    def as_dict(self) -> dict[str, Any]:
        """Plain data (for JSON output)."""
        return {f.name: (dict(sorted(v.items())) if isinstance(v := getattr(self, f.name), Counter) else v)
                for f in fields(self)}
