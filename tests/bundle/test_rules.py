"""Rollback and fast-forward, trusted time, and firmware compatibility: the pure decision rules."""

from __future__ import annotations

import dataclasses
import math

import pytest

from agent.bundle import (
    FormatError,
    IncompatibleError,
    Manifest,
    RollbackError,
    SignatureError,
    canonical_json,
    check_compatible,
    check_version,
    trusted_now,
)
from tests.bundle.helpers import (
    END,
    FAKE_MODEL,
    KEYS,
    NOW,
    Fleet,
    bundle_bytes,
    head,
    profile,
    rejection,
    tar_member,
    tiny_manifest,
    verify,
)

D1, D2 = "11" * 32, "22" * 32


# model version digest | hwm version digest | allow_downgrade -> decision or rule named in the error
ROLLBACK_TABLE = {
    "first install (no mark)": (3, D1, None, None, False, "install"),
    "higher version": (4, D1, 3, D2, False, "install"),
    "reinstall same version same digest": (3, D1, 3, D1, False, "reinstall"),
    "reinstall allowed with allow_downgrade too": (3, D1, 3, D1, True, "reinstall"),
    "lower version": (2, D1, 3, D2, False, "lower than version 3"),
    "much lower version": (0, D1, 99999, D2, False, "lower than version 99999"),
    "same version different digest": (3, D1, 3, D2, False, "never reused"),
    "same version, mark without digest": (3, D1, 3, None, False, "never reused"),
    "lower version with signed rollback order": (2, D1, 3, D2, True, "install"),
    "same version other digest with rollback order": (3, D1, 3, D2, True, "install"),
}


@pytest.mark.parametrize("case", ROLLBACK_TABLE.values(), ids=ROLLBACK_TABLE.keys())
def test_rollback_rule(case: tuple[int, str, int | None, str | None, bool, str]) -> None:
    version, digest, hwm_version, hwm_digest, allow, expected = case
    kwargs = {"model": "toy", "version": version, "digest": digest, "hwm_version": hwm_version,
              "hwm_digest": hwm_digest, "allow_downgrade": allow}
    if expected in ("install", "reinstall"):
        assert check_version(**kwargs) == expected  # type: ignore[arg-type]
    else:
        with pytest.raises(RollbackError, match=expected) as info:
            check_version(**kwargs)  # type: ignore[arg-type]
        assert info.value.reason == "rollback" and "toy@" in str(info.value)


def test_fast_forward_attack_recovered_by_rotating_the_release_key() -> None:
    """A stolen release key signs v99999. Devices install it and their mark jumps to 99999. The fleet rotates the
    release key through the root: the fingerprint changes (the agent resets the mark on that), v1 under the new key
    verifies and installs, and anything signed by the stolen key no longer verifies."""
    stolen, fresh = KEYS[0], KEYS[1]
    fleet = Fleet(root_keys=[KEYS[2]], release_keys=[stolen], orders_keys=[KEYS[3]])
    root_v1 = fleet.root()
    evil = bundle_bytes(tiny_manifest(version=99999), None, [stolen])
    evil_vb = verify(evil, root_v1)  # the compromise: it verifies under the old root
    mark = (evil_vb.manifest.version, evil_vb.digest, root_v1.release_fingerprint())

    honest_v1 = bundle_bytes(tiny_manifest(version=1), None, [fresh])
    assert isinstance(rejection(honest_v1, root_v1), SignatureError)  # not before the rotation

    fleet.version, fleet.release_keys = 2, [fresh]
    root_v2 = root_v1.update(fleet.root_bytes())
    assert root_v2.release_fingerprint() != mark[2]
    vb = verify(honest_v1, root_v2)
    hwm = mark if mark[2] == root_v2.release_fingerprint() else None  # what the agent's HwmStore.effective does
    assert check_version(model="toy", version=vb.manifest.version, digest=vb.digest,
                         hwm_version=hwm[0] if hwm else None, hwm_digest=hwm[1] if hwm else None,
                         allow_downgrade=False) == "install"
    # Had the mark not been reset, the rule would refuse v1: the reset is what makes recovery possible.
    with pytest.raises(RollbackError):
        check_version(model="toy", version=1, digest=vb.digest, hwm_version=mark[0], hwm_digest=mark[1],
                      allow_downgrade=False)
    assert isinstance(rejection(bundle_bytes(tiny_manifest(version=1), None, [stolen]), root_v2), SignatureError)
    assert isinstance(rejection(evil, root_v2), SignatureError)


@pytest.mark.parametrize(("args", "expected"), [
    ((0.0, None), 0.0),
    ((0.0, NOW), NOW),
    ((0.0, NOW, NOW + 5, NOW - 5), NOW + 5),
    ((NOW + 100, NOW), NOW + 100),
    ((0.0, None, NOW), NOW),
    ((math.nan, NOW, math.inf), NOW),
])
def test_trusted_time_is_the_max_of_clock_persisted_and_signed_times(args: tuple[float, ...],
                                                                     expected: float) -> None:
    assert trusted_now(*args) == expected


def test_device_booted_at_1970_keeps_the_newest_signed_time() -> None:
    persisted = NOW
    now = trusted_now(0.0, persisted, NOW - 10)
    assert now == NOW  # a 1970 clock never moves trusted time backwards, so nothing expired becomes current


def _manifest(**fields: object) -> Manifest:
    return Manifest.from_bytes(canonical_json(tiny_manifest(**fields)))  # type: ignore[arg-type]


def test_compatible_bundle_passes() -> None:
    check_compatible(_manifest(), profile("raspberry-pi-4"))


def test_profile_not_listed_rejected() -> None:
    with pytest.raises(IncompatibleError, match="coral-dev-board"):
        check_compatible(_manifest(), profile("coral-dev-board"))


def test_runtime_not_in_profile_rejected() -> None:
    onnx_less = dataclasses.replace(profile("raspberry-pi-4"), runtime_order=("tflite",), onnx=None)
    with pytest.raises(IncompatibleError, match="runtime"):
        check_compatible(_manifest(), onnx_less)


def test_quantization_not_supported_rejected() -> None:
    with pytest.raises(IncompatibleError, match="int4"):
        check_compatible(_manifest(quantization="int4"), profile("raspberry-pi-4"))


def test_model_file_over_profile_limit_rejected() -> None:
    small = profile("raspberry-pi-4")
    tight = dataclasses.replace(small, limits=dataclasses.replace(small.limits, max_model_bytes=10))
    with pytest.raises(IncompatibleError, match="at most 10"):
        check_compatible(_manifest(), tight)


def test_manifest_without_a_version_rejected() -> None:
    doc = tiny_manifest()
    del doc["version"]
    with pytest.raises(FormatError, match="missing key"):
        Manifest.from_bytes(canonical_json(doc))
    fleet = Fleet()  # even when properly signed, a manifest without a version is never installed
    head_bytes, _ = head(fleet, doc)
    data = head_bytes + tar_member("payload/model.onnx", FAKE_MODEL) + END
    exc = rejection(data, fleet.root())
    assert isinstance(exc, FormatError) and "version" in str(exc)
