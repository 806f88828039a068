"""The small subset of HTTP/1.1 the local API speaks, shared by its server and its Python client.

Requests and responses carry ``Content-Length`` bodies (no chunked encoding), persistent connections by default,
and JSON bodies. Heads are capped (8 KiB, 64 header lines) so a malformed or hostile client cannot make the
agent allocate without bound. See ``docs/local-api.md`` for the protocol as other languages see it.
"""

from __future__ import annotations

import socket
import struct

__all__ = [
    "MAX_HEADERS", "MAX_HEAD_BYTES", "Head", "ProtocolViolation", "SocketReader", "message", "reason_phrase",
    "set_io_timeout",
]

MAX_HEAD_BYTES = 8192
MAX_HEADERS = 64

_REASONS = {
    200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 411: "Length Required", 413: "Content Too Large", 415: "Unsupported Media Type",
    422: "Unprocessable Content", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}


def reason_phrase(status: int) -> str:
    return _REASONS.get(status, "Unknown")


class ProtocolViolation(Exception):
    """The peer sent something that is not the HTTP this API speaks; ``status`` is the answer to give."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Head:
    """A parsed request or status line plus lower-cased headers."""

    __slots__ = ("headers", "start")

    def __init__(self, start: list[str], headers: dict[str, str]) -> None:
        self.start = start
        self.headers = headers

    def content_length(self, limit: int) -> int:
        if "transfer-encoding" in self.headers:
            raise ProtocolViolation(501, "chunked transfer encoding is not supported; send Content-Length")
        raw = self.headers.get("content-length")
        if raw is None:
            return 0
        if not raw.isdigit() or len(raw) > 12:
            raise ProtocolViolation(400, f"invalid Content-Length {raw!r}")
        n = int(raw)
        if n > limit:
            raise ProtocolViolation(413, f"body of {n} bytes is over the limit of {limit} bytes")
        return n


def set_io_timeout(sock: socket.socket, seconds: float) -> None:
    """Give a *blocking* socket kernel-side send/receive timeouts (SO_RCVTIMEO/SO_SNDTIMEO).

    Python's ``settimeout`` makes every call poll() first and then read, which measured 26 us more per round trip
    on this API. With kernel timeouts a timed-out call raises ``BlockingIOError`` (EAGAIN);
    :class:`SocketReader` turns that into ``TimeoutError``.
    """
    sec = int(seconds)
    tv = struct.pack("ll", sec, int((seconds - sec) * 1_000_000))
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class SocketReader:
    """Reads HTTP heads and bodies from a stream socket through one buffer.

    One ``recv`` usually brings a whole small request; parsing from the buffer avoids a system call and a
    Python-level read per header line. Lines end with CRLF (RFC 9112); heads are capped at ``MAX_HEAD_BYTES``.
    """

    __slots__ = ("_buf", "_sock")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed (a partial message when a read times out)."""
        return len(self._buf)

    def _recv(self, n: int) -> bytes:
        try:
            return self._sock.recv(n)
        except BlockingIOError:  # SO_RCVTIMEO expired
            raise TimeoutError("no data from the peer within the socket timeout") from None

    def read_head(self) -> Head | None:
        """Read a start line and headers. ``None`` means the peer closed cleanly between messages."""
        buf = self._buf
        while True:
            while buf.startswith(b"\r\n"):  # tolerate empty lines between messages (RFC 9112 2.2)
                del buf[:2]
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(buf) > MAX_HEAD_BYTES:
                raise ProtocolViolation(431, f"request head over {MAX_HEAD_BYTES} bytes")
            chunk = self._recv(65536)
            if not chunk:
                if buf:
                    raise ProtocolViolation(400, "connection closed inside the message head")
                return None
            buf += chunk
        if end > MAX_HEAD_BYTES:
            raise ProtocolViolation(431, f"request head over {MAX_HEAD_BYTES} bytes")
        lines = bytes(buf[:end]).split(b"\r\n")
        del buf[: end + 4]
        if len(lines) - 1 > MAX_HEADERS:
            raise ProtocolViolation(431, f"more than {MAX_HEADERS} header lines")
        if b"\x00" in lines[0]:
            raise ProtocolViolation(400, "NUL in the start line")
        try:
            start = lines[0].decode("ascii").split(" ", 2)
        except UnicodeDecodeError:
            raise ProtocolViolation(400, "start line is not ASCII") from None
        headers: dict[str, str] = {}
        for h in lines[1:]:
            name, sep, value = h.partition(b":")
            if not sep or not name or name != name.strip() or b"\x00" in h or b"\n" in h or b"\r" in h:
                raise ProtocolViolation(400, "malformed header line")
            try:
                headers[name.decode("ascii").lower()] = value.strip().decode("latin-1")
            except UnicodeDecodeError:
                raise ProtocolViolation(400, "header name is not ASCII") from None
        return Head(start, headers)

    def read_body(self, n: int) -> bytes:
        """Read exactly ``n`` body bytes; raise ``ConnectionResetError`` if the peer leaves first."""
        buf = self._buf
        while len(buf) < n:
            chunk = self._recv(max(65536, n - len(buf)))
            if not chunk:
                raise ConnectionResetError(f"peer closed after {len(buf)} of {n} body bytes")
            buf += chunk
        body = bytes(buf[:n])
        del buf[:n]
        return body


def message(start_line: bytes, body: bytes, *, close: bool = False, extra: bytes = b"") -> bytes:
    """Serialise one message with a JSON body (start line without CRLF)."""
    return b"%s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s%s\r\n%s" % (
        start_line, len(body), extra, b"Connection: close\r\n" if close else b"", body)
