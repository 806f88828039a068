"""Service-level indicators (SLIs) of one model version over one drift window.

Per window the device reports how many requests a model answered, how many failed and why, how many were
served with flagged values, how long they took, and whether the model was loaded or swapped. The dict form
(:meth:`WindowSlis.to_dict`) is the ``slis`` field of :class:`agent.protocol.DriftWindow`: plain JSON-compatible
data (``int``, ``float``, ``str``, lists and maps; never numpy types), with zero counters left out to keep the
message small.

Latency is a histogram over **fixed** log-spaced edges in microseconds, the same on every device and in every
window, so windows merge by adding counts and p50/p95/p99 are derivable after any merge
(:func:`latency_quantiles`): bin ``0`` is ``[0, 1 us)``; bin ``k`` (``1 <= k <= 80``) is
``[10**((k-1)/10), 10**(k/10))`` us, ten bins per decade (each bin is 26 % wider than the one before); bin
``81`` is ``[100 s, inf)``. Only the bins from the first to the last non-empty one are sent.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "LATENCY_BINS",
    "LATENCY_BINS_PER_DECADE",
    "LATENCY_EDGES_US",
    "SLIS_FORMAT",
    "WindowSlis",
    "latency_bin",
    "latency_bin_counts",
    "latency_quantiles",
]

SLIS_FORMAT: Final = 1
"""Version of the ``slis`` dict written by :meth:`WindowSlis.to_dict` (its ``"format"`` key)."""

LATENCY_BINS_PER_DECADE: Final = 10
_DECADES: Final = 8  # 1 us .. 100 s
LATENCY_EDGES_US: Final[tuple[float, ...]] = tuple(
    10.0 ** (k / LATENCY_BINS_PER_DECADE) for k in range(_DECADES * LATENCY_BINS_PER_DECADE + 1)
)
"""The inner bin edges in microseconds, ``10**(k/10)`` for ``k = 0 .. 80`` (1 us .. 100 s)."""
LATENCY_BINS: Final = len(LATENCY_EDGES_US) + 1
"""Number of latency bins (82): ``[0, 1 us)``, 80 log-spaced bins, ``[100 s, inf)``."""
_EDGES_ARRAY: Final = np.asarray(LATENCY_EDGES_US, dtype=np.float64)


def latency_bin(latency_us: float) -> int:
    """The latency bin of one value in microseconds (NaN and negative values go to bin 0)."""
    if not latency_us > 0.0:
        return 0
    return bisect.bisect_right(LATENCY_EDGES_US, latency_us)


def latency_bin_counts(latencies_us: npt.ArrayLike) -> list[int]:
    """Counts per latency bin (length :data:`LATENCY_BINS`) of many values in microseconds, vectorised."""
    values = np.asarray(latencies_us, dtype=np.float64).ravel()
    idx = np.searchsorted(_EDGES_ARRAY, np.nan_to_num(values, nan=0.0), side="right")
    counts: list[int] = np.bincount(idx, minlength=LATENCY_BINS).tolist()
    return counts


class WindowSlis:
    """Mutable SLI counters of one window; :meth:`to_dict` gives the wire form.

    Not thread-safe by itself: the recorder updates it from one thread at a time.
    """

    __slots__ = (
        "errors",
        "latency",
        "latency_max_us",
        "latency_sum_us",
        "loads",
        "ok",
        "rows_dropped",
        "rows_failed",
        "served_non_finite",
        "served_out_of_range",
        "swaps",
    )

    def __init__(self) -> None:
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.served_out_of_range = 0
        self.served_non_finite = 0
        self.latency = [0] * LATENCY_BINS
        self.latency_sum_us = 0.0
        self.latency_max_us = 0.0
        self.loads = 0
        self.swaps = 0
        self.rows_dropped = 0
        self.rows_failed = 0

    @property
    def requests(self) -> int:
        """Every request counted: answered (``ok``) plus failed (``errors``)."""
        return self.ok + sum(self.errors.values())

    @property
    def empty(self) -> bool:
        """Nothing happened: no request, no load, no swap (such a window is not worth sending)."""
        return self.ok == 0 and not self.errors and self.loads == 0 and self.swaps == 0 and self.rows_dropped == 0

    # -- updates ---------------------------------------------------------------------------------------------------

    def count_ok(self, latency_us: float, *, out_of_range: bool = False, non_finite: bool = False) -> None:
        """One answered request (the per-request path; the recorder normally uses :meth:`add_ok_batch`)."""
        self.ok += 1
        self.latency[latency_bin(latency_us)] += 1
        if latency_us > 0.0:
            self.latency_sum_us += latency_us
            self.latency_max_us = max(self.latency_max_us, latency_us)
        self.served_out_of_range += out_of_range
        self.served_non_finite += non_finite

    def add_ok_batch(self, latencies_us: npt.NDArray[np.float64], *, out_of_range: int = 0,
                     non_finite: int = 0) -> None:
        """Many answered requests at once (vectorised binning of their latencies)."""
        n = int(latencies_us.size)
        if n == 0:
            return
        self.ok += n
        for i, c in enumerate(latency_bin_counts(latencies_us)):
            if c:
                self.latency[i] += c
        finite = latencies_us[np.isfinite(latencies_us) & (latencies_us > 0.0)]
        if finite.size:
            self.latency_sum_us += float(finite.sum())
            self.latency_max_us = max(self.latency_max_us, float(finite.max()))
        self.served_out_of_range += out_of_range
        self.served_non_finite += non_finite

    def count_error(self, code: str, n: int = 1) -> None:
        """``n`` failed requests with error ``code`` (schema codes, ``inference_failed``, ``busy``, ...)."""
        self.errors[code] += n

    def merge_from(self, other: WindowSlis) -> None:
        """Add ``other``'s counters to these (exact; used to fold side counters into the open window)."""
        self.ok += other.ok
        self.errors.update(other.errors)
        self.served_out_of_range += other.served_out_of_range
        self.served_non_finite += other.served_non_finite
        for i, c in enumerate(other.latency):
            if c:
                self.latency[i] += c
        self.latency_sum_us += other.latency_sum_us
        self.latency_max_us = max(self.latency_max_us, other.latency_max_us)
        self.loads += other.loads
        self.swaps += other.swaps
        self.rows_dropped += other.rows_dropped
        self.rows_failed += other.rows_failed

    # -- wire form -------------------------------------------------------------------------------------------------

    def to_dict(self, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The ``slis`` map: plain JSON data; optional counters that are zero are left out.

        Always present: ``format``, ``requests``, ``ok``. Optional: ``errors`` (code -> count), ``served_out_of_range``
        and ``served_non_finite`` (requests served with such values), ``latency_us`` (``first`` bin index,
        ``counts`` from there to the last non-empty bin, ``sum`` and ``max`` in us), ``loads``, ``swaps``,
        ``rows_dropped`` (rows not binned because the recorder's buffer was full), ``rows_failed`` (rows that could
        not be binned), plus ``meta`` (e.g. ``drift_edges``).
        """
        out: dict[str, Any] = {"format": SLIS_FORMAT, "requests": self.requests, "ok": self.ok}
        if self.errors:
            out["errors"] = {code: int(n) for code, n in sorted(self.errors.items()) if n}
        for key, value in (("served_out_of_range", self.served_out_of_range),
                           ("served_non_finite", self.served_non_finite)):
            if value:
                out[key] = int(value)
        nonzero = [i for i, c in enumerate(self.latency) if c]
        if nonzero:
            first, last = nonzero[0], nonzero[-1]
            out["latency_us"] = {
                "first": first,
                "counts": [int(c) for c in self.latency[first : last + 1]],
                "sum": round(self.latency_sum_us, 1),
                "max": round(self.latency_max_us, 1),
            }
        for key, value in (("loads", self.loads), ("swaps", self.swaps), ("rows_dropped", self.rows_dropped),
                           ("rows_failed", self.rows_failed)):
            if value:
                out[key] = int(value)
        if meta:
            out.update(meta)
        return out


def _bin_bounds(index: int) -> tuple[float, float]:
    if index <= 0:
        return 0.0, LATENCY_EDGES_US[0]
    if index >= LATENCY_BINS - 1:
        return LATENCY_EDGES_US[-1], math.inf
    return LATENCY_EDGES_US[index - 1], LATENCY_EDGES_US[index]


def _dense_latency(slis: Mapping[str, Any]) -> tuple[list[int], float | None]:
    lat = slis.get("latency_us")
    if not isinstance(lat, Mapping):
        return [], None
    first = lat.get("first", 0)
    counts = lat.get("counts", [])
    if not isinstance(first, int) or not isinstance(counts, Sequence) or first < 0:
        raise ValueError("slis.latency_us must have an int 'first' and a list 'counts'")
    dense = [0] * LATENCY_BINS
    for i, c in enumerate(counts):
        if not isinstance(c, int) or isinstance(c, bool) or c < 0 or first + i >= LATENCY_BINS:
            raise ValueError(f"slis.latency_us.counts[{i}] is not a valid count for bin {first + i}")
        dense[first + i] = c
    top = lat.get("max")
    return dense, float(top) if isinstance(top, int | float) and not isinstance(top, bool) else None


def latency_quantiles(slis: Mapping[str, Any] | Iterable[Mapping[str, Any]],
                      quantiles: Sequence[float] = (0.5, 0.95, 0.99)) -> dict[str, float | None]:
    """Latency quantiles in microseconds from one ``slis`` dict (or several, merged by adding counts).

    Returns ``{"p50": .., "p95": .., "p99": ..}`` (keys ``p`` + the quantile in percent). Within a bin the value is
    interpolated geometrically (log-uniform), so the error is well under the bin's 26 % width; the result never
    exceeds the largest latency seen (``max``). ``None`` when there are no latencies.
    """
    docs = [slis] if isinstance(slis, Mapping) else list(slis)
    dense = [0] * LATENCY_BINS
    top: float | None = None
    for doc in docs:
        counts, m = _dense_latency(doc)
        for i, c in enumerate(counts):
            dense[i] += c
        if m is not None:
            top = m if top is None else max(top, m)
    total = sum(dense)
    out: dict[str, float | None] = {}
    for q in quantiles:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantiles must be in [0, 1], got {q}")
        key = "p" + (f"{q * 100:g}")
        if total == 0:
            out[key] = None
            continue
        rank = q * total
        seen = 0
        value = 0.0
        for i, c in enumerate(dense):
            if c == 0:
                continue
            if seen + c >= rank:
                lo, hi = _bin_bounds(i)
                frac = min(1.0, max(0.0, (rank - seen) / c))
                if i == 0:
                    value = hi * frac
                elif math.isinf(hi):
                    value = lo
                else:
                    value = lo * (hi / lo) ** frac
                break
            seen += c
        if top is not None:
            value = min(value, top)
        out[key] = value
    return out
