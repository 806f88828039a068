"""Messages and codec: round trips, golden frames, versioning, validation and hostile input."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.protocol import (
    COMPRESS_THRESHOLD,
    FRAME_MSGPACK,
    FRAME_ZLIB,
    MAX_BODY_SIZE,
    MAX_FRAME_SIZE,
    MAX_NESTING,
    MAX_SEQ,
    MESSAGE_TYPES,
    SCHEMA_VERSION,
    Ack,
    Channel,
    Command,
    DecodeError,
    DriftWindow,
    Event,
    Heartbeat,
    InvalidFieldError,
    InvalidIdentifierError,
    Message,
    MessageTooLargeError,
    ModelState,
    ProtocolError,
    RangeSet,
    Status,
    TopicError,
    UnknownMessageTypeError,
    UnsupportedSchemaVersionError,
    decode,
    decode_for_topic,
    device_topic,
    encode,
    from_json,
    from_wire,
    message_topic,
    to_json,
    to_wire,
)

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "protocol"
GOLDEN_NAMES = sorted(p.stem for p in GOLDEN.glob("*.msgpack"))
T0 = 1767225600.0


def golden_bytes(name: str) -> bytes:
    return (GOLDEN / f"{name}.msgpack").read_bytes()


def raw_map(name: str) -> dict[str, Any]:
    """The decoded plain map of an uncompressed golden frame, to mutate into bad inputs."""
    frame = golden_bytes(name)
    assert frame[0] == FRAME_MSGPACK
    data: dict[str, Any] = msgpack.unpackb(frame[1:])
    return data


def frame(data: Any) -> bytes:
    body: bytes = msgpack.packb(data, use_bin_type=True)
    return bytes([FRAME_MSGPACK]) + body


# --------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------

ids = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True)
seqs = st.integers(min_value=0, max_value=MAX_SEQ)
versions = st.integers(min_value=0, max_value=2**63 - 1)
times = st.floats(min_value=0, max_value=4e9, allow_nan=False, allow_infinity=False)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
plain = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
plain_maps = st.dictionaries(st.text(max_size=10), plain, max_size=4)
# unknown fields from a "newer minor": any key that is not a known field (prefix keeps them apart)
extras = st.dictionaries(st.text(max_size=8).map(lambda k: "x_" + k), plain, max_size=3)
schema_versions = st.tuples(st.just(SCHEMA_VERSION[0]), st.integers(min_value=0, max_value=5))


@st.composite
def range_tuples(draw: st.DrawFn, members: st.SearchStrategy[set[int]]) -> tuple[tuple[int, int], ...]:
    values = draw(members)
    rs = RangeSet()
    for v in values:
        rs.add(v)
    return rs.ranges()


model_states = st.builds(
    ModelState,
    name=ids,
    version=versions,
    slot=st.none() | ids,
    healthy=st.booleans(),
    extra=st.dictionaries(st.text(max_size=6).map(lambda k: "x_" + k), plain, max_size=2),
)
heartbeats = st.builds(
    Heartbeat, device_id=ids, sent_at=times, uptime_s=times, schema_version=schema_versions, extra=extras
)
statuses = st.builds(
    Status,
    device_id=ids,
    state=st.sampled_from(["online", "offline"]),
    agent_version=st.text(st.characters(codec="ascii", min_codepoint=32, max_codepoint=126), max_size=20),
    models=st.lists(model_states, max_size=3).map(tuple),
    sent_at=st.none() | times,
    schema_version=schema_versions,
    extra=extras,
)
events = st.builds(
    Event,
    device_id=ids,
    stream_seq=seqs,
    kind=st.from_regex(r"[a-z_]{1,32}", fullmatch=True),
    at=times,
    command_id=st.none() | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,20}", fullmatch=True),
    model=st.none() | ids,
    version=st.none() | versions,
    reason=st.none() | st.text(max_size=50),
    detail=plain_maps,
    schema_version=schema_versions,
    extra=extras,
)


@st.composite
def drift_windows(draw: st.DrawFn) -> DriftWindow:
    stream_seq = draw(st.integers(min_value=0, max_value=10_000))
    replaces = None
    if stream_seq > 0 and draw(st.booleans()):
        last = draw(st.integers(min_value=0, max_value=stream_seq - 1))
        replaces = (draw(st.integers(min_value=0, max_value=last)), last)
    start = draw(times)
    return DriftWindow(
        device_id=draw(ids),
        stream_seq=stream_seq,
        model=draw(ids),
        version=draw(versions),
        window_start=start,
        window_end=start + draw(st.floats(min_value=0, max_value=1e6)),
        samples=draw(st.integers(min_value=0, max_value=2**40)),
        replaces=replaces,
        features=draw(st.dictionaries(st.text(max_size=10), plain_maps, max_size=3)),
        slis=draw(plain_maps),
        schema_version=draw(schema_versions),
        extra=draw(extras),
    )


@st.composite
def acks(draw: st.DrawFn) -> Ack:
    members = draw(st.sets(st.integers(0, 300), max_size=30))
    stored = draw(st.sets(st.sampled_from(sorted(members)), max_size=len(members))) if members else set()
    return Ack(
        device_id=draw(ids),
        stream=draw(st.sampled_from(["events", "drift"]) | ids),
        seqs=draw(range_tuples(st.just(stored))),
        missing=draw(range_tuples(st.just(members - stored))),
        schema_version=draw(schema_versions),
        extra=draw(extras),
    )


commands = st.builds(
    Command,
    device_id=ids,
    command_id=ids,
    kind=st.sampled_from(["deploy", "cancel"]),
    order=plain_maps,
    sent_at=times,
    schema_version=schema_versions,
    extra=extras,
)


messages: st.SearchStrategy[Message] = st.one_of(heartbeats, statuses, events, drift_windows(), acks(), commands)


# --------------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------------


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(msg=messages)
def test_round_trip_every_type(msg: Message) -> None:
    data = encode(msg)
    back = decode(data)
    assert back == msg
    assert type(back) is type(msg)
    assert encode(back) == data  # byte-stable
    assert decode(encode(msg, compress=True)) == msg
    assert decode(encode(msg, compress=False)) == msg
    assert from_json(to_json(msg)) == msg
    assert from_json(to_json(msg, indent=2)) == msg
    assert from_wire(json.loads(to_json(msg))) == msg
    assert hash(back) == hash(msg)


@pytest.mark.parametrize("strategy", [heartbeats, statuses, events, drift_windows(), acks(), commands],
                         ids=["heartbeat", "status", "event", "drift_window", "ack", "command"])
@settings(max_examples=40)
@given(data=st.data())
def test_round_trip_per_type(strategy: st.SearchStrategy[Message], data: st.DataObject) -> None:
    msg = data.draw(strategy)
    assert decode(encode(msg)) == msg


def test_canonical_encoding_ignores_insertion_order() -> None:
    a = Event(device_id="d", stream_seq=1, kind="k", at=1.0, detail={"b": 1, "a": {"y": 2, "x": 3}})
    b = Event(device_id="d", stream_seq=1, kind="k", at=1.0, detail={"a": {"x": 3, "y": 2}, "b": 1})
    assert encode(a) == encode(b)
    assert to_json(a) == to_json(b)
    keys = list(msgpack.unpackb(encode(a)[1:]))
    assert keys == sorted(keys)


def test_ints_for_float_fields_are_accepted() -> None:
    """Some encoders (JavaScript) write whole floats as ints; the value is the same."""
    data = raw_map("heartbeat")
    data["sent_at"] = 1767225630
    msg = decode(frame(data))
    assert isinstance(msg, Heartbeat)
    assert msg.sent_at == 1767225630.0 and isinstance(msg.sent_at, float)
    assert Heartbeat(device_id="d", sent_at=5, uptime_s=0).sent_at == 5.0


def test_values_are_copied_and_normalised() -> None:
    detail: dict[str, Any] = {"l": (1, 2), "m": {"k": [3]}}
    msg = Event(device_id="d", stream_seq=0, kind="k", at=0.0, detail=detail)
    detail["m"]["k"].append(4)
    assert msg.detail == {"l": [1, 2], "m": {"k": [3]}}
    ack = Ack(device_id="d", stream="events", seqs=[[0, 3]])  # type: ignore[arg-type]
    assert ack.seqs == ((0, 3),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ack.stream = "drift"  # type: ignore[misc]


def test_message_topic_and_registry() -> None:
    assert set(MESSAGE_TYPES) == {"heartbeat", "status", "event", "drift_window", "ack", "command"}
    channels = {cls: cls.CHANNEL for cls in MESSAGE_TYPES.values()}
    assert channels == {Heartbeat: Channel.HEARTBEAT, Status: Channel.STATUS, Event: Channel.EVENTS,
                        DriftWindow: Channel.DRIFT, Ack: Channel.ACKS, Command: Channel.COMMANDS}
    assert message_topic(decode(golden_bytes("ack"))) == "fleet/v1/cam-0042/acks"
    assert message_topic(Status.offline("cam-1")) == "fleet/v1/cam-1/status"


# --------------------------------------------------------------------------------------------------
# Golden files
# --------------------------------------------------------------------------------------------------


def test_golden_set_is_complete() -> None:
    assert set(GOLDEN_NAMES) >= {
        "heartbeat", "status", "status_offline", "event", "drift_window", "drift_window_compressed", "ack",
        "status_v1_1_with_extra", "command_deploy", "command_cancel", "event_installed", "event_rolled_back",
    }
    for name in GOLDEN_NAMES:
        assert (GOLDEN / f"{name}.json").is_file()


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_golden_byte_stable_and_json_matches(name: str) -> None:
    data = golden_bytes(name)
    msg = decode(data)
    if data[0] == FRAME_ZLIB:
        # deflate output depends on the zlib build; the canonical bytes are the inflated body
        assert encode(msg, compress=False) == bytes([FRAME_MSGPACK]) + zlib.decompress(data[1:])
        assert encode(msg)[0] == FRAME_ZLIB
    else:
        assert encode(msg, compress=False) == data
        if len(data) - 1 <= COMPRESS_THRESHOLD:
            assert encode(msg) == data  # small bodies are never compressed by default
    text = (GOLDEN / f"{name}.json").read_text(encoding="utf-8")
    assert from_json(text) == msg
    assert to_json(msg, indent=2) + "\n" == text


def test_golden_heartbeat() -> None:
    msg = decode(golden_bytes("heartbeat"))
    assert msg == Heartbeat(device_id="cam-0042", sent_at=T0 + 30.25, uptime_s=86400.5)
    assert msg.schema_version == (1, 0) and msg.extra == {}


def test_golden_status() -> None:
    msg = decode(golden_bytes("status"))
    assert isinstance(msg, Status)
    assert (msg.device_id, msg.state, msg.agent_version) == ("cam-0042", "online", "0.1.0")
    assert msg.sent_at == T0 + 1.5
    assert msg.models == (
        ModelState(name="person-detector", version=4, slot="b", healthy=True),
        ModelState(name="anomaly.tiny", version=0, slot=None, healthy=False),
    )


def test_golden_status_offline_is_the_last_will() -> None:
    msg = decode(golden_bytes("status_offline"))
    assert msg == Status.offline("cam-0042", agent_version="0.1.0")
    assert isinstance(msg, Status) and msg.state == "offline" and msg.sent_at is None and msg.models == ()


def test_golden_event() -> None:
    msg = decode(golden_bytes("event"))
    assert isinstance(msg, Event)
    assert (msg.stream_seq, msg.kind, msg.at) == (17, "model_activated", T0 + 42.0)
    assert msg.command_id == "cmd-7f3a"
    assert (msg.model, msg.version, msg.reason) == ("person-detector", 4, None)
    assert msg.detail == {"slot": "b", "load_ms": 412.5, "previous_version": 3}


def test_golden_drift_windows() -> None:
    small = decode(golden_bytes("drift_window"))
    assert isinstance(small, DriftWindow)
    assert (small.stream_seq, small.model, small.version, small.samples) == (5, "person-detector", 4, 1200)
    assert (small.window_start, small.window_end, small.replaces) == (T0, T0 + 300.0, None)
    assert small.features["brightness"]["counts"] == [3, 40, 500, 600, 57]
    assert small.slis == {"latency_ms_p50": 18.5, "latency_ms_p99": 41.0, "errors": 0}
    assert golden_bytes("drift_window")[0] == FRAME_MSGPACK

    big_frame = golden_bytes("drift_window_compressed")
    assert big_frame[0] == FRAME_ZLIB
    big = decode(big_frame)
    assert isinstance(big, DriftWindow)
    assert (big.stream_seq, big.replaces, big.samples) == (9, (6, 8), 14400)
    assert len(big.features) == 12 and len(big.features["feature_03"]["counts"]) == 16


def test_golden_ack() -> None:
    msg = decode(golden_bytes("ack"))
    assert msg == Ack(device_id="cam-0042", stream="events", seqs=((0, 16), (18, 20)), missing=((17, 17),))


def test_newer_minor_keeps_unknown_fields_bytes_level() -> None:
    data = golden_bytes("status_v1_1_with_extra")
    msg = decode(data)
    assert isinstance(msg, Status)
    assert msg.schema_version == (1, 1)
    assert msg.extra == {"battery_pct": 87}
    assert msg.models[0].extra == {"accelerator": "npu"}
    assert (msg.agent_version, msg.models[0].version) == ("0.2.0", 5)
    assert encode(msg) == data  # written back unchanged, version included
    assert from_json(to_json(msg)) == msg
    # a relay that rebuilds the message keeps the unknown field too
    assert encode(dataclasses.replace(msg, sent_at=T0 + 8.0)) != data
    assert decode(encode(dataclasses.replace(msg, sent_at=T0 + 8.0))).extra == {"battery_pct": 87}


# --------------------------------------------------------------------------------------------------
# Versioning and structural errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [[2, 0], [99, 3], [0, 9]])
def test_other_major_rejected(version: list[int]) -> None:
    data = raw_map("status")
    data["v"] = version
    with pytest.raises(UnsupportedSchemaVersionError) as info:
        decode(frame(data))
    assert info.value.version == tuple(version)
    data["t"] = "brand_new_type"  # version is checked before the type tag
    with pytest.raises(UnsupportedSchemaVersionError):
        decode(frame(data))
    with pytest.raises(UnsupportedSchemaVersionError):
        Heartbeat(device_id="d", sent_at=0, uptime_s=0, schema_version=(2, 0))


@pytest.mark.parametrize("version", [None, [1], [1, 0, 0], "1.0", [1, -1], [True, 0], [1, 0.0], {"major": 1}])
def test_malformed_version_is_decode_error(version: object) -> None:
    data = raw_map("heartbeat")
    data["v"] = version
    with pytest.raises(DecodeError) as info:
        decode(frame(data))
    assert info.value.field == "v"


def test_unknown_type_rejected() -> None:
    data = raw_map("heartbeat")
    data["t"] = "telemetry"
    with pytest.raises(UnknownMessageTypeError) as info:
        decode(frame(data))
    assert info.value.type_tag == "telemetry"
    data["t"] = 7
    with pytest.raises(DecodeError, match="t: "):
        decode(frame(data))


ALL_FIELDS = [
    (name, key)
    for name in ("heartbeat", "status", "event", "drift_window", "ack", "command_deploy")
    for key in raw_map(name)
]


@pytest.mark.parametrize(("name", "key"), ALL_FIELDS)
def test_missing_field_is_named(name: str, key: str) -> None:
    data = raw_map(name)
    del data[key]
    with pytest.raises(DecodeError) as info:
        decode(frame(data))
    assert info.value.field == key
    assert key in str(info.value)


def test_missing_nested_field_is_named() -> None:
    data = raw_map("status")
    del data["models"][1]["healthy"]
    with pytest.raises(DecodeError) as info:
        decode(frame(data))
    assert info.value.field == "models[1].healthy"


WRONG_TYPES: list[tuple[str, str, object]] = [
    ("heartbeat", "device_id", 42),
    ("heartbeat", "sent_at", "yesterday"),
    ("heartbeat", "uptime_s", None),
    ("heartbeat", "uptime_s", [1.0]),
    ("status", "state", "rebooting"),
    ("status", "state", 1),
    ("status", "agent_version", 1),
    ("status", "models", {"name": "m"}),
    ("status", "models", ["m"]),
    ("status", "sent_at", "now"),
    ("event", "stream_seq", "17"),
    ("event", "stream_seq", 17.0),
    ("event", "kind", "Model-Activated"),
    ("event", "kind", ""),
    ("event", "at", {}),
    ("event", "command_id", 5),
    ("event", "command_id", "has space"),
    ("event", "model", "Person"),
    ("event", "version", "4"),
    ("event", "version", 4.0),
    ("event", "reason", 3),
    ("event", "detail", [1, 2]),
    ("event", "detail", None),
    ("drift_window", "samples", -1),
    ("drift_window", "samples", 1.5),
    ("drift_window", "version", -1),
    ("drift_window", "window_start", -5.0),
    ("drift_window", "replaces", [1]),
    ("drift_window", "replaces", "0-4"),
    ("drift_window", "features", {"f": [1, 2]}),
    ("drift_window", "features", []),
    ("drift_window", "slis", "fast"),
    ("ack", "stream", "Events"),
    ("ack", "stream", None),
    ("ack", "seqs", [[3, 1]]),
    ("ack", "seqs", [[0, 5], [4, 9]]),
    ("ack", "seqs", "0-3"),
    ("ack", "missing", [[-1, 2]]),
    ("command_deploy", "command_id", "CMD-1"),
    ("command_deploy", "command_id", "cmd/1"),
    ("command_deploy", "command_id", None),
    ("command_deploy", "kind", "rollback"),
    ("command_deploy", "kind", ["deploy"]),
    ("command_deploy", "order", [1, 2]),
    ("command_deploy", "order", None),
    ("command_deploy", "order", {"signed": {"n": b"\x00"}}),
    ("command_deploy", "sent_at", "now"),
    ("command_deploy", "sent_at", -1.0),
    ("command_deploy", "sent_at", True),
]


@pytest.mark.parametrize(("name", "key", "value"), WRONG_TYPES)
def test_wrong_type_or_value_is_named(name: str, key: str, value: object) -> None:
    data = raw_map(name)
    data[key] = value
    with pytest.raises(DecodeError) as info:
        decode(frame(data))
    assert info.value.field is not None
    assert info.value.field.split("[")[0].split(".")[0] == key, info.value


@pytest.mark.parametrize(
    ("name", "path", "field"),
    [
        ("event", ["version"], "version"),
        ("event", ["stream_seq"], "stream_seq"),
        ("drift_window", ["samples"], "samples"),
        ("drift_window", ["version"], "version"),
        ("status", ["models", 0, "version"], "models[0].version"),
        ("status", ["models", 0, "healthy"], "models[0].healthy"),
        ("ack", ["seqs", 0, 1], "seqs[0][1]"),
    ],
)
def test_bool_is_not_an_int(name: str, path: list[str | int], field: str) -> None:
    data = raw_map(name)
    target: Any = data
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = True if path[-1] != "healthy" else 1  # and an int is not a bool
    with pytest.raises(InvalidFieldError) as info:
        decode(frame(data))
    assert info.value.field == field
    with pytest.raises(InvalidFieldError):
        Event(device_id="d", stream_seq=True, kind="k", at=0.0)
    with pytest.raises(InvalidFieldError):
        ModelState(name="m", version=False, slot=None, healthy=True)


def test_non_map_and_non_str_keys_rejected() -> None:
    with pytest.raises(DecodeError, match="must be a map"):
        decode(frame([1, 2]))
    with pytest.raises(DecodeError):
        decode(bytes([FRAME_MSGPACK]) + msgpack.packb({1: 2}))
    data: dict[Any, Any] = raw_map("heartbeat")
    data[b"raw"] = 1
    with pytest.raises(DecodeError, match="extra"):
        decode(frame(data))


def test_duplicate_keys_rejected() -> None:
    body = bytearray(msgpack.packb(raw_map("heartbeat")))
    assert body[0] == 0x85  # fixmap with 5 entries: append a 6th that repeats "t"
    body[0] = 0x86
    body += msgpack.packb("t") + msgpack.packb("status")
    with pytest.raises(DecodeError, match="duplicate"):
        decode(bytes([FRAME_MSGPACK]) + bytes(body))
    with pytest.raises(DecodeError, match="duplicate"):
        from_json('{"t": "heartbeat", "t": "status"}')


def test_bin_and_ext_types_rejected() -> None:
    data = raw_map("event")
    data["detail"] = {"blob": b"\x00\x01"}
    with pytest.raises(InvalidFieldError, match="bytes is not plain data") as info:
        decode(frame(data))
    assert info.value.field == "detail.blob"
    data["detail"] = {"ts": msgpack.ExtType(5, b"abc")}
    with pytest.raises(DecodeError):
        decode(frame(data))
    data["detail"] = {"ts": msgpack.Timestamp(1, 0)}
    with pytest.raises(DecodeError):
        decode(frame(data))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"\x03\x80",
        b"\xff" * 10,
        b"{\"t\": \"heartbeat\"}",
        b"\x01",
        b"\x01\xc1",
        b"\x01\x85",
        b"\x02",
        b"\x02not zlib at all",
        b"\x02" + zlib.compress(b"\xc1"),
        b"\x02" + zlib.compress(msgpack.packb({"a": 1}))[:-3],
        b"\x02" + zlib.compress(msgpack.packb({"a": 1})) + b"junk",
    ],
)
def test_garbage_is_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(data)


def test_trailing_bytes_rejected() -> None:
    with pytest.raises(DecodeError, match="extra data"):
        decode(golden_bytes("heartbeat") + b"\xc0")


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_every_truncation_is_rejected(name: str) -> None:
    data = golden_bytes(name)
    for cut in range(len(data)):
        with pytest.raises(ProtocolError):
            decode(data[:cut])


# --------------------------------------------------------------------------------------------------
# Size limits
# --------------------------------------------------------------------------------------------------


def test_oversized_frame_rejected_before_parsing() -> None:
    with pytest.raises(MessageTooLargeError) as info:
        decode(b"\x01" + b"\x00" * MAX_FRAME_SIZE)
    assert info.value.limit == MAX_FRAME_SIZE
    with pytest.raises(MessageTooLargeError):
        decode(golden_bytes("status"), max_size=50)
    with pytest.raises(MessageTooLargeError):
        decode(golden_bytes("status"), max_decompressed=100)
    with pytest.raises(MessageTooLargeError):
        decode(golden_bytes("drift_window_compressed"), max_decompressed=1000)


def test_encode_refuses_oversized_messages() -> None:
    huge = Event(device_id="d", stream_seq=0, kind="k", at=0.0, detail={"x": "a" * (MAX_BODY_SIZE + 1)})
    with pytest.raises(MessageTooLargeError, match="message body"):
        encode(huge)
    # compressible but the frame is still too big for a small broker limit
    big = Event(device_id="d", stream_seq=0, kind="k", at=0.0, detail={"x": [float(i) for i in range(5000)]})
    with pytest.raises(MessageTooLargeError, match="frame"):
        encode(big, max_size=1000)
    assert len(encode(big)) <= MAX_FRAME_SIZE


def _bomb(total: int = 50 * 1024 * 1024, chunk: int = 1024 * 1024) -> bytes:
    """zlib stream of ``total`` zero bytes, built without holding them all in memory."""
    comp = zlib.compressobj(9)
    zeros = bytes(chunk)
    parts = [comp.compress(zeros) for _ in range(total // chunk)]
    parts.append(comp.flush())
    return b"".join(parts)


def test_zlib_bomb_rejected_with_bounded_memory() -> None:
    payload = bytes([FRAME_ZLIB]) + _bomb()
    assert len(payload) < MAX_FRAME_SIZE  # the wire-size check alone would not stop it
    tracemalloc.start()
    try:
        with pytest.raises(MessageTooLargeError) as info:
            decode(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.limit == MAX_BODY_SIZE
    assert peak < 4 * MAX_BODY_SIZE, f"decode allocated {peak} bytes for a 50 MB bomb"


def test_compression_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    small = decode(golden_bytes("heartbeat"))
    assert encode(small)[0] == FRAME_MSGPACK
    assert encode(small, compress=True)[0] == FRAME_ZLIB
    big = Event(device_id="d", stream_seq=0, kind="k", at=0.0, detail={"x": "abc" * 400})
    assert len(encode(big, compress=False)) > COMPRESS_THRESHOLD
    assert encode(big)[0] == FRAME_ZLIB
    assert len(encode(big)) < len(encode(big, compress=False))
    assert encode(big, compress=False)[0] == FRAME_MSGPACK
    # over the threshold but compression does not pay off: sent plain (unless compress=True)
    monkeypatch.setattr(zlib, "compress", lambda data, level=-1: data + b"no gain")
    assert encode(big)[0] == FRAME_MSGPACK
    assert encode(big, compress=True)[0] == FRAME_ZLIB


# --------------------------------------------------------------------------------------------------
# Fuzzing: hostile bytes raise ProtocolError subclasses only
# --------------------------------------------------------------------------------------------------


def _decode_or_protocol_error(data: bytes) -> None:
    try:
        msg = decode(data)
    except ProtocolError:
        return
    assert decode(encode(msg)) == msg


@settings(max_examples=1000)
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    _decode_or_protocol_error(data)


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_behind_valid_headers(data: bytes) -> None:
    _decode_or_protocol_error(bytes([FRAME_MSGPACK]) + data)
    _decode_or_protocol_error(bytes([FRAME_ZLIB]) + zlib.compress(data))


@settings(max_examples=500)
@given(name=st.sampled_from(GOLDEN_NAMES), data=st.data())
def test_fuzz_mutated_golden_frames(name: str, data: st.DataObject) -> None:
    frame_bytes = bytearray(golden_bytes(name))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(frame_bytes) - 1))
        frame_bytes[pos] = data.draw(st.integers(0, 255))
    _decode_or_protocol_error(bytes(frame_bytes))


wire_keys = st.sampled_from(
    ["t", "v", "device_id", "models", "seqs", "features", "detail", "stream_seq", "order", "command_id", "kind"]
)
wire_values = st.recursive(
    scalars | st.binary(max_size=4)
    | st.sampled_from(["heartbeat", "status", "event", "drift_window", "ack", "command", "deploy", "cancel"])
    | st.just([1, 0]),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(wire_keys | st.text(max_size=4), c, max_size=4),
    max_leaves=15,
)


@settings(max_examples=500)
@given(wire_values)
def test_fuzz_random_structures(value: Any) -> None:
    _decode_or_protocol_error(frame(value))
    with contextlib.suppress(ProtocolError):
        from_json(json.dumps(value, default=repr))


def test_deep_nesting_is_rejected_not_crashing() -> None:
    nested: Any = 0
    for _ in range(MAX_NESTING + 5):
        nested = [nested]
    data = raw_map("event")
    data["detail"] = {"deep": nested}
    with pytest.raises(InvalidFieldError, match="nested deeper"):
        decode(frame(data))
    with pytest.raises(DecodeError):
        decode(bytes([FRAME_MSGPACK]) + b"\x91" * 5000 + b"\xc0")
    with pytest.raises(DecodeError):
        from_json("[" * 100_000 + "]" * 100_000)


# --------------------------------------------------------------------------------------------------
# Construction-time validation
# --------------------------------------------------------------------------------------------------

CONSTRUCTION_ERRORS: list[tuple[Callable[[], object], type[ProtocolError], str]] = [
    (lambda: Heartbeat(device_id="Cam", sent_at=0, uptime_s=0), InvalidIdentifierError, "device_id"),
    (lambda: Heartbeat(device_id="d", sent_at=math.nan, uptime_s=0), InvalidFieldError, "sent_at"),
    (lambda: Heartbeat(device_id="d", sent_at=0, uptime_s=math.inf), InvalidFieldError, "uptime_s"),
    (lambda: Heartbeat(device_id="d", sent_at=0, uptime_s=0, extra={"sent_at": 1}),
     InvalidFieldError, "extra"),
    (lambda: Heartbeat(device_id="d", sent_at=0, uptime_s=0, extra={"v": 1}), InvalidFieldError, "extra"),
    (lambda: Status(device_id="d", state="up", agent_version="1", sent_at=0),  # type: ignore[arg-type]
     InvalidFieldError, "state"),
    (lambda: Status(device_id="d", state="online", agent_version="x" * 65, sent_at=0),
     InvalidFieldError, "agent_version"),
    (lambda: Status(device_id="d", state="online", agent_version="1\n", sent_at=0),
     InvalidFieldError, "agent_version"),
    (lambda: Status(device_id="d", state="online", agent_version="1", sent_at=0, models=({"name": "m"},)),  # type: ignore[arg-type]
     InvalidFieldError, "models[0]"),
    (lambda: ModelState(name="M", version=1, slot=None, healthy=True), InvalidIdentifierError, "name"),
    (lambda: ModelState(name="m", version=1, slot="A/B", healthy=True), InvalidIdentifierError, "slot"),
    (lambda: Event(device_id="d", stream_seq=-1, kind="k", at=0), InvalidFieldError, "stream_seq"),
    (lambda: Event(device_id="d", stream_seq=MAX_SEQ + 1, kind="k", at=0), InvalidFieldError, "stream_seq"),
    (lambda: Event(device_id="d", stream_seq=0, kind="x" * 33, at=0), InvalidFieldError, "kind"),
    (lambda: Event(device_id="d", stream_seq=0, kind="k", at=0, reason="r" * 1025),
     InvalidFieldError, "reason"),
    (lambda: Event(device_id="d", stream_seq=0, kind="k", at=0, detail={"n": math.nan}),
     InvalidFieldError, "detail.n"),
    (lambda: Event(device_id="d", stream_seq=0, kind="k", at=0, detail={"big": 2**64}),
     InvalidFieldError, "detail.big"),
    (lambda: Event(device_id="d", stream_seq=0, kind="k", at=0, detail={"s": {1, 2}}),
     InvalidFieldError, "detail.s"),
    (lambda: Event(device_id="d", stream_seq=0, kind="k", at=0, detail={"bad\ud800": 1}),
     InvalidFieldError, "detail"),
    (lambda: Event(device_id="d", stream_seq=0, kind="k", at=0, detail={1: 1}),  # type: ignore[dict-item]
     InvalidFieldError, "detail"),
    (lambda: DriftWindow(device_id="d", stream_seq=3, model="m", version=0, window_start=10.0, window_end=9.0,
                         samples=0, features={}), InvalidFieldError, "window_end"),
    (lambda: DriftWindow(device_id="d", stream_seq=3, model="m", version=0, window_start=0, window_end=1,
                         samples=0, replaces=(1, 3), features={}), InvalidFieldError, "replaces"),
    (lambda: DriftWindow(device_id="d", stream_seq=3, model="m", version=0, window_start=0, window_end=1,
                         samples=0, replaces=(2, 1), features={}), InvalidFieldError, "replaces[0]"),
    (lambda: DriftWindow(device_id="d", stream_seq=3, model="m", version=0, window_start=0, window_end=1,
                         samples=0, features={"f": 3}), InvalidFieldError, "features.f"),  # type: ignore[dict-item]
    (lambda: Ack(device_id="d", stream="events", seqs=((0, 5),), missing=((5, 6),)),
     InvalidFieldError, "missing"),
    (lambda: Ack(device_id="d", stream="a/b", seqs=()), InvalidIdentifierError, "stream"),
    (lambda: Command(device_id="d", command_id="Cmd-1", kind="deploy", order={}, sent_at=0),
     InvalidIdentifierError, "command_id"),
    (lambda: Command(device_id="d", command_id="c", kind="reboot", order={}, sent_at=0),  # type: ignore[arg-type]
     InvalidFieldError, "kind"),
    (lambda: Command(device_id="d", command_id="c", kind="deploy", order={"signed": {"x": math.inf}}, sent_at=0),
     InvalidFieldError, "order.signed.x"),
    (lambda: Command(device_id="d", command_id="c", kind="deploy", order={}, sent_at=math.nan),
     InvalidFieldError, "sent_at"),
    (lambda: Command(device_id="d", command_id="c", kind="cancel", order={}, sent_at=0, extra={"order": 1}),
     InvalidFieldError, "extra"),
]


@pytest.mark.parametrize(("build", "error", "field"), CONSTRUCTION_ERRORS)
def test_construction_validates(build: Callable[[], object], error: type[ProtocolError], field: str) -> None:
    with pytest.raises(error) as info:
        build()
    assert isinstance(info.value, DecodeError) and info.value.field == field


def test_numpy_values_are_not_plain_data() -> None:
    import numpy as np
    with pytest.raises(InvalidFieldError, match="float32") as info:
        Event(device_id="d", stream_seq=0, kind="k", at=0, detail={"x": [1.0, np.float32(2.0)]})
    assert info.value.field == "detail.x[1]"


def test_from_json_rejects_non_finite_and_garbage() -> None:
    good = json.loads(to_json(decode(golden_bytes("heartbeat"))))
    for bad in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(DecodeError, match="not allowed"):
            from_json(json.dumps(good).replace("86400.5", bad))
    with pytest.raises(InvalidFieldError):
        from_json(json.dumps(good).replace("86400.5", "1e400"))
    for text in ("", "{", "[]", "null", '"heartbeat"'):
        with pytest.raises(DecodeError):
            from_json(text)
    with pytest.raises(MessageTooLargeError):
        from_json(" " * 10, max_size=5)


def test_to_wire_refuses_non_messages() -> None:
    with pytest.raises(TypeError):
        to_wire({"t": "heartbeat"})  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Topic binding
# --------------------------------------------------------------------------------------------------


def test_decode_for_topic() -> None:
    data = golden_bytes("event")
    assert decode_for_topic("fleet/v1/cam-0042/events", data) == decode(data)
    with pytest.raises(TopicError, match="does not belong"):
        decode_for_topic("fleet/v1/cam-0042/drift", data)
    with pytest.raises(TopicError, match="does not match"):
        decode_for_topic(device_topic("cam-0043", Channel.EVENTS), data)
    with pytest.raises(TopicError):
        decode_for_topic("elsewhere/cam-0042/events", data)
    with pytest.raises(DecodeError):
        decode_for_topic("fleet/v1/cam-0042/status", b"")  # cleared retained status: nothing to decode
