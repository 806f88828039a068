"""The bundle store: streamed, verified uploads stored content-addressed on local disk, token-protected
downloads with HTTP Range, and garbage collection of unreferenced bundles (``docs/bundle-store.md``, ADR 0014).

Modules: ``store`` (the files on disk, the only filesystem code), ``verify`` (the trust root and the shared
bundle verifier), ``catalog`` (rows + files: upload, references, delete, garbage collection), ``compat``
(firmware-profile compatibility, download URLs), ``ranges`` (HTTP Range, pure), ``tokens`` (download tokens),
``metrics`` (counters for ``/metrics``). The HTTP routes are in :mod:`fleet_server.api.bundles`.
"""

from fleet_server.bundles.catalog import (
    BundleConflictError,
    BundleInUseError,
    BundleReferences,
    GcReport,
    collect_garbage,
    delete_bundle,
    find_references,
)
from fleet_server.bundles.compat import (
    NOT_REGISTERED,
    PROFILE_UNKNOWN,
    UnknownBundleError,
    bundle_url,
    incompatible_devices,
    incompatible_devices_for_bundle,
)
from fleet_server.bundles.metrics import bundle_metrics
from fleet_server.bundles.store import BundleStore
from fleet_server.bundles.tokens import InvalidDownloadTokenError, issue_download_token, verify_download_token

__all__ = [
    "NOT_REGISTERED",
    "PROFILE_UNKNOWN",
    "BundleConflictError",
    "BundleInUseError",
    "BundleReferences",
    "BundleStore",
    "GcReport",
    "InvalidDownloadTokenError",
    "UnknownBundleError",
    "bundle_metrics",
    "bundle_url",
    "collect_garbage",
    "delete_bundle",
    "find_references",
    "incompatible_devices",
    "incompatible_devices_for_bundle",
    "issue_download_token",
    "verify_download_token",
]
