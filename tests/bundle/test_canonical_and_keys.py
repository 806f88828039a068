"""Canonical JSON (one byte form per document) and Ed25519 keys with domain separation."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.bundle import (
    MANIFEST_PREFIX,
    ORDER_PREFIX,
    ROOT_PREFIX,
    FormatError,
    PublicKey,
    SigningKey,
    canonical_json,
    strict_loads,
)
from tests.bundle.helpers import KEYS


def test_canonical_json_sorts_keys_without_whitespace_in_utf8() -> None:
    assert canonical_json({"b": 1, "a": [1.5, "é", None, True]}) == '{"a":[1.5,"é",null,true],"b":1}'.encode()


def test_canonical_round_trip_is_identity() -> None:
    doc = {"x": [0.1, -0.0, 1e-300, 2**62, "\u2028"], "nested": {"z": {}, "a": []}}
    data = canonical_json(doc)
    assert strict_loads(data) == doc
    assert canonical_json(strict_loads(data)) == data


@pytest.mark.parametrize(("data", "fragment"), [
    (b'{"a":1,"a":2}', "twice"),
    (b'{"a":NaN}', "NaN"),
    (b'{"a":Infinity}', "Infinity"),
    (b'{"a":-Infinity}', "Infinity"),
    (b'{"a":1e999}', "finite"),
    (b'{"a":"\xff"}', "UTF-8"),
    (b'\xef\xbb\xbf{"a":1}', "JSON"),
    (b'{"a":1} ', "canonical"),
    (b'{"a": 1}', "canonical"),
    (b'{"b":1,"a":2}', "canonical"),
    (b'{"a":1.0E2}', "canonical"),
    (b'{"a":"\\u0041"}', "canonical"),
    (b'{"a":1}{"b":2}', "JSON"),
    (b'{"a":"\\ud800"}', "canonical JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested"),
    (b"1" * 5000, "acceptable"),
    (b"", "JSON"),
])
def test_non_canonical_or_ambiguous_json_rejected(data: bytes, fragment: str) -> None:
    with pytest.raises(FormatError) as info:
        strict_loads(data)
    assert fragment in str(info.value)
    assert info.value.reason == "malformed"


def test_non_canonical_accepted_only_when_not_required() -> None:
    assert strict_loads(b'{ "b": 1, "a": 2 }', require_canonical=False) == {"a": 2, "b": 1}
    with pytest.raises(FormatError):
        strict_loads(b'{"a":1,"a":1}', require_canonical=False)


def test_strict_loads_refuses_text_input() -> None:
    with pytest.raises(FormatError):
        strict_loads('{"a":1}')  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), b"bytes", "\ud800", {1: "a", "b": 2}])
def test_values_without_one_json_form_cannot_be_canonicalised(value: object) -> None:
    with pytest.raises(FormatError):
        canonical_json({"v": value})


def test_keyid_is_sha256_of_canonical_public_key_object() -> None:
    import hashlib

    key = KEYS[0].public
    expected = hashlib.sha256(canonical_json({"keytype": "ed25519", "public": key.public_hex})).hexdigest()
    assert key.keyid == expected
    assert PublicKey.from_dict(key.to_dict()) == key


def test_public_key_with_a_chosen_keyid_rejected() -> None:
    with pytest.raises(FormatError, match="computed"):
        PublicKey(KEYS[1].public.keyid, KEYS[0].public.public_hex)


@pytest.mark.parametrize("doc", [
    {"keytype": "rsa", "public": "00" * 32},
    {"keytype": "ed25519", "public": "AB" * 32},
    {"keytype": "ed25519", "public": "00" * 31},
    {"keytype": "ed25519", "public": "00" * 32, "extra": 1},
    ["ed25519"],
])
def test_malformed_public_key_rejected(doc: object) -> None:
    with pytest.raises(FormatError):
        PublicKey.from_dict(doc)


def test_signing_key_pem_round_trip_keeps_identity() -> None:
    key = SigningKey.generate()
    again = SigningKey.from_pem(key.to_pem())
    assert again.public == key.public
    assert key.public.verify(b"m", again.sign(b"m"))
    assert "PRIVATE" not in repr(key) and key.public.keyid[:16] in repr(key)


def test_non_ed25519_or_encrypted_pem_rejected() -> None:
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(FormatError, match="Ed25519"):
        SigningKey.from_pem(ec_pem)
    key = SigningKey.generate()
    encrypted = key._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"pw"))
    with pytest.raises(FormatError):
        SigningKey.from_pem(encrypted)
    with pytest.raises(FormatError):
        SigningKey.from_pem(b"not a pem")


def test_signature_for_one_document_kind_never_verifies_as_another() -> None:
    body = canonical_json({"type": "x"})
    sig = KEYS[0].sign(MANIFEST_PREFIX + body)
    assert KEYS[0].public.verify(MANIFEST_PREFIX + body, sig)
    assert not KEYS[0].public.verify(ROOT_PREFIX + body, sig)
    assert not KEYS[0].public.verify(ORDER_PREFIX + body, sig)
    assert not KEYS[0].public.verify(body, sig)
    assert len({MANIFEST_PREFIX, ROOT_PREFIX, ORDER_PREFIX}) == 3


@pytest.mark.parametrize("sig", ["", "zz" * 64, "AB" * 64, "ab" * 63, " " + "ab" * 64, "ab" * 64 + "\n"])
def test_malformed_signature_hex_is_simply_invalid(sig: str) -> None:
    assert KEYS[0].public.verify(b"m", sig) is False


def test_canonical_json_matches_the_documented_dumps_call() -> None:
    doc = {"é": [1, 2.5, {"z": None, "a": False}], "a": "\u00e9\n"}
    documented = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    assert canonical_json(doc) == documented.encode("utf-8")
