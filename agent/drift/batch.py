"""Batched binning of many numeric features at once: arithmetic bin lookup + ONE ``np.bincount``.

Why: a device summarises every inference window, e.g. thousands of rows x 32 features. Calling
``np.histogram`` per column costs one pass of Python/NumPy overhead and a sort or binary search per
column; here every value of the whole matrix is mapped to a *slot* in one flat index space (each
feature owns ``bins + 4`` consecutive slots: underflow, the bins, overflow, nan, one spare) and a single
``np.bincount`` counts them all.

How a value finds its slot, exactly (counts equal those of :meth:`Edges._count`, the per-column rule):

1. Per feature, ``[e0, e_k]`` is cut into ``G`` equal *cells*, with ``G`` chosen so that each cell is
   narrower than the narrowest bin (so a cell, widened by a safety margin, contains at most one bin
   boundary). ``t = x * s + c`` (scale and offset per feature) is clipped and truncated to a cell index
   in the feature's slice of a lookup table (LUT); out-of-range values fall into dedicated
   "certainly underflow/overflow" cells and NaN gets its own cell.
2. The LUT gives the slot directly for cells without a boundary. Cells that contain a boundary are
   marked (negative entry); for the few values landing there the slot is fixed with one comparison
   against the boundary below and one against the boundary above (the guess is off by at most one).
3. Features whose edges do not allow this (a bin far narrower than the range, typical of quantile
   edges of heavy-tailed data, which would need a huge LUT; or edges so large relative to their
   spacing that float rounding could move a value by more than the margin) are counted per column by
   sorting (:meth:`Edges._count`, the ``np.histogram`` approach) and skipped in the shared bincount.

Moments of the finite values are computed per chunk (two-pass) and combined with Chan's formula.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from numpy.typing import ArrayLike, NDArray

from agent.drift.edges import Edges
from agent.drift.errors import InvalidEdgesError, InvalidInputError, MomentOverflowError
from agent.drift.numeric import EMPTY_MOMENTS, Moments, NumericHistogram

__all__ = ["BatchBinner"]

_MARGIN: Final = 1e-4
"""Safety margin, in cells, around each bin boundary: far above float rounding of ``x * s + c``."""
_DENSITY: Final = 64
"""Aim for at least this many cells per bin, so few values land in a cell holding a boundary."""
_MAX_CELLS: Final = 4096
"""Most cells per feature; features needing more are counted by sorting instead (fallback)."""
_CHUNK_ELEMENTS: Final = 1 << 16
"""Values per chunk: keeps the temporaries (and the per-feature tiles) in cache."""
_FOLD: Final = 64
"""Rows folded side by side in the column reductions (contiguous, SIMD-friendly reduce)."""
_EPS: Final = float(np.finfo(np.float64).eps)

F64 = NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class _ColumnPlan:
    """How one feature is binned: LUT slice, transform ``t = x * scale + offset`` and clip bounds."""

    lut: NDArray[np.intp]
    scale: float
    offset: float
    cells: int
    fallback: bool


def _plan_column(edges: Edges, slot_base: int, lut_base: int) -> _ColumnPlan:
    """Build the lookup table of one feature (see the module docstring); fall back if unsafe."""
    bins = edges.bins
    core = edges._core  # boundaries e0..e_{k-1}, nextafter(e_k): slot p covers [core[p-1], core[p])
    lo, hi = float(core[0]), float(edges.values[-1])
    span = hi - lo
    min_gap = float(np.min(np.diff(core)))
    # Fallback features are counted by sorting (Edges._count); in the shared bincount all their
    # values go to the feature's spare slot (bins + 3), which is ignored.
    fallback_lut = np.full(5, slot_base + bins + 3, dtype=np.intp)
    fallback = _ColumnPlan(fallback_lut, 0.0, float(lut_base + 2), 0, True)
    if not math.isfinite(span) or span <= 0.0 or min_gap <= 0.0:
        return fallback
    needed = (1.0 + 4.0 * _MARGIN) * span / min_gap + 1.0
    if not math.isfinite(needed) or needed > _MAX_CELLS:
        return fallback
    cells = min(max(math.ceil(needed), _DENSITY * bins), _MAX_CELLS)
    scale = cells / span
    offset = -lo * scale + float(lut_base + 2)
    if not (math.isfinite(scale) and scale > 0.0 and math.isfinite(offset)):
        return fallback
    # Worst rounding error of t (in cells) for values near the edges: must be far below the margin.
    rounding = 8.0 * _EPS * (max(abs(lo), abs(hi)) * scale + abs(offset) + cells + 8.0)
    pos = (core - lo) * scale  # boundary positions in cell units
    if (
        rounding > _MARGIN / 16.0
        or float(np.min(np.diff(pos))) <= 1.0 + 2.0 * _MARGIN
        or float(pos[-1]) >= cells + 1.0 - 2.0 * _MARGIN
    ):
        return fallback
    # LUT index i <-> cell c = i - 2 <-> r = (x - e0) * scale in [c, c + 1):
    #   i = 0: r < -1 (certainly underflow); i = 1 .. cells + 2: cells -1 .. cells;
    #   i = cells + 3: r >= cells + 1 (certainly overflow); i = cells + 4: NaN.
    lut = np.empty(cells + 5, dtype=np.intp)
    lut[0] = slot_base
    cell = np.arange(-1, cells + 1, dtype=np.float64)
    guess = np.searchsorted(pos, cell, side="right")  # slot of the cell's start
    near = np.searchsorted(pos, cell + 1.0 + _MARGIN, side="right") - np.searchsorted(
        pos, cell - _MARGIN, side="left"
    )
    lut[1 : cells + 3] = np.where(near > 0, -(slot_base + guess) - 1, slot_base + guess)
    lut[cells + 3] = slot_base + bins + 1
    lut[cells + 4] = slot_base + bins + 2
    return _ColumnPlan(lut, scale, offset, cells, False)


def _reduce_rows(op: np.ufunc, x: F64) -> F64:
    """``op.reduce(x, axis=0)`` for a C-contiguous 2-D array, folding rows side by side first.

    A plain axis-0 reduction of a narrow matrix runs an inner loop of only ``cols`` elements per row;
    viewing blocks of ``_FOLD`` rows as one wide row makes the inner loop long and vectorised.
    """
    rows, cols = x.shape
    blocks = rows // _FOLD
    if blocks == 0:
        return np.asarray(op.reduce(x, axis=0), dtype=np.float64)
    head = x[: blocks * _FOLD].reshape(blocks, _FOLD * cols)
    folded = op.reduce(op.reduce(head, axis=0).reshape(_FOLD, cols), axis=0)
    if blocks * _FOLD < rows:
        folded = op(folded, op.reduce(x[blocks * _FOLD :], axis=0))
    return np.asarray(folded, dtype=np.float64)


@dataclass(frozen=True, slots=True)
class _Buffers:
    """Scratch arrays reused by every chunk of one :meth:`BatchBinner.histograms` call."""

    work: F64
    cell: NDArray[np.int32]
    slots: NDArray[np.intp]


@dataclass(slots=True)
class _RunningMoments:
    """Moments of every feature (arrays over features), combined chunk by chunk."""

    n: NDArray[np.int64]
    lo: F64
    hi: F64
    mean: F64
    m2: F64

    @staticmethod
    def empty(features: int) -> _RunningMoments:
        return _RunningMoments(
            np.zeros(features, dtype=np.int64),
            np.full(features, np.inf),
            np.full(features, -np.inf),
            np.zeros(features),
            np.zeros(features),
        )

    def combine(self, other: _RunningMoments) -> _RunningMoments:
        """Chan's formula, vectorised over features (same arithmetic as :meth:`Moments.combine`)."""
        na, nb = self.n, other.n
        n = na + nb
        safe = np.maximum(n, 1)
        lo, hi = np.minimum(self.lo, other.lo), np.maximum(self.hi, other.hi)
        mean = self.mean * (na / safe) + other.mean * (nb / safe)
        mean = np.where(n > 0, np.minimum(np.maximum(mean, lo), hi), 0.0)
        delta = other.mean - self.mean
        m2 = (self.m2 + other.m2) + delta * delta * ((na * nb) / safe)
        mean = np.where(nb == 0, self.mean, np.where(na == 0, other.mean, mean))
        m2 = np.where(nb == 0, self.m2, np.where(na == 0, other.m2, m2))
        return _RunningMoments(n, lo, hi, mean, m2)


class BatchBinner:
    """Bins a 2-D array (rows x features) into one :class:`NumericHistogram` per feature.

    Built once per set of edges (e.g. by :meth:`Summary.add_rows`, which caches it) and reused for
    every batch; its tables are read-only and scratch space is allocated per call, so one binner can
    serve several threads. Counts are exactly those of calling :meth:`NumericHistogram.add` per
    column; moments agree up to float rounding (different summation order).
    """

    __slots__ = (
        "_chunk_rows",
        "_edges",
        "_ext",
        "_ext_next",
        "_fallback",
        "_lut",
        "_names",
        "_slot_base",
        "_tiles",
        "_total_slots",
    )

    def __init__(self, edges: Sequence[Edges], *, names: Sequence[str] | None = None) -> None:
        """Prepare lookup tables for features with these ``edges`` (column order = sequence order).

        ``names`` (optional, same length) are only used in error messages.
        """
        self._edges: tuple[Edges, ...] = tuple(edges)
        for i, e in enumerate(self._edges):
            if not isinstance(e, Edges):
                raise InvalidEdgesError(f"BatchBinner needs Edges for every column; column {i} is {e!r}")
        if names is not None and len(names) != len(self._edges):
            raise InvalidInputError(f"got {len(names)} names for {len(self._edges)} columns")
        self._names: tuple[str, ...] = (
            tuple(names) if names is not None else tuple(f"column {i}" for i in range(len(self._edges)))
        )
        widths = [e.bins + 4 for e in self._edges]
        self._slot_base: list[int] = [int(v) for v in np.cumsum([0, *widths])[:-1]]
        self._total_slots = int(sum(widths))
        ext_parts: list[F64] = []
        for e in self._edges:
            ext_parts.append(np.concatenate([[-np.inf], e._core, [np.nan, np.nan]]))
        self._ext: F64 = np.concatenate(ext_parts) if ext_parts else np.zeros(0)
        self._ext_next: F64 = np.concatenate([self._ext[1:], [np.nan]]) if ext_parts else np.zeros(0)
        plans: list[_ColumnPlan] = []
        lut_base = 0
        for e, slot_base in zip(self._edges, self._slot_base, strict=True):
            plan = _plan_column(e, slot_base, lut_base)
            plans.append(plan)
            lut_base += plan.lut.size
        if lut_base >= 2**31:
            raise InvalidInputError("too many features for one BatchBinner; split the columns")
        self._lut: NDArray[np.intp] = (
            np.concatenate([p.lut for p in plans]) if plans else np.zeros(0, dtype=np.intp)
        )
        self._fallback: tuple[int, ...] = tuple(i for i, p in enumerate(plans) if p.fallback)
        features = len(self._edges)
        self._chunk_rows = max(_FOLD, (_CHUNK_ELEMENTS // max(features, 1)) // _FOLD * _FOLD)
        # Per-feature parameters tiled to a full chunk: flat contiguous binary ops are much faster
        # than broadcasting a row over a narrow matrix.
        lut_starts = np.cumsum([0, *(p.lut.size for p in plans)])[:-1]
        scale = np.array([p.scale for p in plans], dtype=np.float64)
        offset = np.array([p.offset for p in plans], dtype=np.float64)
        lower = np.asarray(lut_starts, dtype=np.float64)
        upper = lower + np.array([p.cells + 3 for p in plans], dtype=np.float64)
        nan_cell = lower + np.array([p.cells + 4 for p in plans], dtype=np.float64)
        self._tiles: tuple[F64, ...] = tuple(
            np.tile(row, (self._chunk_rows, 1)) for row in (scale, offset, lower, upper, nan_cell)
        )

    @property
    def edges(self) -> tuple[Edges, ...]:
        """Edges of each column, in column order."""
        return self._edges

    @property
    def features(self) -> int:
        """Number of columns the binner expects."""
        return len(self._edges)

    @property
    def fallback_columns(self) -> tuple[int, ...]:
        """Columns counted by sorting (per column) because their edges do not suit the lookup table."""
        return self._fallback

    def histograms(self, matrix: ArrayLike) -> list[NumericHistogram]:
        """One new histogram per column holding that column of ``matrix`` (rows x features).

        ``matrix`` must be 2-D with ``features`` columns and a bool/int/float dtype. Raises
        :class:`InvalidInputError` for a wrong shape/dtype and :class:`MomentOverflowError` if a
        column's moments overflow float64.
        """
        x = self._check_matrix(matrix)
        features = self.features
        counts = np.zeros(self._total_slots, dtype=np.int64)
        moments = _RunningMoments.empty(features)
        rows = x.shape[0]
        if features and rows:
            size = min(rows, self._chunk_rows)
            buffers = _Buffers(
                np.empty((size, features)),
                np.empty((size, features), dtype=np.int32),
                np.empty((size, features), dtype=np.intp),
            )
            with np.errstate(over="ignore", invalid="ignore"):
                for start in range(0, rows, self._chunk_rows):
                    chunk = np.ascontiguousarray(x[start : start + self._chunk_rows], dtype=np.float64)
                    moments = moments.combine(self._bin_chunk(chunk, counts, buffers))
        return self._finish(counts, moments)

    def _check_matrix(self, matrix: ArrayLike) -> NDArray[Any]:
        try:
            x = np.asarray(matrix)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"rows must be a 2-D numeric array: {exc}") from exc
        if x.ndim != 2 or x.shape[1] != self.features:
            raise InvalidInputError(
                f"rows must be a 2-D array of shape (rows, {self.features}) with one column per numeric "
                f"feature in summary order, got shape {x.shape}"
            )
        if x.size and x.dtype.kind not in "biuf":
            raise InvalidInputError(f"rows must have a bool/int/float dtype, got {x.dtype}")
        return x

    def _bin_chunk(self, x: F64, counts: NDArray[np.int64], buffers: _Buffers) -> _RunningMoments:
        """Add the slot counts of one C-contiguous chunk to ``counts``; return the chunk's moments."""
        rows, features = x.shape
        work = buffers.work[:rows]
        lo = _reduce_rows(np.minimum, x)
        hi = _reduce_rows(np.maximum, x)
        if bool(np.isfinite(lo).all() and np.isfinite(hi).all()):  # no NaN or inf anywhere
            has_nan = False
            n = np.full(features, rows, dtype=np.int64)
            mean = np.minimum(np.maximum(_reduce_rows(np.add, x) / rows, lo), hi)
            np.subtract(x, mean, out=work)
            np.multiply(work, work, out=work)
            m2 = _reduce_rows(np.add, work)
        else:
            has_nan = bool(np.isnan(lo).any())
            finite = np.isfinite(x)
            np.copyto(work, finite)
            n = _reduce_rows(np.add, work).astype(np.int64)
            np.subtract(x, x, out=work)  # 0 where finite, NaN at NaN and +-inf
            np.add(work, x, out=work)  # x where finite, NaN elsewhere; fmin/fmax skip NaN
            lo = _reduce_rows(np.fmin, work)
            hi = _reduce_rows(np.fmax, work)
            mean = _reduce_rows(np.add, np.where(finite, x, 0.0)) / np.maximum(n, 1)
            mean = np.where(n > 0, np.minimum(np.maximum(mean, lo), hi), 0.0)
            deviation = np.where(finite, x - mean, 0.0)
            np.multiply(deviation, deviation, out=deviation)
            m2 = _reduce_rows(np.add, deviation)
            lo = np.where(n > 0, lo, np.inf)
            hi = np.where(n > 0, hi, -np.inf)
        if len(self._fallback) < features:
            self._count_with_lut(x, counts, buffers, has_nan=has_nan)
        for j in self._fallback:
            base, bins = self._slot_base[j], self._edges[j].bins
            counts[base : base + bins + 3] += self._edges[j]._count(x[:, j])
        return _RunningMoments(n, lo, hi, mean, m2)

    def _count_with_lut(self, x: F64, counts: NDArray[np.int64], buffers: _Buffers, *, has_nan: bool) -> None:
        """Slots via transform + LUT + exact fix-up of boundary cells, then ONE bincount for all."""
        rows = x.shape[0]
        scale, offset, lower, upper, nan_cell = (tile[:rows] for tile in self._tiles)
        work, cell, slots = buffers.work[:rows], buffers.cell[:rows], buffers.slots[:rows]
        np.multiply(x, scale, out=work)
        np.add(work, offset, out=work)
        np.fmax(work, lower, out=work)  # fmax/fmin: a NaN (0 * inf in fallback columns) becomes a bound
        np.fmin(work, upper, out=work)
        if has_nan:
            np.copyto(work, nan_cell, where=np.isnan(x))
        np.copyto(cell, work, casting="unsafe")  # values are >= 0 here, so truncation is floor
        np.take(self._lut, cell, out=slots, mode="wrap")
        flat_slots = slots.reshape(-1)
        uncertain = np.flatnonzero(flat_slots < 0)
        if uncertain.size:
            guess = -flat_slots[uncertain] - 1
            values = x.reshape(-1)[uncertain]
            guess -= values < self._ext[guess]
            guess += values >= self._ext_next[guess]
            flat_slots[uncertain] = guess
        counts += np.bincount(flat_slots, minlength=self._total_slots)

    def _finish(self, counts: NDArray[np.int64], moments: _RunningMoments) -> list[NumericHistogram]:
        result: list[NumericHistogram] = []
        for j, edges in enumerate(self._edges):
            base, bins = self._slot_base[j], edges.bins
            seg = counts[base : base + bins + 4]
            n = int(moments.n[j])
            if n:
                lo, hi = float(moments.lo[j]), float(moments.hi[j])
                mean, m2 = float(moments.mean[j]), float(moments.m2[j])
                if not (math.isfinite(mean) and math.isfinite(m2)):
                    raise MomentOverflowError(
                        f"running moments of {self._names[j]} overflowed float64 (finite values range "
                        f"from {lo!r} to {hi!r}); nothing was added. Rescale the feature (e.g. other "
                        "units) or drop corrupt values"
                    )
                mom = Moments(n, lo, hi, mean, m2)
            else:
                mom = EMPTY_MOMENTS
            result.append(
                NumericHistogram._from_parts(
                    edges,
                    seg[1 : bins + 1],
                    underflow=int(seg[0]),
                    overflow=int(seg[bins + 1]),
                    nan=int(seg[bins + 2]),
                    moments=mom,
                )
            )
        return result
