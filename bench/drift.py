"""Drift benchmarks: binning throughput, whylogs, fleet scoring and PSI, each against a baseline in the same run.

``python -m bench.drift [--quick] [--whylogs-python PATH]``; one JSON object per metric (``bench.common.emit``).

1. Binning: ``Summary.add_rows`` (the layout's ``BatchBinner``: one bincount for all features) on 1 M rows x 32
   features, 16 quantile bins, against ``np.histogram`` per column on the same matrix. Target >= 1 M rows/s.
2. whylogs: profiling the same kind of data with whylogs, which is NOT a project dependency. It runs in its own
   virtualenv (default ``/tmp/wl``: ``python3 -m venv /tmp/wl && /tmp/wl/bin/pip install whylogs numpy pandas``)
   as a subprocess that times ``why.log(df)`` and ``Summary.add_rows`` interleaved on the same rows (the
   project's ``agent.drift`` needs only numpy, so it is imported there from this checkout), and reports the
   serialized profile size. If whylogs is missing or fails, one JSON line says so with the error.
3. Fleet scoring: 10 000 device summaries x 32 features x 16 bins, merged then scored, with
   ``DriftScorer.score_merged`` against ``functools.reduce(Summary.merge)`` + ``score_summary``. Target < 1 s.
   Also one report per device (``score_many``) against calling ``score`` per device.
4. PSI from two 32 x 16 histogram sets (``psi_counts``; PERFORMANCE.md's reference: ~33 us) against a per-feature
   ``psi()`` loop, and a full ``DriftScorer.score`` (every score, levels, report).

Every comparison runs candidate and baseline interleaved (A B A B ...) after a warm-up, at least 5 repeats, and
reports medians and the median / min / max of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from agent.drift import DriftScorer, Edges, NumericHistogram, Summary, psi, psi_counts, score_summary
from agent.drift.numeric import Moments
from bench.common import emit

BENCH = "drift"
FEATURES = 32
BINS = 16
REPO = Path(__file__).resolve().parents[1]
DEFAULT_WHYLOGS_PYTHON = "/tmp/wl/bin/python"


def interleaved_seconds(candidate: Callable[[], Any], baseline: Callable[[], Any], *, repeats: int,
                        warmup: int = 1) -> tuple[list[float], list[float]]:
    """Wall seconds of each call, candidate and baseline alternating (A B A B ...)."""
    for _ in range(warmup):
        candidate()
        baseline()
    cand, base = [], []
    for _ in range(repeats):
        for fn, acc in ((candidate, cand), (baseline, base)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return cand, base


def ratios(a: list[float], b: list[float]) -> dict[str, float]:
    r = [x / y for x, y in zip(a, b, strict=True)]
    return {"ratio_median": round(statistics.median(r), 3), "ratio_min": round(min(r), 3),
            "ratio_max": round(max(r), 3)}


def baseline_summary(train: np.ndarray) -> Summary:
    return Summary((f"f{j}", NumericHistogram.from_values(Edges.quantiles(train[:, j], BINS), train[:, j]))
                   for j in range(train.shape[1]))


# -- 1. binning ------------------------------------------------------------------------------------


def bench_binning(rows: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    baseline = baseline_summary(rng.normal(size=(20_000, FEATURES)))
    x = rng.normal(size=(rows, FEATURES))
    edges = [baseline[name].edges.values for name in baseline.names]  # type: ignore[union-attr]
    window = Summary.empty_like(baseline)
    window.add_rows(x[:100])  # builds the cached BatchBinner outside the timing

    def histogram_per_column() -> None:
        for j in range(FEATURES):
            np.histogram(x[:, j], bins=edges[j])

    cand, base = interleaved_seconds(lambda: window.add_rows(x), histogram_per_column, repeats=repeats)
    rate = [rows / t for t in cand]
    base_rate = [rows / t for t in base]
    binner = window._binner
    emit(BENCH, "binning_rows_per_s", value=statistics.median(rate),
         baseline="np.histogram per column, counts only (same matrix)", baseline_value=statistics.median(base_rate),
         target=">= 1e6 rows/s", **ratios(rate, base_rate), rows=rows, features=FEATURES, bins=BINS,
         data="normal, quantile edges from a 20k training sample", includes="counts + moments",
         fallback_columns=len(binner.fallback_columns) if binner else None, repeats=repeats)


# -- 2. whylogs ------------------------------------------------------------------------------------

WHYLOGS_SCRIPT = textwrap.dedent(
    """
    import json, statistics, sys, time
    import numpy as np
    import pandas as pd
    import whylogs as why
    sys.path.insert(0, sys.argv[3])
    from agent.drift import Edges, NumericHistogram, Summary

    x = np.load(sys.argv[1])
    train = np.load(sys.argv[2])
    repeats = int(sys.argv[4])
    df = pd.DataFrame(x, columns=[f"f{j}" for j in range(x.shape[1])])
    baseline = Summary((f"f{j}", NumericHistogram.from_values(Edges.quantiles(train[:, j], 16), train[:, j]))
                       for j in range(x.shape[1]))
    window = Summary.empty_like(baseline)
    why.log(df.iloc[:1000])
    window.add_rows(x[:1000])
    ours, theirs = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        window.add_rows(x)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        result = why.log(df)
        theirs.append(time.perf_counter() - t0)
    profile = result.view().serialize()
    print(json.dumps({"ours_s": ours, "whylogs_s": theirs, "whylogs_bytes": len(profile),
                      "whylogs_version": why.__version__, "rows": len(x)}))
    """
)


def bench_whylogs(python: str, rows: int, repeats: int, timeout: float) -> None:
    def unavailable(error: str) -> None:
        print(json.dumps({"bench": BENCH, "metric": "whylogs_rows_per_s", "value": None, "skipped": True,
                          "error": error[-2000:], "hint": "python3 -m venv /tmp/wl && /tmp/wl/bin/pip install "
                          "whylogs numpy pandas, or pass --whylogs-python"}), flush=True)

    if not Path(python).exists():
        unavailable(f"no whylogs interpreter at {python}")
        return
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as d:
        data, train = Path(d) / "x.npy", Path(d) / "train.npy"
        np.save(data, rng.normal(size=(rows, FEATURES)))
        np.save(train, rng.normal(size=(20_000, FEATURES)))
        try:
            proc = subprocess.run([python, "-c", WHYLOGS_SCRIPT, str(data), str(train), str(REPO), str(repeats)],
                                  capture_output=True, text=True, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            unavailable(f"{type(exc).__name__}: {exc}")
            return
    if proc.returncode != 0:
        unavailable(f"exit {proc.returncode}: {proc.stderr.strip()}")
        return
    try:
        doc = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        unavailable(f"unreadable output ({exc}): {proc.stdout[-500:]} {proc.stderr[-500:]}")
        return
    ours = [rows / t for t in doc["ours_s"]]
    theirs = [rows / t for t in doc["whylogs_s"]]
    emit(BENCH, "vs_whylogs_rows_per_s", value=statistics.median(ours),
         baseline=f"whylogs {doc['whylogs_version']} why.log(DataFrame), same rows, same process",
         baseline_value=statistics.median(theirs), target=">= 100x whylogs (PERFORMANCE.md)",
         **ratios(ours, theirs), rows=rows, features=FEATURES, repeats=repeats)
    window = Summary.empty_like(baseline_summary(rng.normal(size=(20_000, FEATURES))))
    window.add_rows(rng.normal(size=(rows, FEATURES)))
    ours_bytes = len(msgpack.packb(window.to_dict()))
    emit(BENCH, "profile_bytes", value=ours_bytes, baseline="whylogs profile view serialize()",
         baseline_value=doc["whylogs_bytes"], target="<= 4 KB per 32-feature window (PERFORMANCE.md)",
         encoding="msgpack of Summary.to_dict()", json_bytes=len(json.dumps(window.to_dict())), bins=BINS)


# -- 3. fleet scoring ------------------------------------------------------------------------------


def device_summaries(baseline: Summary, devices: int, rows: int, seed: int = 2) -> list[Summary]:
    """Device windows as the server holds them after decoding: same edge values, distinct Edges objects.

    Built from counts directly (``NumericHistogram._from_parts``; decoding 320 000 histograms with
    ``from_dict`` would dominate the set-up); 64 distinct Edges copies per feature, so the edge check of
    both the candidate and ``Summary.merge`` compares values, not identity. Half the fleet drifts a little.
    """
    rng = np.random.default_rng(seed)
    names = baseline.names
    hists = [baseline[n] for n in names]
    pools = [[Edges(h.edges.values.copy()) for _ in range(64)] for h in hists]  # type: ignore[union-attr]
    centres = [(h.edges.values[:-1] + h.edges.values[1:]) / 2 for h in hists]  # type: ignore[union-attr]
    flat = np.full(BINS, 1.0 / BINS)
    tilted = np.linspace(0.5, 1.5, BINS)
    tilted /= tilted.sum()
    out = []
    for d in range(devices):
        counts = rng.multinomial(rows, tilted if d % 2 else flat, size=len(names))
        feats = []
        for j, name in enumerate(names):
            c = counts[j]
            e = pools[j][d % 64]
            mean = float(np.dot(c, centres[j]) / rows)
            m2 = float(np.dot(c, (centres[j] - mean) ** 2))
            mom = Moments(rows, float(e.lo), float(e.hi), mean, m2)
            feats.append((name, NumericHistogram._from_parts(e, c, underflow=0, overflow=0, nan=0, moments=mom)))
        out.append(Summary(feats))
    return out


def bench_fleet(devices: int, repeats: int, per_device: int) -> None:
    rng = np.random.default_rng(3)
    baseline = baseline_summary(rng.normal(size=(20_000, FEATURES)))
    t0 = time.perf_counter()
    fleet = device_summaries(baseline, devices, rows=300)
    setup = time.perf_counter() - t0
    results: dict[str, Any] = {}

    def candidate() -> None:
        results["merged"] = DriftScorer(baseline).score_merged(fleet)

    def merge_then_score() -> None:
        results["reference"] = score_summary(baseline, functools.reduce(Summary.merge, fleet))

    cand, base = interleaved_seconds(candidate, merge_then_score, repeats=repeats, warmup=0)
    a, b = results["merged"], results["reference"]
    same = a.level == b.level and all(
        x.level == y.level and abs((x.psi or 0.0) - (y.psi or 0.0)) <= 1e-9 for x, y in zip(a.features, b.features,
                                                                                            strict=True))
    emit(BENCH, "fleet_merged_score_s", value=statistics.median(cand),
         baseline="functools.reduce(Summary.merge) then score_summary", baseline_value=statistics.median(base),
         target="< 1 s", **ratios(cand, base), devices=devices, features=FEATURES, bins=BINS, repeats=repeats,
         same_result=same, fleet_level=a.level, setup_s=round(setup, 1))

    scorer = DriftScorer(baseline)
    some = fleet[:per_device]
    cand, base = interleaved_seconds(lambda: scorer.score_many(some), lambda: [scorer.score(s) for s in some],
                                     repeats=repeats, warmup=0)
    emit(BENCH, "fleet_per_device_reports_s", value=statistics.median(cand),
         baseline="DriftScorer.score per device", baseline_value=statistics.median(base),
         target="informational", **ratios(cand, base), devices=per_device, repeats=repeats)


# -- 4. PSI of two 32 x 16 histogram sets ----------------------------------------------------------


def bench_psi(repeats: int) -> None:
    rng = np.random.default_rng(4)
    baseline = baseline_summary(rng.normal(size=(20_000, FEATURES)))
    current = Summary.empty_like(baseline)
    current.add_rows(rng.normal(0.1, 1.0, size=(5_000, FEATURES)))
    pairs = [(baseline[n], current[n]) for n in baseline.names]

    def slot_matrix(s: Summary) -> np.ndarray:
        return np.stack([np.r_[h.underflow, h.counts, h.overflow] for h in s.values()])  # type: ignore[union-attr]

    bm, cm = slot_matrix(baseline), slot_matrix(current)
    n = 2000
    per_feature = lambda: [psi(b, c) for b, c in pairs]  # noqa: E731
    cand, base = interleaved_seconds(lambda: [psi_counts(bm, cm) for _ in range(n)],
                                      lambda: [per_feature() for _ in range(n // 20)], repeats=repeats)
    cand_us = [t / n * 1e6 for t in cand]
    base_us = [t / (n // 20) * 1e6 for t in base]
    emit(BENCH, "psi_32x16_us", value=statistics.median(cand_us), baseline="psi() per feature, 32 histogram pairs",
         baseline_value=statistics.median(base_us), target="~33 us (PERFORMANCE.md reference)",
         **ratios(cand_us, base_us), reference_us=33, repeats=repeats)
    scorer = DriftScorer(baseline)
    m = 500
    cand, base = interleaved_seconds(lambda: [scorer.score(current) for _ in range(m)],
                                     lambda: [psi_counts(bm, cm) for _ in range(m)], repeats=repeats)
    emit(BENCH, "score_32x16_us", value=statistics.median(cand) / m * 1e6,
         baseline="psi_counts on the same two 32 x 18 slot matrices", baseline_value=statistics.median(base) / m * 1e6,
         target="informational (every score, significance gate, levels, report; p-values lazy)",
         **ratios(cand, base), repeats=repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="smaller whylogs sample, fewer repeats (< 60 s)")
    ap.add_argument("--whylogs-python", default=os.environ.get("WHYLOGS_PYTHON", DEFAULT_WHYLOGS_PYTHON),
                    help="interpreter of a virtualenv with whylogs, numpy and pandas")
    args = ap.parse_args()
    repeats = 5 if args.quick else 9
    bench_binning(1_000_000, repeats)
    bench_whylogs(args.whylogs_python, 50_000 if args.quick else 500_000, 5, timeout=120 if args.quick else 900)
    bench_fleet(10_000, repeats=5, per_device=2_000 if args.quick else 10_000)
    bench_psi(repeats)


if __name__ == "__main__":
    sys.exit(main())
