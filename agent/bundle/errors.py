"""The typed errors of the update path: one small tree whose families tell the caller what happened.

Every error raised on purpose by :mod:`agent.bundle` derives from :class:`BundleError`. Its ``reason`` is a short,
stable code (the ``reason`` of the ``rejected`` deployment event, see ``agent.protocol.deploy``), and its message
says what was wrong and what to do about it, because it ends up in device logs and in the fleet console.

The caller's rule is simple: any :class:`BundleError` means "reject this bundle / order / root, report the reason,
keep serving what is active". Nothing is ever partially accepted.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "BundleError",
    "DigestError",
    "ExpiredError",
    "ExtraMemberError",
    "FormatError",
    "IncompatibleError",
    "MemberError",
    "MissingMemberError",
    "OrderError",
    "OrderMismatchError",
    "ReplayedOrderError",
    "RollbackError",
    "SignatureError",
    "SizeError",
    "TrustRootError",
    "WrongDeviceError",
]


class BundleError(Exception):
    """Base of every rejection by :mod:`agent.bundle`; ``reason`` is the stable code to report."""

    reason: ClassVar[str] = "invalid"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class FormatError(BundleError):
    """A document (manifest, signatures, order, key) is not valid, strict, canonical JSON of the right shape.

    The message names the field at fault (``manifest.files[0].sha256``) and what is allowed.
    """

    reason: ClassVar[str] = "malformed"


class MemberError(BundleError):
    """The bundle archive has a member that is not allowed: wrong type, unsafe name, unexpected name."""

    reason: ClassVar[str] = "bad_member"


class ExtraMemberError(MemberError):
    """A member the manifest does not declare (or a duplicate, or anything after the last payload file)."""


class MissingMemberError(MemberError):
    """A member the format or the manifest requires is absent (or not where it must be)."""


class SizeError(BundleError):
    """A size limit was exceeded, a header size disagrees with the manifest, or the stream ended early."""

    reason: ClassVar[str] = "size"


class DigestError(BundleError):
    """A payload file's SHA-256 differs from the one the signed manifest declares."""

    reason: ClassVar[str] = "digest"


class SignatureError(BundleError):
    """Fewer valid signatures from the role's keys than its threshold."""

    reason: ClassVar[str] = "signature"


class ExpiredError(BundleError):
    """A manifest, order or trust root has expired at the trusted time (it is stale)."""

    reason: ClassVar[str] = "stale"


class RollbackError(BundleError):
    """The version rule refuses the candidate (lower version, or same version with another digest)."""

    reason: ClassVar[str] = "rollback"


class IncompatibleError(BundleError):
    """The bundle does not fit this device's firmware profile (profile, runtime, quantization, size)."""

    reason: ClassVar[str] = "incompatible"


class OrderError(BundleError):
    """A deployment order that is validly signed but not acceptable on this device."""

    reason: ClassVar[str] = "order"


class WrongDeviceError(OrderError):
    """The order names another device."""


class ReplayedOrderError(OrderError):
    """The order's sequence is not newer than the last one this device accepted (a replay)."""


class OrderMismatchError(OrderError):
    """The order and the downloaded bundle disagree (model, version, digest or length)."""


class TrustRootError(BundleError):
    """A trust root document is invalid, not signed as required, or not the next version."""

    reason: ClassVar[str] = "trust_root"
