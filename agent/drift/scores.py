"""Drift scores on binned data: one implementation for the device and the fleet server.

Every score compares a *current* histogram (a device window, or a merged fleet view) with the *baseline*
histogram of the same feature in the model bundle. Both are in the drift layout and share the baseline's
bin edges / category names, so the scores are pure functions of two count vectors. Formulas, the
treatment of underflow/overflow/NaN, the thresholds and the hysteresis are documented in
``docs/drift-scores.md``; why the scores are computed on binned data is ADR 0008.

Slots. A numeric histogram is read as the probability vector over ``K = bins + 2`` slots
``[underflow, bin 0, ..., bin k-1, overflow]``; a categorical one over the sorted union of both sides'
category names (capped by the layout's cap rule) plus ``other``. NaN / missing values are **not** part of
the distributions: they are reported separately as :func:`nan_rate_delta`.

Scores (``p`` baseline, ``q`` current slot probabilities):

* :func:`psi`: ``sum((q' - p') * ln(q' / p'))`` with additive smoothing ``p' = (p + eps) / (1 + K*eps)``;
* :func:`js_distance`: ``sqrt(JSD_2(p, q))``, the Jensen-Shannon distance with base-2 logarithms, in [0, 1];
* :func:`wasserstein1`: earth mover's distance with bin mass at the bin centre, underflow at the first
  edge and overflow at the last edge (in the feature's units);
* :func:`ks_binned`: ``max |P - Q|`` of the cumulative slot probabilities, i.e. the KS statistic evaluated
  at the bin edges (never above the raw-data KS statistic by more than float rounding, never below it by
  more than the largest single slot mass);
* :func:`chi_square`: Pearson's chi-square test of homogeneity of the 2 x K table (baseline, current) of
  either kind, with its p-value from :func:`regularized_upper_gamma` (no scipy).

Levels (:class:`DriftThresholds`): the driving score (PSI by default) against warn / alert thresholds,
gated by PSI's own significance test so that the sampling noise of small windows stays ``ok``; features
with fewer than ``min_samples`` values are ``insufficient``; a change of the missing share raises the
level on its own.

:class:`DriftScorer` prepares a baseline once and scores one summary (:meth:`DriftScorer.score`), many
summaries one by one (:meth:`DriftScorer.score_many`) or the merge of many (:meth:`DriftScorer.score_merged`,
what the fleet server does), vectorised over devices x features x slots. :class:`Hysteresis` turns a
stream of per-window levels into a state that cannot flap on small or noisy windows (seed failure F6).

Pure: standard library and numpy only, no I/O, no clock.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Final, Literal, NamedTuple, TypeAlias, cast, get_args

import numpy as np
from numpy.typing import NDArray

from agent.drift._validate import EXTENSION_PREFIX, JsonValue
from agent.drift.categorical import CATEGORICAL_KIND, CategoricalCounts
from agent.drift.edges import Edges
from agent.drift.errors import (
    CategoryCapMismatchError,
    DriftLayoutError,
    EdgesMismatchError,
    FeatureMismatchError,
    InvalidInputError,
)
from agent.drift.layout import FeatureSummary, Summary
from agent.drift.numeric import NUMERIC_KIND, NumericHistogram

__all__ = [
    "DEFAULT_PSI_EPS",
    "LEVELS",
    "ChiSquareResult",
    "DriftReport",
    "DriftScorer",
    "DriftThresholds",
    "FeatureScore",
    "Hysteresis",
    "HysteresisState",
    "InvalidThresholdsError",
    "Level",
    "Metric",
    "StateLevel",
    "chi2_sf",
    "chi_square",
    "js_distance",
    "ks_binned",
    "nan_rate_delta",
    "psi",
    "psi_counts",
    "regularized_upper_gamma",
    "score_many",
    "score_merged",
    "score_summary",
    "wasserstein1",
]

F64: TypeAlias = NDArray[np.float64]

Level: TypeAlias = Literal["ok", "warn", "alert", "insufficient"]
"""Level of one feature or one report; ``insufficient`` = too few samples to judge."""
StateLevel: TypeAlias = Literal["ok", "warn", "alert"]
"""Levels a :class:`Hysteresis` state can take (``insufficient`` windows never change the state)."""
Metric: TypeAlias = Literal["psi", "js", "ks"]
"""Score that drives the level (see :class:`DriftThresholds`)."""

LEVELS: Final[tuple[Level, ...]] = ("insufficient", "ok", "warn", "alert")
"""All levels, from the least to the most severe (the order used for the worst level of a report)."""
_RANK: Final[dict[str, int]] = {"insufficient": -1, "ok": 0, "warn": 1, "alert": 2}
_BY_RANK: Final[dict[int, Level]] = {-1: "insufficient", 0: "ok", 1: "warn", 2: "alert"}
_STATE_BY_RANK: Final[dict[int, StateLevel]] = {0: "ok", 1: "warn", 2: "alert"}

DEFAULT_PSI_EPS: Final = 1e-4
"""Additive smoothing of slot probabilities in :func:`psi` (keeps empty slots finite)."""
_LN2: Final = math.log(2.0)
_BLOCK: Final = 1024
"""Summaries gathered and scored per block (bounds the temporaries of the vectorised path)."""


class InvalidThresholdsError(DriftLayoutError):
    """Drift thresholds (e.g. a bundle manifest's ``drift.thresholds``) that cannot be used."""


# -- the regularized upper incomplete gamma function (chi-square p-values without scipy) ----------------


def regularized_upper_gamma(a: float, x: float) -> float:
    """``Q(a, x) = Gamma(a, x) / Gamma(a)`` for ``a > 0``, ``x >= 0`` (``scipy.special.gammaincc``).

    Series for the lower function ``P = 1 - Q`` when ``x < a + 1`` (there ``Q`` is not small, so ``1 - P``
    loses no relative accuracy), Lentz's continued fraction for ``Q`` otherwise (Numerical Recipes 6.2).
    The common factor ``x^a e^-x / Gamma(a)`` is evaluated in log space with ``math.lgamma``. Relative
    accuracy is about 1e-13 for ``a`` up to ~1e5; results below ~1e-308 underflow to 0.0.
    """
    a, x = float(a), float(x)
    if not (math.isfinite(a) and a > 0.0):
        raise ValueError(f"regularized_upper_gamma needs a finite a > 0, got a={a!r}")
    if math.isnan(x) or x < 0.0:
        raise ValueError(f"regularized_upper_gamma needs x >= 0, got x={x!r}")
    if x == 0.0:
        return 1.0
    if math.isinf(x):
        return 0.0
    log_prefix = a * math.log(x) - x - math.lgamma(a)
    max_iter = 200 + int(40.0 * math.sqrt(a))
    if x < a + 1.0:
        # P(a, x) = x^a e^-x / Gamma(a + 1) * sum_n x^n / ((a + 1) ... (a + n))
        term = 1.0 / a
        total = term
        denom = a
        for _ in range(max_iter):
            denom += 1.0
            term *= x / denom
            total += term
            if term < total * 1e-17:
                break
        return min(1.0, max(0.0, 1.0 - total * math.exp(log_prefix)))
    # Q(a, x) = x^a e^-x / Gamma(a) * 1 / (x + 1 - a - 1 (1 - a) / (x + 3 - a - 2 (2 - a) / (x + 5 - a - ...)))
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, max_iter):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        if abs(d) < tiny:
            d = tiny
        c = b + an / c
        if abs(c) < tiny:
            c = tiny
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return min(1.0, max(0.0, math.exp(log_prefix) * h))


def chi2_sf(statistic: float, dof: int) -> float:
    """Survival function of the chi-square distribution: ``P(X >= statistic)`` for ``dof`` degrees of freedom."""
    if dof < 1:
        raise ValueError(f"chi-square needs dof >= 1, got {dof}")
    return regularized_upper_gamma(dof / 2.0, max(0.0, float(statistic)) / 2.0)


@functools.lru_cache(maxsize=4096)
def _chi2_critical(dof: int, alpha: float) -> float:
    """The statistic ``x`` with ``chi2_sf(x, dof) == alpha`` (bisection; cached): ``p < alpha  <=>  stat > x``."""
    lo, hi = 0.0, float(dof) + 10.0
    while chi2_sf(hi, dof) >= alpha:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if chi2_sf(mid, dof) >= alpha:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return hi


def _significant(statistic: F64, dof: NDArray[np.intp], alpha: float) -> NDArray[np.bool_]:
    """``chi2_sf(statistic, dof) < alpha`` elementwise, via cached critical values (no p-value computed)."""
    if alpha >= 1.0:
        return np.ones(statistic.shape, dtype=np.bool_)
    valid = dof >= 1
    crit = np.full(statistic.shape, np.inf)
    for k in np.unique(dof[valid]).tolist():
        crit[dof == k] = _chi2_critical(int(k), alpha)
    with np.errstate(invalid="ignore"):
        return valid & (statistic > crit)


# -- vectorised score kernels on slot probabilities (..., slots), zero-padded ---------------------------


def _probabilities(counts: F64) -> tuple[F64, F64]:
    """Slot probabilities (NaN where a histogram is empty) and the totals, along the last axis."""
    n = counts.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = counts / n[..., None]
    return p, n


def _psi_kernel(p: F64, q: F64, k: F64, eps: float) -> F64:
    """PSI with additive smoothing; ``k`` = real slots per histogram (padded slots have p = q = 0)."""
    scale = (1.0 / (1.0 + k * eps))[..., None]
    ps = (p + eps) * scale
    qs = (q + eps) * scale
    return cast(F64, np.sum((qs - ps) * (np.log(qs) - np.log(ps)), axis=-1))


def _js_kernel(p: F64, q: F64) -> F64:
    """Jensen-Shannon distance, base 2; empty slots contribute 0 (``0 log 0 = 0``)."""
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        tp = np.where(p > 0.0, p * np.log(p / m), 0.0)
        tq = np.where(q > 0.0, q * np.log(q / m), 0.0)
    div = 0.5 * (tp.sum(axis=-1) + tq.sum(axis=-1)) / _LN2
    empty = np.isnan(p[..., 0]) | np.isnan(q[..., 0])  # a side without values: p (or q) is all NaN
    return cast(F64, np.where(empty, np.nan, np.sqrt(np.clip(div, 0.0, 1.0))))


def _cdf_kernels(p: F64, q: F64, gaps: F64) -> tuple[F64, F64]:
    """Binned KS (max |P - Q| at the slot boundaries) and W1 (sum |P - Q| * gap between support points)."""
    diff = np.abs(np.cumsum(p, axis=-1)[..., :-1] - np.cumsum(q, axis=-1)[..., :-1])
    ks = diff.max(axis=-1)
    w1 = np.where(diff > 0.0, diff * gaps, 0.0).sum(axis=-1)  # 0 * inf (huge edges) stays 0
    return cast(F64, ks), cast(F64, np.where(np.isnan(ks), np.nan, w1))  # an empty side gives NaN


def _chi2_kernel(b: F64, c: F64) -> tuple[F64, NDArray[np.intp]]:
    """Pearson's statistic of the 2 x K homogeneity table per histogram pair, and ``dof = non-empty slots - 1``."""
    nb = b.sum(axis=-1, keepdims=True)
    nc = c.sum(axis=-1, keepdims=True)
    cols = b + c
    with np.errstate(divide="ignore", invalid="ignore"):
        eb = nb * cols / (nb + nc)
        ec = nc * cols / (nb + nc)
        terms = np.where(cols > 0.0, (b - eb) ** 2 / eb + (c - ec) ** 2 / ec, 0.0)
    stat = terms.sum(axis=-1)
    dof = np.maximum((cols > 0.0).sum(axis=-1) - 1, 0).astype(np.intp)
    defined = (nb[..., 0] > 0) & (nc[..., 0] > 0)
    return cast(F64, np.where(defined, stat, np.nan)), cast(NDArray[np.intp], dof)


def psi_counts(base: NDArray[np.number], cur: NDArray[np.number], *, eps: float = DEFAULT_PSI_EPS) -> F64:
    """PSI of slot-count arrays of shape ``(..., K)`` (e.g. 32 features x 18 slots), along the last axis.

    The raw kernel behind :func:`psi`, for callers that already hold count matrices. Every slot counts
    in the smoothing (``K`` = size of the last axis); a row with zero total gives NaN.
    """
    _check_eps(eps)
    b = np.asarray(base, dtype=np.float64)
    c = np.asarray(cur, dtype=np.float64)
    if b.shape[-1:] != c.shape[-1:] or b.ndim == 0:
        raise InvalidInputError(f"psi_counts needs arrays with the same last axis, got {b.shape} and {c.shape}")
    p, nb = _probabilities(b)
    q, nc = _probabilities(c)
    out = _psi_kernel(p, q, np.full(np.broadcast_shapes(nb.shape, nc.shape), float(b.shape[-1])), eps)
    return out


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0.0 < float(eps) < 1.0:
        raise InvalidThresholdsError(f"psi eps must be a number in (0, 1), got {eps!r}")
    return float(eps)


# -- pairs of histograms --------------------------------------------------------------------------------


def _numeric_pair(base: object, cur: object, what: str) -> tuple[NumericHistogram, NumericHistogram]:
    if not isinstance(base, NumericHistogram) or not isinstance(cur, NumericHistogram):
        raise FeatureMismatchError(
            f"{what} compares two numeric histograms, got {type(base).__name__} and {type(cur).__name__}"
        )
    if base.edges != cur.edges:
        raise EdgesMismatchError(
            f"cannot score histograms with different bin edges: baseline {base.edges!r}, current "
            f"{cur.edges!r}; bin the current data with Summary.empty_like(baseline)"
        )
    return base, cur


def _numeric_slots(h: NumericHistogram) -> F64:
    out = np.empty(h.bins + 2, dtype=np.float64)
    out[0] = h.underflow
    out[1:-1] = h.counts
    out[-1] = h.overflow
    return out


def _support(edges: Edges) -> F64:
    """Where each slot's mass sits for W1: underflow at the first edge, bins at their centres, overflow last."""
    e = edges.values
    return np.concatenate(([e[0]], 0.5 * e[:-1] + 0.5 * e[1:], [e[-1]]))


def _category_slots(base: CategoricalCounts, cur: CategoricalCounts) -> tuple[F64, F64]:
    """Counts over the union of names (cap rule applied as in a merge) plus ``other``, both sides."""
    if base.max_categories != cur.max_categories:
        raise CategoryCapMismatchError(
            f"cannot score categorical counts with max_categories {base.max_categories} and "
            f"{cur.max_categories}; build the current counts with Summary.empty_like(baseline)"
        )
    bc, cc = base.counts, cur.counts
    names = sorted(set(bc) | set(cc))
    kept, pooled = names[: base.max_categories], names[base.max_categories :]
    b = [float(bc.get(n, 0)) for n in kept]
    c = [float(cc.get(n, 0)) for n in kept]
    b.append(float(base.other + sum(bc.get(n, 0) for n in pooled)))
    c.append(float(cur.other + sum(cc.get(n, 0) for n in pooled)))
    return np.array(b), np.array(c)


def _pair_slots(base: FeatureSummary, cur: FeatureSummary, what: str) -> tuple[F64, F64]:
    if isinstance(base, CategoricalCounts) and isinstance(cur, CategoricalCounts):
        return _category_slots(base, cur)
    b, c = _numeric_pair(base, cur, what)
    return _numeric_slots(b), _numeric_slots(c)


def psi(base: FeatureSummary, cur: FeatureSummary, *, eps: float = DEFAULT_PSI_EPS) -> float:
    """Population stability index of ``cur`` against ``base`` (numeric or categorical).

    ``sum_i (q'_i - p'_i) ln(q'_i / p'_i)`` over the slots (underflow, bins, overflow; or categories and
    ``other``), with ``p' = (p + eps) / (1 + K eps)`` so that a slot empty on one side stays finite and
    the smoothed vector still sums to 1. NaN when either side has no (non-missing) value. Raises
    :class:`EdgesMismatchError` / :class:`CategoryCapMismatchError` / :class:`FeatureMismatchError` when the
    histograms were not built from the same baseline.
    """
    eps = _check_eps(eps)
    b, c = _pair_slots(base, cur, "psi")
    p, _ = _probabilities(b)
    q, _ = _probabilities(c)
    return float(_psi_kernel(p, q, np.array(float(b.size)), eps))


def js_distance(base: FeatureSummary, cur: FeatureSummary) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between the slot distributions; NaN if a side is empty.

    Equals ``scipy.spatial.distance.jensenshannon(p, q, base=2)`` on the same slots.
    """
    b, c = _pair_slots(base, cur, "js_distance")
    p, _ = _probabilities(b)
    q, _ = _probabilities(c)
    return float(_js_kernel(p, q))


def wasserstein1(base: NumericHistogram, cur: NumericHistogram) -> float:
    """Earth mover's distance (W1, in the feature's units) between two histograms on the same edges.

    Each bin's mass sits at its centre; underflow at the first edge and overflow at the last edge (so
    ``+-inf`` values do not make the distance infinite: the score says "at least this far"). Equals
    ``scipy.stats.wasserstein_distance`` on those support points with the slot counts as weights. NaN if
    a side is empty.
    """
    b, c = _numeric_pair(base, cur, "wasserstein1")
    p, _ = _probabilities(_numeric_slots(b))
    q, _ = _probabilities(_numeric_slots(c))
    _, w1 = _cdf_kernels(p, q, np.diff(_support(b.edges)))
    return float(w1)


def ks_binned(base: NumericHistogram, cur: NumericHistogram) -> float:
    """Kolmogorov-Smirnov statistic at the bin edges: ``max_j |P_j - Q_j|`` of the cumulative slot masses.

    A lower bound of the raw-data two-sample KS statistic, short of it by at most the largest single
    slot probability of either side. NaN if a side is empty.
    """
    b, c = _numeric_pair(base, cur, "ks_binned")
    p, _ = _probabilities(_numeric_slots(b))
    q, _ = _probabilities(_numeric_slots(c))
    ks, _ = _cdf_kernels(p, q, np.zeros(b.bins + 1))
    return float(ks)


class ChiSquareResult(NamedTuple):
    """Pearson chi-square test of homogeneity: statistic, p-value, degrees of freedom."""

    statistic: float
    p_value: float
    dof: int


def _chi_square_slots(b: F64, c: F64) -> ChiSquareResult:
    stat_arr, dof_arr = _chi2_kernel(b, c)
    stat, dof = float(stat_arr), int(dof_arr)
    if math.isnan(stat):
        return ChiSquareResult(math.nan, math.nan, dof)
    if dof < 1:
        return ChiSquareResult(0.0, 1.0, 0)
    return ChiSquareResult(stat, chi2_sf(stat, dof), dof)


def chi_square(base: FeatureSummary, cur: FeatureSummary) -> ChiSquareResult:
    """Pearson's chi-square test of homogeneity of the 2 x K table (baseline row, current row).

    Slots: a categorical feature's union of category names plus ``other``, a numeric feature's underflow,
    bins and overflow; missing values are excluded; slots empty on both sides are dropped and
    ``dof = non-empty slots - 1``. Equals ``scipy.stats.chi2_contingency(table, correction=False)``. The
    p-value comes from :func:`chi2_sf` (no scipy). Both rows are treated as samples, because the training
    baseline is one. With large merged counts any tiny difference is "significant", so the p-value only
    gates the level (:attr:`DriftThresholds.significance`); the effect size (PSI by default) sets it.
    NaN if a side is empty.
    """
    b, c = _pair_slots(base, cur, "chi_square")
    return _chi_square_slots(b, c)


def _missing(h: FeatureSummary) -> int:
    return h.nan if isinstance(h, NumericHistogram) else h.missing


def nan_rate_delta(base: FeatureSummary, cur: FeatureSummary) -> float:
    """``missing share of cur - missing share of base`` (NaN for numeric, ``missing`` for categorical).

    Missing values are left out of every distribution score and reported here instead. NaN when either
    side has seen no value at all.
    """
    _pair_slots(base, cur, "nan_rate_delta")
    bt, ct = base.total, cur.total
    if bt == 0 or ct == 0:
        return math.nan
    return _missing(cur) / ct - _missing(base) / bt


# -- thresholds -----------------------------------------------------------------------------------------


_METRICS: Final[tuple[str, ...]] = get_args(Metric)


@dataclass(frozen=True, slots=True)
class DriftThresholds:
    """When a feature's drift is ``warn`` or ``alert``; a bundle manifest's ``drift.thresholds``.

    ``metric`` names the score that drives the level (``psi`` by default; ``js`` or ``ks``). Categorical
    features have no KS, so with ``metric="ks"`` they are judged on PSI. A level is reached when the score
    is ``>=`` its threshold **and** PSI is statistically significant: under "same distribution"
    ``n_eff * psi`` (``n_eff = n_b n_c / (n_b + n_c)``) is approximately chi-square with ``dof = non-empty
    slots - 1``, and its p-value (:attr:`FeatureScore.psi_p_value`) must be below ``significance`` (default
    1e-3). The
    effect size sets the level; the test keeps the sampling noise of small windows from reaching it
    (``significance=1.0`` turns the gate off). Pearson's chi-square (:func:`chi_square`) is reported but
    does not gate: with a baseline slot that is empty (e.g. underflow of quantile edges) a single current
    value there makes its p-value ~0, while the smoothed PSI stays small.
    Independently, an absolute change of the missing share ``|nan_rate_delta| >= nan_warn`` / ``nan_alert``
    raises the level too. A feature whose current window has fewer than ``min_samples`` non-missing values
    is ``insufficient`` (unless its missing share alone already warns).

    The JS and KS defaults are the values PSI's 0.1 / 0.25 correspond to for a mean shift of a normal
    distribution (0.32 and 0.5 standard deviations). ``psi_eps`` is the smoothing of :func:`psi`.
    """

    psi_warn: float = 0.1
    psi_alert: float = 0.25
    min_samples: int = 200
    metric: Metric = "psi"
    js_warn: float = 0.13
    js_alert: float = 0.21
    ks_warn: float = 0.125
    ks_alert: float = 0.2
    nan_warn: float = 0.1
    nan_alert: float = 0.25
    psi_eps: float = DEFAULT_PSI_EPS
    significance: float = 1e-3

    def __post_init__(self) -> None:
        """Validate every field (raises :class:`InvalidThresholdsError`)."""
        for name in ("psi", "js", "ks", "nan"):
            warn, alert = getattr(self, f"{name}_warn"), getattr(self, f"{name}_alert")
            for key, value in ((f"{name}_warn", warn), (f"{name}_alert", alert)):
                if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                    raise InvalidThresholdsError(f"drift threshold {key} must be a finite number, got {value!r}")
                if value < 0:
                    raise InvalidThresholdsError(f"drift threshold {key} must be >= 0, got {value!r}")
            if alert < warn:
                raise InvalidThresholdsError(
                    f"drift threshold {name}_alert ({alert!r}) must be >= {name}_warn ({warn!r})"
                )
        ms = self.min_samples
        if isinstance(ms, bool) or not isinstance(ms, int) or ms < 1:
            raise InvalidThresholdsError(f"drift threshold min_samples must be an integer >= 1, got {ms!r}")
        if self.metric not in _METRICS:
            raise InvalidThresholdsError(f"drift threshold metric must be one of {list(_METRICS)}, got {self.metric!r}")
        _check_eps(self.psi_eps)
        sig = self.significance
        if isinstance(sig, bool) or not isinstance(sig, int | float) or not 0.0 < sig <= 1.0:
            raise InvalidThresholdsError(f"drift threshold significance must be in (0, 1], got {sig!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> DriftThresholds:
        """Read ``drift.thresholds`` of a bundle manifest; missing keys take the defaults.

        Unknown keys are rejected (a typo must not silently become a default), except ``x_`` extensions.
        """
        if not isinstance(data, Mapping):
            raise InvalidThresholdsError(f"drift thresholds must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        values: dict[str, object] = {}
        for key, value in data.items():
            if not isinstance(key, str):
                raise InvalidThresholdsError(f"drift threshold keys must be strings, got {key!r}")
            if key.startswith(EXTENSION_PREFIX):
                continue
            if key not in known:
                raise InvalidThresholdsError(
                    f"unknown drift threshold {key!r}; known: {sorted(known)} (prefix private keys with 'x_')"
                )
            values[key] = value
        return cls(**values)  # type: ignore[arg-type]  # every field is validated in __post_init__

    def to_dict(self) -> dict[str, JsonValue]:
        """All thresholds as plain values."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def warn_alert(self, kind: str) -> tuple[Metric, float, float]:
        """The driving metric for a feature of ``kind`` and its warn / alert thresholds."""
        metric: Metric = "psi" if (self.metric == "ks" and kind == CATEGORICAL_KIND) else self.metric
        if metric == "js":
            return metric, self.js_warn, self.js_alert
        if metric == "ks":
            return metric, self.ks_warn, self.ks_alert
        return metric, self.psi_warn, self.psi_alert


# -- results --------------------------------------------------------------------------------------------


def _opt(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass(frozen=True, slots=True)
class FeatureScore:
    """Scores of one feature of a current summary against the baseline.

    ``None`` marks a score that is undefined (a side without values) or does not apply to the kind:
    ``wasserstein``/``ks`` are numeric only. ``chi2``/``dof`` (and the :attr:`p_value` property) are the
    binned chi-square test of homogeneity (:func:`chi_square`, on the slots of either kind). ``samples`` /
    ``baseline_samples`` are the current / baseline non-missing counts the scores use; ``nan_rate_delta``
    the change of the missing share. :attr:`psi_p_value` is the p-value of PSI's own test
    (``n_eff * psi ~ chi2(dof)``, ``n_eff = n_b n_c / (n_b + n_c)``) that gates the level (see
    :class:`DriftThresholds`). p-values are computed when read, so scoring 10 000 devices does not pay for
    320 000 of them; the gate itself compares with cached critical values.
    """

    feature: str
    kind: str
    psi: float | None
    js: float | None
    wasserstein: float | None
    ks: float | None
    chi2: float | None
    dof: int
    samples: int
    baseline_samples: int
    level: Level
    nan_rate_delta: float | None = None

    @property
    def p_value(self) -> float | None:
        """p-value of Pearson's chi-square test of homogeneity (``chi2`` with ``dof``); computed on access."""
        if self.chi2 is None:
            return None
        return chi2_sf(self.chi2, self.dof) if self.dof >= 1 else 1.0

    @property
    def psi_p_value(self) -> float | None:
        """p-value of PSI's own test, ``n_eff * psi ~ chi2(dof)``: the gate of the level; computed on access."""
        if self.psi is None or not self.samples or not self.baseline_samples:
            return None
        n_eff = self.samples * self.baseline_samples / (self.samples + self.baseline_samples)
        return chi2_sf(n_eff * self.psi, self.dof) if self.dof >= 1 else 1.0

    def score(self, metric: Metric) -> float | None:
        """The value of ``metric`` (``ks`` falls back to ``psi`` for categorical features)."""
        if metric == "js":
            return self.js
        if metric == "ks" and self.kind == NUMERIC_KIND:
            return self.ks
        return self.psi

    def to_dict(self) -> dict[str, JsonValue]:
        """Plain values (``None`` for undefined scores), p-values included, for JSON / msgpack."""
        doc: dict[str, JsonValue] = {f.name: getattr(self, f.name) for f in fields(self)}
        doc["p_value"] = self.p_value
        doc["psi_p_value"] = self.psi_p_value
        return doc


@dataclass(frozen=True, slots=True)
class DriftReport:
    """Per-feature scores (baseline order) and the overall picture of one current summary.

    ``level`` is the worst feature level (``alert > warn > ok``; ``insufficient`` only when no feature could
    be judged); ``drifted_share`` the share of judged features at ``warn`` or ``alert``; ``top`` the names
    of those features, most severe first (level, then the driving score, descending).
    """

    features: tuple[FeatureScore, ...]
    level: Level
    drifted_share: float
    top: tuple[str, ...]
    metric: Metric

    @property
    def samples(self) -> int:
        """Largest number of non-missing values of any feature (the window size for a full window)."""
        return max((f.samples for f in self.features), default=0)

    @property
    def counts(self) -> dict[Level, int]:
        """How many features are at each level."""
        out: dict[Level, int] = dict.fromkeys(LEVELS, 0)
        for f in self.features:
            out[f.level] += 1
        return out

    def feature(self, name: str) -> FeatureScore:
        """The score of feature ``name`` (``KeyError`` if the baseline has no such feature)."""
        for f in self.features:
            if f.feature == name:
                return f
        raise KeyError(name)

    def to_dict(self) -> dict[str, JsonValue]:
        """Plain values, for JSON / msgpack."""
        counts: dict[str, JsonValue] = {key: value for key, value in self.counts.items()}
        return {
            "level": self.level,
            "drifted_share": self.drifted_share,
            "top": list(self.top),
            "metric": self.metric,
            "counts": counts,
            "features": [f.to_dict() for f in self.features],
        }


def _report(scores: list[FeatureScore], metric: Metric) -> DriftReport:
    judged = [s for s in scores if s.level != "insufficient"]
    drifted = [s for s in judged if s.level in ("warn", "alert")]
    drifted.sort(key=lambda s: (-_RANK[s.level], -(s.score(metric) or 0.0), s.feature))
    worst = max((_RANK[s.level] for s in scores), default=-1)
    return DriftReport(
        features=tuple(scores),
        level=_BY_RANK[worst],
        drifted_share=len(drifted) / len(judged) if judged else 0.0,
        top=tuple(s.feature for s in drifted),
        metric=metric,
    )


def _level_codes(value: F64, significant: NDArray[np.bool_], samples: F64, total: F64, nan_delta: F64, *,
                 thr: DriftThresholds, warn: float, alert: float) -> NDArray[np.int8]:
    """Level rank per feature (-1 insufficient, 0 ok, 1 warn, 2 alert), vectorised."""
    with np.errstate(invalid="ignore"):
        dist = (value >= warn).astype(np.int8) + (value >= alert).astype(np.int8)
        dist = np.where(significant, dist, 0).astype(np.int8)
        nd = np.abs(nan_delta)
        nan_level = (nd >= thr.nan_warn).astype(np.int8) + (nd >= thr.nan_alert).astype(np.int8)
    nan_level = np.where((total >= thr.min_samples) & np.isfinite(nan_delta), nan_level, 0)
    judged = (samples >= thr.min_samples) & np.isfinite(value)
    return cast(
        NDArray[np.int8],
        np.where(judged, np.maximum(dist, nan_level), np.where(nan_level > 0, nan_level, -1)).astype(np.int8),
    )


# -- the prepared scorer --------------------------------------------------------------------------------


_COLUMNS: Final = ("psi", "js", "wasserstein", "ks", "chi2", "dof", "samples", "baseline_samples", "level",
                   "nan_rate_delta")
"""Per-feature columns of the vectorised path, in :class:`FeatureScore` field order (after feature, kind)."""
_INT_COLUMNS: Final = frozenset({"dof", "samples", "baseline_samples", "level"})


def _edges_key(edges: Edges) -> tuple[int, bytes]:
    return hash(edges), edges.values.tobytes()


@dataclass(frozen=True, slots=True)
class _NumericPlan:
    """The baseline's numeric features as zero-padded slot matrices (features x slots)."""

    names: tuple[str, ...]
    edges: tuple[Edges, ...]
    keys: tuple[tuple[int, bytes], ...]
    bins: NDArray[np.intp]
    rows: NDArray[np.intp]  # scatter of the concatenated bin counts into (features, slots)
    cols: NDArray[np.intp]
    k: F64  # real slots per feature (bins + 2)
    gaps: F64  # (features, slots - 1) distances between W1 support points; 0 on padding
    base: F64  # (features, slots) baseline slot counts
    base_nan: F64
    width: int

    @staticmethod
    def of(items: list[tuple[str, NumericHistogram]]) -> _NumericPlan:
        features = len(items)
        bins = np.array([h.bins for _, h in items], dtype=np.intp)
        width = int(bins.max()) + 2 if features else 3
        rows = np.repeat(np.arange(features, dtype=np.intp), bins)
        cols = np.concatenate([np.arange(1, b + 1, dtype=np.intp) for b in bins]) if features else rows
        gaps = np.zeros((features, width - 1))
        base = np.zeros((features, width))
        for i, (_, h) in enumerate(items):
            gaps[i, : h.bins + 1] = np.diff(_support(h.edges))
            base[i, : h.bins + 2] = _numeric_slots(h)
        return _NumericPlan(
            names=tuple(name for name, _ in items),
            edges=tuple(h.edges for _, h in items),
            keys=tuple(_edges_key(h.edges) for _, h in items),
            bins=bins,
            rows=rows,
            cols=cols,
            k=(bins + 2).astype(np.float64),
            gaps=gaps,
            base=base,
            base_nan=np.array([float(h.nan) for _, h in items]),
            width=width,
        )


class DriftScorer:
    """A baseline prepared for scoring: per-feature slot matrices, W1 support points, edge keys.

    Build one per bundle (baseline + thresholds) and reuse it; scoring is vectorised over summaries x
    numeric features x slots (categorical features are scored one by one). Currents must have the
    baseline's feature names (any order) and kinds, numeric features the baseline's edges and categorical
    ones its ``max_categories``; otherwise the layout's typed mismatch errors are raised.
    """

    __slots__ = ("_baseline", "_cat", "_names", "_num", "_order", "_thresholds")

    def __init__(self, baseline: Summary, thresholds: DriftThresholds | None = None) -> None:
        """Prepare ``baseline`` (a bundle's training summary) with ``thresholds`` (defaults if ``None``)."""
        if not isinstance(baseline, Summary):
            raise InvalidInputError(f"DriftScorer needs a Summary baseline, got {type(baseline).__name__}")
        thr = DriftThresholds() if thresholds is None else thresholds
        if not isinstance(thr, DriftThresholds):
            raise InvalidThresholdsError(f"thresholds must be DriftThresholds, got {type(thr).__name__}")
        self._baseline = baseline
        self._thresholds = thr
        self._names = baseline.names
        numeric: list[tuple[str, NumericHistogram]] = []
        self._cat: list[tuple[str, CategoricalCounts]] = []
        for name in self._names:
            feature = baseline[name]
            if isinstance(feature, NumericHistogram):
                numeric.append((name, feature))
            else:
                self._cat.append((name, feature))
        self._num = _NumericPlan.of(numeric)
        # Position of every feature of the report (baseline order) in (numeric list, categorical list).
        num_pos = {name: i for i, (name, _) in enumerate(numeric)}
        cat_pos = {name: i for i, (name, _) in enumerate(self._cat)}
        self._order: tuple[tuple[bool, int], ...] = tuple(
            (True, num_pos[n]) if n in num_pos else (False, cat_pos[n]) for n in self._names
        )

    @property
    def baseline(self) -> Summary:
        """The baseline summary."""
        return self._baseline

    @property
    def thresholds(self) -> DriftThresholds:
        """The thresholds applied."""
        return self._thresholds

    # -- public entry points ----------------------------------------------------------------------------

    def score(self, current: Summary) -> DriftReport:
        """Score one current summary (a device window, or an already merged view)."""
        return self.score_many([current])[0]

    def score_many(self, currents: Sequence[Summary]) -> list[DriftReport]:
        """Score each summary separately (e.g. one report per device), vectorised across them."""
        reports: list[DriftReport] = []
        for start in range(0, len(currents), _BLOCK):
            block = currents[start : start + _BLOCK]
            counts, nan = self._gather(block)
            num = self._numeric_metrics(counts, nan)
            cats = self._categorical_metrics([cur[name] for name, _ in self._cat] for cur in block)
            reports.extend(self._build(num, i, [per_summary[i] for per_summary in cats]) for i in range(len(block)))
        return reports

    def score_merged(self, currents: Iterable[Summary]) -> DriftReport:
        """Score the merge of ``currents`` (e.g. all devices' windows of an hour) with one set of scores.

        Equivalent to ``score(functools.reduce(Summary.merge, currents))`` but only the slot counts are
        summed (float64: exact up to 2**53 per slot, never wraps), in blocks, without building merged
        histograms or moments.
        """
        plan = self._num
        total = np.zeros((1, len(plan.names), plan.width))
        nan_total = np.zeros((1, len(plan.names)))
        cat_acc = [_CategoricalAccumulator(base) for _, base in self._cat]
        block: list[Summary] = []
        seen = 0

        def flush() -> None:
            nonlocal total, nan_total
            counts, nan = self._gather(block)
            total = total + counts.sum(axis=0, keepdims=True)
            nan_total = nan_total + nan.sum(axis=0, keepdims=True)
            for (name, _), acc in zip(self._cat, cat_acc, strict=True):
                for cur in block:
                    acc.add(name, cur[name])
            block.clear()

        for cur in currents:
            block.append(cur)
            seen += 1
            if len(block) == _BLOCK:
                flush()
        if block:
            flush()
        if seen == 0:
            raise InvalidInputError("score_merged needs at least one current summary")
        num = self._numeric_metrics(total, nan_total)
        cats = self._categorical_metrics([[acc.result() for acc in cat_acc]])
        return self._build(num, 0, [per_summary[0] for per_summary in cats])

    # -- gathering --------------------------------------------------------------------------------------

    def _check_features(self, cur: object) -> Mapping[str, FeatureSummary]:
        if not isinstance(cur, Summary):
            raise FeatureMismatchError(f"can only score a Summary, got {type(cur).__name__}")
        names = cur.names
        if names != self._names and set(names) != set(self._names):
            missing = [n for n in self._names if n not in cur]
            extra = [n for n in names if n not in self._baseline]
            raise FeatureMismatchError(
                f"cannot score a summary with different features: missing {missing}, extra {extra}; build it "
                "from the bundle's baseline (Summary.empty_like(baseline))"
            )
        return cur

    def _gather(self, block: Sequence[Summary]) -> tuple[F64, F64]:
        """Slot counts (summaries, numeric features, slots) and NaN counts (summaries, features)."""
        plan = self._num
        features = len(plan.names)
        arrays: list[NDArray[np.int64]] = []
        scalars: list[int] = []
        for cur in block:
            feats = self._check_features(cur)
            for name, edges, (key_hash, key_bytes) in zip(plan.names, plan.edges, plan.keys, strict=True):
                h = feats[name]
                if not isinstance(h, NumericHistogram):
                    raise FeatureMismatchError(
                        f"feature {name!r} is numeric in the baseline but {h.kind} in the current summary"
                    )
                e = h._edges
                if e is not edges and (e._hash != key_hash or e._values.tobytes() != key_bytes):
                    raise EdgesMismatchError(
                        f"feature {name!r}: cannot score histograms with different bin edges: baseline "
                        f"{edges!r}, current {e!r}; bin the current data with Summary.empty_like(baseline)"
                    )
                arrays.append(h._counts)
                scalars += (h._underflow, h._overflow, h._nan)
        n = len(block)
        out = np.zeros((n, features, plan.width))
        if not features or not n:
            return out, np.zeros((n, features))
        flat = np.concatenate(arrays).astype(np.float64).reshape(n, -1)
        sc = np.array(scalars, dtype=np.float64).reshape(n, features, 3)
        idx = np.arange(features)
        out[:, plan.rows, plan.cols] = flat
        out[:, idx, 0] = sc[..., 0]
        out[:, idx, plan.bins + 1] = sc[..., 1]
        return out, sc[..., 2]

    # -- metrics ----------------------------------------------------------------------------------------

    def _numeric_metrics(self, counts: F64, nan: F64) -> dict[str, NDArray[Any]]:
        """Per (summary, numeric feature): scores as object arrays (``None`` where undefined), counts as int."""
        plan = self._num
        thr = self._thresholds
        p, nb = _probabilities(plan.base)
        q, nc = _probabilities(counts)
        defined = (nb > 0) & (nc > 0)
        psi_v = _psi_kernel(p, q, plan.k, thr.psi_eps)
        js_v = _js_kernel(p, q)
        ks_v, w1_v = _cdf_kernels(p, q, plan.gaps)
        chi2_v, dof = _chi2_kernel(np.broadcast_to(plan.base, counts.shape), counts)
        with np.errstate(divide="ignore", invalid="ignore"):
            n_eff = nb * nc / (nb + nc)
        out: dict[str, NDArray[Any]] = {"psi": psi_v, "js": js_v, "ks": ks_v, "wasserstein": w1_v, "chi2": chi2_v}
        for key, value in out.items():
            out[key] = np.where(defined, value, np.nan)
        base_total = nb + plan.base_nan
        cur_total = nc + nan
        with np.errstate(divide="ignore", invalid="ignore"):
            nan_delta = np.where((base_total > 0) & (cur_total > 0), nan / cur_total - plan.base_nan / base_total,
                                 np.nan)
        metric, warn, alert = thr.warn_alert(NUMERIC_KIND)
        significant = _significant(n_eff * out["psi"], dof, thr.significance)
        out["level"] = _level_codes(out[metric], significant, nc, cur_total, nan_delta, thr=thr, warn=warn,
                                    alert=alert)
        out["dof"] = dof
        out["baseline_samples"] = np.broadcast_to(nb, nc.shape)
        out["samples"] = nc
        out["nan_rate_delta"] = nan_delta
        none = np.array(None, dtype=object)
        return {key: (out[key].astype(np.int64) if key in _INT_COLUMNS else
                      np.where(np.isfinite(out[key]), out[key], none)) for key in _COLUMNS}

    def _categorical_metrics(self, rows: Iterable[Iterable[FeatureSummary]]) -> list[list[FeatureScore]]:
        """Scores per categorical feature (outer list) and summary (inner list)."""
        per_feature: list[list[FeatureScore]] = [[] for _ in self._cat]
        thr = self._thresholds
        metric, warn, alert = thr.warn_alert(CATEGORICAL_KIND)
        for row in rows:
            for j, ((name, base), cur) in enumerate(zip(self._cat, row, strict=True)):
                if not isinstance(cur, CategoricalCounts):
                    raise FeatureMismatchError(
                        f"feature {name!r} is categorical in the baseline but {cur.kind} in the current summary"
                    )
                try:
                    b, c = _category_slots(base, cur)
                except CategoryCapMismatchError as exc:
                    raise CategoryCapMismatchError(f"feature {name!r}: {exc}") from exc
                p, nb = _probabilities(b)
                q, nc = _probabilities(c)
                defined = bool(nb > 0 and nc > 0)
                psi_v = float(_psi_kernel(p, q, np.array(float(b.size)), thr.psi_eps)) if defined else math.nan
                js_v = float(_js_kernel(p, q)) if defined else math.nan
                chi = _chi_square_slots(b, c)
                n_eff = float(nb * nc / (nb + nc)) if defined else math.nan
                significant = _significant(np.array(n_eff * psi_v), np.array(chi.dof, dtype=np.intp), thr.significance)
                bt, ct = base.total, cur.total
                nd = cur.missing / ct - base.missing / bt if bt and ct else math.nan
                value = psi_v if metric == "psi" else js_v
                code = int(_level_codes(np.array(value), significant, np.array(float(nc)),
                                        np.array(float(ct)), np.array(nd), thr=thr, warn=warn, alert=alert))
                per_feature[j].append(FeatureScore(
                    feature=name, kind=CATEGORICAL_KIND, psi=_opt(psi_v), js=_opt(js_v), wasserstein=None,
                    ks=None, chi2=_opt(chi.statistic), dof=chi.dof, samples=int(nc), baseline_samples=int(nb),
                    level=_BY_RANK[code], nan_rate_delta=_opt(nd),
                ))
        return per_feature

    def _build(self, cols: dict[str, NDArray[Any]], i: int, cats: list[FeatureScore]) -> DriftReport:
        """The report of summary ``i`` from the per-block columns of :meth:`_numeric_metrics`."""
        row = [cols[key][i].tolist() for key in _COLUMNS]
        numeric = [
            FeatureScore(name, NUMERIC_KIND, psi_v, js_v, w1_v, ks_v, chi2_v, dof, samples, base_n, _BY_RANK[code], nd)
            for name, psi_v, js_v, w1_v, ks_v, chi2_v, dof, samples, base_n, code, nd in zip(
                self._num.names, *row, strict=True
            )
        ]
        scores = [numeric[j] if is_num else cats[j] for is_num, j in self._order]
        return _report(scores, self._thresholds.metric)


class _CategoricalAccumulator:
    """Sums categorical counts of many summaries for one feature (cap rule applied once, at the end)."""

    __slots__ = ("_base", "_counts", "_missing", "_other")

    def __init__(self, base: CategoricalCounts) -> None:
        self._base = base
        self._counts: dict[str, int] = {}
        self._other = 0
        self._missing = 0

    def add(self, name: str, cur: FeatureSummary) -> None:
        if not isinstance(cur, CategoricalCounts):
            raise FeatureMismatchError(
                f"feature {name!r} is categorical in the baseline but {cur.kind} in the current summary"
            )
        if cur.max_categories != self._base.max_categories:
            raise CategoryCapMismatchError(
                f"feature {name!r}: cannot score categorical counts with max_categories "
                f"{self._base.max_categories} and {cur.max_categories}"
            )
        for key, value in cur.counts.items():
            self._counts[key] = self._counts.get(key, 0) + value
        self._other += cur.other
        self._missing += cur.missing

    def result(self) -> CategoricalCounts:
        cap = self._base.max_categories
        names = sorted(self._counts)
        data: dict[str, JsonValue] = {
            "kind": CATEGORICAL_KIND,
            "counts": {n: self._counts[n] for n in names[:cap]},
            "other": self._other + sum(self._counts[n] for n in names[cap:]),
            "missing": self._missing,
            "max_categories": cap,
        }
        return CategoricalCounts.from_dict(data)


# -- module-level conveniences --------------------------------------------------------------------------


def score_summary(baseline: Summary, current: Summary, thresholds: DriftThresholds | None = None) -> DriftReport:
    """Score every feature of ``current`` against ``baseline`` (see :class:`DriftScorer`)."""
    return DriftScorer(baseline, thresholds).score(current)


def score_many(
    baseline: Summary, currents: Sequence[Summary], thresholds: DriftThresholds | None = None
) -> list[DriftReport]:
    """One report per current summary (e.g. per device), vectorised (see :meth:`DriftScorer.score_many`)."""
    return DriftScorer(baseline, thresholds).score_many(currents)


def score_merged(
    baseline: Summary, currents: Iterable[Summary], thresholds: DriftThresholds | None = None
) -> DriftReport:
    """One report for the merge of all ``currents`` (see :meth:`DriftScorer.score_merged`)."""
    return DriftScorer(baseline, thresholds).score_merged(currents)


# -- hysteresis -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HysteresisState:
    """State of a :class:`Hysteresis` after a window.

    ``level`` is the debounced level; ``changed`` whether the last window changed it; ``recent`` the last
    qualifying window levels (oldest first, as many as the rules need); ``windows`` / ``ignored`` count the
    qualifying windows and those ignored (too few samples or ``insufficient``).
    """

    level: StateLevel = "ok"
    changed: bool = False
    recent: tuple[StateLevel, ...] = ()
    windows: int = 0
    ignored: int = 0


class Hysteresis:
    """Debounces per-window drift levels so that small or noisy windows cannot make the state flap.

    Rules (a *qualifying* window has ``samples >= min_samples`` and a level other than ``insufficient``;
    other windows are ignored entirely: they neither change the state nor interrupt a run):

    * **rise**: when the last ``rise_after`` qualifying windows are all above the state, the state rises to
      the lowest of their levels (``alert`` needs ``rise_after`` consecutive ``alert`` windows);
    * **fall**: when the last ``fall_after`` qualifying windows are all below the state, the state falls to
      the highest of their levels.

    Consequently a rise and the following fall are at least ``fall_after`` qualifying windows apart, a fall
    and the following rise at least ``rise_after``. :meth:`step` is the pure transition; :meth:`update`
    applies it to the state held by the object.
    """

    __slots__ = ("_state", "fall_after", "min_samples", "rise_after")

    def __init__(self, *, rise_after: int = 2, fall_after: int = 3, min_samples: int = 200,
                 initial: StateLevel = "ok") -> None:
        """Rules as above; ``initial`` is the starting level."""
        for key, value in (("rise_after", rise_after), ("fall_after", fall_after), ("min_samples", min_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidThresholdsError(f"Hysteresis {key} must be an integer >= 1, got {value!r}")
        if initial not in _STATE_BY_RANK.values():
            raise InvalidThresholdsError(f"Hysteresis initial level must be ok, warn or alert, got {initial!r}")
        self.rise_after = rise_after
        self.fall_after = fall_after
        self.min_samples = min_samples
        self._state = HysteresisState(level=initial)

    @classmethod
    def for_thresholds(cls, thresholds: DriftThresholds, *, rise_after: int = 2, fall_after: int = 3) -> Hysteresis:
        """A hysteresis using ``thresholds.min_samples``."""
        return cls(rise_after=rise_after, fall_after=fall_after, min_samples=thresholds.min_samples)

    @property
    def state(self) -> HysteresisState:
        """The current state."""
        return self._state

    @property
    def level(self) -> StateLevel:
        """The current debounced level."""
        return self._state.level

    def step(self, state: HysteresisState, level: Level, samples: int) -> HysteresisState:
        """The state after a window with ``level`` and ``samples`` values (pure; ``state`` is not changed)."""
        if level not in _RANK:
            raise InvalidInputError(f"unknown drift level {level!r}; expected one of {list(LEVELS)}")
        if level == "insufficient" or samples < self.min_samples:
            return replace(state, changed=False, ignored=state.ignored + 1)
        memory = max(self.rise_after, self.fall_after)
        recent = (*state.recent, _STATE_BY_RANK[_RANK[level]])[-memory:]
        current = _RANK[state.level]
        new = current
        if len(recent) >= self.rise_after:
            low = min(_RANK[v] for v in recent[-self.rise_after :])
            if low > current:
                new = low
        if len(recent) >= self.fall_after:
            high = max(_RANK[v] for v in recent[-self.fall_after :])
            if high < current:
                new = high
        return HysteresisState(
            level=_STATE_BY_RANK[new], changed=new != current, recent=recent, windows=state.windows + 1,
            ignored=state.ignored,
        )

    def update(self, level: Level, samples: int) -> HysteresisState:
        """Apply one window to the held state and return the new state."""
        self._state = self.step(self._state, level, samples)
        return self._state
