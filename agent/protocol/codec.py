"""Bytes on the wire: framing, msgpack, optional zlib, size caps, and the JSON debug form.

A frame is one header byte followed by the body:

* ``0x01``: the body is a msgpack map (the message, see :mod:`agent.protocol.messages`);
* ``0x02``: the body is that msgpack map compressed with zlib (RFC 1950: zlib header + deflate +
  adler32).

**Canonical encoding** (what :func:`encode` writes, so equal messages give equal bytes): maps have
their keys sorted by Unicode code point (= UTF-8 byte order) at every depth; ints use the shortest
msgpack form; floats are always float64; strings are msgpack ``str`` with the shortest length header;
``None`` is nil; no bin or ext types. Compression is transport only: the canonical bytes of a message
are ``0x01`` + body; a ``0x02`` frame compares equal after inflating, but its deflate stream depends
on the zlib build.

:func:`decode` is the one choke point for untrusted bytes. It checks the frame size, inflates with a
hard output cap (a zip bomb stops at the cap without allocating beyond it), unpacks with
``strict_map_key``, ``raw=False``, element counts bounded by the body length, no ext types and
duplicate keys refused, and turns every msgpack/zlib/Unicode failure into :class:`DecodeError`. It
raises only :class:`~agent.protocol.errors.ProtocolError` subclasses.
"""

from __future__ import annotations

import json
import zlib
from typing import Any, Final, NoReturn

import msgpack

from agent.protocol.errors import DecodeError, MessageTooLargeError, ProtocolError, TopicError
from agent.protocol.messages import Message, from_wire, to_wire
from agent.protocol.topics import parse_device_topic

__all__ = [
    "COMPRESS_THRESHOLD",
    "FRAME_MSGPACK",
    "FRAME_ZLIB",
    "MAX_BODY_SIZE",
    "MAX_FRAME_SIZE",
    "MAX_JSON_SIZE",
    "ZLIB_LEVEL",
    "decode",
    "decode_for_topic",
    "encode",
    "from_json",
    "to_json",
]

FRAME_MSGPACK: Final = 0x01
"""Header byte: plain msgpack body."""
FRAME_ZLIB: Final = 0x02
"""Header byte: zlib-compressed msgpack body."""

MAX_FRAME_SIZE: Final = 256 * 1024
"""Largest frame (header + possibly compressed body) sent or accepted, bytes."""
MAX_BODY_SIZE: Final = 1024 * 1024
"""Largest msgpack body, after decompression, sent or accepted, bytes."""
MAX_JSON_SIZE: Final = 4 * 1024 * 1024
"""Largest JSON debug document :func:`from_json` accepts, characters."""
COMPRESS_THRESHOLD: Final = 512
"""Bodies longer than this are compressed automatically when that makes the frame smaller."""
ZLIB_LEVEL: Final = 6
"""zlib compression level used by :func:`encode`."""

_UNPACK_ERRORS: Final = (msgpack.UnpackException, ValueError, TypeError, OverflowError, RecursionError)


def _canonical(value: Any) -> Any:
    """Copy of validated plain data with every map's keys in sorted order (lists for tuples)."""
    if isinstance(value, dict):
        return {key: _canonical(value[key]) for key in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    return value


def _body(msg: Message) -> bytes:
    body: bytes = msgpack.packb(_canonical(to_wire(msg)), use_bin_type=True)
    return body


def encode(msg: Message, *, compress: bool | None = None, max_size: int = MAX_FRAME_SIZE) -> bytes:
    """Serialise ``msg`` to a frame.

    ``compress=None`` (default) compresses a body longer than :data:`COMPRESS_THRESHOLD` bytes when that
    makes it smaller; ``True`` always compresses; ``False`` never does. Raises
    :class:`MessageTooLargeError` if the body exceeds :data:`MAX_BODY_SIZE` or the frame exceeds
    ``max_size`` (lower it for brokers with a smaller packet limit), so a peer with default limits can
    always decode what this function returns.
    """
    body = _body(msg)
    if len(body) > MAX_BODY_SIZE:
        raise MessageTooLargeError("message body", len(body), MAX_BODY_SIZE)
    frame = bytes([FRAME_MSGPACK]) + body
    if compress or (compress is None and len(body) > COMPRESS_THRESHOLD):
        packed = bytes([FRAME_ZLIB]) + zlib.compress(body, ZLIB_LEVEL)
        if compress or len(packed) < len(frame):
            frame = packed
    if len(frame) > max_size:
        raise MessageTooLargeError("frame", len(frame), max_size)
    return frame


def _inflate(payload: bytes, limit: int) -> bytes:
    """Decompress a zlib stream, never producing (or allocating) more than ``limit + 1`` bytes."""
    inflater = zlib.decompressobj()
    try:
        body = inflater.decompress(payload, limit + 1)
    except zlib.error as exc:
        raise DecodeError(f"corrupt zlib body: {exc}") from None
    if len(body) > limit:
        raise MessageTooLargeError("decompressed message body", None, limit)
    if not inflater.eof:
        raise DecodeError("truncated zlib body")
    if inflater.unused_data:
        raise DecodeError("trailing bytes after the zlib body")
    return body


def _pairs_to_dict(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """Map hook for msgpack/JSON: build the dict, refusing duplicate keys (ambiguous, non-canonical)."""
    out: dict[Any, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DecodeError(f"duplicate map key {key!r}"[:120])
        out[key] = value
    return out


def _reject_ext(code: int, data: bytes) -> NoReturn:
    raise DecodeError(f"msgpack ext type {code} is not allowed")


def _unpack(body: bytes) -> Any:
    limit = len(body)  # no element count or string length can honestly exceed the body length
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            object_pairs_hook=_pairs_to_dict,
            ext_hook=_reject_ext,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=limit,
            max_map_len=limit,
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except _UNPACK_ERRORS as exc:
        reason = str(exc) or type(exc).__name__
        raise DecodeError(f"malformed msgpack body: {reason}"[:200]) from None


def decode(
    data: bytes | bytearray | memoryview,
    *,
    max_size: int = MAX_FRAME_SIZE,
    max_decompressed: int = MAX_BODY_SIZE,
) -> Message:
    """Parse a frame into a message. Untrusted input: raises only
    :class:`~agent.protocol.errors.ProtocolError` subclasses (:class:`MessageTooLargeError` past
    ``max_size`` bytes on the wire or ``max_decompressed`` bytes of body, :class:`DecodeError` for
    anything malformed, plus the version/type errors of :func:`~agent.protocol.messages.from_wire`)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected bytes, not {type(data).__name__}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_size:  # before copying anything
        raise MessageTooLargeError("frame", size, max_size)
    frame = bytes(data)
    if not frame:
        raise DecodeError("empty frame")
    header, payload = frame[0], frame[1:]
    if header == FRAME_MSGPACK:
        if len(payload) > max_decompressed:
            raise MessageTooLargeError("message body", len(payload), max_decompressed)
        body = payload
    elif header == FRAME_ZLIB:
        body = _inflate(payload, max_decompressed)
    else:
        raise DecodeError(f"unknown frame header byte 0x{header:02x} (expected 0x01 or 0x02)")
    return from_wire(_unpack(body))


def decode_for_topic(
    topic: str,
    data: bytes | bytearray | memoryview,
    *,
    max_size: int = MAX_FRAME_SIZE,
    max_decompressed: int = MAX_BODY_SIZE,
) -> Message:
    """Decode a frame received on a device topic and check it belongs there: the message type's channel
    must be the topic's channel and its ``device_id`` the topic's device (so a device cannot speak for
    another one through its payload). Raises :class:`TopicError` on a mismatch or a foreign topic."""
    device_id, channel = parse_device_topic(topic)
    msg = decode(data, max_size=max_size, max_decompressed=max_decompressed)
    if msg.CHANNEL is not channel:
        raise TopicError(f"a {msg.TYPE_TAG!r} message does not belong on channel {channel.value!r}")
    if msg.device_id != device_id:
        raise TopicError(f"payload device_id {msg.device_id!r} does not match topic device {device_id!r}")
    return msg


def to_json(msg: Message, *, indent: int | None = None) -> str:
    """The JSON debug form: the same map as the msgpack body (same keys, sorted), compact by default.
    For logs, fixtures and humans; devices and servers exchange msgpack frames."""
    return json.dumps(
        _canonical(to_wire(msg)),
        sort_keys=True,
        ensure_ascii=False,
        allow_nan=False,
        indent=indent,
        separators=(",", ":") if indent is None else (",", ": "),
    )


def _reject_constant(name: str) -> NoReturn:
    raise DecodeError(f"JSON constant {name} is not allowed (finite numbers only)")


def from_json(text: str, *, max_size: int = MAX_JSON_SIZE) -> Message:
    """Parse the JSON debug form back into a message (same validation as :func:`decode`)."""
    if not isinstance(text, str):
        raise DecodeError(f"expected str, not {type(text).__name__}")
    if len(text) > max_size:
        raise MessageTooLargeError("JSON document", len(text), max_size)
    try:
        data = json.loads(text, object_pairs_hook=_pairs_to_dict, parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as exc:
        raise DecodeError(f"malformed JSON: {exc}"[:200]) from None
    return from_wire(data)
