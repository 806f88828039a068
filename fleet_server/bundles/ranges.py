"""HTTP range requests for bundle downloads (RFC 9110 §14), as pure functions of header values.

One range per request: ``bytes=a-b``, ``bytes=a-`` and ``bytes=-n``. What is served:

* no ``Range``, or one this module does not evaluate (another unit, several ranges, bad syntax, ``a > b``):
  the whole file with 200, as RFC 9110 allows a server to ignore ``Range``;
* a satisfiable range: 206 with ``Content-Range: bytes first-last/length`` (``last`` clipped to the end);
* a range starting at or past the end, or ``bytes=-0``: 416 with ``Content-Range: bytes */length``.

``If-Range`` makes the range conditional: it is honoured only when the validator matches the file's strong
``ETag`` (or equals its ``Last-Modified`` date); otherwise the whole file is sent, so a client resuming against
changed content starts over instead of splicing two versions. Bundles never change under their digest, but
clients should not need to know that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime, parsedate_to_datetime
from typing import Final

__all__ = ["ByteRange", "RangeNotSatisfiableError", "http_date", "if_range_allows", "parse_range"]

_MAX_HEADER: Final = 256
_SPEC_RE: Final = re.compile(r"\s*bytes\s*=\s*(?:(\d+)\s*-\s*(\d*)|-\s*(\d+))\s*", re.ASCII | re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Bytes ``first``..``last`` (inclusive) of a file of ``length`` bytes."""

    first: int
    last: int
    length: int

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    @property
    def content_range(self) -> str:
        return f"bytes {self.first}-{self.last}/{self.length}"


class RangeNotSatisfiableError(ValueError):
    """The range lies outside the file: answer 416 with ``Content-Range: bytes */length``."""

    def __init__(self, header: str, length: int) -> None:
        super().__init__(f"range {header.strip()[:80]!r} is not satisfiable: the bundle has {length} bytes")
        self.length = length

    @property
    def content_range(self) -> str:
        return f"bytes */{self.length}"


def parse_range(header: str | None, length: int) -> ByteRange | None:
    """The range to serve for ``Range: header`` on a file of ``length`` bytes; ``None`` means the whole file
    (no header, or one that is ignored). Raises :class:`RangeNotSatisfiableError` for a range outside the file."""
    if header is None or len(header) > _MAX_HEADER:
        return None
    m = _SPEC_RE.fullmatch(header)
    if m is None:
        return None
    first_text, last_text, suffix_text = m.groups()
    if suffix_text is not None:
        n = int(suffix_text)
        if n == 0 or length == 0:
            raise RangeNotSatisfiableError(header, length)
        return ByteRange(max(0, length - n), length - 1, length)
    first = int(first_text)
    last = int(last_text) if last_text else None
    if last is not None and last < first:
        return None  # an invalid range-spec: ignored, the whole file is sent
    if first >= length:
        raise RangeNotSatisfiableError(header, length)
    return ByteRange(first, length - 1 if last is None else min(last, length - 1), length)


def http_date(when: datetime) -> str:
    """``Sun, 06 Nov 1994 08:49:37 GMT`` (an aware datetime, truncated to the second)."""
    return format_datetime(when.replace(microsecond=0), usegmt=True)


def if_range_allows(header: str | None, *, etag: str, last_modified: datetime | None) -> bool:
    """Whether ``Range`` may be honoured given ``If-Range: header`` (``True`` when there is no ``If-Range``).

    An entity tag matches only the exact strong ``etag`` (weak tags never do); a date matches only when it is
    exactly the ``last_modified`` second. Anything else does not match, and the whole file is sent.
    """
    if header is None:
        return True
    value = header.strip()
    if value.startswith('"'):
        return value == etag
    if value.startswith("W/") or last_modified is None:
        return False
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return False
    if when.tzinfo is None:
        return False
    return when == last_modified.replace(microsecond=0)
