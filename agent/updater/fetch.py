"""The bundle downloader: the only module of the agent that speaks HTTP.

``HttpFetcher.fetch`` brings one bundle file to ``dest`` (a partial-download file in the state directory's
``downloads/``), resuming with ``Range`` from whatever is already there, so a retry, and an agent restart, fetch
again only what is missing. Nothing received here is trusted: the caller verifies the finished file
(``docs/bundle-format.md``). What this module guarantees is bounded behaviour against a hostile or broken server
(``THREATS.md``, "Slow retrieval" and "Endless data"):

- never more than ``expected_length`` bytes on disk, and at most one chunk read past it before giving up;
- a silent server is caught by the socket read timeout, a trickling one by the progress window
  (fewer than ``min_bytes_per_window`` bytes in ``stall_window_s``);
- every failure is a :class:`FetchTransientError` (retry later, the partial file is kept for resume) or a
  :class:`FetchPermanentError` (retrying cannot help). Foreign exceptions (``OSError``, ``http.client``,
  ``ssl``) become one of these in exactly one place, :meth:`HttpFetcher._guarded`.

Standard library only (``http.client``, ``ssl``, ``urllib.parse``). Decisions: ``docs/adr/0007-…``.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import logging
import os
import random
import re
import shutil
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import urlsplit

from agent.fsutil import fsync_dir

__all__ = ["FetchConfig", "FetchError", "FetchPermanentError", "FetchTransientError", "HttpFetcher"]

log = logging.getLogger("edge_agent.updater.fetch")

KIB = 1024
MIB = 1024 * KIB

#: Statuses after which retrying cannot help (the order's URL or token is wrong, or the bundle is gone).
PERMANENT_STATUSES = frozenset({401, 403, 404, 410})
#: Statuses that mean "try again later" besides every 5xx.
TRANSIENT_STATUSES = frozenset({408, 429})
USER_AGENT = "edge-agent-fetch/1"
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)", re.ASCII)
_T = TypeVar("_T")


class FetchError(Exception):
    """A download failed; ``reason`` is a short machine-readable word (``stalled``, ``too_long``, ``http_404``…)."""

    def __init__(self, reason: str, message: str = "", *, status: int | None = None) -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message
        self.status = status


class FetchTransientError(FetchError):
    """Retry later (refused, reset, timeout, stall, 5xx/429, short body). The partial file is kept for resume."""

    def __init__(self, reason: str, message: str = "", *, status: int | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(reason, message, status=status)
        self.retry_after_s = retry_after_s


class FetchPermanentError(FetchError):
    """Retrying cannot help (401/403/404/410, longer than declared, no space, bad URL)."""


@dataclass(frozen=True, slots=True)
class FetchConfig:
    connect_timeout_s: float = 10.0
    #: Socket read timeout: catches a server that goes silent (headers or body).
    read_timeout_s: float = 30.0
    #: A transfer that moves fewer than ``min_bytes_per_window`` bytes in this many seconds is stalled.
    stall_window_s: float = 30.0
    min_bytes_per_window: int = 1024
    chunk_size: int = 256 * KIB  # measured: 64 KiB writes reached 0.68-0.83x urllib on disk, 256 KiB 1.07-1.23x
    max_attempts: int = 8
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    #: Free space that must remain on the download filesystem after the whole bundle is written.
    free_space_margin_bytes: int = 16 * MIB
    #: CA bundle for https (None: the system's default trust store).
    ca_file: str | None = None

    def __post_init__(self) -> None:
        for name in ("connect_timeout_s", "read_timeout_s", "stall_window_s", "chunk_size", "max_attempts"):
            if not getattr(self, name) > 0:
                raise ValueError(f"FetchConfig.{name} must be > 0")
        for name in ("min_bytes_per_window", "backoff_initial_s", "backoff_max_s", "free_space_margin_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"FetchConfig.{name} must be >= 0")


@dataclass(frozen=True, slots=True)
class _Target:
    scheme: str
    host: str
    port: int | None
    path: str  # path and query, as sent on the request line


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _fsync_path(path: Path) -> None:
    """fsync ``path`` (the file's data and size) and its directory (the file's name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def _parse_url(url: str) -> _Target:
    parts = urlsplit(url)  # ValueError on malformed input: translated to bad_url by the caller's guard
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchPermanentError("bad_scheme", f"only http and https are fetched, not {scheme or 'no scheme'!r}")
    host = parts.hostname
    if not host:
        raise FetchPermanentError("bad_url", "no host in URL")
    if parts.username is not None or parts.password is not None:
        raise FetchPermanentError("bad_url", "credentials in the URL are not accepted (the token is the credential)")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return _Target(scheme, host, parts.port, path)


def _retry_after(resp: http.client.HTTPResponse) -> float | None:
    value = (resp.getheader("Retry-After") or "").strip()
    return float(value) if value.isdigit() else None


def _content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """``bytes a-b/total`` (or ``bytes */total``) → (a, b, total); a ``*`` part is None."""
    m = _CONTENT_RANGE.fullmatch((value or "").strip())
    if m is None:
        raise FetchTransientError("bad_content_range", f"unparsable Content-Range {value!r}")
    first, last, total = m.groups()
    return (int(first) if first is not None else None, int(last) if last is not None else None,
            None if total == "*" else int(total))


def _translate(exc: BaseException, value_error_reason: str) -> FetchError:
    """The one mapping from foreign exceptions to fetch errors (called only by :meth:`HttpFetcher._guarded`)."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        # Transient on purpose: a device that booted with its clock at 1970 fails here until NTP has run, and an
        # expired server certificate gets fixed server-side. The order's own expiry bounds the retrying.
        return FetchTransientError("tls_verify", text)
    if isinstance(exc, ssl.SSLError):
        return FetchTransientError("tls", text)
    if isinstance(exc, http.client.IncompleteRead):
        return FetchTransientError("short_body", text)
    if isinstance(exc, TimeoutError):
        return FetchTransientError("timeout", text)
    if isinstance(exc, ConnectionRefusedError):
        return FetchTransientError("refused", text)
    if isinstance(exc, ConnectionError):  # reset, aborted, broken pipe, http.client.RemoteDisconnected
        return FetchTransientError("reset", text)
    if isinstance(exc, socket.gaierror):
        return FetchTransientError("dns", text)
    if isinstance(exc, http.client.InvalidURL):
        return FetchPermanentError("bad_url", text)
    if isinstance(exc, http.client.HTTPException):  # bad status line, header too long, ...
        return FetchTransientError("protocol", text)
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return FetchPermanentError("no_space", text)
        if exc.errno == errno.EIO:  # the storage failed this write or fsync: retry later, resume from what stuck
            return FetchTransientError("io_error", text)
        if exc.filename is not None:  # the local file or directory (missing, not writable), not the network
            return FetchPermanentError("local_io", text)
        return FetchTransientError("network", text)
    if isinstance(exc, ValueError):  # malformed URL (bad port, bad IPv6 literal), CR/LF in the token
        return FetchPermanentError(value_error_reason, text)
    return FetchTransientError("network", text)


class HttpFetcher:
    """Resumable, bounded bundle downloads. One instance may serve many downloads (one at a time).

    ``clock``, ``sleep``, ``disk_free`` and ``jitter`` (uniform in [0, 1)) are injected so tests can drive them.
    Counters, cumulative over the instance's life: ``bytes_downloaded`` (body bytes received over the wire,
    every attempt included) and ``attempts`` (HTTP requests made). ``last_errors`` holds the transient errors
    the most recent :meth:`fetch` retried after.
    """

    def __init__(self, config: FetchConfig, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, disk_free: Callable[[Path], int] = _disk_free,
                 jitter: Callable[[], float] = random.random) -> None:
        self.config = config
        self._clock = clock
        self._sleep = sleep
        self._disk_free = disk_free
        self._jitter = jitter
        self._tls: ssl.SSLContext | None = None
        self.bytes_downloaded = 0
        self.attempts = 0
        self.last_errors: list[FetchTransientError] = []

    # -- public -------------------------------------------------------------------------------------------------

    def fetch(self, url: str, token: str, dest: Path, expected_length: int, *,
              on_progress: Callable[[int, int], None] | None = None) -> Path:
        """Download ``url`` into ``dest`` until it holds exactly ``expected_length`` bytes; return ``dest``.

        Resumes from ``dest``'s current size. Transient failures are retried (capped, jittered exponential
        backoff), each retry resuming with ``Range``; after ``max_attempts`` the last transient error is raised and
        the partial file stays for a later resume. A permanent failure is raised at once; only ``too_long`` removes
        the partial file itself, after any other the caller decides whether to keep it (same order retried later)
        or delete it (order abandoned). ``on_progress(have, expected_length)`` is called after every write.
        """
        if expected_length < 0:
            raise FetchPermanentError("bad_length", f"expected_length {expected_length} < 0")
        target = self._guarded(lambda: _parse_url(url), value_error_reason="bad_url")
        self.last_errors = []
        step = 0  # backoff exponent: attempts since the partial file last grew
        for attempt in range(1, self.config.max_attempts + 1):
            before = _file_size(dest)
            try:
                self._guarded(lambda: self._attempt(target, token, dest, expected_length, on_progress))
            except FetchTransientError as exc:
                self.last_errors.append(exc)
                if _file_size(dest) > before:
                    step = 0  # progress was made: a flapping link is not a dead one
                if attempt == self.config.max_attempts:
                    log.warning("download failed after %d attempts: %s", attempt, exc,
                                extra={"host": target.host, "reason": exc.reason, "have": _file_size(dest)})
                    raise
                delay = self._backoff(step, exc.retry_after_s)
                step += 1
                log.info("download interrupted (%s), retrying in %.2fs", exc, delay,
                         extra={"host": target.host, "reason": exc.reason, "attempt": attempt,
                                "have": _file_size(dest), "expected": expected_length})
                self._sleep(delay)
            else:
                return dest
        raise AssertionError("unreachable")  # pragma: no cover

    # -- internals ----------------------------------------------------------------------------------------------

    def _guarded(self, fn: Callable[[], _T], *, value_error_reason: str = "bad_request") -> _T:
        """The choke point: foreign exceptions raised by ``fn`` leave as :class:`FetchError` subclasses."""
        try:
            return fn()
        except FetchError:
            raise
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise _translate(exc, value_error_reason) from exc

    def _backoff(self, step: int, retry_after_s: float | None) -> float:
        cfg = self.config
        base = min(cfg.backoff_max_s, cfg.backoff_initial_s * (2.0 ** min(step, 62)))
        delay = base / 2 + base / 2 * self._jitter()  # "equal jitter": never less than half the step
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, cfg.backoff_max_s))
        return delay

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context(cafile=self.config.ca_file)
        return self._tls

    def _attempt(self, target: _Target, token: str, dest: Path, expected: int,
                 on_progress: Callable[[int, int], None] | None) -> None:
        cfg = self.config
        have = _file_size(dest)
        if have > expected:
            log.info("partial download longer than expected, starting over", extra={"have": have})
            dest.unlink()
            have = 0
        if have == expected:
            if not dest.exists():
                dest.touch()  # a zero-length bundle
            _fsync_path(dest)
            if on_progress is not None:
                on_progress(have, expected)
            return
        free = self._disk_free(dest.parent)
        if free < expected - have + cfg.free_space_margin_bytes:
            raise FetchPermanentError("no_space", f"{free} bytes free, need {expected - have} "
                                                  f"+ {cfg.free_space_margin_bytes} margin")
        self.attempts += 1
        conn: http.client.HTTPConnection
        if target.scheme == "https":
            conn = http.client.HTTPSConnection(target.host, target.port, timeout=cfg.connect_timeout_s,
                                               context=self._tls_context())
        else:
            conn = http.client.HTTPConnection(target.host, target.port, timeout=cfg.connect_timeout_s)
        try:
            conn.connect()
            sock: socket.socket = conn.sock  # kept: getresponse() detaches it from a will-close connection
            sock.settimeout(cfg.read_timeout_s)
            headers = {"Authorization": f"Bearer {token}", "Accept-Encoding": "identity", "User-Agent": USER_AGENT,
                       "Connection": "close"}
            if have:
                headers["Range"] = f"bytes={have}-"
            conn.request("GET", target.path, headers=headers)
            resp = conn.getresponse()
            try:
                offset = self._check_response(resp, dest, have, expected)
                if offset is None:
                    _fsync_path(dest)
                else:
                    self._receive(resp, sock, dest, offset, expected, on_progress=on_progress)
                    fsync_dir(dest.parent)  # the file itself was fsynced before it was closed
            finally:
                resp.close()
        finally:
            conn.close()

    def _check_response(self, resp: http.client.HTTPResponse, dest: Path, have: int, expected: int) -> int | None:
        """Decide from status and headers where the body goes: the offset to write at, or None when done."""
        status = resp.status
        if status == 206:
            first, last, total = _content_range(resp.getheader("Content-Range"))
            if first is None or last is None or first != have or last < first:
                raise FetchTransientError("range_mismatch", f"asked for bytes={have}-, got "
                                                            f"{resp.getheader('Content-Range')!r}", status=status)
            length = resp.length
            if last >= expected or (total is not None and total > expected) or (
                    length is not None and first + length > expected):
                self._too_long(dest, f"server announces {resp.getheader('Content-Range')!r}, "
                                     f"Content-Length {length}; declared length is {expected}")
            return have
        if status == 200:
            if resp.length is not None and resp.length > expected:
                self._too_long(dest, f"Content-Length {resp.length} > declared length {expected}")
            return 0  # the server ignored Range: the body starts at byte 0
        if status == 416:
            if have >= expected:
                return None
            _, _, total = _content_range(resp.getheader("Content-Range") or "bytes */*")
            if total is not None and total < have:
                dest.unlink()  # the partial file cannot be a prefix of what the server has
            raise FetchTransientError("range_not_satisfiable", f"server has {total} bytes, we have {have}",
                                      status=status)
        if status in PERMANENT_STATUSES:
            raise FetchPermanentError(f"http_{status}", resp.reason, status=status)
        if status >= 500 or status in TRANSIENT_STATUSES:
            raise FetchTransientError(f"http_{status}", resp.reason, status=status, retry_after_s=_retry_after(resp))
        # Redirects are not followed (the order's URL is signed), other 4xx are the request's fault.
        raise FetchPermanentError(f"http_{status}", resp.reason, status=status)

    def _too_long(self, dest: Path, message: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        raise FetchPermanentError("too_long", message)

    def _receive(self, resp: http.client.HTTPResponse, sock: socket.socket, dest: Path, offset: int, expected: int,
                 *, on_progress: Callable[[int, int], None] | None) -> None:
        """Stream the body into ``dest`` from ``offset``; never past ``expected``; watch for stalls."""
        cfg = self.config
        clock = self._clock
        pos = offset
        out: BinaryIO | None = None
        window_start, window_bytes = clock(), 0
        try:
            while True:
                # One byte past the cap is enough to prove "too long" (http.client already stops at Content-Length).
                want = min(cfg.chunk_size, expected - pos + 1)
                budget = window_start + cfg.stall_window_s - clock()
                by_window = budget < cfg.read_timeout_s
                sock.settimeout(max(budget, 0.001) if by_window else cfg.read_timeout_s)
                try:
                    data = resp.read1(want)
                except TimeoutError:
                    if by_window:
                        raise FetchTransientError("stalled", f"fewer than {cfg.min_bytes_per_window} bytes in "
                                                             f"{cfg.stall_window_s}s") from None
                    raise
                if not data:
                    break
                n = len(data)
                self.bytes_downloaded += n
                if pos + n > expected:
                    if out is not None:
                        out.close()
                        out = None
                    self._too_long(dest, f"more than the declared {expected} bytes arrived")
                if out is None:
                    # 206: append to the partial file; 200: start over (truncate only now, once bytes arrive).
                    out = dest.open("ab" if offset else "wb")
                out.write(data)
                pos += n
                window_bytes += n
                if on_progress is not None:
                    on_progress(pos, expected)
                now = clock()
                if window_bytes >= cfg.min_bytes_per_window:
                    window_start, window_bytes = now, 0
                elif now - window_start >= cfg.stall_window_s:
                    raise FetchTransientError("stalled", f"{window_bytes} bytes in {now - window_start:.2f}s")
            if out is not None:  # end of body: complete, or short and kept for resume; durable either way
                out.flush()
                os.fsync(out.fileno())
        finally:
            if out is not None:
                out.close()
        if pos < expected:
            raise FetchTransientError("short_body", f"connection closed at byte {pos} of {expected}")
