"""Real bundle downloads for simulated devices (stdlib ``http.client``; blocking, run on a small thread pool).

Like the agent's fetcher, the order's token goes in ``Authorization: Bearer``; credentials in the URL are refused.
``range`` mode asks for the first ``range_bytes`` bytes (``206`` expected; a ``200`` is read up to that many bytes),
``full`` mode reads the whole body and checks its length against the order's ``bundle_length``. The result is a
reason code for a ``failed`` event (``download`` or ``size``) or ``None``; network errors never escape.
"""

from __future__ import annotations

import http.client
import ssl
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

__all__ = ["DownloadResult", "fetch_bundle"]

USER_AGENT = "fleet-simulator/1"
_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class DownloadResult:
    error: str | None
    """``None`` on success, else the reason code (``download``, ``size``)."""
    status: int | None
    received: int
    detail: str = ""


def fetch_bundle(url: str, token: str, *, mode: Literal["range", "full"], range_bytes: int, expected_length: int,
                 timeout_s: float) -> DownloadResult:
    """GET ``url`` with the token; see the module docs."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        return DownloadResult("download", None, 0, f"unusable bundle URL {url[:200]!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout_s,
                                           context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    headers = {"Authorization": f"Bearer {token}", "Accept-Encoding": "identity", "User-Agent": USER_AGENT}
    if mode == "range":
        headers["Range"] = f"bytes=0-{range_bytes - 1}"
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        wanted = range_bytes if mode == "range" else None
        if resp.status not in ((200, 206) if mode == "range" else (200,)):
            resp.read(_CHUNK)
            return DownloadResult("download", resp.status, 0, f"HTTP {resp.status} {resp.reason}")
        received = 0
        while wanted is None or received < wanted:
            chunk = resp.read(_CHUNK if wanted is None else min(_CHUNK, wanted - received))
            if not chunk:
                break
            received += len(chunk)
        if mode == "full" and received != expected_length:
            return DownloadResult("size", resp.status, received,
                                  f"got {received} bytes, the order says {expected_length}")
        return DownloadResult(None, resp.status, received)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return DownloadResult("download", None, 0, f"{type(exc).__name__}: {exc}"[:300])
    finally:
        conn.close()
