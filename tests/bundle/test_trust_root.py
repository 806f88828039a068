"""Key compromise below threshold and root rotation.

The two case tables are python-tuf's ``tests/test_updater_key_rotations.py`` (same case names, same key indices,
thresholds and signers), ported to this trust-root format: the root cases drive :meth:`TrustRoot.update` through a
chain of root versions; the non-root cases (python-tuf's timestamp/snapshot/targets roles) become our ``release``
role verifying a bundle manifest, and our ``orders`` role verifying a deployment order.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import pytest

from agent.bundle import (
    ORDER_PREFIX,
    ROOT_PREFIX,
    ExpiredError,
    PublicKey,
    SignatureError,
    TrustRoot,
    TrustRootError,
    canonical_json,
    make_order_signed,
    make_root_signed,
    sign_document,
    verify_bundle,
    verify_order,
)
from tests.bundle.helpers import DEVICE, KEYS, NOW, YEAR, Fleet, bundle_bytes, order_fields, tiny_manifest


@dataclass
class MdVersion:
    keys: list[int]
    threshold: int
    sigs: list[int]
    res: type[Exception] | None = None


# fmt: off
ROOT_ROTATION_CASES: dict[str, list[MdVersion]] = {
    "1-of-1 key rotation": [
        MdVersion(keys=[1], threshold=1, sigs=[1]),
        MdVersion(keys=[2], threshold=1, sigs=[2, 1]),
        MdVersion(keys=[2], threshold=1, sigs=[2]),
    ],
    "1-of-1 key rotation, unused signatures": [
        MdVersion(keys=[1], threshold=1, sigs=[3, 1, 4]),
        MdVersion(keys=[2], threshold=1, sigs=[3, 2, 1, 4]),
        MdVersion(keys=[2], threshold=1, sigs=[3, 2, 4]),
    ],
    "1-of-1 key rotation fail: not signed with old key": [
        MdVersion(keys=[1], threshold=1, sigs=[1]),
        MdVersion(keys=[2], threshold=1, sigs=[2, 3, 4], res=TrustRootError),
    ],
    "1-of-1 key rotation fail: not signed with new key": [
        MdVersion(keys=[1], threshold=1, sigs=[1]),
        MdVersion(keys=[2], threshold=1, sigs=[1, 3, 4], res=TrustRootError),
    ],
    "3-of-5, sign with different keycombos": [
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 4, 1]),
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 1, 3]),
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 1, 3]),
    ],
    "3-of-5, one key rotated": [
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        MdVersion(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 4, 1]),
    ],
    "3-of-5, one key rotate fails: not signed with 3 new keys": [
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        MdVersion(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 2, 4], res=TrustRootError),
    ],
    "3-of-5, one key rotate fails: not signed with 3 old keys": [
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        MdVersion(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 4, 5], res=TrustRootError),
    ],
    "3-of-5, one key rotated, with intermediate step": [
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        MdVersion(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 2, 4, 5]),
        MdVersion(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 4, 5]),
    ],
    "3-of-5, all keys rotated, with intermediate step": [
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        MdVersion(keys=[5, 6, 7, 8, 9], threshold=3, sigs=[0, 2, 4, 5, 6, 7]),
        MdVersion(keys=[5, 6, 7, 8, 9], threshold=3, sigs=[5, 6, 7]),
    ],
    "1-of-3 threshold increase to 2-of-3": [
        MdVersion(keys=[1, 2, 3], threshold=1, sigs=[1]),
        MdVersion(keys=[1, 2, 3], threshold=2, sigs=[1, 2]),
    ],
    "1-of-3 threshold bump to 2-of-3 fails: new threshold not reached": [
        MdVersion(keys=[1, 2, 3], threshold=1, sigs=[1]),
        MdVersion(keys=[1, 2, 3], threshold=2, sigs=[2], res=TrustRootError),
    ],
    "2-of-3 threshold decrease to 1-of-3": [
        MdVersion(keys=[1, 2, 3], threshold=2, sigs=[1, 2]),
        MdVersion(keys=[1, 2, 3], threshold=1, sigs=[1, 2]),
        MdVersion(keys=[1, 2, 3], threshold=1, sigs=[1]),
    ],
    "2-of-3 threshold decr. to 1-of-3 fails: old threshold not reached": [
        MdVersion(keys=[1, 2, 3], threshold=2, sigs=[1, 2]),
        MdVersion(keys=[1, 2, 3], threshold=1, sigs=[1], res=TrustRootError),
    ],
    "1-of-2 threshold increase to 2-of-2": [
        MdVersion(keys=[1], threshold=1, sigs=[1]),
        MdVersion(keys=[1, 2], threshold=2, sigs=[1, 2]),
    ],
}

NON_ROOT_ROTATION_CASES: dict[str, MdVersion] = {
    "1-of-1 key rotation":
        MdVersion(keys=[2], threshold=1, sigs=[2]),
    "1-of-1 key rotation, unused signatures":
        MdVersion(keys=[1], threshold=1, sigs=[3, 1, 4]),
    "1-of-1 key rotation fail: not signed with new key":
        MdVersion(keys=[2], threshold=1, sigs=[1, 3, 4], res=SignatureError),
    "3-of-5, one key signature wrong: not signed with 3 expected keys":
        MdVersion(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 2, 4], res=SignatureError),
    "2-of-5, one key signature mising: threshold not reached":
        MdVersion(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 4], res=SignatureError),
    "3-of-5, sign first combo":
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
    "3-of-5, sign second combo":
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 4, 1]),
    "3-of-5, sign third combo":
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 1, 3]),
    "3-of-5, sign fourth combo":
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[1, 2, 3]),
    "3-of-5, sign fifth combo":
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[2, 3, 4]),
}
# fmt: on

# The roles the root tables do not exercise keep one fixed key each (not one of KEYS, so they never collide).
OTHER = Fleet()


def _root(version: int, root_keys: list[PublicKey], root_threshold: int, signers: list[int], *,
          release: list[PublicKey] | None = None, release_threshold: int = 1,
          orders: list[PublicKey] | None = None, orders_threshold: int = 1) -> bytes:
    signed = make_root_signed(
        version=version, expires_at=NOW + YEAR,
        keys={"root": root_keys, "release": release or [OTHER.release_keys[0].public],
              "orders": orders or [OTHER.orders_keys[0].public]},
        thresholds={"root": root_threshold, "release": release_threshold, "orders": orders_threshold},
    )
    return sign_document(signed, ROOT_PREFIX, [KEYS[i] for i in signers])


@pytest.mark.parametrize("case", ROOT_ROTATION_CASES.values(), ids=ROOT_ROTATION_CASES.keys())
def test_root_rotation(case: list[MdVersion]) -> None:
    published = [_root(v, [KEYS[i].public for i in md.keys], md.threshold, md.sigs) for v, md in enumerate(case, 1)]
    root = TrustRoot.from_bytes(published[0])
    expected_error = case[-1].res
    for data in published[1:-1]:
        root = root.update(data)
    if expected_error is None:
        root = root.update(published[-1])
        assert root.to_bytes() == published[-1]
    else:
        with pytest.raises(expected_error):
            root.update(published[-1])
        # the device stays on the root before the last one
        assert root.to_bytes() == published[-2]
    assert root.version == (len(case) if expected_error is None else len(case) - 1)


def _non_root_setup(role: str, md: MdVersion) -> TrustRoot:
    """Root v1 with default keys, then v2 (signed by the root key) giving ``role`` the case's keys/threshold."""
    root_key = [OTHER.root_keys[0].public]
    v1 = TrustRoot.from_bytes(sign_document(
        make_root_signed(version=1, expires_at=NOW + YEAR,
                         keys={"root": root_key, "release": [OTHER.release_keys[0].public],
                               "orders": [OTHER.orders_keys[0].public]},
                         thresholds={"root": 1, "release": 1, "orders": 1}),
        ROOT_PREFIX, OTHER.root_keys))
    case_keys = [KEYS[i].public for i in md.keys]
    signed = make_root_signed(
        version=2, expires_at=NOW + YEAR,
        keys={"root": root_key,
              "release": case_keys if role == "release" else [OTHER.release_keys[0].public],
              "orders": case_keys if role == "orders" else [OTHER.orders_keys[0].public]},
        thresholds={"root": 1, "release": md.threshold if role == "release" else 1,
                    "orders": md.threshold if role == "orders" else 1})
    return v1.update(sign_document(signed, ROOT_PREFIX, OTHER.root_keys))


@pytest.mark.parametrize("case", NON_ROOT_ROTATION_CASES.values(), ids=NON_ROOT_ROTATION_CASES.keys())
def test_non_root_rotations_release_role_signs_manifests(case: MdVersion) -> None:
    root = _non_root_setup("release", case)
    data = bundle_bytes(tiny_manifest(), None, [KEYS[i] for i in case.sigs])
    if case.res is None:
        vb = verify_bundle(io.BytesIO(data), root, now=NOW)
        assert vb.manifest.model == "toy"
    else:
        with pytest.raises(case.res):
            verify_bundle(io.BytesIO(data), root, now=NOW)


@pytest.mark.parametrize("case", NON_ROOT_ROTATION_CASES.values(), ids=NON_ROOT_ROTATION_CASES.keys())
def test_non_root_rotations_orders_role_signs_orders(case: MdVersion) -> None:
    root = _non_root_setup("orders", case)
    doc = sign_document(make_order_signed(**order_fields()), ORDER_PREFIX, [KEYS[i] for i in case.sigs])
    if case.res is None:
        assert verify_order(doc, root, device_id=DEVICE, last_sequence=None, now=NOW).sequence == 17
    else:
        with pytest.raises(case.res):
            verify_order(doc, root, device_id=DEVICE, last_sequence=None, now=NOW)


# -- threshold counting --------------------------------------------------------------------------------------------

def test_release_key_compromise_below_threshold_cannot_sign_a_bundle() -> None:
    fleet = Fleet(release_keys=KEYS[:3], thresholds={"root": 1, "release": 2, "orders": 1})
    data = bundle_bytes(tiny_manifest(version=666), None, [KEYS[0]])  # the attacker holds one of three keys
    with pytest.raises(SignatureError, match="2 of its 3"):
        verify_bundle(io.BytesIO(data), fleet.root(), now=NOW)


def test_signature_listed_twice_counts_once() -> None:
    fleet = Fleet(release_keys=KEYS[:3], thresholds={"root": 1, "release": 2, "orders": 1})
    data = bundle_bytes(tiny_manifest(), None, [KEYS[0], KEYS[0], KEYS[0]])
    with pytest.raises(SignatureError):
        verify_bundle(io.BytesIO(data), fleet.root(), now=NOW)


def test_key_listed_twice_in_a_role_counts_once() -> None:
    """A role listing one key twice cannot reach threshold 2 with it: the root itself is refused."""
    fleet = Fleet(release_keys=[KEYS[0], KEYS[0]], thresholds={"root": 1, "release": 2, "orders": 1})
    with pytest.raises(TrustRootError, match="distinct"):
        fleet.root()
    ok = Fleet(release_keys=[KEYS[0], KEYS[0], KEYS[1]], thresholds={"root": 1, "release": 2, "orders": 1}).root()
    assert ok.role("release").keyids == {KEYS[0].public.keyid, KEYS[1].public.keyid}
    message = canonical_json({"m": 1})
    sig0 = {"keyid": KEYS[0].public.keyid, "sig": KEYS[0].sign(ROOT_PREFIX + message)}
    with pytest.raises(SignatureError):
        ok.verify_role("release", ROOT_PREFIX, message, [sig0, sig0])


def test_invalid_signature_does_not_poison_valid_ones() -> None:
    root = Fleet(release_keys=KEYS[:2], thresholds={"root": 1, "release": 2, "orders": 1}).root()
    message = b"payload"
    good = [{"keyid": k.public.keyid, "sig": k.sign(ROOT_PREFIX + message)} for k in KEYS[:2]]
    bad = {"keyid": KEYS[0].public.keyid, "sig": "00" * 64}
    junk: list[Any] = [{"keyid": 5, "sig": None}, "not a dict", {"keyid": KEYS[9].public.keyid, "sig": "11" * 64}]
    assert root.verify_role("release", ROOT_PREFIX, message, [bad, *junk, *good]) == {k.public.keyid for k in KEYS[:2]}


def test_signature_by_a_key_of_another_role_does_not_count() -> None:
    fleet = Fleet()
    data = bundle_bytes(tiny_manifest(), None, fleet.orders_keys + fleet.root_keys)
    with pytest.raises(SignatureError):
        verify_bundle(io.BytesIO(data), fleet.root(), now=NOW)


# -- root documents ------------------------------------------------------------------------------------------------

def test_first_root_must_be_self_signed() -> None:
    fleet = Fleet()
    with pytest.raises(TrustRootError, match="own root keys"):
        TrustRoot.from_bytes(fleet.root_bytes(signers=[KEYS[0]]))
    with pytest.raises(TrustRootError):
        TrustRoot.from_bytes(fleet.root_bytes(signers=[]))


def test_root_version_must_advance_by_exactly_one() -> None:
    fleet = Fleet()
    root = fleet.root()
    for version in (1, 3, 0):
        fleet.version = version
        with pytest.raises(TrustRootError):
            root.update(fleet.root_bytes())
    fleet.version = 2
    assert root.update(fleet.root_bytes()).version == 2


def test_expired_intermediate_root_may_be_passed_through_but_not_used() -> None:
    fleet = Fleet()
    root = fleet.root()
    fleet.version, fleet.expires_at = 2, NOW - YEAR
    v2 = root.update(fleet.root_bytes())
    with pytest.raises(ExpiredError) as info:
        v2.check_not_expired(NOW)
    assert info.value.reason == "stale"
    fleet.version, fleet.expires_at = 3, NOW + YEAR
    v2.update(fleet.root_bytes()).check_not_expired(NOW)


def test_expired_root_verifies_nothing() -> None:
    fleet = Fleet(expires_at=NOW - 1)
    root = fleet.root()
    with pytest.raises(ExpiredError):
        verify_bundle(io.BytesIO(bundle_bytes(tiny_manifest(), None, fleet.release_keys)), root, now=NOW)
    with pytest.raises(ExpiredError):
        verify_order(sign_document(make_order_signed(**order_fields()), ORDER_PREFIX, fleet.orders_keys), root,
                     device_id=DEVICE, last_sequence=None, now=NOW)


def test_revocation_removes_a_release_key() -> None:
    fleet = Fleet(release_keys=[KEYS[0], KEYS[1]])
    root = fleet.root()
    data = bundle_bytes(tiny_manifest(), None, [KEYS[0]])
    verify_bundle(io.BytesIO(data), root, now=NOW)
    fleet.version, fleet.release_keys = 2, [KEYS[1]]
    root = root.update(fleet.root_bytes())
    assert KEYS[0].public.keyid not in root.keys
    with pytest.raises(SignatureError):
        verify_bundle(io.BytesIO(data), root, now=NOW)


@pytest.mark.parametrize(("override", "fragment"), [
    ({"type": "edge-bundle-manifest"}, "type"),
    ({"format": 2}, "format"),
    ({"version": 0}, "version"),
    ({"version": True}, "version"),
    ({"expires_at": "tomorrow"}, "expires_at"),
    ({"roles": {"root": {"keyids": [], "threshold": 1}}}, "roles"),
    ({"extra": 1}, "exactly the keys"),
])
def test_malformed_root_rejected(override: dict[str, Any], fragment: str) -> None:
    with pytest.raises(TrustRootError, match=fragment) as info:
        TrustRoot.from_bytes(Fleet().root_bytes(**override))
    assert info.value.reason == "trust_root"


def test_root_role_naming_unknown_key_rejected() -> None:
    fleet = Fleet()
    signed = fleet.signed()
    signed["roles"]["release"]["keyids"] = [KEYS[9].public.keyid]
    with pytest.raises(TrustRootError, match=r"not in signed\.keys"):
        TrustRoot.from_bytes(sign_document(signed, ROOT_PREFIX, fleet.root_keys))


def test_root_key_under_a_wrong_keyid_rejected() -> None:
    fleet = Fleet()
    signed = fleet.signed()
    keyid = fleet.release_keys[0].public.keyid
    signed["keys"][keyid] = KEYS[9].public.to_dict()
    with pytest.raises(TrustRootError, match="sha256"):
        TrustRoot.from_bytes(sign_document(signed, ROOT_PREFIX, fleet.root_keys))


def test_non_canonical_root_rejected_even_if_signed() -> None:
    data = Fleet().root_bytes()
    with pytest.raises(TrustRootError, match="canonical"):
        TrustRoot.from_bytes(b" " + data)
    with pytest.raises(TrustRootError, match="canonical"):
        TrustRoot.from_bytes(data.replace(b'{"signatures"', b'{ "signatures"', 1))


def test_oversized_root_rejected() -> None:
    with pytest.raises(TrustRootError, match="bytes"):
        TrustRoot.from_bytes(b" " * (256 * 1024 + 1))


def test_root_accessors() -> None:
    fleet = Fleet(release_keys=KEYS[:3], thresholds={"root": 1, "release": 2, "orders": 1})
    root = fleet.root()
    assert root.version == 1 and root.expires_at == NOW + 10 * YEAR
    assert set(root.keys) >= {k.public.keyid for k in KEYS[:3]}
    assert root.role("release").threshold == 2
    with pytest.raises(KeyError):
        root.role("targets")
    assert TrustRoot.from_bytes(root.to_bytes()).release_fingerprint() == root.release_fingerprint()
    assert "release=2/3" in repr(root)


def test_release_fingerprint_changes_with_release_keys_or_threshold_only() -> None:
    base = Fleet(root_keys=[KEYS[8]], release_keys=KEYS[:2], orders_keys=[KEYS[7]],
                 thresholds={"root": 1, "release": 1, "orders": 1})
    fp = base.root().release_fingerprint()
    same = Fleet(root_keys=[KEYS[6]], release_keys=[KEYS[1], KEYS[0]], orders_keys=[KEYS[5]],
                 thresholds={"root": 1, "release": 1, "orders": 1})
    assert same.root().release_fingerprint() == fp
    assert Fleet(root_keys=[KEYS[8]], release_keys=KEYS[:2], orders_keys=[KEYS[7]],
                 thresholds={"root": 1, "release": 2, "orders": 1}).root().release_fingerprint() != fp
    assert Fleet(root_keys=[KEYS[8]], release_keys=KEYS[1:3], orders_keys=[KEYS[7]],
                 thresholds={"root": 1, "release": 1, "orders": 1}).root().release_fingerprint() != fp
