"""Detection power, false-alarm rate and hysteresis of the drift levels (agent.drift.scores).

* a 0.5 sd mean shift reaches ``warn`` and a 1 sd shift ``alert`` within 2 000 samples, on a synthetic
  Gaussian baseline with 16 quantile bins and on real features (scikit-learn's bundled data sets);
* with 32 features and no drift, at most 1 % of 500-sample windows raise any alert (fixed seeds);
* the hysteresis never changes state more often than its rules allow (hypothesis).

Run ``python -m tests.drift.test_detection`` to print the figures quoted in docs/drift-scores.md.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine

from agent.drift import (
    BatchBinner,
    DriftScorer,
    DriftThresholds,
    Edges,
    Hysteresis,
    HysteresisState,
    InvalidInputError,
    InvalidThresholdsError,
    Level,
    Metric,
    NumericHistogram,
    StateLevel,
    Summary,
)

F64 = NDArray[np.float64]
BINS = 16
WINDOW = 250  # detection stream: windows just above the default min_samples (200)
RANK = {"ok": 0, "warn": 1, "alert": 2}


# -- detection -------------------------------------------------------------------------------------


def gaussian() -> tuple[F64, Callable[[np.random.Generator, int], F64]]:
    """A synthetic N(0, 1) training sample and a sampler of the same distribution."""
    return np.random.default_rng(1234).normal(size=100_000), lambda rng, n: rng.normal(size=n)


def real_feature(loader: Callable[[], Any], name: str) -> tuple[F64, Callable[[np.random.Generator, int], F64]]:
    """A real feature: the whole column is the baseline; the stream resamples it (bootstrap)."""
    bunch = loader()
    column = np.asarray(bunch.data[:, list(bunch.feature_names).index(name)], dtype=np.float64)
    return column, lambda rng, n: rng.choice(column, size=n, replace=True)


SOURCES: dict[str, Callable[[], tuple[F64, Callable[[np.random.Generator, int], F64]]]] = {
    "gaussian": gaussian,
    "breast_cancer/mean radius": lambda: real_feature(load_breast_cancer, "mean radius"),
    "breast_cancer/worst area": lambda: real_feature(load_breast_cancer, "worst area"),
    "wine/proline": lambda: real_feature(load_wine, "proline"),
    "diabetes/bmi": lambda: real_feature(load_diabetes, "bmi"),
}


def detection_delay(source: str, shift_sd: float, target: StateLevel, *, seed: int,
                    thresholds: DriftThresholds | None = None, window: int = WINDOW,
                    limit: int = 20_000) -> int | None:
    """Samples streamed (in windows, through the hysteresis) until the state reaches ``target``."""
    train, sample = SOURCES[source]()
    thr = thresholds or DriftThresholds()
    baseline = Summary([("x", NumericHistogram.from_values(Edges.quantiles(train, BINS), train))])
    scorer = DriftScorer(baseline, thr)
    hysteresis = Hysteresis.for_thresholds(thr)
    shift = shift_sd * float(np.std(train))
    rng = np.random.default_rng(seed)
    seen = 0
    while seen < limit:
        window_summary = Summary.empty_like(baseline)
        window_summary.add_rows((sample(rng, window) + shift)[:, None])
        report = scorer.score(window_summary)
        seen += window
        if RANK[hysteresis.update(report.level, report.samples).level] >= RANK[target]:
            return seen
    return None


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize(("shift_sd", "target"), [(0.5, "warn"), (1.0, "alert")])
def test_mean_shift_is_detected_within_2000_samples(source: str, shift_sd: float, target: StateLevel) -> None:
    delays = [detection_delay(source, shift_sd, target, seed=seed) for seed in range(10)]
    assert all(d is not None and d <= 2000 for d in delays), delays


@pytest.mark.parametrize("source", list(SOURCES))
def test_one_window_of_2000_samples_reaches_the_level(source: str) -> None:
    train, sample = SOURCES[source]()
    baseline = Summary([("x", NumericHistogram.from_values(Edges.quantiles(train, BINS), train))])
    scorer = DriftScorer(baseline)
    sd = float(np.std(train))
    rng = np.random.default_rng(99)
    for shift_sd, allowed in ((0.0, {"ok"}), (0.5, {"warn", "alert"}), (1.0, {"alert"})):
        window = Summary.empty_like(baseline)
        window.add_rows((sample(rng, 2000) + shift_sd * sd)[:, None])
        assert scorer.score(window).level in allowed, (source, shift_sd)


# -- false alarms ----------------------------------------------------------------------------------


def _mixed(rng: np.random.Generator, kind: int, n: int) -> F64:
    """Eight differently shaped distributions: smooth, skewed, heavy-tailed, discrete, bimodal, U-shaped."""
    if kind == 0:
        return rng.normal(size=n)
    if kind == 1:
        return rng.lognormal(0.0, 1.0, size=n)
    if kind == 2:
        return rng.exponential(size=n)
    if kind == 3:
        return rng.uniform(size=n)
    if kind == 4:
        return rng.standard_t(3, size=n)
    if kind == 5:
        return rng.poisson(3.0, size=n).astype(np.float64)
    if kind == 6:
        return np.where(rng.uniform(size=n) < 0.3, rng.normal(-2.0, 0.5, size=n), rng.normal(1.0, 1.0, size=n))
    return rng.beta(0.5, 0.5, size=n)


def synthetic_null(features: int = 32) -> tuple[list[F64], Callable[[np.random.Generator, int], F64]]:
    """32 training columns (20 000 rows, eight shapes) and a sampler of the same distributions."""
    def sample(rng: np.random.Generator, n: int) -> F64:
        return np.column_stack([_mixed(rng, j % 8, n) for j in range(features)])
    train = sample(np.random.default_rng(2024), 20_000)
    return [train[:, j] for j in range(features)], sample


def real_null() -> tuple[list[F64], Callable[[np.random.Generator, int], F64]]:
    """32 real columns (breast cancer's 30, wine's first two) as baselines, resampled column by column."""
    columns = [np.asarray(load_breast_cancer().data[:, j], dtype=np.float64) for j in range(30)]
    columns += [np.asarray(load_wine().data[:, j], dtype=np.float64) for j in range(2)]

    def sample(rng: np.random.Generator, n: int) -> F64:
        return np.column_stack([rng.choice(c, size=n, replace=True) for c in columns])

    return columns, sample


NULLS = {"synthetic": synthetic_null, "real": real_null}


def false_alarm_rates(null: str, *, window: int = 500, windows: int = 400, seed: int = 7,
                      thresholds: DriftThresholds | None = None) -> dict[str, float]:
    """Share of no-drift windows whose report is ``alert`` / at least ``warn``; also per feature-window."""
    thr = thresholds or DriftThresholds()
    columns, sample = NULLS[null]()
    hists = [NumericHistogram.from_values(Edges.quantiles(c, BINS), c) for c in columns]
    baseline = Summary((f"f{j}", h) for j, h in enumerate(hists))
    binner = BatchBinner([h.edges for h in hists])
    rng = np.random.default_rng(seed)
    currents = [Summary(zip(baseline.names, binner.histograms(sample(rng, window)), strict=True))
                for _ in range(windows)]
    reports = DriftScorer(baseline, thr).score_many(currents)
    levels = [f.level for r in reports for f in r.features]
    hysteresis = Hysteresis.for_thresholds(thr)
    states = [hysteresis.update(r.level, r.samples) for r in reports]
    return {
        "debounced_not_ok": sum(state.level != "ok" for state in states) / windows,
        "debounced_rises": float(sum(state.changed and state.level != "ok" for state in states)),
        "any_alert": sum(r.level == "alert" for r in reports) / windows,
        "any_warn_or_alert": sum(r.level in ("warn", "alert") for r in reports) / windows,
        "feature_alert": levels.count("alert") / len(levels),
        "feature_warn_or_alert": (levels.count("alert") + levels.count("warn")) / len(levels),
        "max_psi": max(f.psi or 0.0 for r in reports for f in r.features),
    }


@pytest.mark.parametrize("null", ["synthetic", "real"])
@pytest.mark.parametrize("metric", ["psi", "js", "ks"])
def test_no_drift_raises_an_alert_in_at_most_1_percent_of_500_sample_windows(null: str, metric: Metric) -> None:
    rates = false_alarm_rates(null, thresholds=DriftThresholds(metric=metric))
    assert rates["any_alert"] <= 0.01, rates


def test_no_drift_windows_at_min_samples_rarely_alert_either() -> None:
    # Windows of exactly min_samples (200): PSI's sampling noise is larger (about (K - 1) / n = 0.08 on
    # average), so PSI >= 0.1 happens from noise alone; the significance gate keeps such windows at ok.
    rates = false_alarm_rates("synthetic", window=200)
    assert rates["any_alert"] <= 0.01, rates
    assert rates["feature_warn_or_alert"] <= 0.01, rates  # the significance gate (alone: ~19 %)
    assert rates["debounced_not_ok"] <= 0.05, rates  # share of windows the debounced state spends above ok
    ungated = false_alarm_rates("synthetic", window=200, thresholds=DriftThresholds(significance=1.0))
    assert ungated["feature_warn_or_alert"] > 0.1, ungated


def test_small_windows_are_insufficient_and_do_not_alert() -> None:
    rates = false_alarm_rates("synthetic", window=199, windows=50)
    assert rates["any_alert"] == rates["any_warn_or_alert"] == 0.0


# -- hysteresis ------------------------------------------------------------------------------------


def run(h: Hysteresis, windows: list[tuple[Level, int]]) -> list[HysteresisState]:
    return [h.update(level, samples) for level, samples in windows]


def test_hysteresis_rises_and_falls_by_the_rules() -> None:
    h = Hysteresis(rise_after=2, fall_after=3, min_samples=200)
    levels = [s.level for s in run(h, [("warn", 500), ("alert", 500), ("alert", 500), ("ok", 500), ("warn", 500),
                                       ("ok", 500), ("ok", 500), ("ok", 500), ("ok", 500)])]
    assert levels == ["ok", "warn", "alert", "alert", "alert", "warn", "warn", "ok", "ok"]
    assert h.state.windows == 9 and h.state.ignored == 0


def test_hysteresis_flapping_input_never_changes_the_state() -> None:
    h = Hysteresis(rise_after=2, fall_after=3, min_samples=200)
    states = run(h, [("alert", 1000), ("ok", 1000)] * 50)
    assert {s.level for s in states} == {"ok"}
    h = Hysteresis(rise_after=2, fall_after=3, min_samples=200, initial="alert")
    states = run(h, [("ok", 1000), ("ok", 1000), ("alert", 1000)] * 50)
    assert {s.level for s in states} == {"alert"}


def test_small_and_insufficient_windows_never_change_the_state() -> None:
    h = Hysteresis(rise_after=1, fall_after=1, min_samples=200)
    states = run(h, [("alert", 199)] * 10 + [("insufficient", 10_000)] * 10)
    assert {s.level for s in states} == {"ok"} and h.state.ignored == 20 and h.state.windows == 0
    h.update("alert", 200)
    assert h.level == "alert" and h.state.changed


def test_hysteresis_rejects_bad_arguments() -> None:
    with pytest.raises(InvalidThresholdsError):
        Hysteresis(rise_after=0)
    with pytest.raises(InvalidThresholdsError):
        Hysteresis(initial="insufficient")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        Hysteresis().update("critical", 500)  # type: ignore[arg-type]


def test_step_is_pure() -> None:
    h = Hysteresis(rise_after=1)
    start = h.state
    after = h.step(start, "alert", 1000)
    assert after.level == "alert" and h.state is start and h.level == "ok"


window_st = st.tuples(st.sampled_from(["ok", "warn", "alert", "insufficient"]), st.sampled_from([0, 150, 200, 5000]))


@settings(max_examples=400, deadline=None)
@given(st.lists(window_st, max_size=80), st.integers(1, 5), st.integers(1, 5),
       st.sampled_from(["ok", "warn", "alert"]))
def test_hysteresis_changes_only_as_the_rules_allow(windows: list[tuple[Level, int]], rise_after: int,
                                                    fall_after: int, initial: StateLevel) -> None:
    h = Hysteresis(rise_after=rise_after, fall_after=fall_after, min_samples=200, initial=initial)
    qualifying: list[int] = []  # ranks of the qualifying windows so far
    previous = RANK[initial]
    changes: list[tuple[int, int, int]] = []  # (qualifying index, old, new)
    for level, samples in windows:
        state = h.update(level, samples)
        new = RANK[state.level]
        if level == "insufficient" or samples < 200:
            assert new == previous and not state.changed  # ignored windows never change the state
            continue
        qualifying.append(RANK[level])
        last_rise, last_fall = qualifying[-rise_after:], qualifying[-fall_after:]
        if new > previous:  # rise: the last rise_after windows were all above the old state, min = new
            assert len(last_rise) == rise_after and min(last_rise) == new > previous
        elif new < previous:  # fall: the last fall_after windows were all below the old state, max = new
            assert len(last_fall) == fall_after and max(last_fall) == new < previous
        else:  # no change although a rule applied would be a bug too
            assert not (len(last_rise) == rise_after and min(last_rise) > previous)
            assert not (len(last_fall) == fall_after and max(last_fall) < previous)
        assert state.changed == (new != previous)
        if new != previous:
            changes.append((len(qualifying), previous, new))
        previous = new
    # Opposite-direction changes are at least fall_after (after a rise) / rise_after (after a fall)
    # qualifying windows apart, so the state cannot flap faster than the rules allow.
    for (i, a_old, a_new), (j, _, b_new) in itertools.pairwise(changes):
        if (a_new > a_old) != (b_new > a_new):
            assert j - i >= (fall_after if a_new > a_old else rise_after)
    assert len(changes) <= 2 * (len(qualifying) // min(rise_after, fall_after))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["ok", "warn", "alert"]), max_size=60), st.integers(2, 5))
def test_windows_never_all_above_the_state_for_rise_after_never_raise_it(levels: list[StateLevel],
                                                                          rise_after: int) -> None:
    # Put an "ok" window in every run of rise_after: however wild the rest, an "ok" state never rises.
    flapping = [lvl if (i + 1) % rise_after else "ok" for i, lvl in enumerate(levels)]
    h = Hysteresis(rise_after=rise_after, fall_after=1, min_samples=1)
    assert all(h.update(lvl, 1).level == "ok" for lvl in flapping)


# -- figures for the docs --------------------------------------------------------------------------


def main() -> None:  # pragma: no cover - prints the figures quoted in docs/drift-scores.md
    for null in ("synthetic", "real"):
        for window in (200, 500):
            for metric in ("psi", "js", "ks"):
                rates = false_alarm_rates(null, window=window, thresholds=DriftThresholds(metric=metric))  # type: ignore[arg-type]
                print(f"null={null} window={window} metric={metric}: "
                      + ", ".join(f"{k}={v:.4f}" for k, v in rates.items()))
    for source in SOURCES:
        for shift_sd, target in ((0.5, "warn"), (1.0, "alert")):
            delays = [detection_delay(source, shift_sd, target, seed=seed) for seed in range(50)]  # type: ignore[arg-type]
            found = [d for d in delays if d is not None]
            print(f"{source}: {shift_sd} sd -> {target}: median {statistics.median(found)} samples, "
                  f"max {max(found)}, missed {len(delays) - len(found)}/50")


if __name__ == "__main__":
    main()
