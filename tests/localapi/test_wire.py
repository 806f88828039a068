"""The HTTP head parser against arbitrary bytes: it returns a head, says the peer left, or raises the documented
ProtocolViolation; nothing else, and never reads past its cap."""

from __future__ import annotations

import socket
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.localapi.wire import MAX_HEAD_BYTES, Head, ProtocolViolation, SocketReader, message


def _parse(data: bytes) -> Head | ProtocolViolation | None:
    a, b = socket.socketpair()
    writer = threading.Thread(target=lambda: (a.sendall(data), a.shutdown(socket.SHUT_WR)))
    writer.start()
    try:
        b.settimeout(5)
        return SocketReader(b).read_head()
    except ProtocolViolation as exc:
        return exc
    finally:
        writer.join()
        a.close()
        b.close()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_give_head_none_or_protocol_violation(data: bytes) -> None:
    out = _parse(data)
    assert out is None or isinstance(out, Head | ProtocolViolation)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40), max_size=80))
def test_header_like_lines_parse_or_are_refused(lines: list[str]) -> None:
    data = ("GET /v1/health HTTP/1.1\r\n" + "\r\n".join(lines) + "\r\n\r\n").encode()
    out = _parse(data)
    assert isinstance(out, Head | ProtocolViolation)
    if isinstance(out, ProtocolViolation):
        assert out.status in (400, 431)


def test_head_over_cap_refused_without_reading_further() -> None:
    out = _parse(b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD_BYTES * 4))
    assert isinstance(out, ProtocolViolation) and out.status == 431


def test_message_round_trip() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(message(b"POST /x HTTP/1.1", b'{"k": 1}') + message(b"GET /y HTTP/1.1", b""))
        r = SocketReader(b)
        h1 = r.read_head()
        assert h1 is not None and h1.start == ["POST", "/x", "HTTP/1.1"]
        assert r.read_body(h1.content_length(100)) == b'{"k": 1}'
        h2 = r.read_head()
        assert h2 is not None and h2.start[1] == "/y" and h2.content_length(100) == 0
