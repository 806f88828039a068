"""Bundle download tokens: what a deployment order carries so that one device may download one bundle.

A token is ``{device_id}.{expires_at}.{mac}`` where ``mac`` is HMAC-SHA256 (key: ``download_token_secret``)
over the device id, the bundle digest and the expiry. Stateless (no table to grow with the fleet, any replica
with the same secret checks it), bound to one bundle and one device, and expiring. The token is the credential
(the agent sends it as a bearer token), so it never appears in logs.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

__all__ = ["InvalidDownloadTokenError", "TokenClaims", "issue_download_token", "verify_download_token"]

_TOKEN_RE = re.compile(r"([a-z0-9][a-z0-9._-]{0,63})\.([0-9]{1,12})\.([0-9a-f]{64})")


class InvalidDownloadTokenError(ValueError):
    """The token is malformed, forged, for another bundle, or expired (the message says which)."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    device_id: str
    expires_at: int


def _mac(secret: str, device_id: str, digest: str, expires_at: int) -> str:
    msg = f"fleet-download-v1\n{device_id}\n{digest}\n{expires_at}".encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def issue_download_token(secret: str, *, device_id: str, digest: str, expires_at: float) -> str:
    """A token letting ``device_id`` download the bundle ``digest`` until ``expires_at`` (unix seconds)."""
    exp = int(expires_at)
    return f"{device_id}.{exp}.{_mac(secret, device_id, digest, exp)}"


def verify_download_token(secret: str, token: str, *, digest: str, now: float) -> TokenClaims:
    """The claims of ``token`` if it is valid for bundle ``digest`` at ``now``; raises
    :class:`InvalidDownloadTokenError` otherwise."""
    m = _TOKEN_RE.fullmatch(token)
    if m is None:
        raise InvalidDownloadTokenError("malformed download token")
    device_id, exp_text, mac = m.groups()
    exp = int(exp_text)
    if not hmac.compare_digest(mac, _mac(secret, device_id, digest, exp)):
        raise InvalidDownloadTokenError("download token not valid for this bundle")
    if now >= exp:
        raise InvalidDownloadTokenError("download token expired")
    return TokenClaims(device_id, exp)
