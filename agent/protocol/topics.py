"""Identifiers and MQTT topics of the wire contract.

Every device publishes and subscribes under ``fleet/v1/{device_id}/{channel}``; provisioning (before a
device has an id) lives under ``provision/v1/{claim_id}/{request|response}``. The ``v1`` in the topic
is the *topic layout* version, independent of the message schema version carried in each payload.

Identifiers are deliberately narrow (``^[a-z0-9][a-z0-9._-]{0,63}$``): they end up in topics, file
names, database keys and log lines, so they must never contain MQTT wildcards (``+``, ``#``), level
separators (``/``), a leading ``$`` (broker-reserved topics), NUL, whitespace or uppercase (two ids
differing only in case would be two devices on the broker but one on a case-insensitive file system).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from agent.protocol.errors import InvalidIdentifierError, TopicError, _short_repr

__all__ = [
    "CHANNEL_SPECS",
    "IDENTIFIER_PATTERN",
    "PROVISION_PREFIX",
    "PROVISION_QOS",
    "PROVISION_RETAINED",
    "TOPIC_PREFIX",
    "Channel",
    "ChannelSpec",
    "Direction",
    "ProvisionKind",
    "device_topic",
    "is_valid_identifier",
    "parse_device_topic",
    "parse_provision_topic",
    "provision_subscription",
    "provision_topic",
    "shared_subscription",
    "subscription",
    "validate_claim_id",
    "validate_device_id",
    "validate_identifier",
]

TOPIC_PREFIX: Final = "fleet/v1"
"""Prefix of every per-device topic: ``fleet/v1/{device_id}/{channel}``."""

PROVISION_PREFIX: Final = "provision/v1"
"""Prefix of provisioning topics: ``provision/v1/{claim_id}/{request|response}``."""

IDENTIFIER_PATTERN: Final = r"[a-z0-9][a-z0-9._-]{0,63}"
"""The identifier rule (matched against the whole string): 1-64 characters of ``a-z 0-9 . _ -``,
starting with a letter or digit. Used for device ids, claim ids, model names, stream names and
shared-subscription groups."""

_IDENTIFIER_RE: Final = re.compile(IDENTIFIER_PATTERN)
_ALLOWED: Final = "1-64 characters of a-z, 0-9, '.', '_' or '-', starting with a-z or 0-9"


class Channel(enum.StrEnum):
    """The last topic level of a device topic: what kind of traffic flows there."""

    STATUS = "status"
    """Device -> server, retained: current :class:`~agent.protocol.messages.Status`; the MQTT last will
    publishes ``Status.offline`` here."""
    EVENTS = "events"
    """Device -> server: sequenced :class:`~agent.protocol.messages.Event` stream."""
    DRIFT = "drift"
    """Device -> server: sequenced :class:`~agent.protocol.messages.DriftWindow` stream."""
    HEARTBEAT = "heartbeat"
    """Device -> server: periodic :class:`~agent.protocol.messages.Heartbeat` (liveness)."""
    COMMANDS = "commands"
    """Server -> device: :class:`~agent.protocol.messages.Command` (deploy / cancel, resent until the
    device answers with an event carrying the ``command_id``)."""
    ACKS = "acks"
    """Server -> device: :class:`~agent.protocol.messages.Ack` of stored stream messages."""


class Direction(enum.StrEnum):
    """Who publishes on a channel."""

    DEVICE_TO_SERVER = "device_to_server"
    SERVER_TO_DEVICE = "server_to_device"


class ProvisionKind(enum.StrEnum):
    """Last level of a provisioning topic."""

    REQUEST = "request"
    """Device -> server: claim request."""
    RESPONSE = "response"
    """Server -> device: claim response."""


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """How a channel is published: direction, MQTT QoS and the retain flag."""

    direction: Direction
    qos: int
    retained: bool


CHANNEL_SPECS: Final[Mapping[Channel, ChannelSpec]] = MappingProxyType(
    {
        Channel.STATUS: ChannelSpec(Direction.DEVICE_TO_SERVER, qos=1, retained=True),
        Channel.EVENTS: ChannelSpec(Direction.DEVICE_TO_SERVER, qos=1, retained=False),
        Channel.DRIFT: ChannelSpec(Direction.DEVICE_TO_SERVER, qos=1, retained=False),
        Channel.HEARTBEAT: ChannelSpec(Direction.DEVICE_TO_SERVER, qos=1, retained=False),
        Channel.COMMANDS: ChannelSpec(Direction.SERVER_TO_DEVICE, qos=1, retained=False),
        Channel.ACKS: ChannelSpec(Direction.SERVER_TO_DEVICE, qos=1, retained=False),
    }
)
"""Direction, QoS and retain flag of every channel. Everything is QoS 1 (at least once: receivers
de-duplicate by sequence number); only ``status`` is retained, so a subscriber learns each device's
current state (or its last will) immediately."""

_CHANNELS: Final = frozenset(c.value for c in Channel)
_PROVISION_KINDS: Final = frozenset(k.value for k in ProvisionKind)

PROVISION_QOS: Final = 1
"""QoS of both provisioning topics."""

PROVISION_RETAINED: Final = False
"""Provisioning messages are never retained."""


def is_valid_identifier(value: object) -> bool:
    """True if ``value`` is a ``str`` matching :data:`IDENTIFIER_PATTERN` in full."""
    return isinstance(value, str) and _IDENTIFIER_RE.fullmatch(value) is not None


def validate_identifier(value: object, what: str = "identifier", *, field: str | None = None) -> str:
    """Return ``value`` (as a plain ``str``) if it is a valid identifier, else raise
    :class:`InvalidIdentifierError` saying what is allowed.

    ``what`` names the identifier in the message ("device id", "model name", ...); ``field`` is the
    error's field path (default: ``what`` with spaces replaced by ``_``, e.g. ``device_id``).
    """
    if isinstance(value, str) and _IDENTIFIER_RE.fullmatch(value) is not None:
        return str(value)
    got = "" if isinstance(value, str) else f" (a {type(value).__name__}, not a str)"
    raise InvalidIdentifierError(
        f"invalid {what} {_short_repr(value)}{got}: must be {_ALLOWED}",
        field=field if field is not None else what.replace(" ", "_"),
    )


def validate_device_id(device_id: object) -> str:
    """Return ``device_id`` if it is a valid device id, else raise :class:`InvalidIdentifierError`."""
    return validate_identifier(device_id, "device id")


def validate_claim_id(claim_id: object) -> str:
    """Return ``claim_id`` if it is a valid provisioning claim id (same rules as device ids)."""
    return validate_identifier(claim_id, "claim id")


def _channel(channel: object) -> Channel:
    if isinstance(channel, str) and channel in _CHANNELS:
        return Channel(channel)
    allowed = ", ".join(c.value for c in Channel)
    raise TopicError(f"unknown channel {_short_repr(channel)}; expected one of: {allowed}")


def _provision_kind(kind: object) -> ProvisionKind:
    if isinstance(kind, str) and kind in _PROVISION_KINDS:
        return ProvisionKind(kind)
    raise TopicError(f"unknown provisioning topic kind {_short_repr(kind)}; expected 'request' or 'response'")


def device_topic(device_id: str, channel: Channel) -> str:
    """``fleet/v1/{device_id}/{channel}``; raises :class:`InvalidIdentifierError` for a bad id and
    :class:`TopicError` for an unknown channel."""
    return f"{TOPIC_PREFIX}/{validate_device_id(device_id)}/{_channel(channel).value}"


def parse_device_topic(topic: str) -> tuple[str, Channel]:
    """Split a concrete device topic into ``(device_id, channel)``.

    Strict: exactly ``fleet/v1/<valid id>/<known channel>``, no wildcards, no extra or empty levels.
    Anything else raises :class:`TopicError` (so a server can drop traffic on foreign topics).
    """
    if not isinstance(topic, str):
        raise TopicError(f"topic must be a str, not {type(topic).__name__}")
    levels = topic.split("/")
    if len(levels) != 4 or f"{levels[0]}/{levels[1]}" != TOPIC_PREFIX:
        raise TopicError(f"not a device topic {_short_repr(topic)}: expected '{TOPIC_PREFIX}/<id>/<channel>'")
    device_id, channel = levels[2], levels[3]
    if not is_valid_identifier(device_id):
        raise TopicError(f"invalid device id in topic {_short_repr(topic)}: must be {_ALLOWED}")
    return device_id, _channel(channel)


def subscription(channel: Channel) -> str:
    """Filter matching ``channel`` for every device, e.g. ``fleet/v1/+/drift``."""
    return f"{TOPIC_PREFIX}/+/{_channel(channel).value}"


def shared_subscription(group: str, channel: Channel) -> str:
    """MQTT 5 shared subscription ``$share/{group}/fleet/v1/+/{channel}`` so several server workers
    split one channel's traffic. ``group`` follows the identifier rules."""
    return f"$share/{validate_identifier(group, 'subscription group')}/{subscription(channel)}"


def provision_topic(claim_id: str, kind: ProvisionKind) -> str:
    """``provision/v1/{claim_id}/{request|response}``."""
    return f"{PROVISION_PREFIX}/{validate_claim_id(claim_id)}/{_provision_kind(kind).value}"


def parse_provision_topic(topic: str) -> tuple[str, ProvisionKind]:
    """Split a provisioning topic into ``(claim_id, kind)``; strict like :func:`parse_device_topic`."""
    if not isinstance(topic, str):
        raise TopicError(f"topic must be a str, not {type(topic).__name__}")
    levels = topic.split("/")
    if len(levels) != 4 or f"{levels[0]}/{levels[1]}" != PROVISION_PREFIX:
        raise TopicError(
            f"not a provisioning topic {_short_repr(topic)}: expected '{PROVISION_PREFIX}/<claim id>/<kind>'"
        )
    claim_id, kind = levels[2], levels[3]
    if not is_valid_identifier(claim_id):
        raise TopicError(f"invalid claim id in topic {_short_repr(topic)}: must be {_ALLOWED}")
    return claim_id, _provision_kind(kind)


def provision_subscription(kind: ProvisionKind) -> str:
    """Filter matching ``kind`` for every claim, e.g. ``provision/v1/+/request`` (the server's)."""
    return f"{PROVISION_PREFIX}/+/{_provision_kind(kind).value}"
