"""Topics and identifiers of the wire contract: build/parse round trips and strict refusal."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.protocol import (
    CHANNEL_SPECS,
    PROVISION_QOS,
    PROVISION_RETAINED,
    TOPIC_PREFIX,
    Channel,
    Direction,
    InvalidIdentifierError,
    ProtocolError,
    ProvisionKind,
    TopicError,
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
)

BAD_IDS = [
    "+",
    "#",
    "/",
    "a/b",
    "a+b",
    "dev#1",
    "a\x00b",
    "\x00",
    "",
    "a" * 65,
    "Cam-01",
    "CAM",
    "$SYS",
    "$share",
    " cam",
    "cam 1",
    "cam\n",
    "-cam",
    ".cam",
    "_cam",
    "..",
    "caméra",
    "cam\t1",
]

GOOD_IDS = ["a", "0", "cam-0042", "edge.box_7", "a" * 64, "9-._"]

valid_ids = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True)


@pytest.mark.parametrize("device_id", GOOD_IDS)
def test_good_ids_accepted(device_id: str) -> None:
    assert validate_device_id(device_id) == device_id
    assert validate_claim_id(device_id) == device_id
    assert is_valid_identifier(device_id)


@pytest.mark.parametrize("device_id", BAD_IDS)
def test_bad_ids_refused_with_rule_in_message(device_id: str) -> None:
    with pytest.raises(InvalidIdentifierError) as info:
        validate_device_id(device_id)
    assert "a-z, 0-9" in str(info.value)
    assert "1-64" in str(info.value)
    assert info.value.field == "device_id"
    assert isinstance(info.value, ProtocolError)
    assert not is_valid_identifier(device_id)
    with pytest.raises(InvalidIdentifierError):
        device_topic(device_id, Channel.STATUS)
    with pytest.raises(InvalidIdentifierError):
        provision_topic(device_id, ProvisionKind.REQUEST)


@pytest.mark.parametrize("value", [None, 42, b"cam", ["cam"]])
def test_non_str_ids_refused(value: object) -> None:
    with pytest.raises(InvalidIdentifierError, match="not a str"):
        validate_device_id(value)


@pytest.mark.parametrize("channel", list(Channel))
def test_device_topic_round_trip_every_channel(channel: Channel) -> None:
    topic = device_topic("cam-0042", channel)
    assert topic == f"fleet/v1/cam-0042/{channel.value}"
    assert topic.startswith(TOPIC_PREFIX + "/")
    device_id, parsed = parse_device_topic(topic)
    assert (device_id, parsed) == ("cam-0042", channel)
    assert parsed is channel


@given(device_id=valid_ids, channel=st.sampled_from(list(Channel)))
def test_device_topic_round_trip_property(device_id: str, channel: Channel) -> None:
    assert parse_device_topic(device_topic(device_id, channel)) == (device_id, channel)


def test_channel_accepts_plain_strings_and_refuses_unknown() -> None:
    assert device_topic("cam", "drift") == "fleet/v1/cam/drift"  # type: ignore[arg-type]
    with pytest.raises(TopicError, match="unknown channel"):
        device_topic("cam", "telemetry")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "fleet/v1/cam",
        "fleet/v1/cam/status/extra",
        "fleet/v1/cam/",
        "fleet/v1//status",
        "/fleet/v1/cam/status",
        "fleet/v2/cam/status",
        "Fleet/v1/cam/status",
        "other/v1/cam/status",
        "fleet/v1/+/status",
        "fleet/v1/#",
        "fleet/v1/cam/#",
        "fleet/v1/cam/+",
        "fleet/v1/CAM/status",
        "fleet/v1/$SYS/status",
        "fleet/v1/cam/telemetry",
        "fleet/v1/cam/Status",
        "fleet/v1/cam/status\x00",
        "$share/g/fleet/v1/cam/status",
        "provision/v1/cam/request",
        "$SYS/broker/uptime",
    ],
)
def test_parse_device_topic_rejects_foreign_and_malformed(topic: str) -> None:
    with pytest.raises(TopicError):
        parse_device_topic(topic)


def test_parse_device_topic_rejects_non_str() -> None:
    with pytest.raises(TopicError):
        parse_device_topic(b"fleet/v1/cam/status")  # type: ignore[arg-type]


@given(st.text(max_size=80))
def test_parse_device_topic_fuzz_raises_only_topic_error(topic: str) -> None:
    try:
        device_id, channel = parse_device_topic(topic)
    except TopicError:
        return
    assert device_topic(device_id, channel) == topic


def test_subscriptions() -> None:
    assert subscription(Channel.DRIFT) == "fleet/v1/+/drift"
    assert shared_subscription("ingest", Channel.EVENTS) == "$share/ingest/fleet/v1/+/events"
    for bad_group in ["", "a/b", "+", "#", "Group"]:
        with pytest.raises(InvalidIdentifierError):
            shared_subscription(bad_group, Channel.EVENTS)
    assert provision_subscription(ProvisionKind.REQUEST) == "provision/v1/+/request"


@pytest.mark.parametrize("kind", list(ProvisionKind))
def test_provision_topic_round_trip(kind: ProvisionKind) -> None:
    topic = provision_topic("claim-1234", kind)
    assert topic == f"provision/v1/claim-1234/{kind.value}"
    assert parse_provision_topic(topic) == ("claim-1234", kind)


@pytest.mark.parametrize(
    "topic",
    [
        "provision/v1/claim",
        "provision/v1/claim/ack",
        "provision/v1/Claim/request",
        "provision/v1/+/request",
        "provision/v2/claim/request",
        "provision/v1/claim/request/x",
        "fleet/v1/claim/status",
    ],
)
def test_parse_provision_topic_rejects(topic: str) -> None:
    with pytest.raises(TopicError):
        parse_provision_topic(topic)


def test_channel_table() -> None:
    assert set(CHANNEL_SPECS) == set(Channel)
    assert all(spec.qos == 1 for spec in CHANNEL_SPECS.values())
    assert PROVISION_QOS == 1
    assert PROVISION_RETAINED is False
    assert [c for c, spec in CHANNEL_SPECS.items() if spec.retained] == [Channel.STATUS]
    to_device = {c for c, spec in CHANNEL_SPECS.items() if spec.direction is Direction.SERVER_TO_DEVICE}
    assert to_device == {Channel.COMMANDS, Channel.ACKS}
    with pytest.raises(TypeError):
        CHANNEL_SPECS[Channel.STATUS] = CHANNEL_SPECS[Channel.EVENTS]  # type: ignore[index]
