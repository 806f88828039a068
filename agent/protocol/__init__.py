"""The device <-> fleet-server wire contract over MQTT: topics, message types, framing, sequencing.

This package is a *shared contract*. The edge agent and the fleet server both import it, so it
imports only the standard library and ``msgpack``, performs no I/O and knows nothing about MQTT
clients. ``docs/wire-contract.md`` is the prose version; ``tests/golden/protocol/`` holds byte-exact
example frames that both sides' tests decode.

Quick tour::

    from agent.protocol import Heartbeat, encode, decode_for_topic, message_topic

    msg = Heartbeat(device_id="cam-0042", sent_at=1_700_000_000.0, uptime_s=12.5)
    client.publish(message_topic(msg), encode(msg), qos=1)  # fleet/v1/cam-0042/heartbeat
    ...
    try:
        msg = decode_for_topic(topic, payload)           # server side
    except ProtocolError:
        rejected.inc()                                   # reject and count, never crash

Submodules: :mod:`~agent.protocol.errors`, :mod:`~agent.protocol.topics`,
:mod:`~agent.protocol.messages`, :mod:`~agent.protocol.codec`, :mod:`~agent.protocol.sequence`.
"""

from agent.protocol.codec import (
    COMPRESS_THRESHOLD,
    FRAME_MSGPACK,
    FRAME_ZLIB,
    MAX_BODY_SIZE,
    MAX_FRAME_SIZE,
    MAX_JSON_SIZE,
    ZLIB_LEVEL,
    decode,
    decode_for_topic,
    encode,
    from_json,
    to_json,
)
from agent.protocol.errors import (
    DecodeError,
    InvalidFieldError,
    InvalidIdentifierError,
    MessageTooLargeError,
    ProtocolError,
    TopicError,
    UnknownMessageTypeError,
    UnsupportedSchemaVersionError,
)
from agent.protocol.messages import (
    ENVELOPE_KEYS,
    MAX_AGENT_VERSION_LEN,
    MAX_NESTING,
    MAX_REASON_LEN,
    MESSAGE_TYPES,
    SCHEMA_VERSION,
    Ack,
    DriftWindow,
    Event,
    Heartbeat,
    Message,
    ModelState,
    Status,
    StatusState,
    from_wire,
    message_topic,
    to_wire,
)
from agent.protocol.sequence import (
    MAX_SEQ,
    RangeSet,
    ReceivedTracker,
    RecordResult,
    SeqRange,
    Stream,
    validate_ranges,
    validate_seq,
)
from agent.protocol.topics import (
    CHANNEL_SPECS,
    IDENTIFIER_PATTERN,
    PROVISION_PREFIX,
    PROVISION_QOS,
    PROVISION_RETAINED,
    TOPIC_PREFIX,
    Channel,
    ChannelSpec,
    Direction,
    ProvisionKind,
    device_topic,
    is_valid_identifier,
    parse_device_topic,
    parse_provision_topic,
    provision_subscription,
    provision_topic,
    shared_subscription,
    subscription,
    validate_claim_id,
    validate_device_id,
    validate_identifier,
)

__all__ = [
    "CHANNEL_SPECS",
    "COMPRESS_THRESHOLD",
    "ENVELOPE_KEYS",
    "FRAME_MSGPACK",
    "FRAME_ZLIB",
    "IDENTIFIER_PATTERN",
    "MAX_AGENT_VERSION_LEN",
    "MAX_BODY_SIZE",
    "MAX_FRAME_SIZE",
    "MAX_JSON_SIZE",
    "MAX_NESTING",
    "MAX_REASON_LEN",
    "MAX_SEQ",
    "MESSAGE_TYPES",
    "PROVISION_PREFIX",
    "PROVISION_QOS",
    "PROVISION_RETAINED",
    "SCHEMA_VERSION",
    "TOPIC_PREFIX",
    "ZLIB_LEVEL",
    "Ack",
    "Channel",
    "ChannelSpec",
    "DecodeError",
    "Direction",
    "DriftWindow",
    "Event",
    "Heartbeat",
    "InvalidFieldError",
    "InvalidIdentifierError",
    "Message",
    "MessageTooLargeError",
    "ModelState",
    "ProtocolError",
    "ProvisionKind",
    "RangeSet",
    "ReceivedTracker",
    "RecordResult",
    "SeqRange",
    "Status",
    "StatusState",
    "Stream",
    "TopicError",
    "UnknownMessageTypeError",
    "UnsupportedSchemaVersionError",
    "decode",
    "decode_for_topic",
    "device_topic",
    "encode",
    "from_json",
    "from_wire",
    "is_valid_identifier",
    "message_topic",
    "parse_device_topic",
    "parse_provision_topic",
    "provision_subscription",
    "provision_topic",
    "shared_subscription",
    "subscription",
    "to_json",
    "to_wire",
    "validate_claim_id",
    "validate_device_id",
    "validate_identifier",
    "validate_ranges",
    "validate_seq",
]
