"""Deployment orders: wrong device, replayed order, expired order, and order/bundle disagreement."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest

from agent.bundle import (
    ORDER_PREFIX,
    DeploymentOrder,
    ExpiredError,
    FormatError,
    OrderError,
    OrderMismatchError,
    ReplayedOrderError,
    SignatureError,
    VerifiedBundle,
    WrongDeviceError,
    canonical_json,
    check_order_matches,
    make_order_signed,
    sign_document,
    trusted_now,
    verify_order,
)
from tests.bundle.helpers import DEVICE, NOW, Fleet, order_doc, order_fields, small_bundle, verify


@pytest.fixture
def fleet() -> Fleet:
    return Fleet()


@pytest.fixture
def bundle(fleet: Fleet) -> tuple[bytes, VerifiedBundle]:
    data = small_bundle(fleet, version=3)
    return data, verify(data, fleet.root())


def _verify(doc: bytes | Mapping[str, Any], fleet: Fleet, *, device_id: str = DEVICE, last: int | None = 16,
            now: float = NOW) -> DeploymentOrder:
    return verify_order(doc, fleet.root(), device_id=device_id, last_sequence=last, now=now)


def test_valid_order_verifies_from_bytes_and_from_the_decoded_command(fleet: Fleet,
                                                                      bundle: tuple[bytes, VerifiedBundle]) -> None:
    data, vb = bundle
    doc = order_doc(fleet, bundle=data, vb=vb)
    order = _verify(doc, fleet)
    assert (order.model, order.version, order.bundle_digest, order.bundle_length) == ("toy", 3, vb.digest, len(data))
    assert order == _verify(json.loads(doc), fleet)
    assert order.to_dict() == json.loads(doc)["signed"]
    check_order_matches(order, vb, downloaded_length=len(data))


def test_order_for_another_device_rejected(fleet: Fleet) -> None:
    with pytest.raises(WrongDeviceError) as info:
        _verify(order_doc(fleet, device_id="pi-garage-02"), fleet)
    assert info.value.reason == "order" and "pi-garage-02" in str(info.value)


@pytest.mark.parametrize("last", [17, 18, 10**6])
def test_replayed_order_rejected(fleet: Fleet, last: int) -> None:
    with pytest.raises(ReplayedOrderError):
        _verify(order_doc(fleet, sequence=17), fleet, last=last)


def test_first_order_accepted_without_a_last_sequence(fleet: Fleet) -> None:
    assert _verify(order_doc(fleet, sequence=0), fleet, last=None).sequence == 0


def test_expired_order_rejected_as_stale(fleet: Fleet) -> None:
    doc = order_doc(fleet, issued_at=NOW - 7200, expires_at=NOW - 3600)
    with pytest.raises(ExpiredError) as info:
        _verify(doc, fleet)
    assert info.value.reason == "stale"
    with pytest.raises(ExpiredError):  # a device booting at 1970 still uses its persisted trusted time
        _verify(doc, fleet, now=trusted_now(0.0, NOW))


def test_order_signed_by_release_key_instead_of_orders_key_rejected(fleet: Fleet) -> None:
    with pytest.raises(SignatureError):
        _verify(order_doc(fleet, signers=fleet.release_keys), fleet)


def test_unsigned_or_tampered_order_rejected(fleet: Fleet) -> None:
    with pytest.raises(SignatureError):
        _verify(order_doc(fleet, signers=[]), fleet)
    doc = json.loads(order_doc(fleet))
    doc["signed"]["device_id"] = "pi-garage-02"
    with pytest.raises(SignatureError):
        _verify(doc, fleet, device_id="pi-garage-02")
    doc = json.loads(order_doc(fleet))
    doc["signed"]["allow_downgrade"] = True
    with pytest.raises(SignatureError):
        _verify(doc, fleet)


def test_manifest_signature_cannot_be_replayed_as_an_order(fleet: Fleet) -> None:
    from agent.bundle import MANIFEST_PREFIX

    signed = make_order_signed(**order_fields())
    key = fleet.orders_keys[0]
    doc = {"signed": signed, "signatures": [{"keyid": key.public.keyid,
                                             "sig": key.sign(MANIFEST_PREFIX + canonical_json(signed))}]}
    with pytest.raises(SignatureError):
        _verify(doc, fleet)


@pytest.mark.parametrize(("field", "value"), [
    ("model", "other-model"),
    ("version", 2),
    ("bundle_digest", "ab" * 32),
    ("bundle_length", 1),
])
def test_order_and_bundle_disagreeing_rejected(fleet: Fleet, bundle: tuple[bytes, VerifiedBundle], field: str,
                                               value: Any) -> None:
    data, vb = bundle
    order = _verify(order_doc(fleet, bundle=data, vb=vb, **{field: value}), fleet)
    with pytest.raises(OrderMismatchError) as info:
        check_order_matches(order, vb, downloaded_length=len(data))
    assert info.value.reason == "order"


def test_download_with_trailing_data_does_not_match_the_order(fleet: Fleet,
                                                              bundle: tuple[bytes, VerifiedBundle]) -> None:
    data, vb = bundle
    order = _verify(order_doc(fleet, bundle=data + b"junk", vb=vb), fleet)
    with pytest.raises(OrderMismatchError, match="trailing"):
        check_order_matches(order, vb, downloaded_length=len(data) + 4)


def test_cancel_order_names_no_bundle(fleet: Fleet, bundle: tuple[bytes, VerifiedBundle]) -> None:
    signed = make_order_signed(command_id="cmd-18", action="cancel", device_id=DEVICE, sequence=18,
                               issued_at=NOW, expires_at=NOW + 60, cancels="cmd-17")
    order = _verify(sign_document(signed, ORDER_PREFIX, fleet.orders_keys), fleet)
    assert order.action == "cancel" and order.cancels == "cmd-17" and order.model is None
    assert order.to_dict() == signed
    with pytest.raises(OrderMismatchError):
        check_order_matches(order, bundle[1], downloaded_length=len(bundle[0]))


@pytest.mark.parametrize("overrides", [
    {"action": "install"},
    {"version": -1},
    {"version": True},
    {"sequence": "17"},
    {"bundle_digest": "AB" * 32},
    {"bundle_length": 1.5},
    {"device_id": "Pi/Kitchen/#"},
    {"command_id": ""},
    {"allow_downgrade": "yes"},
    {"expires_at": NOW - 120},
    {"url": ""},
    {"cancels": "cmd-1"},
    {"format": 2},
    {"type": "bundle"},
    {"surprise": 1},
])
def test_malformed_order_fields_rejected(overrides: dict[str, Any]) -> None:
    with pytest.raises(FormatError):
        make_order_signed(**order_fields(**overrides))


def test_malformed_signed_order_rejected_after_signature_check(fleet: Fleet) -> None:
    signed = {**make_order_signed(**order_fields()), "surprise": 1}
    with pytest.raises(FormatError, match="surprise"):
        _verify(sign_document(signed, ORDER_PREFIX, fleet.orders_keys), fleet)


@pytest.mark.parametrize("doc", [b"", b"[]", b'{"signed":{}}', b'{"signatures":[],"signed":[]}', b"x" * 70000])
def test_malformed_order_document_rejected(fleet: Fleet, doc: bytes) -> None:
    with pytest.raises(FormatError):
        _verify(doc, fleet)


def test_order_errors_share_one_family() -> None:
    for cls in (WrongDeviceError, ReplayedOrderError, OrderMismatchError):
        assert issubclass(cls, OrderError) and cls("x").reason == "order"


def test_order_carried_in_read_only_mappings_verifies(fleet: Fleet) -> None:
    from types import MappingProxyType

    doc = json.loads(order_doc(fleet))
    frozen = MappingProxyType({"signed": MappingProxyType(doc["signed"]), "signatures": doc["signatures"]})
    assert _verify(frozen, fleet).command_id == "cmd-17"
