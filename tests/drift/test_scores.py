"""Drift scores (agent.drift.scores) against scipy on the same bins, on scikit-learn's bundled data sets.

scipy is only the reference here: the scores themselves use numpy and the standard library. Baselines
are binned with 16 quantile edges from a train split; currents are the held-out split as is, shifted by
half a (train) standard deviation, and rescaled 1.5x around the train mean.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from scipy.spatial.distance import jensenshannon
from scipy.special import gammaincc, rel_entr
from scipy.stats import chi2 as chi2_dist
from scipy.stats import chi2_contingency, chisquare, ks_2samp, wasserstein_distance
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_wine
from sklearn.model_selection import train_test_split

from agent.drift import (
    DEFAULT_PSI_EPS,
    CategoricalCounts,
    CategoryCapMismatchError,
    DriftReport,
    DriftScorer,
    DriftThresholds,
    Edges,
    EdgesMismatchError,
    FeatureMismatchError,
    InvalidThresholdsError,
    NumericHistogram,
    Summary,
    chi2_sf,
    chi_square,
    js_distance,
    ks_binned,
    nan_rate_delta,
    psi,
    psi_counts,
    regularized_upper_gamma,
    score_many,
    score_merged,
    score_summary,
    wasserstein1,
)
from agent.drift.numeric import EMPTY_MOMENTS
from agent.drift.scores import _chi2_critical, _significant

F64 = NDArray[np.float64]
BINS = 16
LOADERS: dict[str, Callable[[], Any]] = {
    "breast_cancer": load_breast_cancer,
    "wine": load_wine,
    "diabetes": load_diabetes,
    "digits": load_digits,
}


# -- helpers ---------------------------------------------------------------------------------------


def split(name: str) -> tuple[F64, F64, list[str]]:
    bunch = LOADERS[name]()
    train, test = train_test_split(np.asarray(bunch.data, dtype=np.float64), test_size=0.3, random_state=0)
    return train, test, [str(n) for n in bunch.feature_names]


def variants(train: F64, test: F64) -> dict[str, F64]:
    """The held-out data as is, with every feature shifted by 0.5 sd, and rescaled 1.5x around the mean."""
    mean, sd = train.mean(axis=0), train.std(axis=0)
    return {"heldout": test, "shifted": test + 0.5 * sd, "rescaled": mean + 1.5 * (test - mean)}


def slots(h: NumericHistogram) -> F64:
    return np.array([h.underflow, *h.counts.tolist(), h.overflow], dtype=np.float64)


def support(h: NumericHistogram) -> F64:
    e = h.edges.values
    return np.concatenate(([e[0]], (e[:-1] + e[1:]) / 2, [e[-1]]))


def reference_psi(b: F64, c: F64, eps: float = DEFAULT_PSI_EPS) -> float:
    """PSI written as the symmetric KL divergence of the smoothed slot distributions (scipy.special.rel_entr)."""
    k = b.size
    p = (b / b.sum() + eps) / (1 + k * eps)
    q = (c / c.sum() + eps) / (1 + k * eps)
    return float(np.sum(rel_entr(q, p) + rel_entr(p, q)))


def numeric_cases() -> list[tuple[str, str, int, NumericHistogram, NumericHistogram, F64, F64]]:
    cases = []
    for name in LOADERS:
        train, test, features = split(name)
        for variant, cur in variants(train, test).items():
            for j, feature in enumerate(features):
                edges = Edges.quantiles(train[:, j], BINS)
                base = NumericHistogram.from_values(edges, train[:, j])
                current = NumericHistogram.from_values(edges, cur[:, j])
                cases.append((name, variant, j, base, current, train[:, j], cur[:, j]))
                del feature
    return cases


CASES = numeric_cases()


def approx(ref: float) -> Any:
    return pytest.approx(ref, rel=1e-9, abs=1e-9)


# -- numeric scores vs scipy on the same bins ------------------------------------------------------


def test_cases_cover_every_data_set_variant_and_drift() -> None:
    assert len(CASES) == 3 * (30 + 13 + 10 + 64)
    shifted = [psi(b, c) for _, v, _, b, c, _, _ in CASES if v == "shifted"]
    heldout = [psi(b, c) for _, v, _, b, c, _, _ in CASES if v == "heldout"]
    assert np.median(shifted) > 2 * np.median(heldout)  # the shifted data really drifted


@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: f"{CASES[i][0]}-{CASES[i][1]}-{CASES[i][2]}")
def test_numeric_scores_match_scipy_on_the_same_bins(case: int) -> None:
    _, _, _, base, cur, raw_base, raw_cur = CASES[case]
    b, c = slots(base), slots(cur)
    p, q = b / b.sum(), c / c.sum()
    assert psi(base, cur) == approx(reference_psi(b, c))
    assert js_distance(base, cur) == approx(float(jensenshannon(p, q, base=2)))
    x = support(base)
    assert wasserstein1(base, cur) == approx(float(wasserstein_distance(x, x, u_weights=b, v_weights=c)))
    # The KS statistic at the bin edges vs scipy's on the raw values: never above it, and below it by at
    # most the largest single slot mass of either distribution.
    ks = ks_binned(base, cur)
    raw = float(ks_2samp(raw_base, raw_cur).statistic)
    biggest = float(max(p.max(), q.max()))
    assert raw - biggest - 1e-12 <= ks <= raw + 1e-12
    assert nan_rate_delta(base, cur) == 0.0
    # Pearson's chi-square test of homogeneity on the same slots (empty columns dropped, as scipy needs).
    t = np.stack([b, c])
    t = t[:, t.sum(axis=0) > 0]
    got = chi_square(base, cur)
    if t.shape[1] > 1:
        stat, pval, dof, _ = chi2_contingency(t, correction=False)
        assert (got.statistic, got.dof) == (approx(float(stat)), dof)
        assert got.p_value == pytest.approx(float(pval), rel=1e-9, abs=1e-300)
    else:
        assert got == (0.0, 1.0, 0)


def test_binned_ks_is_exact_when_every_value_sits_on_an_edge() -> None:
    # Integer data with an edge at every integer: the binned CDF is the raw CDF at every data point.
    rng = np.random.default_rng(3)
    edges = Edges.uniform(0.0, 20.0, 20)
    a, b = rng.poisson(6.0, 3000).astype(float), rng.poisson(7.0, 2000).astype(float)
    ks = ks_binned(NumericHistogram.from_values(edges, a), NumericHistogram.from_values(edges, b))
    assert ks == approx(float(ks_2samp(a, b).statistic))


def test_identical_histograms_score_zero() -> None:
    _, _, _, base, _, _, _ = CASES[0]
    same = NumericHistogram.from_dict(base.to_dict())  # equal, but distinct Edges object
    assert psi(base, same) == 0.0
    assert js_distance(base, same) == 0.0
    assert wasserstein1(base, same) == 0.0
    assert ks_binned(base, same) == 0.0


def test_psi_counts_is_the_vectorised_kernel() -> None:
    pairs = [(slots(b), slots(c)) for _, v, _, b, c, _, _ in CASES if v == "shifted"][:32]
    width = max(b.size for b, _ in pairs)
    same_width = [(b, c) for b, c in pairs if b.size == width]
    bm = np.stack([b for b, _ in same_width])
    cm = np.stack([c for _, c in same_width])
    got = psi_counts(bm, cm)
    assert got.shape == (len(same_width),)
    for value, (b, c) in zip(got, same_width, strict=True):
        assert value == approx(reference_psi(b, c))


# -- categorical: chi-square without scipy ---------------------------------------------------------


def digits_pixel(col: int) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    """Intensities (0..16) of one pixel as categories: train split, test split, test split of digits 0 and 1."""
    bunch = load_digits()
    x_train, x_test, _, y_test = train_test_split(bunch.data, bunch.target, test_size=0.3, random_state=0)
    values = lambda a: a[:, col].astype(int).astype(str)  # noqa: E731
    return values(x_train), values(x_test), values(x_test[y_test <= 1])


def table(base: CategoricalCounts, cur: CategoricalCounts) -> F64:
    """The 2 x K contingency table built independently: names of both sides, cap rule, other; empty columns dropped."""
    names = sorted(set(base.counts) | set(cur.counts))
    kept, pooled = names[: base.max_categories], names[base.max_categories :]
    rows = []
    for h in (base, cur):
        row = [h.counts.get(n, 0) for n in kept] + [h.other + sum(h.counts.get(n, 0) for n in pooled)]
        rows.append(row)
    t = np.array(rows, dtype=np.float64)
    return t[:, t.sum(axis=0) > 0]


@pytest.mark.parametrize("col", [10, 20, 21, 36, 43, 53])
@pytest.mark.parametrize("cap", [256, 6])
def test_chi_square_matches_scipy_chi2_contingency(col: int, cap: int) -> None:
    train, test, subset = digits_pixel(col)
    base = CategoricalCounts.from_values(train, max_categories=cap)
    for values in (test, subset):
        cur = CategoricalCounts.from_values(values, max_categories=cap)
        t = table(base, cur)
        stat, p, dof, _ = chi2_contingency(t, correction=False)
        got = chi_square(base, cur)
        assert got.dof == dof == t.shape[1] - 1
        assert got.statistic == approx(float(stat))
        assert got.p_value == pytest.approx(float(p), rel=1e-9, abs=1e-300)
        # PSI and JS of categorical counts use the same slots (with empty columns kept: they add nothing to JS).
        full = table_keep_empty(base, cur)
        assert psi(base, cur) == approx(reference_psi(full[0], full[1]))
        assert js_distance(base, cur) == approx(float(jensenshannon(full[0], full[1], base=2)))


def table_keep_empty(base: CategoricalCounts, cur: CategoricalCounts) -> F64:
    names = sorted(set(base.counts) | set(cur.counts))
    kept, pooled = names[: base.max_categories], names[base.max_categories :]
    return np.array(
        [[h.counts.get(n, 0) for n in kept] + [h.other + sum(h.counts.get(n, 0) for n in pooled)] for h in (base, cur)],
        dtype=np.float64,
    )


def test_chi_square_goodness_of_fit_view_agrees_with_scipy_chisquare() -> None:
    # With both rows in a 2 x K table, Pearson's statistic is the sum of two goodness-of-fit statistics
    # against the pooled expected frequencies: the same number scipy.stats.chisquare gives per row.
    train, _, subset = digits_pixel(36)
    base, cur = CategoricalCounts.from_values(train), CategoricalCounts.from_values(subset)
    t = table(base, cur)
    expected = np.outer(t.sum(axis=1), t.sum(axis=0)) / t.sum()
    by_row = sum(float(chisquare(t[i], expected[i]).statistic) for i in range(2))
    assert chi_square(base, cur).statistic == approx(by_row)


def test_real_categorical_feature_drift_is_detected() -> None:
    train, test, subset = digits_pixel(36)
    base = CategoricalCounts.from_values(train)
    same = chi_square(base, CategoricalCounts.from_values(test))
    drifted = chi_square(base, CategoricalCounts.from_values(subset))
    assert same.p_value > 1e-3
    assert drifted.p_value < 1e-6
    assert psi(base, CategoricalCounts.from_values(subset)) > psi(base, CategoricalCounts.from_values(test))


def test_new_category_in_current_is_a_drift_signal_not_an_error() -> None:
    base = CategoricalCounts.from_values(["a"] * 500 + ["b"] * 500)
    cur = CategoricalCounts(base.categories)
    cur.add(["a"] * 300 + ["b"] * 300 + ["c"] * 400)
    result = chi_square(base, cur)
    assert result.dof == 2
    assert result.p_value < 1e-50
    assert psi(base, cur) > 1.0


A_GRID = [0.5, 1.0, 1.5, 2.0, 3.5, 7.0, 15.5, 50.0, 127.5, 1000.0, 32767.5]


@pytest.mark.parametrize("a", A_GRID)
def test_regularized_upper_gamma_matches_scipy(a: float) -> None:
    for x in np.concatenate(([0.0], np.geomspace(1e-6, 20 * a + 200, 300))):
        ref = float(gammaincc(a, x))
        got = regularized_upper_gamma(a, float(x))
        if ref > 1e-290:
            assert got == pytest.approx(ref, rel=1e-9), (a, x)
        else:
            assert got < 1e-280


@pytest.mark.parametrize("dof", [1, 2, 3, 15, 17, 100, 1023])
@pytest.mark.parametrize("alpha", [0.05, 1e-3, 1e-6])
def test_gate_critical_values_match_scipy(dof: int, alpha: float) -> None:
    crit = _chi2_critical(dof, alpha)
    assert crit == pytest.approx(float(chi2_dist.isf(alpha, dof)), rel=1e-9)
    stats = np.array([crit * 0.999, crit * 1.001, math.nan])
    assert _significant(stats, np.array([dof, dof, dof], dtype=np.intp), alpha).tolist() == [False, True, False]
    assert _significant(np.array([1e9]), np.array([0], dtype=np.intp), alpha).tolist() == [False]  # no test


def test_chi2_sf_matches_scipy_and_edge_cases() -> None:
    for dof in [1, 2, 3, 10, 17, 100, 255, 65535]:
        for stat in np.linspace(0.0, 4.0 * dof + 50, 60):
            ref = float(chi2_dist.sf(stat, dof))
            if ref > 1e-290:
                assert chi2_sf(float(stat), dof) == pytest.approx(ref, rel=1e-9), (dof, stat)
    assert regularized_upper_gamma(2.0, math.inf) == 0.0
    for bad in [(0.0, 1.0), (-1.0, 1.0), (math.nan, 1.0), (1.0, -1.0), (1.0, math.nan)]:
        with pytest.raises(ValueError):
            regularized_upper_gamma(*bad)
    with pytest.raises(ValueError):
        chi2_sf(1.0, 0)


# -- the summary-level scorer ----------------------------------------------------------------------


def summaries(name: str) -> tuple[Summary, dict[str, Summary]]:
    train, test, features = split(name)
    base = Summary((f, NumericHistogram.from_values(Edges.quantiles(train[:, j], BINS), train[:, j]))
                   for j, f in enumerate(features))
    currents = {}
    for variant, data in variants(train, test).items():
        cur = Summary.empty_like(base)
        cur.add_rows(data)
        currents[variant] = cur
    return base, currents


def test_score_summary_equals_the_pair_functions_on_real_data() -> None:
    base, currents = summaries("breast_cancer")
    for cur in currents.values():
        report = score_summary(base, cur)
        assert [f.feature for f in report.features] == list(base.names)
        for fs in report.features:
            b, c = base[fs.feature], cur[fs.feature]
            assert isinstance(b, NumericHistogram) and isinstance(c, NumericHistogram)
            assert fs.kind == "numeric"
            assert fs.psi == approx(psi(b, c))
            assert fs.js == approx(js_distance(b, c))
            assert fs.wasserstein == approx(wasserstein1(b, c))
            assert fs.ks == approx(ks_binned(b, c))
            chi = chi_square(b, c)
            assert fs.chi2 == approx(chi.statistic)
            assert fs.p_value == pytest.approx(chi.p_value, rel=1e-9, abs=1e-300)
            assert fs.samples == c.total - c.nan
            assert fs.nan_rate_delta == 0.0


def test_report_levels_share_and_top_on_real_data() -> None:
    base, currents = summaries("breast_cancer")
    thresholds = DriftThresholds(min_samples=100)  # the held-out split has 171 rows
    shifted = score_summary(base, currents["shifted"], thresholds)
    assert shifted.level == "alert"
    assert shifted.drifted_share > 0.5
    drifted = [f for f in shifted.features if f.level in ("warn", "alert")]
    assert len(shifted.top) == len(drifted)
    ranks = [(["warn", "alert"].index(shifted.feature(n).level), shifted.feature(n).psi) for n in shifted.top]
    assert ranks == sorted(ranks, reverse=True)
    assert shifted.counts["alert"] + shifted.counts["warn"] + shifted.counts["ok"] == 30
    # With the default min_samples (200) the 171-row held-out window cannot be judged.
    default = score_summary(base, currents["shifted"])
    assert default.level == "insufficient"
    assert {f.level for f in default.features} == {"insufficient"}
    assert default.drifted_share == 0.0 and default.top == ()
    assert default.features[0].psi == shifted.features[0].psi  # scores are still reported


def test_mixed_summary_with_categorical_feature() -> None:
    train, _, subset = digits_pixel(36)
    rng = np.random.default_rng(0)
    base = Summary([
        ("pixel36", CategoricalCounts.from_values(train)),
        ("noise", NumericHistogram.from_values(Edges.quantiles(rng.normal(size=5000), BINS), rng.normal(size=5000))),
    ])
    cur = Summary.empty_like(base)
    cur["pixel36"].add(subset)
    cur["noise"].add(rng.normal(size=len(subset)))
    report = score_summary(base, cur, DriftThresholds(min_samples=100))
    cat = report.feature("pixel36")
    b, c = base["pixel36"], cur["pixel36"]
    assert isinstance(b, CategoricalCounts) and isinstance(c, CategoricalCounts)
    assert cat.kind == "categorical"
    assert cat.psi == approx(psi(b, c))
    assert cat.chi2 == approx(chi_square(b, c).statistic)
    assert cat.p_value == chi_square(b, c).p_value
    assert cat.wasserstein is None and cat.ks is None
    assert report.feature("noise").chi2 is not None
    with pytest.raises(KeyError):
        report.feature("nope")
    doc = report.to_dict()
    assert doc["level"] == report.level and len(doc["features"]) == 2  # type: ignore[arg-type]


def test_categorical_only_and_empty_summaries() -> None:
    base = Summary([("c", CategoricalCounts.from_values(["a"] * 300 + ["b"] * 300))])
    cur = Summary.empty_like(base)
    cur["c"].add(["a"] * 500 + ["b"] * 100)
    report = score_summary(base, cur)
    assert report.level == "alert" and report.top == ("c",)
    assert_same_report(score_merged(base, [cur]), report)
    assert_same_report(score_many(base, [cur])[0], report)
    json.dumps(report.to_dict(), allow_nan=False)  # plain values only
    empty = score_summary(Summary([]), Summary([]))
    assert (empty.level, empty.features, empty.samples) == ("insufficient", (), 0)


def test_score_merged_equals_scoring_the_merged_summary() -> None:
    train, test, features = split("digits")
    rng = np.random.default_rng(5)
    base = Summary(
        [(f, NumericHistogram.from_values(Edges.quantiles(train[:, j], BINS), train[:, j]))
         for j, f in enumerate(features)]
        + [("label", CategoricalCounts.from_values(rng.choice(["a", "b", "c"], 500), max_categories=4))]
    )
    windows = []
    for part in np.array_split(test + rng.normal(0, 0.5, test.shape), 7):
        w = Summary.empty_like(base)
        w.add_rows(part)
        w["label"].add(rng.choice(["a", "b", "d", "e", "f"], len(part)))
        windows.append(Summary.from_dict(w.to_dict()))  # as decoded from the wire: distinct Edges objects
    merged = functools.reduce(Summary.merge, windows)
    thresholds = DriftThresholds(min_samples=50)
    expected = score_summary(base, merged, thresholds)
    got = score_merged(base, windows, thresholds)
    assert_same_report(got, expected)
    assert got.feature("label").samples == merged["label"].total


def test_score_many_equals_scoring_one_by_one() -> None:
    base, currents = summaries("wine")
    thresholds = DriftThresholds(min_samples=20)
    many = score_many(base, list(currents.values()), thresholds)
    scorer = DriftScorer(base, thresholds)
    for got, cur in zip(many, currents.values(), strict=True):
        assert_same_report(got, scorer.score(cur))
        assert_same_report(got, score_summary(base, cur, thresholds))
    assert score_many(base, [], thresholds) == []


def assert_same_report(a: DriftReport, b: DriftReport) -> None:
    assert (a.level, a.top, a.metric) == (b.level, b.top, b.metric)
    assert a.drifted_share == pytest.approx(b.drifted_share)
    for fa, fb in zip(a.features, b.features, strict=True):
        assert (fa.feature, fa.kind, fa.level, fa.samples, fa.dof, fa.baseline_samples) == (
            fb.feature, fb.kind, fb.level, fb.samples, fb.dof, fb.baseline_samples)
        for key in ("psi", "js", "wasserstein", "ks", "chi2", "p_value", "psi_p_value", "nan_rate_delta"):
            va, vb = getattr(fa, key), getattr(fb, key)
            assert (va is None) == (vb is None), key
            if va is not None:
                assert va == pytest.approx(vb, rel=1e-9, abs=1e-12), key


def test_feature_order_may_differ_but_names_and_kinds_must_match() -> None:
    base, currents = summaries("diabetes")
    cur = currents["shifted"]
    reordered = Summary([(n, cur[n]) for n in reversed(cur.names)])
    assert_same_report(score_summary(base, reordered, DriftThresholds(min_samples=10)),
                       score_summary(base, cur, DriftThresholds(min_samples=10)))
    missing = Summary([(n, cur[n]) for n in cur.names[1:]])
    with pytest.raises(FeatureMismatchError, match="missing"):
        score_summary(base, missing)
    swapped = Summary([(n, CategoricalCounts() if i == 0 else cur[n]) for i, n in enumerate(cur.names)])
    with pytest.raises(FeatureMismatchError, match="numeric in the baseline"):
        score_summary(base, swapped)
    with pytest.raises(FeatureMismatchError):
        DriftScorer(base).score(cur["age"])  # type: ignore[arg-type]


# -- thresholds ------------------------------------------------------------------------------------


def test_thresholds_from_the_bundle_manifest() -> None:
    t = DriftThresholds.from_dict({"psi_warn": 0.1, "psi_alert": 0.25, "min_samples": 200})
    assert t == DriftThresholds()
    t = DriftThresholds.from_dict({"psi_warn": 0.2, "psi_alert": 0.5, "min_samples": 1000, "metric": "js",
                                   "x_note": "ignored"})
    assert (t.psi_warn, t.psi_alert, t.min_samples, t.metric) == (0.2, 0.5, 1000, "js")
    assert DriftThresholds.from_dict(t.to_dict()) == t
    assert DriftThresholds.from_dict({}) == DriftThresholds()


@pytest.mark.parametrize(
    "doc",
    [
        {"psi_wran": 0.1},
        {"psi_warn": 0.3, "psi_alert": 0.2},
        {"psi_warn": -0.1},
        {"psi_warn": math.nan},
        {"psi_warn": True},
        {"psi_warn": "0.1"},
        {"min_samples": 0},
        {"min_samples": 200.0},
        {"min_samples": True},
        {"metric": "wasserstein"},
        {"psi_eps": 0.0},
        {"nan_warn": 0.5, "nan_alert": 0.4},
    ],
)
def test_bad_thresholds_raise_a_typed_error(doc: dict[str, object]) -> None:
    with pytest.raises(InvalidThresholdsError):
        DriftThresholds.from_dict(doc)


def test_thresholds_of_other_metrics_drive_the_level() -> None:
    base, currents = summaries("breast_cancer")
    for metric in ("psi", "js", "ks"):
        t = DriftThresholds(min_samples=100, metric=metric)  # type: ignore[arg-type]
        report = score_summary(base, currents["shifted"], t)
        assert report.metric == metric
        for f in report.features:
            value = f.score(t.metric)
            warn, alert = {"psi": (t.psi_warn, t.psi_alert), "js": (t.js_warn, t.js_alert),
                           "ks": (t.ks_warn, t.ks_alert)}[metric]
            assert value is not None and f.psi_p_value is not None and f.psi is not None
            expected = "alert" if value >= alert else "warn" if value >= warn else "ok"
            assert f.level == (expected if f.psi_p_value < t.significance else "ok")
            n_eff = 1 / (1 / f.samples + 1 / base[f.feature].total)
            assert f.psi_p_value == pytest.approx(float(chi2_dist.sf(n_eff * f.psi, count_dof(base, currents, f))),
                                                  rel=1e-9, abs=1e-300)


def count_dof(base: Summary, currents: dict[str, Summary], f: Any) -> int:
    b, c = base[f.feature], currents["shifted"][f.feature]
    assert isinstance(b, NumericHistogram) and isinstance(c, NumericHistogram)
    return int(np.count_nonzero(slots(b) + slots(c))) - 1


def test_significance_gate_keeps_sampling_noise_of_small_windows_at_ok() -> None:
    # 200 values from the baseline's own distribution: PSI is often >= 0.1 from noise alone ((K - 1) / n
    # on average), but the chi-square test does not reject, so the level stays ok.
    rng = np.random.default_rng(8)
    train = rng.normal(size=50_000)
    base = Summary([("x", NumericHistogram.from_values(Edges.quantiles(train, BINS), train))])
    gated, ungated = DriftThresholds(), DriftThresholds(significance=1.0)
    noisy = 0
    for _ in range(200):
        cur = Summary.empty_like(base)
        cur.add_rows(rng.normal(size=(200, 1)))
        f = score_summary(base, cur, gated).feature("x")
        assert f.psi is not None and f.p_value is not None
        if f.psi >= 0.1:
            noisy += 1
            assert score_summary(base, cur, ungated).feature("x").level in ("warn", "alert")
            assert f.psi_p_value is not None
            assert f.level == ("ok" if f.psi_p_value >= 1e-3 else f.level)
    assert noisy > 20  # the gate had work to do


# -- bad input -------------------------------------------------------------------------------------


def test_nan_and_infinities_in_their_own_counters_do_not_break_scores() -> None:
    rng = np.random.default_rng(11)
    edges = Edges.quantiles(rng.normal(size=4000), BINS)
    clean = rng.normal(size=4000)
    base = NumericHistogram.from_values(edges, np.concatenate([clean, [math.nan] * 40]))  # 1 % NaN
    dirty = np.concatenate([rng.normal(size=900), [math.nan] * 300, [math.inf] * 50, [-math.inf] * 50])
    cur = NumericHistogram.from_values(edges, dirty)
    assert (cur.nan, cur.underflow >= 50, cur.overflow >= 50) == (300, True, True)
    values = [psi(base, cur), js_distance(base, cur), wasserstein1(base, cur), ks_binned(base, cur)]
    assert all(math.isfinite(v) for v in values)
    # +-inf sit at the outer edges: W1 equals scipy's on the finite support points.
    b, c = slots(base), slots(cur)
    x = support(base)
    assert wasserstein1(base, cur) == approx(float(wasserstein_distance(x, x, u_weights=b, v_weights=c)))
    assert wasserstein1(base, cur) <= edges.hi - edges.lo
    # NaN is reported separately, not mixed into the distribution.
    assert nan_rate_delta(base, cur) == approx(300 / 1300 - 40 / 4040)
    report = score_summary(Summary([("x", base)]), Summary([("x", cur)]))
    f = report.feature("x")
    assert f.samples == 1000 and f.level == "alert"
    assert f.nan_rate_delta == approx(300 / 1300 - 40 / 4040)


def test_missing_share_alone_raises_the_level() -> None:
    rng = np.random.default_rng(2)
    edges = Edges.quantiles(rng.normal(size=4000), BINS)
    base = NumericHistogram.from_values(edges, rng.normal(size=4000))
    cur = NumericHistogram.from_values(edges, np.concatenate([rng.normal(size=700), [math.nan] * 300]))
    f = score_summary(Summary([("x", base)]), Summary([("x", cur)])).feature("x")
    assert f.psi is not None and f.psi < 0.1
    assert f.level == "alert"  # 30 % of the values went missing
    all_nan = NumericHistogram.from_values(edges, [math.nan] * 500)
    g = score_summary(Summary([("x", base)]), Summary([("x", all_nan)])).feature("x")
    assert (g.psi, g.js, g.wasserstein, g.ks, g.samples, g.level) == (None, None, None, None, 0, "alert")


def test_empty_sides_are_insufficient_not_errors() -> None:
    edges = Edges.uniform(0.0, 1.0, 4)
    empty = NumericHistogram(edges)
    full = NumericHistogram.from_values(edges, np.linspace(0, 1, 300))
    for b, c in ((empty, full), (full, empty), (empty, empty)):
        assert math.isnan(psi(b, c)) and math.isnan(js_distance(b, c))
        assert math.isnan(wasserstein1(b, c)) and math.isnan(ks_binned(b, c))
        report = score_summary(Summary([("x", b)]), Summary([("x", c)]))
        assert report.level == "insufficient"
        assert report.to_dict()["features"][0]["psi"] is None  # type: ignore[index]
    cat = CategoricalCounts(["a"])
    assert math.isnan(chi_square(cat, cat).p_value)
    one = CategoricalCounts.from_values(["a"] * 10)
    assert chi_square(one, one) == (0.0, 1.0, 0)


def test_mismatched_edges_raise_the_typed_error() -> None:
    a = NumericHistogram.from_values(Edges.uniform(0.0, 1.0, 4), [0.1, 0.5])
    b = NumericHistogram.from_values(Edges.uniform(0.0, 1.0, 5), [0.1, 0.5])
    for fn in (psi, js_distance, wasserstein1, ks_binned, nan_rate_delta):
        with pytest.raises(EdgesMismatchError):
            fn(a, b)
    with pytest.raises(EdgesMismatchError, match="'x'"):
        score_summary(Summary([("x", a)]), Summary([("x", b)]))
    with pytest.raises(EdgesMismatchError):
        score_merged(Summary([("x", a)]), [Summary([("x", a)]), Summary([("x", b)])])
    with pytest.raises(EdgesMismatchError):
        score_many(Summary([("x", a)]), [Summary([("x", b)])])
    cat = CategoricalCounts.from_values(["a"])
    with pytest.raises(FeatureMismatchError):
        psi(a, cat)
    with pytest.raises(FeatureMismatchError):
        wasserstein1(cat, cat)  # type: ignore[arg-type]
    with pytest.raises(EdgesMismatchError):
        chi_square(a, b)
    capped = CategoricalCounts.from_values(["a"], max_categories=3)
    with pytest.raises(CategoryCapMismatchError):
        psi(cat, capped)
    with pytest.raises(CategoryCapMismatchError, match="'c'"):
        score_summary(Summary([("c", cat)]), Summary([("c", capped)]))
    with pytest.raises(CategoryCapMismatchError):
        score_merged(Summary([("c", cat)]), [Summary([("c", capped)])])


# -- properties ------------------------------------------------------------------------------------

counts_st = st.lists(st.integers(0, 10**6), min_size=6, max_size=6)


@settings(max_examples=300, deadline=None)
@given(counts_st, counts_st, st.lists(st.floats(0.01, 100.0), min_size=4, max_size=4))
def test_score_ranges_and_symmetries(b: list[int], c: list[int], widths: list[float]) -> None:
    edges = Edges(np.concatenate(([0.0], np.cumsum(widths))))

    def hist(v: list[int]) -> NumericHistogram:  # counts only: the scores never read the moments
        return NumericHistogram._from_parts(edges, np.array(v[1:5]), underflow=v[0], overflow=v[5], nan=0,
                                            moments=EMPTY_MOMENTS)

    hb, hc = hist(b), hist(c)
    if sum(b) == 0 or sum(c) == 0:
        assert math.isnan(psi(hb, hc))
        return
    p, j, w, k = psi(hb, hc), js_distance(hb, hc), wasserstein1(hb, hc), ks_binned(hb, hc)
    assert p >= 0.0 and 0.0 <= j <= 1.0 and 0.0 <= k <= 1.0
    assert 0.0 <= w <= (edges.hi - edges.lo) * (1 + 1e-12)
    assert p == pytest.approx(psi(hc, hb), rel=1e-9, abs=1e-15)  # PSI is symmetric
    assert j == pytest.approx(js_distance(hc, hb), abs=1e-12)
    assert k * float(np.min(np.diff(support(hb)))) <= w * (1 + 1e-9) + 1e-12  # W1 >= KS x smallest gap
    report = score_summary(Summary([("x", hb)]), Summary([("x", hc)]))
    assert report.features[0].psi == pytest.approx(p, rel=1e-9, abs=1e-15)
