"""Pure decision rules of the update path: the version rule, trusted time, firmware compatibility.

No I/O and no clock: the caller passes every input (the persisted high-water mark, the device clock, the profile)
and gets a decision or a typed error whose message says which rule refused.
"""

from __future__ import annotations

import math
from typing import Literal

from agent.bundle.errors import IncompatibleError, RollbackError
from agent.bundle.manifest import Manifest
from agent.profiles import FirmwareProfile

__all__ = ["check_compatible", "check_version", "trusted_now"]


def check_version(*, model: str, version: int, digest: str, hwm_version: int | None, hwm_digest: str | None,
                  allow_downgrade: bool) -> Literal["install", "reinstall"]:
    """Apply the rollback rule to a candidate against the model's high-water mark (highest version ever activated
    and that version's digest).

    * no mark, or ``version > hwm_version``: ``"install"``;
    * ``version == hwm_version`` with the mark's digest: ``"reinstall"`` (the same bundle again);
    * a lower version, or the same version with another digest: ``"install"`` only with ``allow_downgrade`` (a
      signed rollback order; a sideload never has it), else :class:`RollbackError` naming the rule.
    """
    if hwm_version is None or version > hwm_version:
        return "install"
    if version == hwm_version and hwm_digest is not None and digest == hwm_digest:
        return "reinstall"
    if allow_downgrade:
        return "install"
    if version == hwm_version:
        raise RollbackError(
            f"{model}@{version} has digest {digest[:16]}... but version {hwm_version} was already activated with "
            f"digest {str(hwm_digest)[:16]}...: a version number is never reused for other bytes; publish a higher "
            "version, or send a signed order with allow_downgrade")
    raise RollbackError(
        f"{model}@{version} is lower than version {hwm_version}, the highest ever activated on this device: "
        "downgrades need a signed order with allow_downgrade")


def trusted_now(clock: float, persisted: float | None, *seen: float) -> float:
    """``max(device clock, persisted trusted time, every signed time seen)``, ignoring non-finite values.

    A device that boots with its clock at 1970 therefore keeps judging expiry against the newest signed time it
    has seen (an order's ``issued_at``, a manifest's ``created_at``), never against 1970. Persist the result
    whenever it advances.
    """
    values = [clock, *seen] if persisted is None else [clock, persisted, *seen]
    finite = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return max(finite, default=0.0)


def check_compatible(manifest: Manifest, profile: FirmwareProfile) -> None:
    """Raise :class:`IncompatibleError` unless the bundle lists ``profile``, the profile runs the manifest's runtime
    and quantization, and the model file fits the profile's model-size limit."""
    where = f"{manifest.model}@{manifest.version}"
    if profile.name not in manifest.profiles:
        raise IncompatibleError(f"{where} is built for the firmware profiles {', '.join(manifest.profiles)}, not "
                                f"{profile.name!r}: publish a bundle that lists {profile.name!r}")
    if not profile.supports_runtime(manifest.runtime):
        raise IncompatibleError(f"{where} needs the {manifest.runtime!r} runtime; profile {profile.name!r} runs "
                                f"{', '.join(profile.runtime_order)}")
    quant = manifest.schema.quantization
    if not profile.supports_quantization(quant):
        raise IncompatibleError(f"{where} is quantized as {quant!r}; profile {profile.name!r} allows "
                                f"{', '.join(sorted(profile.limits.quantizations))}")
    size = manifest.model_entry.length
    if size > profile.limits.max_model_bytes:
        raise IncompatibleError(f"{where}: model file {manifest.model_file!r} is {size} bytes; profile "
                                f"{profile.name!r} accepts at most {profile.limits.max_model_bytes}")
