"""Errors raised by the wire contract.

Every error here derives from :class:`ProtocolError` (itself a :class:`ValueError`) and means the same
thing to the caller: **reject the message or topic, count it, keep running**. A device or server must
never crash, retry forever or disconnect because a peer sent something the contract does not allow.
The subclasses exist so the rejection can be counted and logged by cause::

    ProtocolError (ValueError)
    ├── TopicError                     topic string is not one of ours / malformed
    ├── DecodeError                    bytes or structure wrong; ``field`` names the culprit
    │   └── InvalidFieldError          a field holds a value the contract forbids
    │       └── InvalidIdentifierError device id / claim id / model / stream name breaks the id rules
    ├── UnknownMessageTypeError        well-formed, but the ``"t"`` tag is not one we know
    ├── UnsupportedSchemaVersionError  the major schema version is not one we understand
    └── MessageTooLargeError           over a size cap (frame, decompressed body or encode limit)

:class:`InvalidFieldError` is a :class:`DecodeError` so ``except DecodeError`` around ``decode`` sees
every per-field problem, whichever layer found it. The same class is raised when *code* builds a
message with a bad value, so an invalid message can never be constructed, let alone sent.
"""

from __future__ import annotations

__all__ = [
    "DecodeError",
    "InvalidFieldError",
    "InvalidIdentifierError",
    "MessageTooLargeError",
    "ProtocolError",
    "TopicError",
    "UnknownMessageTypeError",
    "UnsupportedSchemaVersionError",
]


class ProtocolError(ValueError):
    """Base class: the peer (or the caller) broke the wire contract. Reject and count; never crash."""


class TopicError(ProtocolError):
    """A topic string is not a well-formed topic of this contract (foreign prefix, wrong shape, unknown
    channel, bad identifier inside it, payload not matching its topic)."""


class DecodeError(ProtocolError):
    """Malformed bytes or structure: not a frame, not msgpack/JSON, not a map, a field missing or of the
    wrong type. ``field`` names the offending field (dotted path for nested data) when there is one.
    """

    def __init__(self, reason: str, *, field: str | None = None) -> None:
        self.reason = reason
        self.field = field
        super().__init__(f"{field}: {reason}" if field else reason)

    def with_prefix(self, prefix: str) -> DecodeError:
        """Return the same error with ``prefix`` prepended to its field path (for nested structures)."""
        path = f"{prefix}.{self.field}" if self.field else prefix
        err = type(self)(self.reason, field=path)
        err.__cause__ = self.__cause__
        return err


class InvalidFieldError(DecodeError):
    """A field is present and of a plausible shape but its value is forbidden (wrong type, out of range,
    breaks a pattern, inconsistent with another field). Raised both when decoding and when code
    constructs a message, so only valid messages exist in memory."""


class InvalidIdentifierError(InvalidFieldError):
    """An identifier (device id, claim id, model name, stream name, subscription group) breaks the
    identifier rules; the message says which characters and lengths are allowed."""


class UnknownMessageTypeError(ProtocolError):
    """The message is well-formed but its ``"t"`` type tag is not in the registry (a newer peer may
    have sent a type this build does not know). Ignore and count it."""

    def __init__(self, type_tag: object) -> None:
        self.type_tag = type_tag
        super().__init__(f"unknown message type {_short_repr(type_tag)}")


class UnsupportedSchemaVersionError(ProtocolError):
    """The message's major schema version is not the one this build understands (a newer major means
    an incompatible change: the receiver must be upgraded; it must not guess)."""

    def __init__(self, version: tuple[int, int], supported: tuple[int, int]) -> None:
        self.version = version
        self.supported = supported
        super().__init__(
            f"schema version {version[0]}.{version[1]} is not supported: this build reads major version "
            f"{supported[0]} (any minor) and writes {supported[0]}.{supported[1]}"
        )


class MessageTooLargeError(ProtocolError):
    """A size cap was exceeded: the frame on the wire, the decompressed body (zip bombs stop here,
    before the memory is allocated) or the encoder's own limit."""

    def __init__(self, what: str, size: int | None, limit: int) -> None:
        self.what = what
        self.size = size
        self.limit = limit
        shown = "more than" if size is None else f"{size} bytes, more than"
        super().__init__(f"{what} is {shown} the limit of {limit} bytes")


def _short_repr(value: object, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters so hostile input cannot flood the logs."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
