"""Tests of the shared drift summary layout (agent.drift).

The layout is a contract between the device agent, the fleet server and model bundles, so these tests
pin the binning rule, exact merging, the dict form and its validation, and a golden file.
"""

from __future__ import annotations

import bisect
import json
import math
import pickle
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.drift import (
    LAYOUT_VERSION,
    MAX_BINS,
    BatchBinner,
    CategoricalCounts,
    CategoryCapMismatchError,
    DriftLayoutError,
    Edges,
    EdgesMismatchError,
    FeatureMismatchError,
    InvalidEdgesError,
    InvalidInputError,
    InvalidSummaryError,
    MomentOverflowError,
    NumericHistogram,
    Summary,
    UnsupportedLayoutError,
    feature_from_dict,
)

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "drift_summary_v1.json"

# The raw values the golden summary was built from (see docs/drift-layout.md, "Golden example").
GOLDEN_TEMPERATURE = [-5.0, 0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, math.nan]
GOLDEN_VIBRATION = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, math.inf]
GOLDEN_WEATHER = ["sunny", "rain", "fog", "sunny", None, "snow", "rain", "sunny"]


# -- helpers ---------------------------------------------------------------------------------------


def reference_slot(edges: list[float], x: float) -> str | int:
    """The binning rule written out in plain Python (independent of numpy)."""
    if math.isnan(x):
        return "nan"
    if x < edges[0]:
        return "underflow"
    if x > edges[-1]:
        return "overflow"
    if x == edges[-1]:
        return len(edges) - 2
    return bisect.bisect_right(edges, x) - 1


def reference_histogram(edges: list[float], values: list[float]) -> dict[str, Any]:
    counts = [0] * (len(edges) - 1)
    other = {"underflow": 0, "overflow": 0, "nan": 0}
    for x in values:
        slot = reference_slot(edges, x)
        if isinstance(slot, int):
            counts[slot] += 1
        else:
            other[slot] += 1
    return {"counts": counts, **other}


def state(h: NumericHistogram) -> tuple[list[int], int, int, int, int]:
    """The exact (integer) part of a histogram."""
    return ([int(c) for c in h.counts], h.underflow, h.overflow, h.nan, h.n)


def assert_plain(value: object) -> None:
    """The dict form must hold only plain Python values (what JSON and msgpack carry)."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert type(key) is str
            assert_plain(item)
    elif isinstance(value, list):
        for item in value:
            assert_plain(item)
    else:
        assert value is None or type(value) in (int, float, str), type(value)
        if type(value) is float:
            assert math.isfinite(value)


def close(a: float, b: float, scale: float) -> bool:
    """Relative 1e-9, with an absolute floor proportional to the data's magnitude."""
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9 * scale)


def golden_dict() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(GOLDEN.read_text())
    return data


def numeric_dict(**overrides: object) -> dict[str, Any]:
    base: dict[str, Any] = {
        "kind": "numeric",
        "edges": [0.0, 1.0, 2.0],
        "counts": [3, 1],
        "underflow": 1,
        "overflow": 0,
        "nan": 2,
        "n": 5,
        "min": -1.0,
        "max": 1.5,
        "mean": 0.5,
        "m2": 4.0,
    }
    base.update(overrides)
    return base


def categorical_dict(**overrides: object) -> dict[str, Any]:
    base: dict[str, Any] = {
        "kind": "categorical",
        "counts": {"a": 2, "b": 0},
        "other": 1,
        "missing": 3,
        "max_categories": 4,
    }
    base.update(overrides)
    return base


# strategies
finite_floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
value_lists = st.lists(finite_floats, max_size=40)


@st.composite
def edges_strategy(draw: st.DrawFn) -> Edges:
    values = draw(st.lists(st.floats(-100, 100, allow_nan=False), min_size=2, max_size=12, unique=True))
    values.sort()
    return Edges.from_values(values)


@st.composite
def mixed_values(draw: st.DrawFn, edges: Edges, max_size: int = 60) -> list[float]:
    """Values that hit every case: exact edges, their float neighbours, tails, +-inf, NaN."""
    e = edges.tolist()
    specials = [
        *e,
        *(float(np.nextafter(v, np.inf)) for v in e),
        *(float(np.nextafter(v, -np.inf)) for v in e),
        math.inf,
        -math.inf,
        math.nan,
        e[0] - 1.0,
        e[-1] + 1.0,
    ]
    item = st.one_of(st.sampled_from(specials), st.floats(e[0] - 5, e[-1] + 5, allow_nan=False))
    return draw(st.lists(item, max_size=max_size))


# -- errors ----------------------------------------------------------------------------------------


def test_every_error_is_a_drift_layout_error_and_a_value_error() -> None:
    for cls in (
        InvalidEdgesError,
        InvalidInputError,
        InvalidSummaryError,
        UnsupportedLayoutError,
        EdgesMismatchError,
        CategoryCapMismatchError,
        FeatureMismatchError,
        MomentOverflowError,
    ):
        assert issubclass(cls, DriftLayoutError)
        assert issubclass(cls, ValueError)


def test_invalid_summary_error_keeps_field_through_pickle() -> None:
    err = InvalidSummaryError("features['t'].counts", "must be an array but is str")
    clone = pickle.loads(pickle.dumps(err))
    assert clone.field == "features['t'].counts"
    assert str(clone) == str(err)


# -- edges -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ([1.0], "at least 2"),
        ([], "at least 2"),
        ([0.0, math.nan, 2.0], "finite"),
        ([0.0, math.inf], "finite"),
        ([0.0, 2.0, 1.0], "strictly increasing"),
        ([0.0, 1.0, 1.0], "strictly increasing"),
        ([[0.0, 1.0], [2.0, 3.0]], "one-dimensional"),
        (["a", "b"], "real numbers"),
        (list(range(MAX_BINS + 2)), "maximum"),
    ],
)
def test_invalid_edges_rejected_with_reason(values: list[Any], fragment: str) -> None:
    with pytest.raises(InvalidEdgesError, match=fragment):
        Edges(values)


def test_max_bins_edges_accepted() -> None:
    assert Edges(np.arange(MAX_BINS + 1)).bins == MAX_BINS


def test_edges_equal_and_hash_by_value_including_negative_zero() -> None:
    a = Edges.from_values([-0.0, 1.0, 2.0])
    b = Edges(np.array([0.0, 1.0, 2.0]))
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != Edges.from_values([0.0, 1.0, 3.0])
    assert a.tolist() == [0.0, 1.0, 2.0]
    assert all(type(v) is float for v in a.tolist())


def test_edges_are_immutable_and_copied_from_input() -> None:
    source = np.array([0.0, 1.0, 2.0])
    edges = Edges(source)
    source[0] = -5.0
    assert edges.lo == 0.0
    with pytest.raises(ValueError, match="read-only"):
        edges.values[0] = 3.0


def test_uniform_edges_end_exactly_at_hi() -> None:
    edges = Edges.uniform(0.1, 0.7, 3)
    assert edges.bins == 3
    assert edges.lo == 0.1
    assert edges.hi == 0.7
    assert len(edges) == 4


@pytest.mark.parametrize(("lo", "hi", "bins"), [(1.0, 1.0, 3), (2.0, 1.0, 3), (0.0, math.inf, 3), (0, 1, 0)])
def test_uniform_edges_reject_bad_arguments(lo: float, hi: float, bins: int) -> None:
    with pytest.raises(InvalidEdgesError):
        Edges.uniform(lo, hi, bins)


def test_uniform_edges_reject_too_many_bins() -> None:
    with pytest.raises(InvalidEdgesError, match="between 1 and"):
        Edges.uniform(0.0, 1.0, MAX_BINS + 1)


def test_quantile_edges_span_the_sample_so_every_training_value_is_in_a_bin() -> None:
    rng = np.random.default_rng(3)
    sample = rng.lognormal(size=5000)
    edges = Edges.quantiles(sample, 10)
    assert edges.bins == 10
    assert edges.lo == sample.min()
    assert edges.hi == sample.max()
    hist = NumericHistogram.from_values(edges, sample)
    assert hist.underflow == hist.overflow == 0
    assert int(hist.counts.sum()) == sample.size
    # roughly equal mass per bin
    assert hist.counts.min() >= 450


def test_quantile_edges_deduplicate_discrete_data_and_ignore_non_finite() -> None:
    sample = np.array([1, 1, 1, 1, 2, 2, 3, math.nan, math.inf], dtype=np.float64)
    edges = Edges.quantiles(sample, 8)
    assert edges.tolist() == sorted(set(edges.tolist()))
    assert edges.lo == 1.0
    assert edges.hi == 3.0
    assert edges.bins < 8


def test_quantile_edges_of_constant_sample_make_one_closed_bin() -> None:
    edges = Edges.quantiles([4.0, 4.0, 4.0], 5)
    assert edges.bins == 1
    assert edges.lo == 4.0
    hist = NumericHistogram.from_values(edges, [4.0, 4.0])
    assert state(hist) == ([2], 0, 0, 0, 2)


def test_quantile_edges_need_a_finite_value() -> None:
    with pytest.raises(InvalidEdgesError, match="no finite values"):
        Edges.quantiles([math.nan, math.inf], 4)


# -- binning ---------------------------------------------------------------------------------------


EDGES_0_10_20_30 = Edges.from_values([0.0, 10.0, 20.0, 30.0])


def test_value_on_inner_edge_belongs_to_the_bin_it_opens() -> None:
    hist = NumericHistogram.from_values(EDGES_0_10_20_30, [0.0, 10.0, 20.0])
    assert hist.counts.tolist() == [1, 1, 1]


def test_last_edge_is_inclusive() -> None:
    hist = NumericHistogram.from_values(EDGES_0_10_20_30, [30.0])
    assert state(hist) == ([0, 0, 1], 0, 0, 0, 1)


def test_just_above_last_edge_is_overflow_and_just_below_first_is_underflow() -> None:
    values = [float(np.nextafter(30.0, np.inf)), float(np.nextafter(0.0, -np.inf))]
    hist = NumericHistogram.from_values(EDGES_0_10_20_30, values)
    assert state(hist) == ([0, 0, 0], 1, 1, 0, 2)


def test_just_below_inner_edge_stays_in_lower_bin() -> None:
    hist = NumericHistogram.from_values(EDGES_0_10_20_30, [float(np.nextafter(10.0, -np.inf))])
    assert hist.counts.tolist() == [1, 0, 0]


def test_infinities_are_under_and_overflow_but_not_finite() -> None:
    hist = NumericHistogram.from_values(EDGES_0_10_20_30, [-math.inf, math.inf, 5.0])
    assert state(hist) == ([1, 0, 0], 1, 1, 0, 1)
    assert hist.min == hist.max == hist.mean == 5.0


def test_nan_is_counted_apart_and_ignored_by_moments() -> None:
    hist = NumericHistogram.from_values(EDGES_0_10_20_30, [math.nan, 1.0, 3.0, math.nan])
    assert state(hist) == ([2, 0, 0], 0, 0, 2, 2)
    assert hist.mean == 2.0
    assert hist.m2 == 2.0
    assert hist.total == 4


def test_empty_input_changes_nothing() -> None:
    hist = NumericHistogram(EDGES_0_10_20_30)
    hist.add(np.array([], dtype=np.float64))
    hist.add([])
    assert hist == NumericHistogram(EDGES_0_10_20_30)
    assert hist.total == 0
    assert hist.min is None and hist.max is None and hist.variance is None


def test_int_bool_and_float32_inputs_are_binned_like_floats() -> None:
    ints = NumericHistogram.from_values(EDGES_0_10_20_30, np.array([0, 10, 30, 31, -1], dtype=np.int32))
    assert state(ints) == ([1, 1, 1], 1, 1, 0, 5)
    uints = NumericHistogram.from_values(EDGES_0_10_20_30, np.array([5, 25], dtype=np.uint64))
    assert uints.counts.tolist() == [1, 0, 1]
    bools = NumericHistogram.from_values(Edges.from_values([0.0, 0.5, 1.0]), np.array([True, False, True]))
    assert bools.counts.tolist() == [1, 2]
    f32 = NumericHistogram.from_values(EDGES_0_10_20_30, np.array([9.5, 10.0], dtype=np.float32))
    assert f32.counts.tolist() == [1, 1, 0]


def test_multidimensional_input_is_flattened() -> None:
    hist = NumericHistogram.from_values(EDGES_0_10_20_30, np.array([[1.0, 11.0], [21.0, 40.0]]))
    assert state(hist) == ([1, 1, 1], 0, 1, 0, 4)


@pytest.mark.parametrize(
    "bad", [np.array(["a", "b"]), np.array([1 + 2j]), np.array([object()], dtype=object)]
)
def test_non_numeric_input_rejected_and_histogram_unchanged(bad: np.ndarray[Any, Any]) -> None:
    hist = NumericHistogram.from_values(EDGES_0_10_20_30, [1.0])
    before = hist.copy()
    with pytest.raises(InvalidInputError, match="dtype"):
        hist.add(bad)
    assert hist == before


def test_counts_are_read_only_snapshots() -> None:
    hist = NumericHistogram.from_values(EDGES_0_10_20_30, [1.0])
    snapshot = hist.counts
    with pytest.raises(ValueError, match="read-only"):
        snapshot[0] = 5
    hist.add([2.0])
    assert snapshot.tolist() == [1, 0, 0]
    assert hist.counts.tolist() == [2, 0, 0]


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), edges=edges_strategy())
def test_binning_matches_the_written_rule(data: st.DataObject, edges: Edges) -> None:
    values = data.draw(mixed_values(edges))
    hist = NumericHistogram.from_values(edges, np.array(values, dtype=np.float64))
    expected = reference_histogram(edges.tolist(), values)
    assert hist.counts.tolist() == expected["counts"]
    assert (hist.underflow, hist.overflow, hist.nan) == (
        expected["underflow"],
        expected["overflow"],
        expected["nan"],
    )
    assert hist.n == sum(1 for v in values if math.isfinite(v))
    assert hist.total == len(values)


# -- moments and merge -----------------------------------------------------------------------------


def test_merge_with_different_edges_rejected_naming_both() -> None:
    a = NumericHistogram(Edges.from_values([0.0, 1.0, 2.0]))
    b = NumericHistogram(Edges.from_values([0.0, 1.0, 3.0]))
    with pytest.raises(EdgesMismatchError) as info:
        a.merge(b)
    message = str(info.value)
    assert "2.0" in message and "3.0" in message
    assert "same baseline" in message


def test_merge_with_categorical_rejected() -> None:
    with pytest.raises(FeatureMismatchError):
        NumericHistogram(EDGES_0_10_20_30).merge(CategoricalCounts())  # type: ignore[arg-type]


@settings(deadline=None)  # the machine may be busy; correctness is what matters
@given(values=value_lists)
def test_merge_with_empty_is_identity(values: list[float]) -> None:
    a = NumericHistogram.from_values(EDGES_0_10_20_30, values)
    empty = a.empty_like()
    assert a.merge(empty) == a
    assert empty.merge(a) == a


def test_merge_does_not_change_inputs() -> None:
    a = NumericHistogram.from_values(EDGES_0_10_20_30, [1.0, 2.0])
    b = NumericHistogram.from_values(EDGES_0_10_20_30, [15.0])
    a_before, b_before = a.copy(), b.copy()
    merged = a.merge(b)
    assert a == a_before and b == b_before
    assert merged.counts.tolist() == [2, 1, 0]


@settings(deadline=None, max_examples=150)
@given(parts=st.lists(value_lists, min_size=1, max_size=5))
def test_merge_counts_equal_histogram_of_concatenation(parts: list[list[float]]) -> None:
    hists = [NumericHistogram.from_values(EDGES_0_10_20_30, p) for p in parts]
    merged = hists[0]
    for h in hists[1:]:
        merged = merged.merge(h)
    everything = [v for p in parts for v in p]
    direct = NumericHistogram.from_values(EDGES_0_10_20_30, everything)
    assert state(merged) == state(direct)
    assert merged.min == direct.min and merged.max == direct.max


@settings(deadline=None)  # the machine may be busy; correctness is what matters
@given(a=value_lists, b=value_lists)
def test_merge_is_commutative_bit_for_bit(a: list[float], b: list[float]) -> None:
    ha = NumericHistogram.from_values(EDGES_0_10_20_30, a)
    hb = NumericHistogram.from_values(EDGES_0_10_20_30, b)
    assert ha.merge(hb) == hb.merge(ha)


@settings(deadline=None)  # the machine may be busy; correctness is what matters
@given(a=value_lists, b=value_lists, c=value_lists)
def test_merge_is_associative_on_counts_and_close_on_moments(
    a: list[float], b: list[float], c: list[float]
) -> None:
    ha, hb, hc = (NumericHistogram.from_values(EDGES_0_10_20_30, v) for v in (a, b, c))
    left = ha.merge(hb).merge(hc)
    right = ha.merge(hb.merge(hc))
    assert state(left) == state(right)
    assert left.min == right.min and left.max == right.max
    scale = max((abs(v) for v in a + b + c), default=1.0)
    assert close(left.mean, right.mean, scale)
    assert close(left.m2, right.m2, scale * scale * max(left.n, 1))


@settings(deadline=None, max_examples=200)
@given(parts=st.lists(st.lists(finite_floats, min_size=0, max_size=30), min_size=1, max_size=6))
def test_merged_moments_match_numpy_mean_and_var_of_concatenation(parts: list[list[float]]) -> None:
    merged = NumericHistogram(EDGES_0_10_20_30)
    for p in parts:
        merged = merged.merge(NumericHistogram.from_values(EDGES_0_10_20_30, p))
    everything = np.array([v for p in parts for v in p], dtype=np.float64)
    if everything.size == 0:
        assert merged.n == 0 and merged.mean == 0.0 and merged.variance is None
        return
    scale = float(np.max(np.abs(everything))) or 1.0
    assert merged.n == everything.size
    assert merged.min == everything.min() and merged.max == everything.max()
    assert close(merged.mean, float(np.mean(everything)), scale)
    assert merged.variance is not None
    assert close(merged.variance, float(np.var(everything)), scale * scale)
    assert merged.min <= merged.mean <= merged.max


def test_moments_of_a_known_sample() -> None:
    hist = NumericHistogram.from_values(EDGES_0_10_20_30, [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])
    assert hist.mean == 5.0
    assert hist.m2 == 32.0
    assert hist.variance == 4.0


def test_moment_overflow_raises_and_leaves_histogram_unchanged() -> None:
    hist = NumericHistogram.from_values(EDGES_0_10_20_30, [1.0])
    before = hist.copy()
    with pytest.raises(MomentOverflowError, match="unchanged"):
        hist.add([1e300, -1e300, 1e300])
    assert hist == before


def test_histogram_is_not_hashable() -> None:
    with pytest.raises(TypeError):
        hash(NumericHistogram(EDGES_0_10_20_30))


# -- categorical -----------------------------------------------------------------------------------


def test_categorical_counts_missing_none_and_nan_and_empty_string_is_a_category() -> None:
    cat = CategoricalCounts.from_values(["a", None, "b", "a", math.nan, ""])
    assert dict(cat.counts) == {"": 1, "a": 2, "b": 1}
    assert cat.missing == 2
    assert cat.other == 0
    assert cat.total == 6


def test_categorical_accepts_unicode_arrays_of_any_shape() -> None:
    cat = CategoricalCounts.from_values(np.array([["x", "y"], ["x", "x"]]))
    assert dict(cat.counts) == {"x": 3, "y": 1}


def test_categorical_cap_keeps_smallest_names_and_pools_the_rest_in_other() -> None:
    cat = CategoricalCounts(max_categories=2)
    cat.add(["d", "c", "d"])
    assert dict(cat.counts) == {"c": 1, "d": 2}
    cat.add(["a", "z"])
    assert dict(cat.counts) == {"a": 1, "c": 1}
    assert cat.other == 3  # "d" x2 and "z"
    assert cat.total == 5


@pytest.mark.parametrize(
    "bad",
    [
        np.array([1, 2, 3]),
        np.array([b"a"]),
        ["a", 3],
        np.array([1.5, 2.5], dtype=object),
        ["a", ["nested"]],
        [np.array([1, 2]), "a"],
    ],
)
def test_categorical_rejects_non_strings_and_stays_unchanged(bad: Any) -> None:
    cat = CategoricalCounts.from_values(["a"])
    before = cat.copy()
    with pytest.raises(InvalidInputError):
        cat.add(bad)
    assert cat == before


def test_categorical_merge_with_different_caps_rejected() -> None:
    with pytest.raises(CategoryCapMismatchError, match="max_categories"):
        CategoricalCounts(max_categories=3).merge(CategoricalCounts(max_categories=4))


def test_categorical_empty_like_keeps_names_with_zero_counts() -> None:
    base = CategoricalCounts.from_values(["a", "b", "b"], max_categories=5)
    empty = base.empty_like()
    assert dict(empty.counts) == {"a": 0, "b": 0}
    assert empty.max_categories == 5
    assert empty.total == 0
    assert base.merge(empty) == base


def test_categorical_constructor_rejects_too_many_names() -> None:
    with pytest.raises(InvalidInputError, match="exceed"):
        CategoricalCounts(["a", "b", "c"], max_categories=2)


names = st.sampled_from(["a", "b", "c", "d", "e", "f", "g", "é", ""])
name_lists = st.lists(st.one_of(names, st.none()), max_size=20)


@settings(deadline=None, max_examples=150)
@given(parts=st.lists(name_lists, min_size=1, max_size=5), cap=st.integers(1, 5), data=st.data())
def test_categorical_result_does_not_depend_on_grouping_or_order(
    parts: list[list[str | None]], cap: int, data: st.DataObject
) -> None:
    everything = [v for p in parts for v in p]
    direct = CategoricalCounts.from_values(everything, max_categories=cap)
    merged = CategoricalCounts(max_categories=cap)
    for p in parts:
        merged = merged.merge(CategoricalCounts.from_values(p, max_categories=cap))
    assert merged == direct
    shuffled = data.draw(st.permutations(parts))
    reverse = CategoricalCounts(max_categories=cap)
    for p in shuffled:
        reverse = CategoricalCounts.from_values(p, max_categories=cap).merge(reverse)
    assert reverse == direct
    # exact: kept names carry their true totals, everything else is in `other`
    for name, count in direct.counts.items():
        assert count == everything.count(name)
    assert direct.missing == everything.count(None)
    assert direct.total == len(everything)


# -- dict form -------------------------------------------------------------------------------------


def roundtrips(obj: NumericHistogram | CategoricalCounts | Summary) -> None:
    data = obj.to_dict()
    assert_plain(data)
    cls = type(obj)
    via_json = json.loads(json.dumps(data, allow_nan=False))
    via_msgpack = msgpack.unpackb(msgpack.packb(data), raw=False)
    for decoded in (data, via_json, via_msgpack):
        again = cls.from_dict(decoded)
        assert again == obj
        assert again.to_dict() == data


@settings(deadline=None)  # the machine may be busy; correctness is what matters
@given(data=st.data(), edges=edges_strategy())
def test_numeric_round_trip_through_dict_json_and_msgpack(data: st.DataObject, edges: Edges) -> None:
    values = data.draw(mixed_values(edges))
    roundtrips(NumericHistogram.from_values(edges, np.array(values, dtype=np.float64)))


@settings(deadline=None)  # the machine may be busy; correctness is what matters
@given(values=name_lists, cap=st.integers(1, 5))
def test_categorical_round_trip_through_dict_json_and_msgpack(values: list[str | None], cap: int) -> None:
    roundtrips(CategoricalCounts.from_values(values, max_categories=cap))


def test_empty_numeric_dict_form_matches_the_documented_shape() -> None:
    assert NumericHistogram(Edges.from_values([0, 1])).to_dict() == {
        "kind": "numeric",
        "edges": [0.0, 1.0],
        "counts": [0],
        "underflow": 0,
        "overflow": 0,
        "nan": 0,
        "n": 0,
        "min": None,
        "max": None,
        "mean": 0.0,
        "m2": 0.0,
    }


def test_fixture_dicts_are_valid() -> None:
    assert NumericHistogram.from_dict(numeric_dict()).n == 5
    assert CategoricalCounts.from_dict(categorical_dict()).total == 6


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"counts": [3]}, "counts"),
        ({"counts": [3, 1, 0]}, "counts"),
        ({"counts": [3, -1]}, "counts[1]"),
        ({"counts": [3, 1.0]}, "counts[1]"),
        ({"counts": [3, True]}, "counts[1]"),
        ({"counts": "31"}, "counts"),
        ({"counts": [3, 2**63]}, "counts[1]"),
        ({"edges": [0.0, 2.0, 1.0]}, "edges"),
        ({"edges": [0.0, 1.0, 1.0]}, "edges"),
        ({"edges": [0.0, math.nan, 2.0]}, "edges[1]"),
        ({"edges": [0.0, 1.0, math.inf]}, "edges[2]"),
        ({"edges": [0.0, "1", 2.0]}, "edges[1]"),
        ({"edges": [0.0]}, "edges"),
        ({"edges": None}, "edges"),
        ({"kind": "categorical"}, "kind"),
        ({"underflow": -1}, "underflow"),
        ({"overflow": "0"}, "overflow"),
        ({"nan": 0.5}, "nan"),
        ({"n": None}, "n"),
        ({"n": 3}, "n"),
        ({"n": 6}, "n"),
        ({"min": "x"}, "min"),
        ({"min": None}, "min"),
        ({"min": 1.6}, "min"),
        ({"max": math.nan}, "max"),
        ({"mean": 2.0}, "mean"),
        ({"mean": True}, "mean"),
        ({"m2": -1.0}, "m2"),
        ({"mean": 10**400}, "mean"),
        ({"edges": list(range(MAX_BINS + 2))}, "edges"),
        ({"counts": [0] * (MAX_BINS + 1)}, "counts"),
        ({"m2": math.inf}, "m2"),
        ({"x": 1}, "x"),
        ({"underfow": 0}, "underfow"),
    ],
)
def test_numeric_from_dict_rejects_bad_field_and_names_it(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidSummaryError) as info:
        NumericHistogram.from_dict(numeric_dict(**overrides))
    assert info.value.field == field
    assert repr(field) in str(info.value)


@pytest.mark.parametrize("missing", ["kind", "edges", "counts", "underflow", "n", "min", "m2"])
def test_numeric_from_dict_requires_every_field(missing: str) -> None:
    data = numeric_dict()
    del data[missing]
    with pytest.raises(InvalidSummaryError, match="is missing") as info:
        NumericHistogram.from_dict(data)
    assert info.value.field == missing


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        # n == 0 needs null min/max and zero mean/m2
        ({"counts": [0, 0], "underflow": 0, "n": 0, "min": 1.0, "max": None, "mean": 0.0, "m2": 0.0}, "min"),
        (
            {"counts": [0, 0], "underflow": 0, "n": 0, "min": None, "max": None, "mean": 0.5, "m2": 0.0},
            "mean",
        ),
        # min below the first edge, yet every finite value is in range
        ({"n": 4}, "min"),
        # max above the last edge without any overflow
        ({"max": 2.5}, "max"),
        # finite values outside the edges claimed, yet min/max are inside
        ({"min": 0.0}, "n"),
        (
            {
                "counts": [1, 0],
                "underflow": 0,
                "nan": 0,
                "n": 1,
                "min": 0.5,
                "max": 0.7,
                "mean": 0.6,
                "m2": 0.0,
            },
            "max",
        ),
    ],
)
def test_numeric_from_dict_rejects_inconsistent_moments(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidSummaryError) as info:
        NumericHistogram.from_dict(numeric_dict(**overrides))
    assert info.value.field == field


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"kind": "numeric"}, "kind"),
        ({"counts": {"a": -1}}, "counts['a']"),
        ({"counts": {"a": "1"}}, "counts['a']"),
        ({"counts": ["a"]}, "counts"),
        ({"counts": {"a": 1, "b": 1, "c": 1, "d": 1, "e": 1}}, "counts"),
        ({"other": -2}, "other"),
        ({"missing": None}, "missing"),
        ({"max_categories": 0}, "max_categories"),
        ({"max_categories": 10**6}, "max_categories"),
        ({"max_categories": 4.0}, "max_categories"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_categorical_from_dict_rejects_bad_field_and_names_it(
    overrides: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidSummaryError) as info:
        CategoricalCounts.from_dict(categorical_dict(**overrides))
    assert info.value.field == field


def test_extension_keys_starting_with_x_are_ignored_and_dropped() -> None:
    data = golden_dict()
    data["x_device"] = "cam-7"
    data["features"]["temperature_c"]["x_unit"] = "celsius"
    data["features"]["weather"]["x_source"] = {"nested": [1, 2]}
    summary = Summary.from_dict(data)
    assert summary.to_dict() == golden_dict()


def test_category_names_and_feature_names_may_start_with_x() -> None:
    data = categorical_dict(counts={"x_ray": 2})
    assert dict(CategoricalCounts.from_dict(data).counts) == {"x_ray": 2}
    summary = Summary.from_dict({"layout": 1, "features": {"x_feature": categorical_dict()}})
    assert summary.names == ("x_feature",)


def test_feature_from_dict_dispatches_on_kind_and_rejects_unknown_kinds() -> None:
    assert isinstance(feature_from_dict(numeric_dict()), NumericHistogram)
    assert isinstance(feature_from_dict(categorical_dict()), CategoricalCounts)
    with pytest.raises(InvalidSummaryError, match="'numeric' or 'categorical'") as info:
        feature_from_dict({"kind": "sketch"})
    assert info.value.field == "kind"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"features": {}}, "layout"),
        ({"layout": "1", "features": {}}, "layout"),
        ({"layout": 0, "features": {}}, "layout"),
        ({"layout": 1}, "features"),
        ({"layout": 1, "features": []}, "features"),
        ({"layout": 1, "features": {}, "extra": 1}, "extra"),
        ({"layout": 1, "features": {"": numeric_dict()}}, "features['']"),
        ({"layout": 1, "features": {"t": numeric_dict(counts=[1])}}, "features['t'].counts"),
        ({"layout": 1, "features": {"t": numeric_dict(kind=None)}}, "features['t'].kind"),
        ({"layout": 1, "features": {"t": 5}}, "features['t']"),
        ({"layout": 1, "features": {"w": categorical_dict(other=-1)}}, "features['w'].other"),
        ([1, 2], "<root>"),
    ],
)
def test_summary_from_dict_rejects_bad_field_and_names_it(data: Any, field: str) -> None:
    with pytest.raises(InvalidSummaryError) as info:
        Summary.from_dict(data)
    assert info.value.field == field


def test_summary_from_newer_layout_rejected_with_upgrade_hint() -> None:
    with pytest.raises(UnsupportedLayoutError, match="upgrade") as info:
        Summary.from_dict({"layout": 2, "features": {}, "whatever": 1})
    assert info.value.field == "layout"


def test_pickle_round_trip_keeps_values_and_read_only_arrays() -> None:
    summary = Summary.from_dict(golden_dict())
    clone = pickle.loads(pickle.dumps(summary))
    assert clone == summary
    temp = clone["temperature_c"]
    assert isinstance(temp, NumericHistogram)
    with pytest.raises(ValueError, match="read-only"):
        temp.counts[0] = 1
    with pytest.raises(ValueError, match="read-only"):
        temp.edges.values[0] = 1.0
    assert pickle.loads(pickle.dumps(temp.edges)) == temp.edges


def test_summary_dict_is_strict_json() -> None:
    summary = Summary.from_dict(golden_dict())
    text = json.dumps(summary.to_dict(), allow_nan=False)
    assert json.loads(text) == golden_dict()


# -- golden file -----------------------------------------------------------------------------------


def test_golden_summary_decodes_to_the_documented_counts() -> None:
    summary = Summary.from_dict(golden_dict())
    assert summary.names == ("temperature_c", "vibration_rms", "weather")
    assert summary.numeric_names == ("temperature_c", "vibration_rms")
    temp = summary["temperature_c"]
    assert isinstance(temp, NumericHistogram)
    assert temp.edges == Edges.from_values([0, 10, 20, 30])
    # [0,10): 0, 5   [10,20): 10, 15   [20,30]: 20, 25, 30 (last edge inclusive)
    assert temp.counts.tolist() == [2, 2, 3]
    assert (temp.underflow, temp.overflow, temp.nan) == (1, 1, 1)  # -5, 35, NaN
    assert (temp.n, temp.min, temp.max, temp.mean, temp.m2) == (9, -5.0, 35.0, 15.0, 1500.0)
    assert temp.total == 10
    vib = summary["vibration_rms"]
    assert isinstance(vib, NumericHistogram)
    assert vib.counts.tolist() == [2, 2, 2, 3]
    assert (vib.underflow, vib.overflow, vib.nan, vib.n) == (0, 1, 0, 9)  # +inf: overflow, not finite
    assert (vib.mean, vib.m2) == (1.0, 3.75)
    weather = summary["weather"]
    assert isinstance(weather, CategoricalCounts)
    assert dict(weather.counts) == {"fog": 1, "rain": 2, "snow": 1}
    assert (weather.other, weather.missing, weather.max_categories) == (3, 1, 3)  # "sunny" x3 over the cap


def test_golden_summary_reencodes_to_the_identical_document() -> None:
    original = golden_dict()
    summary = Summary.from_dict(original)
    assert summary.to_dict() == original
    # byte-level (catches 15 vs 15.0 and key order)
    assert json.dumps(summary.to_dict()) == json.dumps(original)
    assert msgpack.packb(summary.to_dict()) == msgpack.packb(original)


def test_golden_summary_is_what_the_agent_computes_from_the_documented_values() -> None:
    baseline = Summary.from_dict(golden_dict())
    rows = np.column_stack([GOLDEN_TEMPERATURE, GOLDEN_VIBRATION])
    batched = Summary.empty_like(baseline)
    batched.add_rows(rows)
    batched["weather"].add(GOLDEN_WEATHER)
    per_column = Summary(
        [
            (
                "temperature_c",
                NumericHistogram.from_values(Edges.from_values([0, 10, 20, 30]), GOLDEN_TEMPERATURE),
            ),
            ("vibration_rms", NumericHistogram.from_values(Edges.uniform(0.0, 2.0, 4), GOLDEN_VIBRATION)),
            ("weather", CategoricalCounts.from_values(GOLDEN_WEATHER, max_categories=3)),
        ]
    )
    assert batched == baseline
    assert per_column == baseline
    assert json.dumps(batched.to_dict()) == json.dumps(golden_dict())


def test_layout_version_is_one() -> None:
    assert LAYOUT_VERSION == 1
    assert Summary.from_dict(golden_dict()).to_dict()["layout"] == 1


# -- summary ---------------------------------------------------------------------------------------


def make_summary(edges: dict[str, Edges], cats: dict[str, int] | None = None) -> Summary:
    features: list[tuple[str, NumericHistogram | CategoricalCounts]] = [
        (name, NumericHistogram(e)) for name, e in edges.items()
    ]
    features += [(name, CategoricalCounts(max_categories=cap)) for name, cap in (cats or {}).items()]
    return Summary(features)


def test_summary_is_an_ordered_mapping() -> None:
    summary = Summary.from_dict(golden_dict())
    assert list(summary) == ["temperature_c", "vibration_rms", "weather"]
    assert len(summary) == 3
    assert "weather" in summary
    assert summary.get("nope") is None


def test_summary_merge_with_missing_and_extra_features_rejected_naming_them() -> None:
    a = make_summary({"t": EDGES_0_10_20_30, "u": EDGES_0_10_20_30})
    b = make_summary({"t": EDGES_0_10_20_30, "v": EDGES_0_10_20_30})
    with pytest.raises(FeatureMismatchError) as info:
        a.merge(b)
    assert "['u']" in str(info.value) and "['v']" in str(info.value)


def test_summary_merge_with_reordered_features_rejected() -> None:
    a = make_summary({"t": EDGES_0_10_20_30, "u": EDGES_0_10_20_30})
    b = make_summary({"u": EDGES_0_10_20_30, "t": EDGES_0_10_20_30})
    with pytest.raises(FeatureMismatchError, match="order"):
        a.merge(b)


def test_summary_merge_with_kind_mismatch_rejected_naming_the_feature() -> None:
    a = make_summary({"t": EDGES_0_10_20_30})
    b = make_summary({}, {"t": 4})
    with pytest.raises(FeatureMismatchError, match="feature 't'"):
        a.merge(b)


def test_summary_merge_with_different_edges_names_the_feature() -> None:
    a = make_summary({"t": EDGES_0_10_20_30})
    b = make_summary({"t": Edges.uniform(0, 30, 4)})
    with pytest.raises(EdgesMismatchError, match="feature 't'"):
        a.merge(b)


def test_summary_merge_adds_every_feature_and_empty_is_identity() -> None:
    golden = Summary.from_dict(golden_dict())
    empty = Summary.empty_like(golden)
    assert golden.merge(empty) == golden
    assert empty.merge(golden) == golden
    doubled = golden.merge(golden)
    temp = doubled["temperature_c"]
    assert isinstance(temp, NumericHistogram)
    assert temp.counts.tolist() == [4, 4, 6]
    assert temp.m2 == 3000.0
    weather = doubled["weather"]
    assert isinstance(weather, CategoricalCounts)
    assert weather.other == 6


def test_empty_like_keeps_edges_caps_and_categories_with_zero_counts() -> None:
    golden = Summary.from_dict(golden_dict())
    empty = Summary.empty_like(golden)
    assert empty.names == golden.names
    for name in golden:
        mine, theirs = empty[name], golden[name]
        assert mine.total == 0
        if isinstance(mine, NumericHistogram):
            assert isinstance(theirs, NumericHistogram)
            assert mine.edges == theirs.edges
        else:
            assert isinstance(mine, CategoricalCounts) and isinstance(theirs, CategoricalCounts)
            assert mine.categories == theirs.categories
            assert mine.max_categories == theirs.max_categories
    assert golden.to_dict() == golden_dict()  # baseline untouched


def test_summary_rejects_duplicate_or_empty_names_and_wrong_types() -> None:
    h = NumericHistogram(EDGES_0_10_20_30)
    with pytest.raises(InvalidInputError, match="twice"):
        Summary([("a", h), ("a", h)])
    with pytest.raises(InvalidInputError, match="non-empty"):
        Summary({"": h})
    with pytest.raises(InvalidInputError, match="NumericHistogram or CategoricalCounts"):
        Summary({"a": [1, 2]})  # type: ignore[dict-item]


def test_summary_equality_is_order_sensitive() -> None:
    a = make_summary({"t": EDGES_0_10_20_30, "u": EDGES_0_10_20_30})
    b = make_summary({"u": EDGES_0_10_20_30, "t": EDGES_0_10_20_30})
    assert a != b
    assert a == make_summary({"t": EDGES_0_10_20_30, "u": EDGES_0_10_20_30})


def test_add_rows_rejects_wrong_shape_and_dtype_without_changing_anything() -> None:
    summary = make_summary({"t": EDGES_0_10_20_30, "u": EDGES_0_10_20_30}, {"c": 4})
    before = summary.copy()
    for bad in (np.zeros((3, 3)), np.zeros(2), np.zeros((2, 2, 2)), np.array([["a", "b"]])):
        with pytest.raises(InvalidInputError):
            summary.add_rows(bad)
    assert summary == before


def test_add_rows_moment_overflow_is_atomic_and_names_the_feature() -> None:
    summary = make_summary({"t": EDGES_0_10_20_30, "u": EDGES_0_10_20_30})
    summary.add_rows(np.array([[1.0, 2.0]]))
    before = summary.copy()
    with pytest.raises(MomentOverflowError, match="'u'"):
        summary.add_rows(np.array([[1.0, 1e300], [2.0, -1e300], [3.0, 1e300]]))
    assert summary == before


def test_add_rows_with_no_rows_or_no_numeric_features_is_a_noop() -> None:
    summary = make_summary({"t": EDGES_0_10_20_30}, {"c": 4})
    summary.add_rows(np.zeros((0, 1)))
    assert summary["t"].total == 0
    cats_only = make_summary({}, {"c": 4})
    cats_only.add_rows(np.zeros((5, 0)))
    assert cats_only["c"].total == 0


# -- batched binner --------------------------------------------------------------------------------


def per_column(edges: list[Edges], matrix: np.ndarray[Any, Any]) -> list[NumericHistogram]:
    return [NumericHistogram.from_values(e, matrix[:, j]) for j, e in enumerate(edges)]


def assert_same_as_per_column(edges: list[Edges], matrix: np.ndarray[Any, Any]) -> None:
    batched = BatchBinner(edges).histograms(matrix)
    reference = per_column(edges, matrix)
    for j, (got, want) in enumerate(zip(batched, reference, strict=True)):
        assert state(got) == state(want), f"column {j}"
        assert got.min == want.min and got.max == want.max, f"column {j}"
        column = np.asarray(matrix[:, j], dtype=np.float64)
        finite = column[np.isfinite(column)]
        scale = float(np.max(np.abs(finite))) if finite.size else 1.0
        assert close(got.mean, want.mean, scale), f"column {j}"
        assert close(got.m2, want.m2, scale * scale * max(want.n, 1)), f"column {j}"


def nasty_matrix(edges: list[Edges], rows: int, seed: int) -> np.ndarray[Any, Any]:
    """Random values plus exact edges, their float neighbours, +-inf, NaN and huge magnitudes."""
    rng = np.random.default_rng(seed)
    columns = []
    for e in edges:
        u = rng.uniform(-0.2, 1.2, rows)
        col = e.lo * (1.0 - u) + e.hi * u  # no overflow even for edges near +-1e308
        pick = rng.random(rows)
        exact = e.values[rng.integers(0, len(e), rows)]
        col = np.where(pick < 0.15, exact, col)
        col = np.where((pick >= 0.15) & (pick < 0.25), np.nextafter(exact, np.inf), col)
        col = np.where((pick >= 0.25) & (pick < 0.35), np.nextafter(exact, -np.inf), col)
        specials = rng.choice(np.array([np.nan, np.inf, -np.inf, 1e300, -1e300, 0.0, -0.0]), rows)
        col = np.where((pick >= 0.35) & (pick < 0.40), specials, col)
        columns.append(col)
    return np.column_stack(columns)


def test_batched_binner_equals_per_column_add_on_random_data_with_nan_and_inf() -> None:
    rng = np.random.default_rng(11)
    sample = rng.standard_normal((5000, 8)) * [1, 10, 100, 1e-3, 1e6, 1, 3, 7] + [0, 5, -50, 0, 1e7, 0, 0, 0]
    edges = [Edges.quantiles(sample[:, j], 20) for j in range(6)]
    edges += [Edges.uniform(-3, 3, 7), Edges.from_values([-1.0, 0.0, 0.001, 2.0, 1000.0])]
    edges += [Edges.quantiles(np.exp(3.0 * sample[:, 0]), 20)]  # heavy tail: counted by the fallback
    binner = BatchBinner(edges)
    assert binner.fallback_columns == (7, 8)  # uneven edges are counted by sorting
    matrix = nasty_matrix(edges, 20_000, seed=12)  # several chunks
    matrix = np.where(np.abs(matrix) > 1e299, 1e9, matrix)  # keep the moments finite
    assert_same_as_per_column(edges, matrix)


def test_batched_binner_fallback_columns_are_exact_too() -> None:
    edges = [
        Edges.from_values([0.0, 1e-12, 1.0]),  # one bin far narrower than the range: LUT would be huge
        Edges.from_values([1e15, 1e15 + 0.25, 1e15 + 0.5]),  # cells finer than the rounding of x * s
        Edges.from_values([-1e308, 0.0, 1e308]),  # range overflows float64
        Edges.uniform(0.0, 1.0, 10),
    ]
    binner = BatchBinner(edges)
    assert binner.fallback_columns == (0, 1, 2)
    matrix = nasty_matrix(edges, 3000, seed=5)
    matrix[:, :2] = np.where(np.abs(matrix[:, :2]) > 1e299, 0.0, matrix[:, :2])
    matrix[:, 2] = np.where(np.isfinite(matrix[:, 2]), matrix[:, 2] * 1e-160, matrix[:, 2])
    matrix[:, 3] = np.where(np.abs(matrix[:, 3]) > 1e299, 0.5, matrix[:, 3])
    assert_same_as_per_column(edges, matrix)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edges=st.lists(edges_strategy(), min_size=1, max_size=4),
    rows=st.integers(0, 300),
    seed=st.integers(0, 2**32 - 1),
)
def test_batched_binner_equals_per_column_add_property(edges: list[Edges], rows: int, seed: int) -> None:
    matrix = nasty_matrix(edges, rows, seed)
    matrix = np.where(np.abs(matrix) > 1e299, 0.0, matrix)
    assert_same_as_per_column(edges, matrix)


any_float = st.one_of(st.floats(-1e6, 1e6), st.sampled_from([math.nan, math.inf, -math.inf, 10.0, 30.0]))


@settings(max_examples=40, deadline=None)
@given(matrix=hnp.arrays(np.float64, st.tuples(st.integers(0, 40), st.just(3)), elements=any_float))
def test_batched_binner_equals_per_column_add_on_arbitrary_floats(matrix: np.ndarray[Any, Any]) -> None:
    edges = [EDGES_0_10_20_30, Edges.uniform(-1e6, 1e6, 64), Edges.from_values([-1.0, 0.0, 1.0])]
    assert_same_as_per_column(edges, matrix)


def test_batched_binner_accepts_int_and_fortran_ordered_matrices() -> None:
    edges = [EDGES_0_10_20_30, Edges.uniform(-5, 5, 10)]
    ints = np.array([[0, -5], [10, 5], [30, 6], [31, -6], [29, 0]], dtype=np.int64)
    assert_same_as_per_column(edges, ints)
    fortran = np.asfortranarray(nasty_matrix(edges, 5000, seed=3))
    fortran = np.where(np.abs(fortran) > 1e299, 0.0, fortran)
    assert_same_as_per_column(edges, np.asfortranarray(fortran))


def test_add_rows_equals_per_column_add_and_accumulates() -> None:
    rng = np.random.default_rng(7)
    train = rng.normal(size=(2000, 3))
    baseline = Summary(
        [
            ("a", NumericHistogram.from_values(Edges.quantiles(train[:, 0], 10), train[:, 0])),
            ("kind", CategoricalCounts.from_values(["x", "y"])),
            ("b", NumericHistogram.from_values(Edges.quantiles(train[:, 1], 10), train[:, 1])),
            ("c", NumericHistogram.from_values(Edges.uniform(-2, 2, 8), train[:, 2])),
        ]
    )
    window = Summary.empty_like(baseline)
    reference = Summary.empty_like(baseline)
    for seed in range(3):
        numeric = [baseline[name] for name in baseline.numeric_names]
        batch = nasty_matrix([h.edges for h in numeric if isinstance(h, NumericHistogram)], 1500, seed)
        batch = np.where(np.abs(batch) > 1e299, 0.0, batch)
        window.add_rows(batch)
        for j, name in enumerate(window.numeric_names):
            reference[name].add(batch[:, j])
    for name in window.numeric_names:
        got, want = window[name], reference[name]
        assert isinstance(got, NumericHistogram) and isinstance(want, NumericHistogram)
        assert state(got) == state(want)
        assert close(got.mean, want.mean, 10.0)
    assert window["kind"].total == 0
