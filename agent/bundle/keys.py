"""Ed25519 keys, key ids, domain-separation prefixes and the signature-list shape.

A public key is written ``{"keytype": "ed25519", "public": "<64 hex>"}`` and identified by
``keyid = sha256(canonical_json(that object))``. Every signed message is ``PREFIX + document bytes``, with one prefix
per kind of document, so a signature made for one kind can never be replayed as another.

:class:`SigningKey` keeps a private key in memory and serialises it as unencrypted PKCS#8 PEM. That is right for
tests, demos and a fleet server's order key kept in a protected file; real release keys belong in an HSM or a cloud
KMS (sign ``PREFIX + manifest bytes`` there and add the ``{"keyid", "sig"}`` entry yourself).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


from agent.bundle.canonical import canonical_json
from agent.bundle.errors import FormatError


def _crypto() -> tuple[ModuleType, ModuleType, ModuleType]:
    """``cryptography`` is imported on first use, not at import: it maps about 6 MiB (its own OpenSSL), and an
    agent that is only serving models never verifies a signature (docs/performance.md)."""
    from cryptography import exceptions
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return exceptions, serialization, ed25519

__all__ = [
    "KEYTYPE",
    "MANIFEST_PREFIX",
    "ORDER_PREFIX",
    "ROOT_PREFIX",
    "PublicKey",
    "SigningKey",
    "parse_signature_list",
]

MANIFEST_PREFIX: Final = b"edge-fleet/bundle-manifest/v1\n"
"""Prefix of the message a release key signs: ``MANIFEST_PREFIX + manifest bytes``."""
ROOT_PREFIX: Final = b"edge-fleet/trust-root/v1\n"
"""Prefix of the message a root key signs: ``ROOT_PREFIX + canonical_json(root["signed"])``."""
ORDER_PREFIX: Final = b"edge-fleet/deployment-order/v1\n"
"""Prefix of the message an orders key signs: ``ORDER_PREFIX + canonical_json(order["signed"])``."""

KEYTYPE: Final = "ed25519"
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_HEX128: Final = re.compile(r"[0-9a-f]{128}")


def _keyid_of(public_hex: str) -> str:
    return hashlib.sha256(canonical_json({"keytype": KEYTYPE, "public": public_hex})).hexdigest()


@dataclass(frozen=True, slots=True)
class PublicKey:
    """An Ed25519 public key and its key id. Construct with :meth:`from_public_hex` or :meth:`from_dict`."""

    keyid: str
    public_hex: str
    _key: Ed25519PublicKey = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.public_hex, str) or _HEX64.fullmatch(self.public_hex) is None:
            raise FormatError(f"public key must be 64 lower-case hex characters, got {str(self.public_hex)[:80]!r}")
        if self.keyid != _keyid_of(self.public_hex):
            raise FormatError(f"keyid {str(self.keyid)[:80]!r} is not the sha256 of the key object; "
                              "key ids are computed, never chosen")
        try:
            key = _crypto()[2].Ed25519PublicKey.from_public_bytes(bytes.fromhex(self.public_hex))
        except ValueError as exc:
            raise FormatError(f"public key {self.public_hex[:16]}... is not an Ed25519 key: {exc}") from None
        object.__setattr__(self, "_key", key)

    @classmethod
    def from_public_hex(cls, public_hex: str) -> PublicKey:
        """The key with raw public bytes ``public_hex`` (64 lower-case hex characters); computes the key id."""
        if not isinstance(public_hex, str) or _HEX64.fullmatch(public_hex) is None:
            raise FormatError(f"public key must be 64 lower-case hex characters, got {str(public_hex)[:80]!r}")
        return cls(_keyid_of(public_hex), public_hex)

    @classmethod
    def from_dict(cls, doc: object, *, where: str = "key") -> PublicKey:
        """Parse ``{"keytype": "ed25519", "public": "<hex>"}``; :class:`FormatError` names ``where``."""
        if not isinstance(doc, Mapping):
            raise FormatError(f"{where} must be an object, got {type(doc).__name__}")
        if set(doc) != {"keytype", "public"}:
            raise FormatError(f"{where} must have exactly the keys keytype, public; got {sorted(map(str, doc))}")
        if doc["keytype"] != KEYTYPE:
            raise FormatError(f"{where}.keytype = {str(doc['keytype'])[:40]!r}; only 'ed25519' is supported")
        try:
            return cls.from_public_hex(doc["public"])
        except FormatError as exc:
            raise FormatError(f"{where}.public: {exc.message}") from None

    def to_dict(self) -> dict[str, str]:
        """The JSON form ``{"keytype": "ed25519", "public": "<hex>"}`` (what the key id hashes)."""
        return {"keytype": KEYTYPE, "public": self.public_hex}

    def verify(self, message: bytes, sig_hex: str) -> bool:
        """Whether ``sig_hex`` (128 lower-case hex characters) is this key's signature over ``message``."""
        if not isinstance(sig_hex, str) or _HEX128.fullmatch(sig_hex) is None:
            return False
        try:
            self._key.verify(bytes.fromhex(sig_hex), message)
        except _crypto()[0].InvalidSignature:
            return False
        return True


class SigningKey:
    """An Ed25519 private key with its :class:`PublicKey` (``public``).

    Stored as unencrypted PKCS#8 PEM (:meth:`to_pem`): fine for tests and for a key in a protected file; real
    release keys belong in an HSM or KMS, which then produces the signatures instead of this class.
    """

    __slots__ = ("_key", "public")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        """Wrap an existing ``cryptography`` Ed25519 private key."""
        _exceptions, serialization, ed25519 = _crypto()
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise TypeError(f"need an Ed25519PrivateKey, got {type(key).__name__}")
        self._key = key
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public: PublicKey = PublicKey.from_public_hex(raw.hex())

    @classmethod
    def generate(cls) -> SigningKey:
        """A new random key."""
        return cls(_crypto()[2].Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, data: bytes) -> SigningKey:
        """Load an unencrypted PKCS#8 PEM Ed25519 private key; :class:`FormatError` for anything else."""
        exceptions, serialization, ed25519 = _crypto()
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, exceptions.UnsupportedAlgorithm) as exc:
            raise FormatError(f"not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise FormatError(f"the PEM holds a {type(key).__name__}; bundle keys must be Ed25519")
        return cls(key)

    def to_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (keep the file private: mode 0600, or better an HSM)."""
        serialization = _crypto()[1]
        pem: bytes = self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())
        return pem

    def sign(self, message: bytes) -> str:
        """The signature over ``message`` (already prefixed by the caller) as 128 lower-case hex characters."""
        sig: bytes = self._key.sign(message)
        return sig.hex()

    def __repr__(self) -> str:
        """Shows the key id only, never the secret."""
        return f"SigningKey(keyid={self.public.keyid[:16]}...)"


def parse_signature_list(value: object, where: str = "signatures") -> list[dict[str, str]]:
    """Check the shape of a signature list ``[{"keyid": "<64 hex>", "sig": "<128 hex>"}, ...]``.

    Only the shape: whether a signature is valid, and whether its key counts, is the trust root's business
    (:meth:`agent.bundle.TrustRoot.verify_role`). Raises :class:`FormatError` naming the entry.
    """
    if not isinstance(value, list):
        raise FormatError(f"{where} must be a list of {{keyid, sig}} objects, got {type(value).__name__}")
    out: list[dict[str, str]] = []
    for i, entry in enumerate(value):
        w = f"{where}[{i}]"
        if not isinstance(entry, Mapping) or set(entry) != {"keyid", "sig"}:
            raise FormatError(f"{w} must be an object with exactly the keys keyid, sig")
        keyid: Any = entry["keyid"]
        sig: Any = entry["sig"]
        if not isinstance(keyid, str) or _HEX64.fullmatch(keyid) is None:
            raise FormatError(f"{w}.keyid must be 64 lower-case hex characters")
        if not isinstance(sig, str) or _HEX128.fullmatch(sig) is None:
            raise FormatError(f"{w}.sig must be 128 lower-case hex characters (an Ed25519 signature)")
        out.append({"keyid": keyid, "sig": sig})
    return out
