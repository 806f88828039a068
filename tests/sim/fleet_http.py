"""A stateful simulator of the fleet server's bundle endpoint (``GET /v1/bundles/<digest>``), with fault knobs.

Real sockets on 127.0.0.1 (a free port), one thread per connection, ``Range`` support (206 + ``Content-Range``,
416 past the end), bearer-token check (401 missing, 403 wrong, 404 unknown bundle, 410 withdrawn). Every request
is recorded (range asked, status, body bytes sent, how it ended) so tests can count what was fetched again.

Fault knobs are plain attributes, settable at any time (also from inside an injected ``sleep``)::

    trickle_bytes_per_s  serve the body at this rate (tiny writes with sleeps in between)
    drop_after_bytes     one-shot: the next body is cut (clean close) after N bytes
    flap, flap_after_bytes
                         the next ``flap`` bodies are each cut after ``flap_after_bytes`` bytes
    fail_next_requests   the next N requests fail: ``fail_mode`` "503" (with ``Retry-After`` if
                         ``retry_after_s`` is set), "429", or "reset" (TCP RST, no response)
    extra_bytes, extra_length
                         the served file is N bytes longer than the bundle; ``extra_length`` "match" announces the
                         true (longer) length, "lie" announces the bundle's length, "none" sends no Content-Length
    endless              after the body keep streaming zeros (no Content-Length) up to ``endless_limit`` bytes
    ignore_range         answer 200 with the whole file whatever ``Range`` says
    silent               send the headers, then nothing (until the client leaves or the simulator stops)
    silent_before_headers
                         accept and read the request, then send nothing at all

``stop()`` (or leaving the ``with`` block) returns promptly even mid-trickle and joins every thread it started.
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FleetHttpSim", "RequestRecord"]

_PATH = re.compile(r"/v1/bundles/([A-Za-z0-9._-]{1,128})")
_RANGE = re.compile(r"bytes=(\d+)-(\d*)", re.ASCII)


@dataclass
class RequestRecord:
    """One request as the server saw it. ``bytes_sent`` counts body bytes handed to the kernel, live."""

    path: str
    range_header: str | None
    range_start: int | None
    token: str | None
    status: int = 0
    bytes_sent: int = 0
    #: "complete", "dropped", "reset", "client_gone", "stopped", "silent", "error" (no body) or "" (in progress)
    outcome: str = ""


@dataclass
class _Bundle:
    data: bytes
    tokens: frozenset[str]
    gone: bool = False


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins every handler thread: nothing leaks
    block_on_close = True
    allow_reuse_address = True
    sim: FleetHttpSim

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that fails the TLS handshake or vanishes is expected here, not an error worth a traceback


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 10  # a handler never blocks forever on a client that neither reads nor closes

    def setup(self) -> None:
        super().setup()
        self.server.sim._opened(self.connection)
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()  # here, in the connection's thread, not in the accept loop

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.sim._closed(self.connection)

    def do_GET(self) -> None:
        self.server.sim._serve(self)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


class FleetHttpSim:
    """``with FleetHttpSim() as sim: url = sim.add_bundle(digest, data, {"tok"})``."""

    def __init__(self, host: str = "127.0.0.1", *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.trickle_bytes_per_s: float | None = None
        self.drop_after_bytes: int | None = None
        self.flap = 0
        self.flap_after_bytes = 64 * 1024
        self.fail_next_requests = 0
        self.fail_mode = "503"
        self.retry_after_s: int | None = None
        self.extra_bytes = 0
        self.extra_length = "match"
        self.endless = False
        self.endless_limit = 1 << 30
        self.ignore_range = False
        self.silent = False
        self.silent_before_headers = False
        self.write_size = 64 * 1024
        self.records: list[RequestRecord] = []

        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active: set[socket.socket] = set()
        self._bundles: dict[str, _Bundle] = {}
        self._stopping = threading.Event()
        self._server = _Server((host, 0), _Handler)
        self._server.sim = self
        self._tls = ssl_context is not None
        if ssl_context is not None:
            self._server.socket = ssl_context.wrap_socket(self._server.socket, server_side=True,
                                                          do_handshake_on_connect=False)
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> FleetHttpSim:
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                            name=f"fleet-http-sim:{self.port}")
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut in-flight responses (also mid-trickle or silent), join every thread."""
        self._stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        with self._lock:
            for conn in list(self._active):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)  # unblocks a handler waiting in recv() or sendall()
        self._server.server_close()  # joins the handler threads (block_on_close)

    def __enter__(self) -> FleetHttpSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"{'https' if self._tls else 'http'}://{self.host}:{self.port}"

    # -- bundles ------------------------------------------------------------------------------------------------

    def add_bundle(self, digest: str, data: bytes, tokens: set[str]) -> str:
        """Serve ``data`` at ``/v1/bundles/<digest>`` to holders of ``tokens``; re-adding replaces it. → URL"""
        if _PATH.fullmatch(f"/v1/bundles/{digest}") is None:
            raise ValueError(f"bad digest {digest!r}")
        with self._lock:
            self._bundles[digest] = _Bundle(bytes(data), frozenset(tokens))
        return self.url(digest)

    def url(self, digest: str) -> str:
        return f"{self.base_url}/v1/bundles/{digest}"

    def withdraw(self, digest: str) -> None:
        """The bundle is gone for good: 410."""
        with self._lock:
            self._bundles[digest].gone = True

    # -- observations -------------------------------------------------------------------------------------------

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until no connection is being served (so every record is final)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._active:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self._active)} connections still open")
                self._idle.wait(left)

    def total_body_bytes_sent(self) -> int:
        with self._lock:
            return sum(r.bytes_sent for r in self.records)

    def clear_records(self) -> None:
        with self._lock:
            self.records.clear()

    # -- handler side -------------------------------------------------------------------------------------------

    def _opened(self, conn: socket.socket) -> None:
        with self._lock:
            self._active.add(conn)
        if self._stopping.is_set():
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _closed(self, conn: socket.socket) -> None:
        with self._idle:
            self._active.discard(conn)
            self._idle.notify_all()

    def _take_failure(self) -> bool:
        with self._lock:
            if self.fail_next_requests > 0:
                self.fail_next_requests -= 1
                return True
            return False

    def _take_cut(self) -> int | None:
        with self._lock:
            if self.drop_after_bytes is not None:
                cut, self.drop_after_bytes = self.drop_after_bytes, None
                return cut
            if self.flap > 0:
                self.flap -= 1
                return self.flap_after_bytes
            return None

    def _serve(self, h: _Handler) -> None:
        h.close_connection = True
        auth = h.headers.get("Authorization")
        token = auth[7:].strip() if auth is not None and auth.startswith("Bearer ") else None
        range_header = h.headers.get("Range")
        m_range = _RANGE.fullmatch(range_header.strip()) if range_header else None
        rec = RequestRecord(h.path, range_header, int(m_range.group(1)) if m_range else None, token)
        with self._lock:
            self.records.append(rec)
        try:
            self._respond(h, rec, token, m_range)
        except OSError:  # the client left (reset, broken pipe) or stop() cut the connection
            rec.outcome = rec.outcome or "client_gone"

    def _simple(self, h: _Handler, rec: RequestRecord, status: int, headers: dict[str, str] | None = None) -> None:
        rec.status, rec.outcome = status, "error"
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", "0")
        h.send_header("Connection", "close")
        h.end_headers()

    def _respond(self, h: _Handler, rec: RequestRecord, token: str | None, m_range: re.Match[str] | None) -> None:
        if self._take_failure():
            if self.fail_mode == "reset":
                rec.outcome = "reset"
                h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                h.connection.close()
                return
            status = 429 if self.fail_mode == "429" else 503
            self._simple(h, rec, status, {"Retry-After": str(self.retry_after_s)} if self.retry_after_s else None)
            return
        if self.silent_before_headers:
            rec.outcome = "silent"
            self._hold(h)
            return
        m = _PATH.fullmatch(h.path)
        with self._lock:
            bundle = self._bundles.get(m.group(1)) if m else None
        if bundle is None:
            self._simple(h, rec, 404)
            return
        if not token:
            self._simple(h, rec, 401, {"WWW-Authenticate": 'Bearer realm="bundles"'})
            return
        if token not in bundle.tokens:
            self._simple(h, rec, 403)
            return
        if bundle.gone:
            self._simple(h, rec, 410)
            return

        served = bundle.data + b"\x00" * self.extra_bytes if self.extra_bytes else bundle.data  # as served
        announced_total = len(bundle.data) if self.extra_length == "lie" else len(served)
        start, end = 0, len(served) - 1
        status = 200
        if m_range is not None and not self.ignore_range:
            start = int(m_range.group(1))
            if start >= announced_total:
                self._simple(h, rec, 416, {"Content-Range": f"bytes */{announced_total}"})
                return
            if m_range.group(2):
                end = min(end, int(m_range.group(2)))
            status = 206
        body = memoryview(served)[start:end + 1]
        rec.status = status
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Accept-Ranges", "bytes")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{announced_total}")
        if not self.endless and self.extra_length != "none":
            length = len(body) - self.extra_bytes if self.extra_length == "lie" else len(body)
            h.send_header("Content-Length", str(length))
        h.send_header("Connection", "close")
        h.end_headers()
        if self.silent:
            rec.outcome = "silent"
            self._hold(h)
            return
        rec.outcome = self._stream(h, rec, self._pieces(body), self._take_cut())

    def _pieces(self, body: memoryview) -> Iterator[memoryview]:
        size = self.write_size
        rate = self.trickle_bytes_per_s
        if rate:
            size = max(1, min(size, int(rate * 0.02)))
        for i in range(0, len(body), size):
            yield body[i:i + size]
        if self.endless:
            zeros = memoryview(bytes(size))
            left = self.endless_limit
            while left > 0:
                yield zeros[:left]
                left -= size

    def _stream(self, h: _Handler, rec: RequestRecord, pieces: Iterator[memoryview], cut: int | None) -> str:
        for piece in pieces:
            if self._stopping.is_set():
                return "stopped"
            if cut is not None and rec.bytes_sent + len(piece) >= cut:
                last = piece[:cut - rec.bytes_sent]
                h.wfile.write(last)
                rec.bytes_sent += len(last)
                return "dropped"  # clean close: the client gets every byte sent, then EOF
            h.wfile.write(piece)
            rec.bytes_sent += len(piece)
            rate = self.trickle_bytes_per_s
            if rate and self._stopping.wait(len(piece) / rate):
                return "stopped"
        return "complete"

    def _hold(self, h: _Handler) -> None:
        """Say nothing until the client hangs up or the simulator stops."""
        conn = h.connection
        while not self._stopping.is_set():
            readable, _, _ = select.select([conn], [], [], 0.05)
            if readable and not conn.recv(1):
                return


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.sim.fleet_http --file F --digest D --token T``: serve one bundle in its own process (so a
    benchmark's client does not share a GIL with the server); prints the URL, serves until stdin closes."""
    import argparse
    import sys
    from pathlib import Path

    ap = argparse.ArgumentParser(description="fleet-server bundle endpoint simulator")
    ap.add_argument("--file", type=Path, required=True)
    ap.add_argument("--digest", required=True)
    ap.add_argument("--token", required=True)
    args = ap.parse_args(argv)
    with FleetHttpSim() as sim:
        print(sim.add_bundle(args.digest, args.file.read_bytes(), {args.token}), flush=True)
        sys.stdin.read()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
