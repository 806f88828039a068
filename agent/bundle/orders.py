"""Deployment orders: the fleet server's signed instruction to one device, and the checks a device applies.

An order is accepted only if a threshold of the trust root's ``orders`` keys signed it, it names this device, its
``sequence`` is newer than the last one the device accepted (replay protection; the caller persists it) and it has
not expired at the trusted time. Once the bundle is verified, :func:`check_order_matches` ties the two together:
same model, version, bundle identity and downloaded length.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from agent.bundle.canonical import canonical_json, strict_loads
from agent.bundle.container import VerifiedBundle
from agent.bundle.errors import (
    ExpiredError,
    FormatError,
    OrderMismatchError,
    ReplayedOrderError,
    WrongDeviceError,
)
from agent.bundle.keys import ORDER_PREFIX, parse_signature_list
from agent.bundle.trust import TrustRoot
from agent.model import InvalidModelRefError, validate_model_name, validate_version

__all__ = [
    "MAX_ORDER_BYTES",
    "ORDER_FORMAT",
    "ORDER_TYPE",
    "DeploymentOrder",
    "check_order_matches",
    "make_order_signed",
    "verify_order",
]

ORDER_TYPE: Final = "deployment-order"
ORDER_FORMAT: Final = 1
MAX_ORDER_BYTES: Final = 64 * 1024
"""Largest accepted order document."""
_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_DEVICE_RE: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_MAX_INT: Final = 2**63 - 1
_MAX_TEXT: Final = 4096
_COMMON: Final = frozenset({"type", "format", "command_id", "action", "device_id", "sequence", "issued_at",
                            "expires_at"})
_DEPLOY: Final = _COMMON | {"rollout_id", "model", "version", "bundle_digest", "bundle_length", "url", "token",
                            "token_expires_at", "allow_downgrade"}
_CANCEL_REQUIRED: Final = _COMMON | {"cancels"}
_CANCEL_ALLOWED: Final = _CANCEL_REQUIRED | {"rollout_id"}


@dataclass(frozen=True, slots=True)
class DeploymentOrder:
    """A verified order. Bundle fields (``model`` ... ``token_expires_at``) are set for ``deploy`` and ``None`` for
    ``cancel``; ``cancels`` is the ``command_id`` a cancel stops (``None`` for deploy)."""

    command_id: str
    action: Literal["deploy", "cancel"]
    device_id: str
    sequence: int
    issued_at: float
    expires_at: float
    rollout_id: str | None = None
    model: str | None = None
    version: int | None = None
    bundle_digest: str | None = None
    bundle_length: int | None = None
    url: str | None = None
    token: str | None = None
    token_expires_at: float | None = None
    allow_downgrade: bool = False
    cancels: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ``signed`` object of this order (what :func:`make_order_signed` builds)."""
        d: dict[str, Any] = {"type": ORDER_TYPE, "format": ORDER_FORMAT, "command_id": self.command_id,
                             "action": self.action, "device_id": self.device_id, "sequence": self.sequence,
                             "issued_at": self.issued_at, "expires_at": self.expires_at}
        if self.rollout_id is not None:
            d["rollout_id"] = self.rollout_id
        if self.action == "deploy":
            d.update(model=self.model, version=self.version, bundle_digest=self.bundle_digest,
                     bundle_length=self.bundle_length, url=self.url, token=self.token,
                     token_expires_at=self.token_expires_at, allow_downgrade=self.allow_downgrade)
        else:
            d["cancels"] = self.cancels
        return d


def _time(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise FormatError(f"{where} must be a non-negative number of Unix seconds, got {str(value)[:40]!r}")
    return value


def _ident(value: object, where: str, pattern: re.Pattern[str] = _ID_RE) -> str:
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise FormatError(f"{where} = {str(value)[:80]!r} is not a valid identifier ({pattern.pattern})")
    return value


def _text(value: object, where: str) -> str:
    if not isinstance(value, str) or not value or len(value) > _MAX_TEXT:
        raise FormatError(f"{where} must be a non-empty string of at most {_MAX_TEXT} characters")
    return value


def _int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_INT:
        raise FormatError(f"{where} must be an integer from 0 to 2**63-1, got {str(value)[:40]!r}")
    return value


def _parse_signed(signed: object) -> DeploymentOrder:
    """Validate an order's ``signed`` object into a :class:`DeploymentOrder` (:class:`FormatError` names the field)."""
    if not isinstance(signed, Mapping):
        raise FormatError(f"order.signed must be an object, got {type(signed).__name__}")
    action = signed.get("action")
    if action not in ("deploy", "cancel"):
        raise FormatError(f"order.action = {str(action)[:40]!r}; allowed: deploy, cancel")
    keys = set(signed)
    required, allowed = (_DEPLOY, _DEPLOY) if action == "deploy" else (_CANCEL_REQUIRED, _CANCEL_ALLOWED)
    extra, missing = sorted(keys - allowed), sorted(required - keys)
    if extra:
        raise FormatError(f"order: unknown key(s) for a {action} order: {', '.join(k[:40] for k in extra)}")
    if missing:
        raise FormatError(f"order: missing key(s) for a {action} order: {', '.join(missing)}")
    if signed["type"] != ORDER_TYPE:
        raise FormatError(f"order.type must be {ORDER_TYPE!r}")
    if isinstance(signed["format"], bool) or signed["format"] != ORDER_FORMAT:
        raise FormatError(f"order.format = {str(signed['format'])[:20]!r}; this agent reads format {ORDER_FORMAT}")
    issued_at = _time(signed["issued_at"], "order.issued_at")
    expires_at = _time(signed["expires_at"], "order.expires_at")
    if not expires_at > issued_at:
        raise FormatError("order.expires_at must be later than order.issued_at")
    rollout = signed.get("rollout_id")
    common: dict[str, Any] = {
        "command_id": _ident(signed["command_id"], "order.command_id"),
        "action": action,
        "device_id": _ident(signed["device_id"], "order.device_id", _DEVICE_RE),
        "sequence": _int(signed["sequence"], "order.sequence"),
        "issued_at": issued_at,
        "expires_at": expires_at,
        "rollout_id": None if rollout is None and action == "cancel" else _ident(rollout, "order.rollout_id"),
    }
    if action == "cancel":
        return DeploymentOrder(**common, cancels=_ident(signed["cancels"], "order.cancels"))
    try:
        model = validate_model_name(signed["model"])
        version = validate_version(signed["version"])
    except InvalidModelRefError as exc:
        raise FormatError(f"order: {exc}") from None
    digest = signed["bundle_digest"]
    if not isinstance(digest, str) or _HEX64.fullmatch(digest) is None:
        raise FormatError("order.bundle_digest must be 64 lower-case hex characters (sha256 of the manifest)")
    allow = signed["allow_downgrade"]
    if not isinstance(allow, bool):
        raise FormatError("order.allow_downgrade must be true or false")
    return DeploymentOrder(
        **common, model=model, version=version, bundle_digest=digest,
        bundle_length=_int(signed["bundle_length"], "order.bundle_length"), url=_text(signed["url"], "order.url"),
        token=_text(signed["token"], "order.token"),
        token_expires_at=_time(signed["token_expires_at"], "order.token_expires_at"), allow_downgrade=allow,
    )


def make_order_signed(**fields: Any) -> dict[str, Any]:
    """The ``signed`` object of an order: ``type`` and ``format`` are filled in, ``allow_downgrade`` defaults to
    false for a deploy, and the result is validated (:class:`FormatError`). Sign it with
    ``sign_document(signed, ORDER_PREFIX, order_keys)``."""
    signed: dict[str, Any] = {"type": ORDER_TYPE, "format": ORDER_FORMAT, **fields}
    if signed.get("action") == "deploy":
        signed.setdefault("allow_downgrade", False)
    plain: dict[str, Any] = strict_loads(canonical_json(signed))
    _parse_signed(plain)
    return plain


def verify_order(data: bytes | Mapping[str, Any], root: TrustRoot, *, device_id: str, last_sequence: int | None,
                 now: float) -> DeploymentOrder:
    """Verify an order document ``{"signed": ..., "signatures": [...]}`` (canonical bytes, or the decoded object a
    command carries) and return it, or raise.

    Checks, in order: shape; root not expired at ``now``; a threshold of ``orders`` signatures over
    ``ORDER_PREFIX + canonical_json(signed)`` (:class:`SignatureError`); the fields; ``device_id``
    (:class:`WrongDeviceError`); ``sequence > last_sequence`` (:class:`ReplayedOrderError`); ``expires_at > now``
    (:class:`ExpiredError`). ``now`` is the trusted time before this order; the caller persists the new sequence
    and advances trusted time with ``issued_at`` after accepting it.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        if len(data) > MAX_ORDER_BYTES:
            raise FormatError(f"order is {len(data)} bytes; at most {MAX_ORDER_BYTES} are accepted")
        doc: Any = strict_loads(data)
    else:
        doc = data
    if not isinstance(doc, Mapping) or set(doc) != {"signed", "signatures"}:
        raise FormatError("an order document must be an object with exactly the keys signed, signatures")
    signed = doc["signed"]
    if not isinstance(signed, Mapping):
        raise FormatError("order.signed must be an object")
    signatures = parse_signature_list(doc["signatures"], "order.signatures")
    signed_bytes = canonical_json(signed)
    if len(signed_bytes) > MAX_ORDER_BYTES:
        raise FormatError(f"order is {len(signed_bytes)} bytes; at most {MAX_ORDER_BYTES} are accepted")
    root.check_not_expired(now)
    root.verify_role("orders", ORDER_PREFIX, signed_bytes, signatures)
    order = _parse_signed(strict_loads(signed_bytes))
    if order.device_id != device_id:
        raise WrongDeviceError(f"order {order.command_id} is for device {order.device_id!r}, not {device_id!r}")
    if last_sequence is not None and not order.sequence > last_sequence:
        raise ReplayedOrderError(f"order {order.command_id} has sequence {order.sequence}, not newer than "
                                 f"{last_sequence} (the last accepted): a replayed or reordered order")
    if not order.expires_at > now:
        raise ExpiredError(f"order {order.command_id} expired at {order.expires_at:.0f}, trusted time is {now:.0f}")
    return order


def check_order_matches(order: DeploymentOrder, bundle: VerifiedBundle, *, downloaded_length: int) -> None:
    """Raise :class:`OrderMismatchError` unless the verified bundle is the one the order names: same model,
    version and identity (``bundle_digest``), and the downloaded file is exactly ``bundle_length`` bytes, all of
    them archive (no trailing data)."""
    if order.action != "deploy":
        raise OrderMismatchError(f"order {order.command_id} is a {order.action} order; it names no bundle")
    m = bundle.manifest
    for what, ordered, got in (("model", order.model, m.model), ("version", order.version, m.version),
                               ("bundle digest", order.bundle_digest, bundle.digest),
                               ("length", order.bundle_length, downloaded_length)):
        if ordered != got:
            raise OrderMismatchError(f"order {order.command_id} names {what} {ordered!r} but the downloaded bundle "
                                     f"has {got!r}: refusing a bundle the order did not ask for")
    if bundle.length != downloaded_length:
        raise OrderMismatchError(f"the downloaded file is {downloaded_length} bytes but the bundle archive ends after "
                                 f"{bundle.length}: trailing data is not allowed")
