"""Counts of one categorical (string) feature, with a cap on the number of distinct categories.

Cap rule: at most ``max_categories`` categories are kept by name; when more distinct names have been
seen, the ones kept are the ``max_categories`` *smallest names in Unicode code-point order* and the
counts of all others are pooled in ``other``. The rule depends only on the *set* of names seen, never
on arrival order, which is what makes :meth:`CategoricalCounts.merge` exact, commutative and
associative: whichever way device windows are grouped, the merged result is the same, and the count
of every kept category is its true total. (Keeping the most frequent names instead would depend on how
the data was split, so merged results would differ between the device and the server.)

Missing values are ``None`` and float NaN in object arrays; they are counted in ``missing``. The empty
string is a category like any other.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Final

import numpy as np
from numpy.typing import ArrayLike

from agent.drift._validate import (
    JsonValue,
    check_keys,
    join,
    read_count,
    read_int,
    read_mapping,
)
from agent.drift.errors import (
    CategoryCapMismatchError,
    FeatureMismatchError,
    InvalidInputError,
    InvalidSummaryError,
)

__all__ = ["CATEGORICAL_KIND", "DEFAULT_MAX_CATEGORIES", "MAX_CATEGORIES_LIMIT", "CategoricalCounts"]

CATEGORICAL_KIND: Final = "categorical"
"""Value of the ``kind`` field of a categorical feature's dict form."""

DEFAULT_MAX_CATEGORIES: Final = 256
"""Default cap on distinct category names kept per feature."""

MAX_CATEGORIES_LIMIT: Final = 65536
"""Largest allowed ``max_categories``: keeps a summary bounded in size."""

_CATEGORICAL_FIELDS: Final = frozenset({"kind", "counts", "other", "missing", "max_categories"})
_NONE: Final = np.array([None], dtype=object)


def _check_cap(max_categories: object) -> int:
    if isinstance(max_categories, bool) or not isinstance(max_categories, int):
        raise InvalidInputError(f"max_categories must be an integer, got {max_categories!r}")
    if not 1 <= max_categories <= MAX_CATEGORIES_LIMIT:
        raise InvalidInputError(
            f"max_categories must be between 1 and {MAX_CATEGORIES_LIMIT}, got {max_categories}"
        )
    return max_categories


def _capped(counts: Mapping[str, int], other: int, cap: int) -> tuple[dict[str, int], int]:
    """Apply the cap rule: keep the ``cap`` smallest names (sorted), pool the rest into ``other``."""
    names = sorted(counts)
    kept = {name: counts[name] for name in names[:cap]}
    pooled = sum(counts[name] for name in names[cap:])
    return kept, other + pooled


class CategoricalCounts:
    """Per-category counts of a string feature, plus ``other`` (beyond the cap) and ``missing``.

    Fields (also the dict form, see :meth:`to_dict`): ``counts`` (name -> count, sorted by name; zero
    counts are allowed, e.g. baseline categories not seen yet in a device window), ``other``,
    ``missing`` and ``max_categories``. ``total = sum(counts) + other + missing``.

    The object is mutable through :meth:`add` only; :attr:`counts` returns a read-only snapshot.
    """

    kind: ClassVar[str] = CATEGORICAL_KIND
    __slots__ = ("_counts", "_max_categories", "_missing", "_other")

    _counts: dict[str, int]
    _other: int
    _missing: int
    _max_categories: int

    def __init__(
        self, categories: Iterable[str] = (), *, max_categories: int = DEFAULT_MAX_CATEGORIES
    ) -> None:
        """Empty counts, pre-registering ``categories`` with count 0 (e.g. the baseline's names)."""
        cap = _check_cap(max_categories)
        names: dict[str, int] = {}
        for name in categories:
            if not isinstance(name, str):
                raise InvalidInputError(f"category names must be str, got {type(name).__name__} ({name!r})")
            names[name] = 0
        if len(names) > cap:
            raise InvalidInputError(
                f"{len(names)} categories exceed max_categories={cap}; "
                "raise max_categories or pass fewer names"
            )
        self._max_categories = cap
        self._set(dict(sorted(names.items())), 0, 0)

    @classmethod
    def from_values(
        cls, values: ArrayLike, *, max_categories: int = DEFAULT_MAX_CATEGORIES
    ) -> CategoricalCounts:
        """Counts holding ``values`` (e.g. the training column of a baseline)."""
        counts = cls(max_categories=max_categories)
        counts.add(values)
        return counts

    def _set(self, counts: dict[str, int], other: int, missing: int) -> None:
        self._counts = counts
        self._other = other
        self._missing = missing

    # -- accessors ----------------------------------------------------------------------------------

    @property
    def counts(self) -> Mapping[str, int]:
        """Read-only name -> count mapping, sorted by name."""
        return MappingProxyType(self._counts)

    @property
    def categories(self) -> tuple[str, ...]:
        """The kept category names, sorted."""
        return tuple(self._counts)

    @property
    def other(self) -> int:
        """Values whose category was not kept because of the cap."""
        return self._other

    @property
    def missing(self) -> int:
        """Missing values (``None`` or NaN)."""
        return self._missing

    @property
    def max_categories(self) -> int:
        """The cap on kept category names."""
        return self._max_categories

    @property
    def total(self) -> int:
        """All values seen: ``sum(counts) + other + missing``."""
        return sum(self._counts.values()) + self._other + self._missing

    # -- updates ------------------------------------------------------------------------------------

    def add(self, values: ArrayLike) -> None:
        """Fold ``values`` (strings; ``None``/NaN are missing; any shape, flattened) in place.

        Vectorised: missing values are found with array comparisons and the rest counted with one
        ``np.unique``; only the distinct names are visited in Python. Non-string values raise
        :class:`InvalidInputError` (convert integer codes with ``values.astype(str)`` first) and leave
        the counts unchanged.
        """
        arr = np.asarray(values, dtype=object) if isinstance(values, list | tuple) else np.asarray(values)
        if arr.size == 0:
            return
        flat = arr.ravel()
        missing = 0
        if flat.dtype.kind == "O":
            try:
                is_missing = np.equal(flat, _NONE) | np.not_equal(flat, flat)
            except (TypeError, ValueError) as exc:
                raise InvalidInputError(
                    f"categorical values must be str (or None/NaN for missing): {exc}"
                ) from exc
            missing = int(np.count_nonzero(is_missing))
            if missing:
                flat = flat[~is_missing]
        elif flat.dtype.kind != "U":
            raise InvalidInputError(
                f"categorical features take strings, got dtype {flat.dtype}; convert codes with "
                "values.astype(str) or summarise the column as a numeric feature"
            )
        batch: dict[str, int] = {}
        if flat.size:
            try:
                names, counts = np.unique(flat, return_counts=True)
            except TypeError as exc:
                raise InvalidInputError(
                    f"categorical values must all be str (or None/NaN for missing): {exc}"
                ) from exc
            for name, count in zip(names.tolist(), counts.tolist(), strict=True):
                if not isinstance(name, str):
                    raise InvalidInputError(
                        f"categorical values must be str (or None/NaN for missing), got "
                        f"{type(name).__name__} ({name!r}); convert with values.astype(str)"
                    )
                batch[name] = int(count)
        merged = dict(self._counts)
        for name, count in batch.items():
            merged[name] = merged.get(name, 0) + count
        kept, other = _capped(merged, self._other, self._max_categories)
        self._set(kept, other, self._missing + missing)

    def merge(self, other: CategoricalCounts) -> CategoricalCounts:
        """New counts holding the values of both (exact, commutative, associative); inputs unchanged.

        Raises :class:`CategoryCapMismatchError` if ``max_categories`` differ.
        """
        if not isinstance(other, CategoricalCounts):
            raise FeatureMismatchError(
                f"cannot merge categorical counts with {type(other).__name__}; the feature must have the "
                "same kind on both sides (build both from the same baseline)"
            )
        if self._max_categories != other._max_categories:
            raise CategoryCapMismatchError(
                f"cannot merge categorical counts with max_categories {self._max_categories} and "
                f"{other._max_categories}; build both from the same baseline (Summary.empty_like(baseline))"
            )
        merged = dict(self._counts)
        for name, count in other._counts.items():
            merged[name] = merged.get(name, 0) + count
        kept, pooled = _capped(merged, self._other + other._other, self._max_categories)
        result = CategoricalCounts.__new__(CategoricalCounts)
        result._max_categories = self._max_categories
        result._set(kept, pooled, self._missing + other._missing)
        return result

    def empty_like(self) -> CategoricalCounts:
        """Empty counts with the same cap and the same category names registered (count 0)."""
        return CategoricalCounts(self._counts, max_categories=self._max_categories)

    def copy(self) -> CategoricalCounts:
        """An independent copy."""
        result = CategoricalCounts.__new__(CategoricalCounts)
        result._max_categories = self._max_categories
        result._set(dict(self._counts), self._other, self._missing)
        return result

    # -- dict form ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, JsonValue]:
        """The plain-Python dict form (str keys; int/dict values), for JSON and msgpack."""
        counts: dict[str, JsonValue] = dict(self._counts)
        return {
            "kind": CATEGORICAL_KIND,
            "counts": counts,
            "other": self._other,
            "missing": self._missing,
            "max_categories": self._max_categories,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CategoricalCounts:
        """Validate and decode the dict form; raise :class:`InvalidSummaryError` naming the bad field.

        Unknown keys are rejected except those starting with ``x_`` (ignored and dropped). Category names
        inside ``counts`` are data, so the ``x_`` rule does not apply to them.
        """
        return cls._from_dict(data, "")

    @classmethod
    def _from_dict(cls, data: object, path: str) -> CategoricalCounts:
        obj = read_mapping(data, path, "categorical counts")
        check_keys(obj, path, _CATEGORICAL_FIELDS)
        if obj["kind"] != CATEGORICAL_KIND:
            raise InvalidSummaryError(
                join(path, "kind"), f"must be {CATEGORICAL_KIND!r} but is {obj['kind']!r}"
            )
        cap = read_int(
            obj["max_categories"], join(path, "max_categories"), minimum=1, maximum=MAX_CATEGORIES_LIMIT
        )
        counts_path = join(path, "counts")
        raw = read_mapping(obj["counts"], counts_path, "category name -> count")
        if len(raw) > cap:
            raise InvalidSummaryError(
                counts_path, f"has {len(raw)} categories, more than max_categories = {cap}"
            )
        counts = {name: read_count(value, f"{counts_path}[{name!r}]") for name, value in raw.items()}
        other = read_count(obj["other"], join(path, "other"))
        missing = read_count(obj["missing"], join(path, "missing"))
        result = cls.__new__(cls)
        result._max_categories = cap
        result._set(dict(sorted(counts.items())), other, missing)
        return result

    # -- value semantics ----------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        """Equal when counts, ``other``, ``missing`` and ``max_categories`` are equal."""
        if not isinstance(other, CategoricalCounts):
            return NotImplemented
        return self._counts == other._counts and (self._other, self._missing, self._max_categories) == (
            other._other,
            other._missing,
            other._max_categories,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable accumulator

    def __repr__(self) -> str:
        """Summary line for logs."""
        return (
            f"CategoricalCounts(categories={len(self._counts)}, other={self._other}, "
            f"missing={self._missing}, max_categories={self._max_categories})"
        )
