"""The drift summary: an ordered mapping feature name -> histogram/counts, and its versioned dict form.

A :class:`Summary` is what a device reports for a window of inference inputs, what the fleet server
merges across windows and devices, and what a model bundle stores as its training baseline. All three
use the same layout (``LAYOUT_VERSION``), so they are directly comparable::

    {"layout": 1, "features": {"temp": {"kind": "numeric", ...}, "weather": {"kind": "categorical", ...}}}

Feature order is part of the layout: :meth:`Summary.add_rows` takes one column per *numeric* feature in
summary order, and two summaries only merge when names, order and kinds agree. Python's ``json`` and
``msgpack`` keep the order of the ``features`` object.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final, TypeAlias

from numpy.typing import ArrayLike

from agent.drift._validate import JsonValue, check_keys, join, read_int, read_mapping
from agent.drift.batch import BatchBinner
from agent.drift.categorical import CATEGORICAL_KIND, CategoricalCounts
from agent.drift.errors import (
    FeatureMismatchError,
    InvalidInputError,
    InvalidSummaryError,
    MergeMismatchError,
    MomentOverflowError,
    UnsupportedLayoutError,
)
from agent.drift.numeric import NUMERIC_KIND, NumericHistogram

__all__ = ["LAYOUT_VERSION", "FeatureSummary", "Summary", "feature_from_dict"]

LAYOUT_VERSION: Final = 1
"""Version of the dict form written by :meth:`Summary.to_dict` (the ``layout`` field).

Bump it for any change an old reader would misread; additive, ignorable extras go in ``x_`` keys.
"""

FeatureSummary: TypeAlias = NumericHistogram | CategoricalCounts
"""What a summary holds per feature."""

_SUMMARY_FIELDS: Final = frozenset({"layout", "features"})


def feature_from_dict(data: Mapping[str, Any]) -> FeatureSummary:
    """Decode one feature's dict form, dispatching on its ``kind`` field."""
    return _feature_from_dict(data, "")


def _feature_from_dict(data: object, path: str) -> FeatureSummary:
    obj = read_mapping(data, path, "a feature summary")
    kind = obj.get("kind")
    if kind == NUMERIC_KIND:
        return NumericHistogram._from_dict(obj, path)
    if kind == CATEGORICAL_KIND:
        return CategoricalCounts._from_dict(obj, path)
    raise InvalidSummaryError(
        join(path, "kind"),
        f"must be {NUMERIC_KIND!r} or {CATEGORICAL_KIND!r} but is {kind!r}",
        "this reader knows only those two kinds; a new kind needs a new layout version",
    )


def _merge_feature(mine: FeatureSummary, theirs: FeatureSummary) -> FeatureSummary:
    if isinstance(mine, NumericHistogram) and isinstance(theirs, NumericHistogram):
        return mine.merge(theirs)
    if isinstance(mine, CategoricalCounts) and isinstance(theirs, CategoricalCounts):
        return mine.merge(theirs)
    raise FeatureMismatchError(
        f"is {mine.kind} on one side and {theirs.kind} on the other; "
        "build both summaries from the same baseline"
    )


class Summary(Mapping[str, FeatureSummary]):
    """Ordered mapping feature name -> :class:`NumericHistogram` | :class:`CategoricalCounts`.

    The summary holds the accumulators it is given (no copy) and its feature set is fixed; update the
    features through :meth:`add_rows` (all numeric features at once) or ``summary[name].add(values)``.
    Equality is order-sensitive (order is part of the layout); summaries are not hashable.
    """

    __slots__ = ("_binner", "_features")

    def __init__(self, features: Mapping[str, FeatureSummary] | Iterable[tuple[str, FeatureSummary]]) -> None:
        """Build from a mapping or ``(name, feature)`` pairs; names must be unique non-empty strings."""
        pairs = features.items() if isinstance(features, Mapping) else features
        table: dict[str, FeatureSummary] = {}
        for name, feature in pairs:
            if not isinstance(name, str) or not name:
                raise InvalidInputError(f"feature names must be non-empty strings, got {name!r}")
            if name in table:
                raise InvalidInputError(f"feature {name!r} appears twice; feature names must be unique")
            if not isinstance(feature, NumericHistogram | CategoricalCounts):
                raise InvalidInputError(
                    f"feature {name!r} must be a NumericHistogram or CategoricalCounts, "
                    f"got {type(feature).__name__}"
                )
            table[name] = feature
        self._features = table
        self._binner: BatchBinner | None = None

    # -- mapping ------------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> FeatureSummary:
        """The accumulator of feature ``name``."""
        return self._features[name]

    def __iter__(self) -> Iterator[str]:
        """Feature names in layout order."""
        return iter(self._features)

    def __len__(self) -> int:
        """Number of features."""
        return len(self._features)

    @property
    def names(self) -> tuple[str, ...]:
        """All feature names, in layout order."""
        return tuple(self._features)

    @property
    def numeric_names(self) -> tuple[str, ...]:
        """Names of the numeric features in layout order: the columns :meth:`add_rows` expects."""
        return tuple(name for name, f in self._features.items() if isinstance(f, NumericHistogram))

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def empty_like(cls, baseline: Summary) -> Summary:
        """A summary with the baseline's features, edges, caps and category names but zero counts.

        This is how a device starts a window: binning against the baseline's edges is what makes the
        window comparable with the training data and mergeable with other devices' windows.
        """
        if not isinstance(baseline, Summary):
            raise InvalidInputError(f"empty_like needs a Summary baseline, got {type(baseline).__name__}")
        return cls((name, feature.empty_like()) for name, feature in baseline._features.items())

    def copy(self) -> Summary:
        """An independent copy (features copied too)."""
        return Summary((name, feature.copy()) for name, feature in self._features.items())

    # -- updates ------------------------------------------------------------------------------------

    def add_rows(self, matrix: ArrayLike) -> None:
        """Add a 2-D array (rows x numeric features, columns in :attr:`numeric_names` order) in place.

        Uses a cached :class:`BatchBinner`: one ``np.bincount`` over all features per chunk. Atomic: on
        any error (shape, dtype, moment overflow) no feature changes. Categorical features are not
        touched; update them with ``summary[name].add(values)``.
        """
        names = self.numeric_names
        if self._binner is None:
            edges = [self._numeric(name).edges for name in names]
            self._binner = BatchBinner(edges, names=[f"feature {name!r}" for name in names])
        batch = self._binner.histograms(matrix)
        merged: list[NumericHistogram] = []
        for name, part in zip(names, batch, strict=True):
            try:
                merged.append(self._numeric(name).merge(part))
            except MomentOverflowError as exc:
                raise MomentOverflowError(f"feature {name!r}: {exc}") from exc
        for name, result in zip(names, merged, strict=True):
            self._numeric(name)._assign(result)

    def _numeric(self, name: str) -> NumericHistogram:
        feature = self._features[name]
        assert isinstance(feature, NumericHistogram)
        return feature

    def merge(self, other: Summary) -> Summary:
        """A new summary merging every feature (exact counts); neither input changes.

        Requires the same feature names in the same order with the same kinds, else raises
        :class:`FeatureMismatchError` naming the missing/extra/misordered features; feature-level
        mismatches (edges, caps) raise their own error prefixed with the feature name.
        """
        if not isinstance(other, Summary):
            raise FeatureMismatchError(f"can only merge a Summary with a Summary, got {type(other).__name__}")
        self._check_same_features(other)
        merged: list[tuple[str, FeatureSummary]] = []
        for name, mine in self._features.items():
            theirs = other._features[name]
            try:
                merged.append((name, _merge_feature(mine, theirs)))
            except (MergeMismatchError, MomentOverflowError) as exc:
                raise type(exc)(f"feature {name!r}: {exc}") from exc
        return Summary(merged)

    def _check_same_features(self, other: Summary) -> None:
        mine, theirs = self.names, other.names
        if mine == theirs:
            return
        missing = [n for n in mine if n not in other._features]
        extra = [n for n in theirs if n not in self._features]
        if missing or extra:
            raise FeatureMismatchError(
                f"cannot merge summaries with different features: missing from the other {missing}, "
                f"extra in the other {extra}; both must come from the same baseline "
                "(Summary.empty_like(baseline))"
            )
        raise FeatureMismatchError(
            f"cannot merge summaries whose features are in a different order: {list(mine)} vs "
            f"{list(theirs)}; feature order is part of the layout (it is the add_rows column order)"
        )

    # -- dict form ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, JsonValue]:
        """``{"layout": 1, "features": {name: feature dict}}`` with plain Python values only."""
        features: dict[str, JsonValue] = {name: f.to_dict() for name, f in self._features.items()}
        return {"layout": LAYOUT_VERSION, "features": features}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Summary:
        """Validate and decode the dict form (e.g. ``json.loads`` / ``msgpack.unpackb`` output).

        Raises :class:`InvalidSummaryError` naming the offending field (e.g.
        ``features['temp'].counts[3]``), :class:`UnsupportedLayoutError` for another layout version.
        Unknown keys are rejected, except keys starting with ``x_`` (at the top level and inside a
        feature), which are ignored and dropped.
        """
        obj = read_mapping(data, "", "a drift summary")
        if "layout" in obj:
            version = read_int(obj["layout"], "layout", minimum=1)
            if version != LAYOUT_VERSION:
                raise UnsupportedLayoutError(
                    "layout",
                    f"is {version} but this code reads layout {LAYOUT_VERSION}",
                    "upgrade edge-fleet on the reading side (or downgrade the writer)",
                )
        check_keys(obj, "", _SUMMARY_FIELDS)
        raw = read_mapping(obj["features"], "features", "feature name -> feature summary")
        pairs: list[tuple[str, FeatureSummary]] = []
        for name, value in raw.items():
            path = f"features[{name!r}]"
            if not name:
                raise InvalidSummaryError(path, "has an empty feature name", "name every feature")
            pairs.append((name, _feature_from_dict(value, path)))
        return cls(pairs)

    # -- value semantics ----------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        """Equal when the same features appear in the same order with equal contents."""
        if not isinstance(other, Summary):
            return NotImplemented
        return list(self._features.items()) == list(other._features.items())

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, tuple[dict[str, JsonValue]]]:
        """Pickle through the dict form (the cached binner is rebuilt on demand)."""
        return (Summary.from_dict, (self.to_dict(),))

    def __repr__(self) -> str:
        """Feature names and kinds."""
        inner = ", ".join(f"{name!r}: {f.kind}" for name, f in self._features.items())
        return f"Summary({{{inner}}})"
