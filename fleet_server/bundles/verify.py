"""Upload verification with the shared bundle code: the fleet's trust root and one pass over the received file.

The server runs exactly the checks a device runs (``agent.bundle.verify_bundle``: archive structure, a threshold
of valid release signatures under the trust root, manifest fields and expiry, every payload file's length and
SHA-256), except the firmware-profile check: a bundle supports a set of profiles, and which devices it may go to
is decided per rollout (:mod:`fleet_server.bundles.compat`). On top, the uploaded file must end where the archive
ends: devices download exactly ``length`` bytes and compare them with the order, so trailing bytes would make a
bundle that no device can install.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, BinaryIO

from agent.bundle import (
    MANIFEST_PREFIX,
    MAX_ROOT_BYTES,
    BundleError,
    Manifest,
    TrustRoot,
    read_manifest,
    strict_loads,
    verify_bundle,
)
from fleet_server.settings import FleetSettings

__all__ = ["TrustRootUnavailableError", "UploadRejectedError", "VerifiedUpload", "load_trust_root", "verify_file"]


class TrustRootUnavailableError(RuntimeError):
    """Uploads cannot be verified: the trust root is not configured, unreadable, invalid or expired (503)."""


class UploadRejectedError(ValueError):
    """The uploaded bytes are not a valid bundle (422). ``reason`` is the verifier's stable code
    (``signature``, ``digest``, ``malformed``, ``stale``, ``size``, ``bad_member``...) or ``trailing_data``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class VerifiedUpload:
    """What verification established about an uploaded file."""

    digest: str
    """sha256 of the manifest bytes: the bundle's identity, as orders name it."""
    manifest: Manifest
    manifest_doc: dict[str, Any]
    signers: tuple[str, ...]
    """Key ids of the valid release signatures (sorted)."""
    length: int


def load_trust_root(settings: FleetSettings, *, now: float) -> TrustRoot:
    """The trust root named by ``bundle_trust_root_file``, read at each call (a rotated root takes effect without
    a restart). Raises :class:`TrustRootUnavailableError` naming the setting and what is wrong."""
    path = settings.bundle_trust_root_file
    if path is None:
        raise TrustRootUnavailableError(
            "bundle uploads are disabled: set bundle_trust_root_file (FLEET_BUNDLE_TRUST_ROOT_FILE) to the "
            "fleet's trust root (root.json) so uploads can be verified")
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_ROOT_BYTES + 1)
    except OSError as exc:
        raise TrustRootUnavailableError(f"bundle_trust_root_file {str(path)!r} cannot be read: "
                                        f"{exc.strerror or exc}") from None
    try:
        root = TrustRoot.from_bytes(data)
        root.check_not_expired(now)
    except BundleError as exc:
        raise TrustRootUnavailableError(f"bundle_trust_root_file {str(path)!r} is not a usable trust root "
                                        f"({exc.reason}): {exc.message}") from None
    return root


def verify_file(stream: BinaryIO, root: TrustRoot, *, now: float, size: int) -> VerifiedUpload:
    """Verify the bundle in ``stream`` (seekable, ``size`` bytes) at time ``now``; raise
    :class:`UploadRejectedError` with the verifier's reason if it is not valid."""
    try:
        vb = verify_bundle(stream, root, now=now)
        if vb.length != size:
            raise UploadRejectedError(
                "trailing_data", f"{size - vb.length} byte(s) follow the end of the archive (the bundle is "
                f"{vb.length} bytes); upload the bundle file exactly as edge-bundle wrote it")
        stream.seek(0)
        manifest_bytes, sigs = read_manifest(stream)
        signers = root.verify_role("release", MANIFEST_PREFIX, manifest_bytes, sigs)
        doc = strict_loads(manifest_bytes)
    except BundleError as exc:
        raise UploadRejectedError(exc.reason, exc.message) from None
    return VerifiedUpload(vb.digest, vb.manifest, doc, tuple(sorted(signers)), vb.length)
