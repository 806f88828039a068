"""Sequence helpers: RangeSet against a plain-set model, ReceivedTracker bookkeeping."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from agent.protocol import (
    MAX_SEQ,
    InvalidFieldError,
    RangeSet,
    ReceivedTracker,
    Stream,
    validate_ranges,
)

small = st.integers(min_value=0, max_value=60)


def _model_ranges(members: set[int]) -> tuple[tuple[int, int], ...]:
    """Reference implementation: maximal runs of consecutive members."""
    out: list[tuple[int, int]] = []
    for n in sorted(members):
        if out and out[-1][1] == n - 1:
            out[-1] = (out[-1][0], n)
        else:
            out.append((n, n))
    return tuple(out)


def _model_missing(members: set[int], upto: int) -> tuple[tuple[int, int], ...]:
    return _model_ranges({n for n in range(upto + 1) if n not in members})


class RangeSetMachine(RuleBasedStateMachine):
    """Every operation on RangeSet agrees with the same operation on a Python set."""

    def __init__(self) -> None:
        super().__init__()
        self.rs = RangeSet()
        self.model: set[int] = set()

    @rule(seq=small)
    def add(self, seq: int) -> None:
        assert self.rs.add(seq) == (seq not in self.model)
        self.model.add(seq)

    @rule(first=small, length=st.integers(min_value=0, max_value=12))
    def add_range(self, first: int, length: int) -> None:
        new = set(range(first, first + length + 1))
        assert self.rs.add_range(first, first + length) == len(new - self.model)
        self.model |= new

    @rule(seq=st.integers(min_value=-2, max_value=80))
    def contains(self, seq: int) -> None:
        assert (seq in self.rs) == (seq in self.model)

    @rule(upto=st.integers(min_value=-1, max_value=80))
    def missing(self, upto: int) -> None:
        assert self.rs.missing(upto) == _model_missing(self.model, upto)

    @invariant()
    def same_contents(self) -> None:
        assert self.rs.ranges() == _model_ranges(self.model)
        assert self.rs.count == len(self.model)
        assert self.rs.range_count == len(_model_ranges(self.model))
        assert self.rs.first == (min(self.model) if self.model else None)
        assert self.rs.last == (max(self.model) if self.model else None)
        assert bool(self.rs) == bool(self.model)


TestRangeSetStateful = RangeSetMachine.TestCase


@given(st.lists(st.tuples(small, st.integers(min_value=0, max_value=10)), max_size=30))
def test_from_ranges_merges_any_order(pairs: list[tuple[int, int]]) -> None:
    ranges = [(a, a + n) for a, n in pairs]
    model = {x for a, b in ranges for x in range(a, b + 1)}
    rs = RangeSet.from_ranges(ranges)
    assert rs.ranges() == _model_ranges(model)
    assert RangeSet.from_ranges(rs.ranges()) == rs
    assert validate_ranges(rs.ranges()) == rs.ranges()


def test_rangeset_basics() -> None:
    rs = RangeSet()
    assert rs.ranges() == () and rs.count == 0 and rs.first is None and rs.last is None
    assert rs.missing(3) == ((0, 3),)
    assert rs.missing(-1) == ()
    assert rs.add(5) and not rs.add(5)
    assert rs.add_range(0, 3) == 4
    assert rs.ranges() == ((0, 3), (5, 5))
    assert rs.add(4)
    assert rs.ranges() == ((0, 5),)
    assert rs.add_range(2, 9) == 4
    assert rs.missing(12) == ((10, 12),)
    assert "3" not in rs and True not in rs and 3 in rs
    copy = rs.copy()
    copy.add(100)
    assert 100 not in rs and copy != rs
    assert repr(rs) == "RangeSet([[0, 9]])"


def test_rangeset_handles_huge_ranges_compactly() -> None:
    rs = RangeSet()
    assert rs.add_range(0, MAX_SEQ) == MAX_SEQ + 1
    assert rs.count == MAX_SEQ + 1 and rs.range_count == 1
    assert rs.missing(MAX_SEQ) == ()


@pytest.mark.parametrize("bad", [-1, MAX_SEQ + 1, True, 1.0, "1", None])
def test_rangeset_refuses_bad_seqs(bad: object) -> None:
    with pytest.raises(InvalidFieldError):
        RangeSet().add(bad)  # type: ignore[arg-type]


def test_rangeset_refuses_reversed_range() -> None:
    with pytest.raises(InvalidFieldError, match="after its end"):
        RangeSet().add_range(5, 4)
    with pytest.raises(InvalidFieldError):
        RangeSet.from_ranges([(5, 4)])


@pytest.mark.parametrize(
    ("ranges", "field"),
    [
        ([(3, 1)], "r[0]"),
        ([(0, 2), (2, 4)], "r[1]"),
        ([(5, 6), (0, 1)], "r[1]"),
        ([(0, -1)], "r[0][1]"),
        ([(0,)], "r[0]"),
        ([(0, True)], "r[0][1]"),
        ("0-3", "r"),
    ],
)
def test_validate_ranges_names_the_element(ranges: object, field: str) -> None:
    with pytest.raises(InvalidFieldError) as info:
        validate_ranges(ranges, "r")
    assert info.value.field == field


def test_tracker_counts_duplicates_and_gaps() -> None:
    tracker = ReceivedTracker()
    assert tracker.high_water is None and tracker.gaps() == ()
    assert [tracker.record(s) for s in (0, 1, 2, 5, 2, 8, 0)] == [
        "new", "new", "new", "new", "duplicate", "new", "duplicate",
    ]
    assert tracker.duplicates == 2
    assert tracker.high_water == 8
    assert tracker.gaps() == ((3, 4), (6, 7))
    assert tracker.received_count == 5
    assert 5 in tracker and 6 not in tracker
    assert tracker.record(3) == "new" and tracker.record(4) == "new"
    assert tracker.gaps() == ((6, 7),)
    assert tracker.to_ranges() == ((0, 5), (8, 8))


def test_tracker_record_range_for_replaced_windows() -> None:
    tracker = ReceivedTracker()
    for seq in (0, 1, 5):
        tracker.record(seq)
    assert tracker.gaps() == ((2, 4),)
    assert tracker.record_range(2, 4) == 3  # a merged window replaced 2..4
    assert tracker.gaps() == () and tracker.duplicates == 0
    assert tracker.record_range(0, 3) == 0
    assert tracker.duplicates == 0


def test_tracker_persistence_round_trip() -> None:
    tracker = ReceivedTracker()
    for seq in (0, 1, 4, 4, 9):
        tracker.record(seq)
    restored = ReceivedTracker.from_ranges(tracker.to_ranges(), duplicates=tracker.duplicates)
    assert restored.to_ranges() == tracker.to_ranges() == ((0, 1), (4, 4), (9, 9))
    assert restored.duplicates == 1
    assert restored.gaps() == ((2, 3), (5, 8))
    assert restored.record(9) == "duplicate"
    # plain lists, as loaded from JSON or a database, are fine too
    assert ReceivedTracker.from_ranges([[0, 1], [4, 4]]).to_ranges() == ((0, 1), (4, 4))  # type: ignore[list-item]
    with pytest.raises(InvalidFieldError):
        ReceivedTracker.from_ranges([], duplicates=-1)


@given(st.lists(small, max_size=80))
def test_tracker_matches_model(seqs: list[int]) -> None:
    tracker = ReceivedTracker()
    seen: set[int] = set()
    dups = 0
    for seq in seqs:
        expected = "duplicate" if seq in seen else "new"
        dups += expected == "duplicate"
        seen.add(seq)
        assert tracker.record(seq) == expected
    assert tracker.duplicates == dups
    assert tracker.high_water == (max(seen) if seen else None)
    assert tracker.gaps() == (_model_missing(seen, max(seen)) if seen else ())


def test_streams() -> None:
    assert [s.value for s in Stream] == ["events", "drift"]
    assert Stream("drift") is Stream.DRIFT
