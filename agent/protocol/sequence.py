"""Per-stream sequence numbers: pure helpers shared by the device and the server.

Each device numbers every message it sends on a *stream* (``events``, ``drift``) with its own counter
starting at 0 and increasing by one per message, persisted across restarts. MQTT QoS 1 delivers at
least once, and the device resends until the server acknowledges, so the server sees duplicates and
gaps; these helpers make ingestion idempotent and tell the server what to ask for again:

* :class:`RangeSet` is a compact set of non-negative ints stored as sorted, disjoint, non-adjacent
  inclusive ranges. Memory and most operations are O(number of ranges), which stays tiny when
  messages arrive mostly in order.
* :class:`ReceivedTracker` is the server's per (device, stream) record of what it has stored: it answers
  "new or duplicate?", the high-water mark, the gaps below it, and round-trips through plain ranges so
  it can be persisted.
"""

from __future__ import annotations

import enum
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from typing import Final, Literal, TypeAlias

from agent.protocol.errors import InvalidFieldError, _short_repr

__all__ = [
    "MAX_SEQ",
    "RangeSet",
    "ReceivedTracker",
    "RecordResult",
    "SeqRange",
    "Stream",
    "validate_ranges",
    "validate_seq",
]

MAX_SEQ: Final = 2**63 - 1
"""Largest sequence number (fits a signed 64-bit integer, i.e. an SQL BIGINT)."""

SeqRange: TypeAlias = tuple[int, int]
"""An inclusive range ``(first, last)`` of sequence numbers, ``first <= last``."""

RecordResult: TypeAlias = Literal["new", "duplicate"]
"""What :meth:`ReceivedTracker.record` found."""


class Stream(enum.StrEnum):
    """The sequenced streams a device sends. Each has its own counter starting at 0."""

    EVENTS = "events"
    DRIFT = "drift"


def validate_seq(value: object, field: str = "seq") -> int:
    """Return ``value`` if it is an ``int`` (not ``bool``) in ``0..MAX_SEQ``, else raise
    :class:`InvalidFieldError` naming ``field``."""
    if type(value) is not int:
        raise InvalidFieldError(f"must be an int, not {type(value).__name__}", field=field)
    if not 0 <= value <= MAX_SEQ:
        raise InvalidFieldError(f"must be between 0 and 2**63-1, got {_short_repr(value)}", field=field)
    return value


def _validate_range(value: object, field: str) -> SeqRange:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise InvalidFieldError(
            f"must be a [first, last] pair, not {_short_repr(value)}", field=field
        )
    first = validate_seq(value[0], f"{field}[0]")
    last = validate_seq(value[1], f"{field}[1]")
    if first > last:
        raise InvalidFieldError(f"range start {first} is after its end {last}", field=field)
    return first, last


def validate_ranges(value: object, field: str = "ranges") -> tuple[SeqRange, ...]:
    """Return ``value`` as a tuple of ``(first, last)`` int pairs, checking each pair is a valid inclusive
    range and that the ranges are sorted ascending and disjoint. Accepts lists (as decoded) or tuples.
    Raises :class:`InvalidFieldError` naming the offending element."""
    if not isinstance(value, (list, tuple)):
        raise InvalidFieldError(
            f"must be a list of [first, last] ranges, not {type(value).__name__}", field=field
        )
    out: list[SeqRange] = []
    for i, item in enumerate(value):
        rng = _validate_range(item, f"{field}[{i}]")
        if out and rng[0] <= out[-1][1]:
            raise InvalidFieldError(
                f"ranges must be sorted and disjoint; {list(rng)} does not follow {list(out[-1])}",
                field=f"{field}[{i}]",
            )
        out.append(rng)
    return tuple(out)


class RangeSet:
    """A set of ints in ``0..MAX_SEQ`` kept as sorted, disjoint, non-adjacent inclusive ranges.

    Lookups are O(log r) and updates O(r) (a list insert/delete) for r ranges; nothing is ever
    proportional to the number of *members*, so a stream with billions of in-order messages costs one
    range.
    """

    __slots__ = ("_count", "_ends", "_starts")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._count = 0

    @classmethod
    def from_ranges(cls, ranges: Iterable[tuple[int, int]]) -> RangeSet:
        """Build from inclusive ranges in any order, overlapping or adjacent ones are merged
        (e.g. as loaded from storage or an :class:`~agent.protocol.messages.Ack`)."""
        rs = cls()
        for i, rng in enumerate(ranges):
            first, last = _validate_range(rng, f"ranges[{i}]")
            rs.add_range(first, last)
        return rs

    def add(self, seq: int) -> bool:
        """Add ``seq``; return ``True`` if it was not already a member."""
        return self.add_range(seq, seq) == 1

    def add_range(self, first: int, last: int) -> int:
        """Add every int in ``first..last`` (inclusive); return how many were new."""
        first = validate_seq(first, "first")
        last = validate_seq(last, "last")
        if first > last:
            raise InvalidFieldError(f"range start {first} is after its end {last}", field="first")
        starts, ends = self._starts, self._ends
        # Ranges [lo, hi) touch or overlap [first, last]: end >= first - 1 and start <= last + 1.
        lo = bisect_left(ends, first - 1)
        hi = bisect_right(starts, last + 1)
        if lo >= hi:
            starts.insert(lo, first)
            ends.insert(lo, last)
            added = last - first + 1
        else:
            new_first = min(first, starts[lo])
            new_last = max(last, ends[hi - 1])
            covered = sum(ends[i] - starts[i] + 1 for i in range(lo, hi))
            added = (new_last - new_first + 1) - covered
            starts[lo:hi] = [new_first]
            ends[lo:hi] = [new_last]
        self._count += added
        return added

    def __contains__(self, seq: object) -> bool:
        if type(seq) is not int:
            return False
        i = bisect_right(self._starts, seq) - 1
        return i >= 0 and seq <= self._ends[i]

    def ranges(self) -> tuple[SeqRange, ...]:
        """The members as sorted, disjoint, non-adjacent inclusive ranges."""
        return tuple(zip(self._starts, self._ends, strict=True))

    def missing(self, upto: int) -> tuple[SeqRange, ...]:
        """Inclusive ranges of ints in ``0..upto`` that are *not* members (empty if ``upto < 0``)."""
        gaps: list[SeqRange] = []
        nxt = 0
        for start, end in zip(self._starts, self._ends, strict=True):
            if start > upto:
                break
            if start > nxt:
                gaps.append((nxt, start - 1))
            nxt = end + 1
        if nxt <= upto:
            gaps.append((nxt, upto))
        return tuple(gaps)

    @property
    def count(self) -> int:
        """Number of members (not ``len()``: it can exceed ``sys.maxsize``)."""
        return self._count

    @property
    def range_count(self) -> int:
        """Number of stored ranges: the memory cost. A server may cap it to bound hostile senders."""
        return len(self._starts)

    @property
    def first(self) -> int | None:
        """Smallest member, or ``None`` if empty."""
        return self._starts[0] if self._starts else None

    @property
    def last(self) -> int | None:
        """Largest member, or ``None`` if empty."""
        return self._ends[-1] if self._ends else None

    def copy(self) -> RangeSet:
        """An independent copy."""
        rs = RangeSet()
        rs._starts = list(self._starts)
        rs._ends = list(self._ends)
        rs._count = self._count
        return rs

    def __bool__(self) -> bool:
        return self._count > 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RangeSet):
            return NotImplemented
        return self._starts == other._starts and self._ends == other._ends

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"RangeSet({[list(r) for r in self.ranges()]!r})"


class ReceivedTracker:
    """What the server has stored for one (device, stream): idempotent ingestion bookkeeping.

    Call :meth:`record` for each arriving message *after* (or in the same transaction as) storing it;
    ``"duplicate"`` means it was stored before and must not be stored or counted again. Persist
    :meth:`to_ranges` (and :attr:`duplicates` if wanted) with the data and restore with
    :meth:`from_ranges`.
    """

    __slots__ = ("_received", "duplicates")

    def __init__(self) -> None:
        self._received = RangeSet()
        self.duplicates = 0
        """How many :meth:`record` calls found an already-received seq."""

    @classmethod
    def from_ranges(cls, ranges: Iterable[tuple[int, int]], *, duplicates: int = 0) -> ReceivedTracker:
        """Restore from persisted :meth:`to_ranges` output (and optionally the duplicates counter)."""
        tracker = cls()
        tracker._received = RangeSet.from_ranges(ranges)
        if type(duplicates) is not int or duplicates < 0:
            raise InvalidFieldError("must be a non-negative int", field="duplicates")
        tracker.duplicates = duplicates
        return tracker

    def to_ranges(self) -> tuple[SeqRange, ...]:
        """Everything received, as sorted disjoint inclusive ranges (also what an Ack reports stored)."""
        return self._received.ranges()

    def record(self, seq: int) -> RecordResult:
        """Record ``seq`` as stored; ``"new"`` the first time, ``"duplicate"`` afterwards."""
        if self._received.add(seq):
            return "new"
        self.duplicates += 1
        return "duplicate"

    def record_range(self, first: int, last: int) -> int:
        """Mark ``first..last`` as received without counting duplicates; return how many were new.

        For a ``DriftWindow`` whose ``replaces`` range stands for earlier windows the device merged
        instead of sending: those seqs must not be reported as gaps.
        """
        return self._received.add_range(first, last)

    def __contains__(self, seq: object) -> bool:
        return seq in self._received

    @property
    def high_water(self) -> int | None:
        """Highest seq received so far, or ``None`` before the first message."""
        return self._received.last

    @property
    def received_count(self) -> int:
        """How many distinct seqs have been received."""
        return self._received.count

    @property
    def range_count(self) -> int:
        """Number of ranges held (memory cost; 1 when nothing was ever lost or reordered)."""
        return self._received.range_count

    def gaps(self) -> tuple[SeqRange, ...]:
        """Seqs below the high-water mark never received: what to ask the device to resend."""
        high = self._received.last
        return () if high is None else self._received.missing(high)

    def __repr__(self) -> str:
        return (
            f"ReceivedTracker(ranges={[list(r) for r in self.to_ranges()]!r}, "
            f"duplicates={self.duplicates})"
        )
