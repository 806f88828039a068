"""Which devices a bundle may be rolled out to, by firmware profile, and the URL orders carry.

A bundle declares the firmware profiles it supports (``manifest.profiles``); a device runs one profile
(``devices.firmware_profile``, set when it is registered). A device is compatible when its profile is one of the
bundle's. A device whose profile is **unknown** (``None``) is *not* compatible: the server cannot show that the
bundle fits it, and rolling out on hope would only move the refusal to the device (the agent checks
compatibility itself before installing) and burn the rollout's failure budget. Set the device's profile to
include it (ADR 0014).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Final

import sqlalchemy as sa

from fleet_server.models import BundleRecord, Device, table_of
from fleet_server.settings import FleetSettings

__all__ = [
    "NOT_REGISTERED",
    "PROFILE_UNKNOWN",
    "UnknownBundleError",
    "bundle_url",
    "incompatible_devices",
    "incompatible_devices_for_bundle",
    "profile_not_supported",
]

PROFILE_UNKNOWN: Final = "profile unknown"
"""Why a device with no recorded firmware profile is excluded."""
NOT_REGISTERED: Final = "device not registered"
"""Why an id that is not in the registry is excluded (by :func:`incompatible_devices_for_bundle`)."""
_CHUNK: Final = 5000  # ids per IN (...) query: well under SQLite's and PostgreSQL's parameter limits


class UnknownBundleError(LookupError):
    """No bundle with this digest is stored."""

    def __init__(self, digest: str) -> None:
        super().__init__(f"no bundle with digest {digest}")
        self.digest = digest


def profile_not_supported(profile: str) -> str:
    """Why a device whose profile the bundle does not list is excluded."""
    return f"profile {profile!r} not supported"


def incompatible_devices(bundle_profiles: Collection[str],
                         device_profiles: Mapping[str, str | None]) -> dict[str, str]:
    """The devices of ``device_profiles`` (device id -> firmware profile, ``None`` when unknown) that the bundle
    cannot go to, each with why: ``profile 'x' not supported`` or ``profile unknown``. Compatible devices are
    left out, so an empty result means every device is compatible. Pure; ids keep the mapping's order."""
    supported = frozenset(bundle_profiles)
    out: dict[str, str] = {}
    for device_id, profile in device_profiles.items():
        if profile is None:
            out[device_id] = PROFILE_UNKNOWN
        elif profile not in supported:
            out[device_id] = profile_not_supported(profile)
    return out


def incompatible_devices_for_bundle(conn: sa.Connection, digest: str, device_ids: Iterable[str]) -> dict[str, str]:
    """:func:`incompatible_devices` for the stored bundle ``digest`` and the registered devices ``device_ids``
    (ids not in the registry are reported as ``device not registered``). Raises :class:`UnknownBundleError`."""
    bundles = table_of(BundleRecord)
    profiles = conn.execute(sa.select(bundles.c.profiles).where(bundles.c.digest == digest)).scalar_one_or_none()
    if profiles is None:
        raise UnknownBundleError(digest)
    ids = list(dict.fromkeys(device_ids))
    devices = table_of(Device)
    known: dict[str, str | None] = {}
    for i in range(0, len(ids), _CHUNK):
        chunk = ids[i:i + _CHUNK]
        rows = conn.execute(sa.select(devices.c.id, devices.c.firmware_profile).where(devices.c.id.in_(chunk)))
        known.update({r.id: r.firmware_profile for r in rows})
    verdict = incompatible_devices(profiles, known)
    return {d: NOT_REGISTERED if d not in known else verdict[d] for d in ids if d not in known or d in verdict}


def bundle_url(settings: FleetSettings, digest: str) -> str:
    """The URL a device downloads bundle ``digest`` from (what deployment orders carry)."""
    return f"{settings.public_url.rstrip('/')}/bundles/{digest}"
