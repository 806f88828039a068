"""Signed deployment orders and cancels, wrapped in wire ``Command`` frames (pure: no database, no network).

:class:`OrderSigner` holds the orders key (``orders_key_file``), the download-token secret and the URLs and
lifetimes from the settings. Given a device, a command id, a sequence number and ``now`` it builds the order's
``signed`` object with every :class:`agent.bundle.DeploymentOrder` field (``make_order_signed`` validates it),
signs it with ``sign_document(signed, ORDER_PREFIX, [key])``, and encodes the ``Command`` that carries the signed
document: the exact bytes the bridge stores and (re)publishes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.bundle import ORDER_PREFIX, BundleError, SigningKey, make_order_signed, sign_document
from agent.protocol import Command, encode
from fleet_server.bundles.compat import bundle_url
from fleet_server.bundles.tokens import issue_download_token
from fleet_server.settings import FleetSettings

__all__ = ["BundleInfo", "OrderSigner", "RolloutsDisabledError", "rollouts_disabled_reason"]


class RolloutsDisabledError(RuntimeError):
    """Orders cannot be signed with these settings (the message says which settings to set or fix)."""


def rollouts_disabled_reason(settings: FleetSettings) -> str | None:
    """Why this server cannot run rollouts, or ``None`` when the settings allow it."""
    missing = [name for name in ("orders_key_file", "download_token_secret") if getattr(settings, name) is None]
    if missing:
        env = ", ".join(f"FLEET_{m.upper()}" for m in missing)
        return f"rollouts are disabled: set {' and '.join(missing)} ({env}) to sign deployment orders"
    return None


@dataclass(frozen=True, slots=True)
class BundleInfo:
    """What an order needs to know about a bundle (from the ``bundles`` table)."""

    digest: str
    model: str
    version: int
    length: int


@dataclass(frozen=True, slots=True)
class OrderSigner:
    """Builds signed ``Command`` frames. Orders carry the bundle URL of :func:`fleet_server.bundles.compat.bundle_url`
    (``{public_url}/bundles/{digest}``) and a download token for that device and bundle."""

    key: SigningKey
    settings: FleetSettings

    @classmethod
    def from_settings(cls, settings: FleetSettings) -> OrderSigner:
        """Load the orders key named by the settings; :class:`RolloutsDisabledError` says what is missing or
        unreadable."""
        reason = rollouts_disabled_reason(settings)
        if reason is not None:
            raise RolloutsDisabledError(reason)
        assert settings.orders_key_file is not None
        return cls(load_key(settings.orders_key_file), settings)

    @property
    def keyid(self) -> str:
        return self.key.public.keyid

    def bundle_url(self, digest: str) -> str:
        return bundle_url(self.settings, digest)

    def _frame(self, signed: dict[str, Any], now: float) -> bytes:
        # The document is our own canonical JSON: the C parser reads it back (strict_loads guards untrusted input).
        document = json.loads(sign_document(signed, ORDER_PREFIX, [self.key]))
        # Not compressed: an order is mostly hex (signature, token, digest), which deflate barely shrinks, and
        # zlib would cost a tenth of the signing time.
        return encode(Command(device_id=signed["device_id"], command_id=signed["command_id"], kind=signed["action"],
                              order=document, sent_at=now), compress=False)

    def deploy(self, *, device_id: str, command_id: str, rollout_id: str, bundle: BundleInfo, sequence: int,
               now: float, allow_downgrade: bool = False) -> tuple[bytes, float]:
        """The encoded ``Command`` of a deploy order and the order's expiry (unix seconds)."""
        expires_at = now + self.settings.command_ttl_s
        token_expires_at = float(int(now + self.settings.download_token_ttl_s))
        secret = self.settings.download_token_secret
        assert secret is not None  # from_settings checked it
        signed = make_order_signed(
            command_id=command_id, action="deploy", device_id=device_id, rollout_id=rollout_id, sequence=sequence,
            issued_at=now, expires_at=expires_at, model=bundle.model, version=bundle.version,
            bundle_digest=bundle.digest, bundle_length=bundle.length, url=self.bundle_url(bundle.digest),
            token=issue_download_token(secret, device_id=device_id, digest=bundle.digest,
                                       expires_at=token_expires_at),
            token_expires_at=token_expires_at, allow_downgrade=allow_downgrade)
        return self._frame(signed, now), expires_at

    def cancel(self, *, device_id: str, command_id: str, cancels: str, rollout_id: str | None, sequence: int,
               now: float) -> tuple[bytes, float]:
        """The encoded ``Command`` of a cancel of the order ``cancels`` and the cancel's expiry."""
        expires_at = now + self.settings.command_ttl_s
        fields: dict[str, Any] = {"command_id": command_id, "action": "cancel", "device_id": device_id,
                                  "sequence": sequence, "issued_at": now, "expires_at": expires_at, "cancels": cancels}
        if rollout_id is not None:
            fields["rollout_id"] = rollout_id
        return self._frame(make_order_signed(**fields), now), expires_at


def load_key(path: Path) -> SigningKey:
    """The Ed25519 orders key from a PEM file; :class:`RolloutsDisabledError` names the file and the problem."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RolloutsDisabledError(f"orders_key_file {str(path)!r} cannot be read: {exc.strerror}") from None
    try:
        return SigningKey.from_pem(data)
    except BundleError as exc:
        raise RolloutsDisabledError(f"orders_key_file {str(path)!r}: {exc}") from None
