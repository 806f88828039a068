"""Fixed-edge histogram of one numeric feature, with exact counts and mergeable running moments.

A :class:`NumericHistogram` is a mutable accumulator: :meth:`NumericHistogram.add` folds a batch of
values into it in place (vectorised: one sort of the batch, no Python loop per value), while
:meth:`NumericHistogram.merge` returns a *new* histogram combining two of them. Counts merge exactly
(integer addition), so device windows can be merged on the server in any order and grouping. Moments
(``n``, ``min``, ``max``, ``mean``, ``m2``) of the *finite* values use Chan et al.'s parallel formula,
written symmetrically so ``a.merge(b)`` and ``b.merge(a)`` are bit-for-bit equal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import numpy as np
from numpy.typing import ArrayLike, NDArray

from agent.drift._validate import (
    JsonValue,
    check_keys,
    join,
    read_count,
    read_float,
    read_float_list,
    read_int_list,
    read_mapping,
    read_optional_float,
)
from agent.drift.edges import MAX_BINS, Edges
from agent.drift.errors import (
    EdgesMismatchError,
    FeatureMismatchError,
    InvalidEdgesError,
    InvalidInputError,
    InvalidSummaryError,
    MomentOverflowError,
)

__all__ = ["NUMERIC_KIND", "NumericHistogram"]

NUMERIC_KIND: Final = "numeric"
"""Value of the ``kind`` field of a numeric histogram's dict form."""

_NUMERIC_FIELDS: Final = frozenset(
    {"kind", "edges", "counts", "underflow", "overflow", "nan", "n", "min", "max", "mean", "m2"}
)


@dataclass(frozen=True, slots=True)
class Moments:
    """Moments of the finite values seen so far (package-internal value object).

    ``n`` finite values, their ``min``/``max`` (``None`` when ``n == 0``), ``mean`` and ``m2`` (sum of
    squared deviations from the mean). ``mean`` is kept inside ``[min, max]`` (clamped after rounding),
    and ``n == 0`` means ``mean == m2 == 0.0``.
    """

    n: int = 0
    min: float | None = None
    max: float | None = None
    mean: float = 0.0
    m2: float = 0.0

    @staticmethod
    def of(finite: NDArray[np.float64]) -> Moments:
        """Two-pass moments of an array of finite float64 values (pairwise-summed mean)."""
        n = int(finite.size)
        if n == 0:
            return EMPTY_MOMENTS
        with np.errstate(over="ignore", invalid="ignore"):
            lo, hi = float(finite.min()), float(finite.max())
            mean = min(max(float(np.mean(finite)), lo), hi)
            dev = finite - mean
            m2 = float(np.dot(dev, dev))
        _check_finite(mean, m2, lo, hi)
        return Moments(n, lo, hi, mean, m2)

    def combine(self, other: Moments) -> Moments:
        """Chan's parallel combination; commutative bit-for-bit, the empty moments are the identity."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        assert self.min is not None and self.max is not None
        assert other.min is not None and other.max is not None
        n = self.n + other.n
        lo, hi = min(self.min, other.min), max(self.max, other.max)
        mean = self.mean * (self.n / n) + other.mean * (other.n / n)
        mean = min(max(mean, lo), hi)
        delta = other.mean - self.mean
        m2 = (self.m2 + other.m2) + delta * delta * ((self.n * other.n) / n)
        _check_finite(mean, m2, lo, hi)
        return Moments(n, lo, hi, mean, m2)


EMPTY_MOMENTS: Final = Moments()


def _check_finite(mean: float, m2: float, lo: float, hi: float) -> None:
    if not (math.isfinite(mean) and math.isfinite(m2)):
        raise MomentOverflowError(
            f"running moments overflowed float64 (finite values range from {lo!r} to {hi!r}); the "
            "histogram was left unchanged. Rescale the feature (e.g. other units) or drop corrupt values"
        )


def as_float_values(values: ArrayLike) -> NDArray[np.float64]:
    """``values`` flattened to a float64 array; bool/int/uint/float dtypes only."""
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"numeric values must be an array of numbers: {exc}") from exc
    if arr.size == 0:
        return np.zeros(0, dtype=np.float64)
    if arr.dtype.kind not in "biuf":
        raise InvalidInputError(
            f"numeric features take bool/int/float values, got dtype {arr.dtype}; convert the column "
            "(e.g. np.asarray(col, dtype=float)) or summarise it as a categorical feature"
        )
    return arr.astype(np.float64, copy=False).ravel()


class NumericHistogram:
    """Counts of one numeric feature over fixed :class:`Edges`, plus moments of its finite values.

    Fields (also the dict form, see :meth:`to_dict`):

    * ``counts[i]``: values in bin ``i`` (int64), ``underflow`` / ``overflow`` / ``nan``: values below
      the first edge (incl. ``-inf``), above the last edge (incl. ``+inf``), NaN;
    * ``n``: number of *finite* values (in-range values plus finite under/overflow values, i.e.
      ``total - nan - (number of +-inf)``), with their ``min``, ``max``, ``mean`` and ``m2``.

    Invariants: ``sum(counts) <= n <= sum(counts) + underflow + overflow``; ``n == 0`` iff ``min`` and
    ``max`` are ``None`` (then ``mean == m2 == 0.0``); otherwise ``min <= mean <= max`` and ``m2 >= 0``.

    The object is mutable through :meth:`add` only; arrays it hands out are read-only snapshots.
    """

    kind: ClassVar[str] = NUMERIC_KIND
    __slots__ = ("_counts", "_edges", "_moments", "_nan", "_overflow", "_underflow")

    _edges: Edges
    _counts: NDArray[np.int64]
    _underflow: int
    _overflow: int
    _nan: int
    _moments: Moments

    def __init__(self, edges: Edges) -> None:
        """An empty histogram over ``edges``."""
        if not isinstance(edges, Edges):
            raise InvalidEdgesError(
                f"NumericHistogram needs an Edges instance, got {type(edges).__name__}; build one with "
                "Edges.uniform, Edges.quantiles or Edges.from_values"
            )
        self._edges = edges
        self._set(_frozen(np.zeros(edges.bins, dtype=np.int64)), 0, 0, 0, EMPTY_MOMENTS)

    @classmethod
    def from_values(cls, edges: Edges, values: ArrayLike) -> NumericHistogram:
        """A histogram over ``edges`` holding ``values`` (e.g. the training column of a baseline)."""
        hist = cls(edges)
        hist.add(values)
        return hist

    @classmethod
    def _from_parts(
        cls,
        edges: Edges,
        counts: NDArray[np.integer[Any]],
        *,
        underflow: int,
        overflow: int,
        nan: int,
        moments: Moments,
    ) -> NumericHistogram:
        hist = cls.__new__(cls)
        hist._edges = edges
        hist._set(_frozen(counts), underflow, overflow, nan, moments)
        return hist

    def _set(self, counts: NDArray[np.int64], underflow: int, overflow: int, nan: int, mom: Moments) -> None:
        self._counts = counts
        self._underflow = underflow
        self._overflow = overflow
        self._nan = nan
        self._moments = mom

    def _assign(self, other: NumericHistogram) -> None:
        """Take over ``other``'s state (same edges); used to commit batched updates atomically."""
        self._set(other._counts, other._underflow, other._overflow, other._nan, other._moments)

    # -- accessors ----------------------------------------------------------------------------------

    @property
    def edges(self) -> Edges:
        """The bin edges (shared with the baseline the histogram was built from)."""
        return self._edges

    @property
    def bins(self) -> int:
        """Number of bins."""
        return self._edges.bins

    @property
    def counts(self) -> NDArray[np.int64]:
        """Per-bin counts (read-only int64 array of length ``bins``)."""
        return self._counts

    @property
    def underflow(self) -> int:
        """Values below the first edge, including ``-inf``."""
        return self._underflow

    @property
    def overflow(self) -> int:
        """Values above the last edge, including ``+inf``."""
        return self._overflow

    @property
    def nan(self) -> int:
        """NaN values."""
        return self._nan

    @property
    def total(self) -> int:
        """All values seen: ``sum(counts) + underflow + overflow + nan``."""
        return int(self._counts.sum()) + self._underflow + self._overflow + self._nan

    @property
    def n(self) -> int:
        """Number of finite values (the population of the moments)."""
        return self._moments.n

    @property
    def min(self) -> float | None:
        """Smallest finite value, ``None`` if there is none."""
        return self._moments.min

    @property
    def max(self) -> float | None:
        """Largest finite value, ``None`` if there is none."""
        return self._moments.max

    @property
    def mean(self) -> float:
        """Mean of the finite values (``0.0`` if there are none)."""
        return self._moments.mean

    @property
    def m2(self) -> float:
        """Sum of squared deviations of the finite values from their mean."""
        return self._moments.m2

    @property
    def variance(self) -> float | None:
        """Population variance ``m2 / n`` of the finite values, ``None`` when ``n == 0``."""
        mom = self._moments
        return mom.m2 / mom.n if mom.n else None

    # -- updates ------------------------------------------------------------------------------------

    def add(self, values: ArrayLike) -> None:
        """Fold ``values`` (any shape; bool/int/float dtype; flattened) into the histogram in place.

        Vectorised: one ``np.sort`` of the batch, then the edges are located in the sorted values (see
        :meth:`Edges._count`); moments are two-pass over the finite values. Raises
        :class:`InvalidInputError` for non-numeric input and :class:`MomentOverflowError` if the moments
        would overflow; in both cases the histogram is unchanged.
        """
        x = as_float_values(values)
        if x.size == 0:
            return
        bins = self._edges.bins
        slot_counts = self._edges._count(x)
        finite_mask = np.isfinite(x)
        moments = self._moments.combine(Moments.of(x if finite_mask.all() else x[finite_mask]))
        self._set(
            _frozen(self._counts + slot_counts[1 : bins + 1]),
            self._underflow + int(slot_counts[0]),
            self._overflow + int(slot_counts[bins + 1]),
            self._nan + int(slot_counts[bins + 2]),
            moments,
        )

    def merge(self, other: NumericHistogram) -> NumericHistogram:
        """A new histogram holding the values of both; neither input changes.

        Counts add exactly; moments combine with Chan's formula. Raises :class:`EdgesMismatchError`
        (naming both edge lists) when the edges differ, because bins of different edges do not measure
        the same thing.
        """
        if not isinstance(other, NumericHistogram):
            raise FeatureMismatchError(
                f"cannot merge a numeric histogram with {type(other).__name__}; the feature must have "
                "the same kind on both sides (build both from the same baseline)"
            )
        if self._edges != other._edges:
            raise EdgesMismatchError(
                f"cannot merge histograms with different bin edges: this one has {self._edges!r}, the other "
                f"{other._edges!r}; build both from the same baseline (Summary.empty_like(baseline))"
            )
        return NumericHistogram._from_parts(
            self._edges,
            self._counts + other._counts,
            underflow=self._underflow + other._underflow,
            overflow=self._overflow + other._overflow,
            nan=self._nan + other._nan,
            moments=self._moments.combine(other._moments),
        )

    def empty_like(self) -> NumericHistogram:
        """An empty histogram over the same edges."""
        return NumericHistogram(self._edges)

    def copy(self) -> NumericHistogram:
        """An independent histogram with the same state."""
        return NumericHistogram._from_parts(
            self._edges,
            self._counts,
            underflow=self._underflow,
            overflow=self._overflow,
            nan=self._nan,
            moments=self._moments,
        )

    # -- dict form ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, JsonValue]:
        """The plain-Python dict form (str keys; int/float/list/None values), for JSON and msgpack."""
        mom = self._moments
        return {
            "kind": NUMERIC_KIND,
            "edges": list(self._edges.tolist()),
            "counts": [int(c) for c in self._counts],
            "underflow": self._underflow,
            "overflow": self._overflow,
            "nan": self._nan,
            "n": mom.n,
            "min": mom.min,
            "max": mom.max,
            "mean": mom.mean,
            "m2": mom.m2,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NumericHistogram:
        """Validate and decode the dict form; raise :class:`InvalidSummaryError` naming the bad field.

        Unknown keys are rejected except those starting with ``x_``, which are ignored (and dropped).
        """
        return cls._from_dict(data, "")

    @classmethod
    def _from_dict(cls, data: object, path: str) -> NumericHistogram:
        obj = read_mapping(data, path, "a numeric histogram")
        check_keys(obj, path, _NUMERIC_FIELDS)
        if obj["kind"] != NUMERIC_KIND:
            raise InvalidSummaryError(join(path, "kind"), f"must be {NUMERIC_KIND!r} but is {obj['kind']!r}")
        edge_values = read_float_list(obj["edges"], join(path, "edges"), max_len=MAX_BINS + 1)
        try:
            edges = Edges(edge_values)
        except InvalidEdgesError as exc:
            raise InvalidSummaryError(join(path, "edges"), f"is invalid: {exc}") from exc
        counts_list = read_int_list(obj["counts"], join(path, "counts"), max_len=MAX_BINS)
        if len(counts_list) != edges.bins:
            raise InvalidSummaryError(
                join(path, "counts"),
                f"must have len(edges) - 1 = {edges.bins} entries but has {len(counts_list)}",
            )
        underflow = read_count(obj["underflow"], join(path, "underflow"))
        overflow = read_count(obj["overflow"], join(path, "overflow"))
        nan = read_count(obj["nan"], join(path, "nan"))
        n = read_count(obj["n"], join(path, "n"))
        lo = read_optional_float(obj["min"], join(path, "min"))
        hi = read_optional_float(obj["max"], join(path, "max"))
        mean = read_float(obj["mean"], join(path, "mean"))
        m2 = read_float(obj["m2"], join(path, "m2"))
        moments = Moments(n, lo, hi, mean, m2)
        _check_consistency(
            path, edges, in_range=sum(counts_list), underflow=underflow, overflow=overflow, moments=moments
        )
        counts = np.array(counts_list, dtype=np.int64)
        return cls._from_parts(
            edges, counts, underflow=underflow, overflow=overflow, nan=nan, moments=moments
        )

    # -- value semantics ----------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        """Equal when edges, every count and every moment are equal."""
        if not isinstance(other, NumericHistogram):
            return NotImplemented
        return (
            self._edges == other._edges
            and bool(np.array_equal(self._counts, other._counts))
            and self._underflow == other._underflow
            and self._overflow == other._overflow
            and self._nan == other._nan
            and self._moments == other._moments
        )

    __hash__ = None  # type: ignore[assignment]  # mutable accumulator

    def __reduce__(self) -> tuple[Any, tuple[dict[str, JsonValue]]]:
        """Pickle through the dict form, so unpickled arrays are read-only again."""
        return (NumericHistogram.from_dict, (self.to_dict(),))

    def __repr__(self) -> str:
        """Summary line for logs."""
        return (
            f"NumericHistogram(edges={self._edges!r}, total={self.total}, underflow={self._underflow}, "
            f"overflow={self._overflow}, nan={self._nan}, n={self.n}, mean={self.mean!r})"
        )


def _frozen(arr: NDArray[np.integer[Any]]) -> NDArray[np.int64]:
    """A read-only int64 copy of ``arr`` (counts are small; copying keeps snapshots independent)."""
    out = np.array(arr, dtype=np.int64, copy=True)
    out.setflags(write=False)
    return out


def _check_consistency(
    path: str, edges: Edges, *, in_range: int, underflow: int, overflow: int, moments: Moments
) -> None:
    """Cross-field checks of a decoded numeric histogram (everything the fields let us verify)."""
    n, lo, hi, mean, m2 = moments.n, moments.min, moments.max, moments.mean, moments.m2
    if not in_range <= n <= in_range + underflow + overflow:
        raise InvalidSummaryError(
            join(path, "n"),
            f"is {n} but must be between sum(counts) = {in_range} and sum(counts) + underflow + overflow = "
            f"{in_range + underflow + overflow} (n counts the finite values)",
        )
    if n == 0:
        for key, value in (("min", lo), ("max", hi)):
            if value is not None:
                raise InvalidSummaryError(join(path, key), f"must be null when n == 0 but is {value!r}")
        for key, value in (("mean", mean), ("m2", m2)):
            if value != 0.0:
                raise InvalidSummaryError(join(path, key), f"must be 0.0 when n == 0 but is {value!r}")
        return
    if lo is None or hi is None:
        raise InvalidSummaryError(
            join(path, "min" if lo is None else "max"), f"must be a number when n = {n} > 0"
        )
    if lo > hi:
        raise InvalidSummaryError(join(path, "min"), f"({lo!r}) is greater than max ({hi!r})")
    if not lo <= mean <= hi:
        raise InvalidSummaryError(join(path, "mean"), f"({mean!r}) is outside [min, max] = [{lo!r}, {hi!r}]")
    if m2 < 0.0:
        raise InvalidSummaryError(join(path, "m2"), f"is a sum of squares and cannot be negative ({m2!r})")
    if n == 1 and lo != hi:
        raise InvalidSummaryError(join(path, "max"), f"must equal min when n == 1 (min={lo!r}, max={hi!r})")
    all_in_range = n == in_range  # no finite value outside the edges
    if lo < edges.lo and (underflow == 0 or all_in_range):
        raise InvalidSummaryError(
            join(path, "min"),
            f"({lo!r}) is below the first edge ({edges.lo!r}) but no finite underflow is counted",
        )
    if hi > edges.hi and (overflow == 0 or all_in_range):
        raise InvalidSummaryError(
            join(path, "max"),
            f"({hi!r}) is above the last edge ({edges.hi!r}) but no finite overflow is counted",
        )
    if n > in_range and edges.lo <= lo and hi <= edges.hi:
        raise InvalidSummaryError(
            join(path, "n"),
            f"({n}) says {n - in_range} finite values fell outside the edges, but min ({lo!r}) and max "
            f"({hi!r}) are inside [{edges.lo!r}, {edges.hi!r}]",
        )
    if in_range > 0 and (lo > edges.hi or hi < edges.lo):
        raise InvalidSummaryError(
            join(path, "min" if lo > edges.hi else "max"),
            f"puts every finite value outside the edges [{edges.lo!r}, {edges.hi!r}] but counts has "
            f"{in_range} in-range values",
        )
