"""Deployment commands (``Command``) and the deployment-event vocabulary (``agent.protocol.deploy``)."""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol import (
    COMMAND_KINDS,
    DEPLOY_EVENT_KINDS,
    DEPLOY_KINDS_REQUIRING_COMMAND,
    DEPLOY_KINDS_REQUIRING_REASON,
    DEPLOY_REASONS,
    FRAME_MSGPACK,
    FRAME_ZLIB,
    MAX_REASON_LEN,
    Channel,
    Command,
    DecodeError,
    DeployEvent,
    DeployReason,
    Event,
    InvalidFieldError,
    InvalidIdentifierError,
    TopicError,
    decode,
    decode_for_topic,
    device_topic,
    encode,
    from_json,
    is_deploy_event,
    message_topic,
    to_json,
    validate_deploy_event,
)

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "protocol"
T0 = 1767225600.0
DEVICE = "cam-0042"


def golden(name: str) -> bytes:
    return (GOLDEN / f"{name}.msgpack").read_bytes()


def canonical_json(value: Any) -> str:
    """What a signature verifier re-serialises (the task's form; bundle-format adds ensure_ascii=False)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def bundle_canonical_json(value: Any) -> bytes:
    """``canonical_json`` exactly as docs/bundle-format.md defines it."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def assert_same_types(a: Any, b: Any, path: str = "order") -> None:
    """``a == b`` with identical types at every depth (``1 == 1.0 == True`` in Python, not in JSON)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} became {type(b).__name__}"
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            assert_same_types(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_types(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def make_order(**signed: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "deployment-order", "format": 1, "command_id": "cmd-1", "action": "deploy",
        "device_id": DEVICE, "rollout_id": "ro-1", "sequence": 3, "model": "m", "version": 2,
        "bundle_digest": "ab" * 32, "bundle_length": 10, "url": "https://x/b", "token": "t",
        "token_expires_at": 1795773600, "issued_at": 1795770000, "expires_at": 1795856400,
        "allow_downgrade": False,
    }
    base.update(signed)
    return {"signed": base, "signatures": [{"keyid": "cd" * 32, "sig": "ef" * 64}]}


def command(order: dict[str, Any] | None = None, **kw: Any) -> Command:
    fields: dict[str, Any] = {"device_id": DEVICE, "command_id": "cmd-1", "kind": "deploy",
                              "order": make_order() if order is None else order, "sent_at": T0}
    fields.update(kw)
    return Command(**fields)


def event(kind: str, **kw: Any) -> Event:
    fields: dict[str, Any] = {"device_id": DEVICE, "stream_seq": 0, "kind": kind, "at": T0, "command_id": "cmd-1"}
    fields.update(kw)
    return Event(**fields)


# --------------------------------------------------------------------------------------------------
# Command: golden frames
# --------------------------------------------------------------------------------------------------


def test_golden_command_deploy() -> None:
    data = golden("command_deploy")
    assert data[0] == FRAME_MSGPACK
    msg = decode(data)
    assert isinstance(msg, Command)
    assert (msg.device_id, msg.command_id, msg.kind, msg.sent_at) == (DEVICE, "cmd-8c41e0", "deploy", T0 + 60.5)
    assert msg.schema_version == (1, 0) and msg.extra == {}
    assert set(msg.order) == {"signed", "signatures"}
    signed = msg.order["signed"]
    assert signed["type"] == "deployment-order" and signed["format"] == 1
    assert (signed["command_id"], signed["action"], signed["device_id"]) == ("cmd-8c41e0", "deploy", DEVICE)
    assert (signed["model"], signed["version"], signed["sequence"]) == ("person-detector", 5, 17)
    assert signed["bundle_length"] == 4_812_288 and signed["allow_downgrade"] is False
    assert len(signed["bundle_digest"]) == 64 and signed["url"].endswith(signed["bundle_digest"])
    assert signed["issued_at"] == 1767225660 and type(signed["issued_at"]) is int
    assert signed["expires_at"] - signed["issued_at"] == 86400
    sigs = msg.order["signatures"]
    assert isinstance(sigs, list) and len(sigs) == 2
    assert all(len(s["keyid"]) == 64 and len(s["sig"]) == 128 for s in sigs)
    assert encode(msg, compress=False) == data
    assert message_topic(msg) == "fleet/v1/cam-0042/commands"
    assert decode_for_topic("fleet/v1/cam-0042/commands", data) == msg


def test_golden_command_cancel() -> None:
    data = golden("command_cancel")
    msg = decode(data)
    assert isinstance(msg, Command)
    assert (msg.command_id, msg.kind, msg.sent_at) == ("cmd-8c41e1", "cancel", T0 + 120.25)
    signed = msg.order["signed"]
    assert (signed["action"], signed["cancels"], signed["sequence"]) == ("cancel", "cmd-8c41e0", 18)
    assert not {"model", "version", "bundle_digest", "bundle_length", "url", "token"} & set(signed)
    assert encode(msg, compress=False) == data


@pytest.mark.parametrize("name", ["command_deploy", "command_cancel"])
def test_golden_command_order_bytes_survive_every_path(name: str) -> None:
    """The order a verifier sees after any transport path re-serialises to the very bytes that were signed."""
    data = golden(name)
    raw = msgpack.unpackb(data[1:])["order"]  # as a peer with no knowledge of this package reads it
    msg = decode(data)
    assert isinstance(msg, Command)
    for copy in (msg, decode(encode(msg)), decode(encode(msg, compress=True)), from_json(to_json(msg))):
        assert isinstance(copy, Command)
        assert_same_types(raw, dict(copy.order))
        assert bundle_canonical_json(copy.order["signed"]) == bundle_canonical_json(raw["signed"])
    assert encode(msg)[0] == FRAME_ZLIB  # a real send of this size is compressed; the body is the same
    assert zlib.decompress(encode(msg)[1:]) == data[1:]


# --------------------------------------------------------------------------------------------------
# Command: values survive the codec exactly (signatures are over canonical JSON of order["signed"])
# --------------------------------------------------------------------------------------------------

TRICKY_SIGNED: dict[str, Any] = {
    "int": 1, "float_whole": 1.0, "zero": 0, "float_zero": 0.0, "neg_zero": -0.0, "neg": -7, "tenth": 0.1,
    "tiny": 5e-324, "huge_float": 1.7976931348623157e308, "big_int": 2**63 - 1, "u64": 2**64 - 1,
    "min_int": -(2**63), "true": True, "false": False, "none": None, "empty_str": "", "digits": "017",
    "unicode": "caméra 🚀 \u2028", "list": [1, 1.0, "1", True, None, [], {}], "nested": {"a": [{"b": [2.5]}]},
    "empty_list": [], "empty_map": {},
}


@pytest.mark.parametrize("compress", [None, True, False])
def test_order_json_is_unchanged_by_the_codec(compress: bool | None) -> None:
    order = make_order(**TRICKY_SIGNED)
    cmd = command(order)
    back = decode(encode(cmd, compress=compress))
    assert isinstance(back, Command)
    assert json.dumps(back.order, sort_keys=True, separators=(",", ":")) == json.dumps(
        order, sort_keys=True, separators=(",", ":"))
    assert bundle_canonical_json(back.order["signed"]) == bundle_canonical_json(order["signed"])
    assert_same_types(order, dict(back.order))
    assert type(back.order["signatures"]) is list and type(back.order["signed"]["list"]) is list


def test_order_given_with_tuples_is_sent_as_lists() -> None:
    """Construction normalises tuples to lists (what a JSON parser gives the verifier), so the signed JSON
    is the same before and after the wire."""
    order: dict[str, Any] = {"signed": {"profiles": ("a", "b")}, "signatures": ()}
    cmd = command(order)
    assert cmd.order == {"signed": {"profiles": ["a", "b"]}, "signatures": []}
    back = decode(encode(cmd))
    assert isinstance(back, Command)
    assert canonical_json(back.order) == canonical_json(order)
    assert_same_types(dict(cmd.order), dict(back.order))


def test_order_is_copied() -> None:
    order = make_order()
    cmd = command(order)
    order["signed"]["version"] = 99
    assert cmd.order["signed"]["version"] == 2


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300)
@given(signed=st.dictionaries(st.text(max_size=8), json_values, max_size=6),
       signatures=st.lists(st.fixed_dictionaries({"keyid": st.text(max_size=8), "sig": st.text(max_size=8)}),
                           max_size=3),
       compress=st.sampled_from([None, True, False]))
def test_order_canonical_json_survives_property(signed: dict[str, Any], signatures: list[dict[str, str]],
                                                compress: bool | None) -> None:
    order = {"signed": signed, "signatures": signatures}
    cmd = command(order)
    for back in (decode(encode(cmd, compress=compress)), from_json(to_json(cmd))):
        assert isinstance(back, Command)
        assert canonical_json(back.order) == canonical_json(order)
        assert bundle_canonical_json(back.order["signed"]) == bundle_canonical_json(signed)
        assert_same_types(order, dict(back.order))


# --------------------------------------------------------------------------------------------------
# Command: validation and topics
# --------------------------------------------------------------------------------------------------


def test_command_kinds() -> None:
    assert {"deploy", "cancel"} == COMMAND_KINDS
    assert command(kind="cancel").kind == "cancel"


@pytest.mark.parametrize("command_id", ["Cmd-1", "cmd:1", "cmd/1", "+", "#", "", "a" * 65, "-cmd", 7, None])
def test_command_id_follows_the_identifier_rule(command_id: object) -> None:
    with pytest.raises(InvalidIdentifierError) as info:
        command(command_id=command_id)
    assert info.value.field == "command_id"
    assert "a-z, 0-9" in str(info.value)


def test_command_ids_are_valid_event_command_ids() -> None:
    """Events answer commands: every command id is accepted by Event.command_id (a wider rule)."""
    for command_id in ["0", "cmd-8c41e0", "a" * 64, "9-._"]:
        assert command(command_id=command_id).command_id == command_id
        assert event("received", command_id=command_id).command_id == command_id


@pytest.mark.parametrize(("key", "value", "field"), [
    ("device_id", "Cam", "device_id"),
    ("kind", "deploy ", "kind"),
    ("kind", None, "kind"),
    ("order", "signed", "order"),
    ("order", {"signed": {"t": (1, {2: 3})}}, "order.signed.t[1]"),
    ("order", {"signed": b"raw"}, "order.signed"),
    ("order", {"signed": {"v": 2**64}}, "order.signed.v"),
    ("sent_at", True, "sent_at"),
    ("sent_at", -0.5, "sent_at"),
    ("extra", {"t": "event"}, "extra"),
])
def test_command_construction_validates(key: str, value: object, field: str) -> None:
    with pytest.raises(InvalidFieldError) as info:
        command(**{key: value})  # type: ignore[arg-type]
    assert info.value.field == field


def test_missing_command_fields_are_named() -> None:
    raw = msgpack.unpackb(golden("command_deploy")[1:])
    for key in ("device_id", "command_id", "kind", "order", "sent_at"):
        data = dict(raw)
        del data[key]
        with pytest.raises(DecodeError) as info:
            decode(bytes([FRAME_MSGPACK]) + msgpack.packb(data))
        assert info.value.field == key


def test_unknown_command_fields_are_kept() -> None:
    raw = msgpack.unpackb(golden("command_deploy")[1:])
    raw["v"] = [1, 3]
    raw["priority"] = "high"
    msg = decode(bytes([FRAME_MSGPACK]) + msgpack.packb(raw))
    assert isinstance(msg, Command)
    assert msg.extra == {"priority": "high"} and msg.schema_version == (1, 3)
    assert decode(encode(dataclasses.replace(msg, sent_at=T0 + 1.0))).extra == {"priority": "high"}


def test_command_keyword_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        Command(DEVICE, "cmd-1", "deploy", {}, 0.0)  # type: ignore[call-arg]
    cmd = command()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cmd.kind = "cancel"  # type: ignore[misc]
    assert hash(cmd) == hash(decode(encode(cmd)))


def test_command_belongs_on_the_commands_channel_only() -> None:
    data = golden("command_deploy")
    with pytest.raises(TopicError, match="does not belong"):
        decode_for_topic("fleet/v1/cam-0042/events", data)
    with pytest.raises(TopicError, match="does not match"):
        decode_for_topic(device_topic("cam-0043", Channel.COMMANDS), data)


# --------------------------------------------------------------------------------------------------
# Deployment event vocabulary
# --------------------------------------------------------------------------------------------------


def test_vocabulary() -> None:
    assert {
        "received", "downloading", "verified", "installed", "healthy", "failed", "rolled_back", "rejected",
        "cancelled",
    } == DEPLOY_EVENT_KINDS
    assert {k.value for k in DeployEvent} == DEPLOY_EVENT_KINDS
    assert all(type(k) is str for k in DEPLOY_EVENT_KINDS)
    assert {"failed", "rolled_back", "rejected"} == DEPLOY_KINDS_REQUIRING_REASON
    assert {"received", "cancelled"} == DEPLOY_KINDS_REQUIRING_COMMAND
    assert {
        "signature", "digest", "rollback", "stale", "incompatible", "health_check", "crash_loop", "order",
        "size", "bad_member", "malformed", "download", "no_space",
    } <= DEPLOY_REASONS
    assert {r.value for r in DeployReason} == DEPLOY_REASONS
    # every kind and code is a valid Event kind / reason code
    for kind in DEPLOY_EVENT_KINDS:
        assert event(kind, reason="order").kind == kind
    for code in DEPLOY_REASONS:
        assert validate_deploy_event(event("failed", reason=code)).reason == code


def test_enum_members_are_sent_as_plain_strings() -> None:
    msg = event(DeployEvent.ROLLED_BACK, reason=DeployReason.HEALTH_CHECK)
    assert type(msg.kind) is str and msg.kind == "rolled_back"
    assert decode(encode(msg)) == msg
    assert DeployEvent("healthy") is DeployEvent.HEALTHY


def test_golden_event_installed() -> None:
    msg = decode(golden("event_installed"))
    assert isinstance(msg, Event)
    assert (msg.kind, msg.command_id, msg.stream_seq, msg.at) == ("installed", "cmd-8c41e0", 21, T0 + 95.5)
    assert (msg.model, msg.version, msg.reason) == ("person-detector", 5, None)
    assert msg.detail["slot"] == "a" and msg.detail["previous_version"] == 4
    assert len(msg.detail["bundle_digest"]) == 64
    assert is_deploy_event(msg) and validate_deploy_event(msg) is msg
    deploy = decode(golden("command_deploy"))
    assert isinstance(deploy, Command)
    assert msg.command_id == deploy.command_id  # the event answers (and acknowledges) that command
    assert msg.detail["bundle_digest"] == deploy.order["signed"]["bundle_digest"]
    assert encode(msg) == golden("event_installed")


def test_golden_event_rolled_back_is_autonomous() -> None:
    msg = decode(golden("event_rolled_back"))
    assert isinstance(msg, Event)
    assert (msg.kind, msg.command_id, msg.reason) == ("rolled_back", None, "crash_loop")
    assert (msg.model, msg.version, msg.stream_seq, msg.at) == ("person-detector", 5, 22, T0 + 400.0)
    assert msg.detail == {"message": "model worker exited 5 times within 300 s", "restarts": 5,
                          "window_s": 300.0, "restored_version": 4, "slot": "b"}
    assert validate_deploy_event(msg) is msg
    assert encode(msg) == golden("event_rolled_back")


def test_the_old_golden_event_is_not_a_deploy_event() -> None:
    msg = decode(golden("event"))
    assert isinstance(msg, Event) and not is_deploy_event(msg)
    with pytest.raises(InvalidFieldError) as info:
        validate_deploy_event(msg)
    assert info.value.field == "kind"


VALID_EVENTS: list[Event] = [
    event("received"),
    event("received", model="m", version=3),
    event("downloading", detail={"bytes": 0, "total": 10}),
    event("verified", model="m", version=3),
    event("installed", model="m", version=3, detail={"slot": "a"}),
    event("healthy", model="m", version=3),
    event("failed", reason="download", detail={"message": "HTTP 503 from bundle server"}),
    event("failed", reason="no_space"),
    event("rolled_back", reason="health_check", model="m", version=3, detail={"restored_version": 2}),
    event("rolled_back", command_id=None, reason="crash_loop", model="m", version=3),
    event("rejected", reason="signature", detail={"message": "1 valid signature, threshold 2"}),
    event("rejected", reason="quota_exceeded"),  # a code this build does not know: still well-formed
    event("rejected", reason="too_late"),
    event("cancelled"),  # a cancel command took effect (under its own id), or a deployment was stopped
    event("cancelled", detail={"cancels": "cmd-0", "message": "deployment cmd-0 stopped while downloading"}),
    event("cancelled", command_id="cmd-0", model="m", version=3, detail={"cancelled_by": "cmd-1"}),
    event("installed", command_id=None, reason="sideload", model="m", version=4),
    event("healthy", detail={"message": ""}),
]


@pytest.mark.parametrize("msg", VALID_EVENTS, ids=lambda e: f"{e.kind}-{e.reason}")
def test_valid_deploy_events(msg: Event) -> None:
    assert validate_deploy_event(msg) is msg
    back = decode(encode(msg))
    assert isinstance(back, Event) and validate_deploy_event(back) == msg
    assert is_deploy_event(msg)


INVALID_EVENTS: list[tuple[Event, str]] = [
    (event("model_activated"), "kind"),
    (event("installing"), "kind"),
    (event("failed"), "reason"),
    (event("rolled_back", reason=None), "reason"),
    (event("rejected", command_id=None), "reason"),
    (event("failed", reason=""), "reason"),
    (event("failed", reason="Signature"), "reason"),
    (event("failed", reason="signature check failed"), "reason"),
    (event("failed", reason="x" * 33), "reason"),
    (event("healthy", reason="fine!"), "reason"),
    (event("received", command_id=None), "command_id"),
    (event("received", command_id=None, reason="sideload"), "command_id"),
    (event("cancelled", command_id=None, reason="order", detail={"cancelled_by": "cmd-2"}), "command_id"),
    (event("installed", command_id=None), "command_id"),
    (event("downloading", command_id=None), "command_id"),
    (event("verified", command_id="CMD-1"), "command_id"),
    (event("verified", command_id="cmd:1"), "command_id"),
    (event("failed", reason="download", detail={"message": 42}), "detail.message"),
    (event("failed", reason="download", detail={"message": "x" * (MAX_REASON_LEN + 1)}), "detail.message"),
    (event("cancelled", detail={"cancelled_by": "Cmd 2"}), "detail.cancelled_by"),
    (event("cancelled", detail={"cancels": None}), "detail.cancels"),
    (event("rejected", reason="too_late", detail={"cancels": 7}), "detail.cancels"),
]


@pytest.mark.parametrize(("msg", "field"), INVALID_EVENTS, ids=lambda v: v if isinstance(v, str) else v.kind)
def test_invalid_deploy_events_name_the_field(msg: Event, field: str) -> None:
    with pytest.raises(InvalidFieldError) as info:
        validate_deploy_event(msg)
    assert info.value.field == field
    decode(encode(msg))  # still a valid Event on the wire: the server stores, acks and counts it


def test_validate_deploy_event_refuses_non_events() -> None:
    with pytest.raises(TypeError):
        validate_deploy_event(command())  # type: ignore[arg-type]
