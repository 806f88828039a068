"""Immutable bin edges and the binning rule shared by every drift histogram.

Binning rule (the contract; see docs/drift-layout.md):

* bin ``i`` covers ``[edges[i], edges[i+1])``; the **last** bin also includes its right edge, so the
  maximum of the training sample (the last quantile edge) lands in the last bin, not in overflow;
* values ``< edges[0]`` (including ``-inf``) count as *underflow*, values ``> edges[-1]`` (including
  ``+inf``) as *overflow*, ``NaN`` as *nan*.

Internally a value is counted in a *slot*: ``0`` underflow, ``1..bins`` the bins, ``bins + 1``
overflow, ``bins + 2`` nan. :meth:`Edges._count` counts a 1-D array by sorting it (the approach of
``np.histogram`` for uneven bins); the batched binner in :mod:`agent.drift.batch` is an independent
implementation of the same rule and is tested against it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Final, final

import numpy as np
from numpy.typing import ArrayLike, NDArray

from agent.drift.errors import InvalidEdgesError

__all__ = ["MAX_BINS", "Edges"]

MAX_BINS: Final = 1024
"""Most bins a histogram may have (so at most ``MAX_BINS + 1`` edges): keeps summaries small."""


@final
class Edges:
    """Strictly increasing, finite float64 bin edges (2 to ``MAX_BINS + 1`` values); immutable.

    Two ``Edges`` are equal (and hash equal) when their values are equal, which is what merging checks:
    histograms are only comparable when they were binned on the very same edges. ``-0.0`` is stored as
    ``0.0`` so equality and hashing agree.
    """

    __slots__ = ("_core", "_hash", "_values")

    _values: NDArray[np.float64]
    _core: NDArray[np.float64]
    _hash: int

    def __init__(self, values: ArrayLike) -> None:
        """Validate and freeze ``values``; raise :class:`InvalidEdgesError` saying what is wrong."""
        try:
            raw = np.asarray(values)
        except (TypeError, ValueError) as exc:
            raise InvalidEdgesError(f"bin edges must be a sequence of numbers: {exc}") from exc
        if raw.dtype.kind not in "iuf":
            raise InvalidEdgesError(
                f"bin edges must be real numbers, got dtype {raw.dtype}; pass floats such as [0.0, 0.5, 1.0]"
            )
        if raw.ndim != 1:
            raise InvalidEdgesError(f"bin edges must be one-dimensional, got shape {raw.shape}")
        arr = raw.astype(np.float64) + 0.0  # copy; also turns -0.0 into 0.0
        if arr.size < 2:
            raise InvalidEdgesError(f"need at least 2 bin edges (1 bin), got {arr.size}")
        if arr.size > MAX_BINS + 1:
            raise InvalidEdgesError(
                f"{arr.size - 1} bins is more than the maximum {MAX_BINS}; use fewer bins "
                "(e.g. Edges.quantiles(sample, 20))"
            )
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            i = int(bad[0])
            raise InvalidEdgesError(
                f"bin edges must be finite, edge {i} is {arr[i]!r}; use underflow/overflow for the tails "
                "instead of infinite edges"
            )
        steps = np.flatnonzero(np.diff(arr) <= 0)
        if steps.size:
            i = int(steps[0])
            raise InvalidEdgesError(
                f"bin edges must be strictly increasing, but edge {i + 1} ({arr[i + 1]!r}) is not greater "
                f"than edge {i} ({arr[i]!r}); sort and de-duplicate them"
            )
        arr.setflags(write=False)
        core = arr.copy()
        # The last bin is closed: x <= edges[-1] belongs to it, i.e. x < nextafter(edges[-1], +inf).
        core[-1] = np.nextafter(core[-1], np.inf)
        core.setflags(write=False)
        self._values = arr
        self._core = core
        self._hash = hash(arr.tobytes())

    # -- constructors -------------------------------------------------------------------------------

    @classmethod
    def from_values(cls, values: Iterable[float]) -> Edges:
        """Build edges from explicit values, e.g. ``Edges.from_values([0, 10, 20, 30])``."""
        return cls(values if isinstance(values, np.ndarray) else list(values))

    @classmethod
    def uniform(cls, lo: float, hi: float, bins: int) -> Edges:
        """``bins`` equal-width bins over ``[lo, hi]`` (``np.linspace``; the last edge is exactly ``hi``)."""
        if isinstance(bins, bool) or not isinstance(bins, int | np.integer):
            raise InvalidEdgesError(f"bins must be an integer, got {bins!r}")
        if not 1 <= bins <= MAX_BINS:
            raise InvalidEdgesError(f"bins must be between 1 and {MAX_BINS}, got {bins}")
        lo_f, hi_f = float(lo), float(hi)
        if not (math.isfinite(lo_f) and math.isfinite(hi_f)) or not lo_f < hi_f:
            raise InvalidEdgesError(f"uniform edges need finite lo < hi, got lo={lo_f!r}, hi={hi_f!r}")
        values = np.linspace(lo_f, hi_f, int(bins) + 1)
        values[-1] = hi_f
        return cls(values)

    @classmethod
    def quantiles(cls, sample: ArrayLike, bins: int) -> Edges:
        """Edges at the ``0, 1/bins, ..., 1`` quantiles of the finite values of ``sample``, de-duplicated.

        Used to build a baseline from training data: each bin then holds about the same share of the
        training data, which makes population-stability style scores well conditioned. The first edge is
        the sample minimum and the last the sample maximum, so every training value falls in a bin (the
        last bin is closed). Repeated quantiles (discrete data) are merged, so the result may have fewer
        than ``bins`` bins. A constant sample ``v`` gives the single bin ``[v, nextafter(v, +inf)]``.
        """
        if isinstance(bins, bool) or not isinstance(bins, int | np.integer):
            raise InvalidEdgesError(f"bins must be an integer, got {bins!r}")
        if not 1 <= bins <= MAX_BINS:
            raise InvalidEdgesError(f"bins must be between 1 and {MAX_BINS}, got {bins}")
        arr = np.asarray(sample)
        if arr.dtype.kind not in "biuf":
            raise InvalidEdgesError(f"quantile edges need a numeric sample, got dtype {arr.dtype}")
        flat = arr.astype(np.float64, copy=False).ravel()
        finite = flat[np.isfinite(flat)]
        if finite.size == 0:
            raise InvalidEdgesError(
                "cannot compute quantile edges: the sample has no finite values; pass training data "
                "for this feature or build the edges with Edges.uniform"
            )
        qs = np.quantile(finite, np.linspace(0.0, 1.0, int(bins) + 1))
        qs[0], qs[-1] = finite.min(), finite.max()
        values = np.unique(qs)
        if values.size == 1:
            v = float(values[0])
            up = float(np.nextafter(v, np.inf))
            values = np.array([v, up] if math.isfinite(up) else [float(np.nextafter(v, -np.inf)), v])
        return cls(values)

    # -- accessors ----------------------------------------------------------------------------------

    @property
    def values(self) -> NDArray[np.float64]:
        """The edges as a read-only float64 array."""
        return self._values

    @property
    def bins(self) -> int:
        """Number of bins (``len(values) - 1``)."""
        return int(self._values.size - 1)

    @property
    def lo(self) -> float:
        """The first edge: values below it are underflow."""
        return float(self._values[0])

    @property
    def hi(self) -> float:
        """The last edge: it belongs to the last bin; values above it are overflow."""
        return float(self._values[-1])

    def tolist(self) -> list[float]:
        """The edges as Python floats (the dict form)."""
        return [float(v) for v in self._values]

    def __len__(self) -> int:
        """Number of edges (``bins + 1``)."""
        return int(self._values.size)

    def __eq__(self, other: object) -> bool:
        """Equal when the values are equal (the same binning)."""
        if not isinstance(other, Edges):
            return NotImplemented
        if self is other:
            return True
        return self._hash == other._hash and bool(np.array_equal(self._values, other._values))

    def __hash__(self) -> int:
        """Hash of the values, consistent with ``==``."""
        return self._hash

    def __reduce__(self) -> tuple[type[Edges], tuple[list[float]]]:
        """Pickle as the plain values (re-validated and frozen again on load)."""
        return (Edges, (self.tolist(),))

    def __repr__(self) -> str:
        """Short form; long edge lists are elided so error messages stay readable."""
        return f"Edges({_short(self._values)})"

    # -- binning ------------------------------------------------------------------------------------

    def _count(self, values: NDArray[np.float64]) -> NDArray[np.int64]:
        """Slot counts of 1-D float64 ``values``: underflow, each bin, overflow, nan (``bins + 3``).

        Sorting (NaN sorts last) and then locating the ``bins + 1`` boundaries
        ``[e0, ..., e_{k-1}, nextafter(e_k)]`` in the sorted data gives ``#{x < boundary}``; differences
        of those are the slot counts. Sorting is SIMD-accelerated in numpy and much faster than a
        binary search per value. ``nextafter(e_k)`` as the last boundary makes the last bin closed.
        """
        ordered = np.sort(values)
        real = int(np.searchsorted(ordered, np.nan, side="left"))  # NaNs sort after everything
        below = np.searchsorted(ordered[:real], self._core, side="left").astype(np.int64)
        counts = np.empty(self.bins + 3, dtype=np.int64)
        counts[0] = below[0]
        counts[1 : self.bins + 1] = np.diff(below)
        counts[self.bins + 1] = real - below[-1]
        counts[self.bins + 2] = values.size - real
        return counts


def _short(values: NDArray[np.float64], limit: int = 6) -> str:
    """Render at most ``limit`` values of ``values`` (head ... tail) with the total count."""
    items = [repr(float(v)) for v in values]
    if len(items) > limit:
        half = limit // 2
        items = [*items[:half], "...", *items[-half:]]
        return "[" + ", ".join(items) + f"] ({values.size} edges)"
    return "[" + ", ".join(items) + "]"
