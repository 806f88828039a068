"""The trust root: which keys sign what, k-of-n thresholds, and TUF-style rotation.

A :class:`TrustRoot` is built only from bytes that passed every check, and it is immutable: :meth:`TrustRoot.update`
returns a new root (or raises), so a failed rotation leaves the device on the root it had. The rules are python-tuf's
root rules (``tuf/ngclient/_internal/trusted_metadata_set.py``) applied to the format of ``docs/bundle-format.md``:

* the first root is provisioned out of band and must be signed by a threshold of its own root keys;
* version N+1 is accepted only if signed by a threshold of version N's root keys **and** of its own root keys;
* a role's signatures count once per distinct listed key id; invalid signatures are ignored, not fatal;
* expiry is judged separately (:meth:`TrustRoot.check_not_expired`): an expired intermediate root may be passed
  through on the way to a current one, but nothing is verified with an expired root.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from agent.bundle.canonical import canonical_json, strict_loads
from agent.bundle.errors import ExpiredError, FormatError, SignatureError, TrustRootError
from agent.bundle.keys import ROOT_PREFIX, PublicKey, SigningKey, parse_signature_list

__all__ = [
    "MAX_ROOT_BYTES",
    "ROLE_NAMES",
    "ROOT_FORMAT",
    "ROOT_TYPE",
    "Role",
    "TrustRoot",
    "make_root_signed",
    "sign_document",
]

ROOT_TYPE: Final = "edge-trust-root"
ROOT_FORMAT: Final = 1
ROLE_NAMES: Final = ("root", "release", "orders")
"""``root`` signs trust roots, ``release`` signs bundle manifests, ``orders`` signs deployment orders."""
MAX_ROOT_BYTES: Final = 256 * 1024
"""Largest accepted root document; a real one is a few KiB."""
_MAX_VERSION: Final = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Role:
    """The key ids allowed to sign for a role and how many distinct ones must."""

    keyids: frozenset[str]
    threshold: int


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise FormatError(f"{where} must be a non-negative number of Unix seconds, got {str(value)[:40]!r}")
    return value


class TrustRoot:
    """A verified trust root document. Build with :meth:`from_bytes` (provisioning) or :meth:`update` (rotation)."""

    __slots__ = ("_data", "_expires_at", "_keys", "_roles", "_signatures", "_signed_bytes", "_version")

    def __init__(self, data: bytes, *, signed_bytes: bytes, signatures: list[dict[str, str]], version: int,
                 expires_at: float, keys: Mapping[str, PublicKey], roles: Mapping[str, Role]) -> None:
        """Internal: use :meth:`from_bytes` or :meth:`update`, which check signatures first."""
        self._data = data
        self._signed_bytes = signed_bytes
        self._signatures = signatures
        self._version = version
        self._expires_at = expires_at
        self._keys: Mapping[str, PublicKey] = MappingProxyType(dict(keys))
        self._roles: Mapping[str, Role] = MappingProxyType(dict(roles))

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def _parse(cls, data: bytes) -> TrustRoot:
        """Structure only (no signature check). Every problem is a :class:`TrustRootError`."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TrustRootError(f"trust root must be bytes, got {type(data).__name__}")
        raw = bytes(data)
        if len(raw) > MAX_ROOT_BYTES:
            raise TrustRootError(f"trust root is {len(raw)} bytes; at most {MAX_ROOT_BYTES} are accepted")
        try:
            return cls._parse_doc(raw)
        except FormatError as exc:
            raise TrustRootError(f"trust root is malformed: {exc.message}") from None

    @classmethod
    def _parse_doc(cls, raw: bytes) -> TrustRoot:
        doc = strict_loads(raw)
        if not isinstance(doc, dict) or set(doc) != {"signed", "signatures"}:
            raise FormatError("the document must be an object with exactly the keys signed, signatures")
        signed = doc["signed"]
        signatures = parse_signature_list(doc["signatures"])
        if not isinstance(signed, dict):
            raise FormatError("signed must be an object")
        expected = {"type", "format", "version", "expires_at", "keys", "roles"}
        if set(signed) != expected:
            raise FormatError(f"signed must have exactly the keys {', '.join(sorted(expected))}; "
                              f"got {', '.join(sorted(signed))}")
        if signed["type"] != ROOT_TYPE:
            raise FormatError(f"signed.type must be {ROOT_TYPE!r}")
        fmt = signed["format"]
        if isinstance(fmt, bool) or fmt != ROOT_FORMAT:
            raise FormatError(f"signed.format = {str(fmt)[:20]!r}; this agent reads format {ROOT_FORMAT}")
        version = signed["version"]
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= _MAX_VERSION:
            raise FormatError(f"signed.version must be an integer from 1 to 2**63-1, got {str(version)[:40]!r}")
        expires_at = _number(signed["expires_at"], "signed.expires_at")
        raw_keys = signed["keys"]
        if not isinstance(raw_keys, dict):
            raise FormatError("signed.keys must be an object keyid -> public key")
        keys: dict[str, PublicKey] = {}
        for keyid, value in raw_keys.items():
            key = PublicKey.from_dict(value, where=f"signed.keys[{keyid[:16]!r}]")
            if key.keyid != keyid:
                raise FormatError(f"signed.keys: keyid {keyid[:80]!r} is not the sha256 of its key object "
                                  f"(that is {key.keyid})")
            keys[keyid] = key
        raw_roles = signed["roles"]
        if not isinstance(raw_roles, dict) or set(raw_roles) != set(ROLE_NAMES):
            raise FormatError(f"signed.roles must have exactly the roles {', '.join(ROLE_NAMES)}")
        roles = {name: cls._parse_role(raw_roles[name], f"signed.roles.{name}", keys) for name in ROLE_NAMES}
        return cls(raw, signed_bytes=canonical_json(signed), signatures=signatures, version=version,
                   expires_at=expires_at, keys=keys, roles=roles)

    @staticmethod
    def _parse_role(value: object, where: str, keys: Mapping[str, PublicKey]) -> Role:
        if not isinstance(value, dict) or set(value) != {"keyids", "threshold"}:
            raise FormatError(f"{where} must be an object with exactly the keys keyids, threshold")
        keyids = value["keyids"]
        if not isinstance(keyids, list) or not keyids or not all(isinstance(k, str) for k in keyids):
            raise FormatError(f"{where}.keyids must be a non-empty list of key ids")
        unknown = [k for k in keyids if k not in keys]
        if unknown:
            raise FormatError(f"{where}.keyids lists {unknown[0][:80]!r}, which is not in signed.keys")
        distinct = frozenset(keyids)
        threshold = value["threshold"]
        if isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold <= len(distinct):
            raise FormatError(f"{where}.threshold must be an integer from 1 to the number of distinct key ids "
                              f"({len(distinct)}), got {str(threshold)[:40]!r}")
        return Role(distinct, threshold)

    @classmethod
    def from_bytes(cls, data: bytes) -> TrustRoot:
        """Parse a root and check it is signed by a threshold of its own root keys (the provisioned first root).

        Raises :class:`TrustRootError` saying what is wrong. Expiry is not checked here: see
        :meth:`check_not_expired`.
        """
        root = cls._parse(data)
        try:
            root.verify_role("root", ROOT_PREFIX, root._signed_bytes, root._signatures)
        except SignatureError as exc:
            raise TrustRootError(f"trust root version {root.version} is not signed by its own root keys: "
                                 f"{exc.message}") from None
        return root

    def update(self, new_data: bytes) -> TrustRoot:
        """Rotate to the next root: version exactly ``self.version + 1``, signed by a threshold of this root's root
        keys **and** of the new root's own root keys. Returns the new root; raises :class:`TrustRootError`.

        Apply roots one version at a time. The new root may be expired (it can be passed through on the way to a
        newer one); check the final root with :meth:`check_not_expired` before verifying anything with it.
        """
        new = TrustRoot._parse(new_data)
        if new.version != self._version + 1:
            raise TrustRootError(f"trust root version {new.version} cannot follow version {self._version}: roots are "
                                 f"applied one version at a time (expected {self._version + 1})")
        try:
            self.verify_role("root", ROOT_PREFIX, new._signed_bytes, new._signatures)
        except SignatureError as exc:
            raise TrustRootError(f"trust root version {new.version} is not signed by the root keys of version "
                                 f"{self._version}: {exc.message}") from None
        try:
            new.verify_role("root", ROOT_PREFIX, new._signed_bytes, new._signatures)
        except SignatureError as exc:
            raise TrustRootError(f"trust root version {new.version} is not signed by its own root keys: "
                                 f"{exc.message}") from None
        return new

    # -- accessors ---------------------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """The root's version (1 for the first root, +1 per rotation)."""
        return self._version

    @property
    def expires_at(self) -> float:
        """Unix time after which nothing may be verified with this root."""
        return self._expires_at

    @property
    def keys(self) -> Mapping[str, PublicKey]:
        """Every key the root lists, by key id (read-only)."""
        return self._keys

    def role(self, name: str) -> Role:
        """The role ``name`` (``root``, ``release`` or ``orders``); ``KeyError`` for another name."""
        try:
            return self._roles[name]
        except KeyError:
            raise KeyError(f"unknown role {name!r}; roles are {', '.join(ROLE_NAMES)}") from None

    def to_bytes(self) -> bytes:
        """The exact bytes this root was parsed from (what a device stores as ``root.json``)."""
        return self._data

    def release_fingerprint(self) -> str:
        """SHA-256 over the release role's sorted key ids and threshold, in hex.

        The agent stores it with each model's rollback high-water mark and resets the mark when it changes: after a
        release key was compromised and used to sign a huge version (fast-forward attack), rotating the release key
        through the root is what lets honest versions install again.
        """
        role = self.role("release")
        doc = {"keyids": sorted(role.keyids), "threshold": role.threshold}
        return hashlib.sha256(canonical_json(doc)).hexdigest()

    def check_not_expired(self, now: float) -> None:
        """Raise :class:`ExpiredError` if the root has expired at the trusted time ``now``."""
        if not self._expires_at > now:
            raise ExpiredError(f"the trust root (version {self._version}) expired at {self._expires_at:.0f}, trusted "
                               f"time is {now:.0f}: install a newer root (signed by the current root keys)")

    # -- verification ------------------------------------------------------------------------------------------

    def verify_role(self, role: str, prefix: bytes, message: bytes,
                    signatures: Sequence[Mapping[str, Any]]) -> set[str]:
        """Check that a threshold of ``role``'s keys signed ``prefix + message``; return the valid key ids.

        Only key ids the role lists count; each counts once however often it appears; an invalid or malformed
        entry is ignored (it does not poison the others). Fewer valid distinct keys than the threshold raises
        :class:`SignatureError`.
        """
        spec = self.role(role)
        signed = prefix + message
        valid: set[str] = set()
        tried: set[tuple[str, str]] = set()
        for entry in signatures:
            if not isinstance(entry, Mapping):
                continue
            keyid, sig = entry.get("keyid"), entry.get("sig")
            if not isinstance(keyid, str) or not isinstance(sig, str):
                continue
            if keyid not in spec.keyids or keyid in valid or (keyid, sig) in tried:
                continue
            tried.add((keyid, sig))
            if self._keys[keyid].verify(signed, sig):
                valid.add(keyid)
        if len(valid) < spec.threshold:
            raise SignatureError(
                f"the {role!r} role needs valid signatures from {spec.threshold} of its {len(spec.keyids)} keys; "
                f"found {len(valid)} among {len(signatures)} signature(s): sign with the {role} keys of the "
                f"current trust root (version {self._version})")
        return valid

    def __repr__(self) -> str:
        """Version, expiry and role sizes."""
        roles = ", ".join(f"{n}={r.threshold}/{len(r.keyids)}" for n, r in self._roles.items())
        return f"TrustRoot(version={self._version}, expires_at={self._expires_at}, {roles})"


def make_root_signed(*, version: int, expires_at: float, keys: Mapping[str, Sequence[PublicKey]],
                     thresholds: Mapping[str, int]) -> dict[str, Any]:
    """The ``signed`` part of a root document: role -> keys and role -> threshold.

    No validation beyond building the shape (tests build invalid roots with it); :meth:`TrustRoot.from_bytes`
    judges the result. Role key ids keep the given order, duplicates included.
    """
    all_keys: dict[str, dict[str, str]] = {}
    roles: dict[str, dict[str, Any]] = {}
    for role, role_keys in keys.items():
        for key in role_keys:
            all_keys[key.keyid] = key.to_dict()
        roles[role] = {"keyids": [key.keyid for key in role_keys], "threshold": thresholds[role]}
    return {"type": ROOT_TYPE, "format": ROOT_FORMAT, "version": version, "expires_at": expires_at,
            "keys": all_keys, "roles": roles}


def sign_document(signed: Mapping[str, Any], prefix: bytes, signers: Sequence[SigningKey]) -> bytes:
    """``canonical_json({"signed": signed, "signatures": [...]})`` with one signature per signer over
    ``prefix + canonical_json(signed)``. Generic: roots (``ROOT_PREFIX``) and orders (``ORDER_PREFIX``)."""
    body = dict(signed)
    message = prefix + canonical_json(body)
    sigs = [{"keyid": s.public.keyid, "sig": s.sign(message)} for s in signers]
    return canonical_json({"signed": body, "signatures": sigs})
