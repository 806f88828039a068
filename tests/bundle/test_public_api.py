"""The shared contract's public surface: ``__all__``, the error tree and its stable reason codes."""

from __future__ import annotations

import pickle

import pytest

from agent import bundle
from agent.bundle import (
    BundleError,
    DigestError,
    ExpiredError,
    ExtraMemberError,
    FormatError,
    IncompatibleError,
    MemberError,
    MissingMemberError,
    OrderError,
    OrderMismatchError,
    ReplayedOrderError,
    RollbackError,
    SignatureError,
    SizeError,
    TrustRootError,
    WrongDeviceError,
)

REASONS = {
    FormatError: "malformed", MemberError: "bad_member", ExtraMemberError: "bad_member",
    MissingMemberError: "bad_member", SizeError: "size", DigestError: "digest", SignatureError: "signature",
    ExpiredError: "stale", RollbackError: "rollback", IncompatibleError: "incompatible", OrderError: "order",
    WrongDeviceError: "order", ReplayedOrderError: "order", OrderMismatchError: "order",
    TrustRootError: "trust_root",
}


def test_public_names_declared_and_present() -> None:
    missing = [n for n in bundle.__all__ if not hasattr(bundle, n)]
    assert not missing and len(set(bundle.__all__)) == len(bundle.__all__)


@pytest.mark.parametrize(("cls", "reason"), REASONS.items(), ids=[c.__name__ for c in REASONS])
def test_every_error_is_a_bundle_error_with_a_stable_reason(cls: type[BundleError], reason: str) -> None:
    import re

    exc = cls("what was wrong; what to do")
    assert isinstance(exc, BundleError) and exc.reason == reason
    assert re.fullmatch(r"[a-z_]{1,32}", exc.reason)  # the deployment event's reason-code rule
    assert str(exc) == exc.message == "what was wrong; what to do"
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is cls and again.message == exc.message
