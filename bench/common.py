"""Interleaved A/B timing and the one-JSON-object-per-metric output format.

Each repeat times the candidate and then the baseline on the same inputs (A B A B ...), after a warm-up, so a
noisy neighbour slows both alike; the reported ratio is the median of the per-repeat ratios, with min and max.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Pair:
    p50: list[float]
    p99: list[float]


def _percentile(sorted_vals: list[float], q: float) -> float:
    i = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[i]


def time_calls(fn: Callable[[], Any], n: int) -> tuple[float, float]:
    """p50 and p99 in microseconds of ``n`` calls of ``fn``."""
    clock = time.perf_counter_ns
    samples = []
    for _ in range(n):
        t0 = clock()
        fn()
        samples.append(clock() - t0)
    samples.sort()
    return _percentile(samples, 0.5) / 1000, _percentile(samples, 0.99) / 1000


def interleaved(candidate: Callable[[], Any], baseline: Callable[[], Any], *, repeats: int, n: int,
                warmup: int = 200) -> tuple[Pair, Pair]:
    for _ in range(warmup):
        candidate()
        baseline()
    cand, base = Pair([], []), Pair([], [])
    for _ in range(repeats):
        for fn, acc in ((candidate, cand), (baseline, base)):
            p50, p99 = time_calls(fn, n)
            acc.p50.append(p50)
            acc.p99.append(p99)
    return cand, base


def ratio_stats(a: list[float], b: list[float]) -> tuple[float, float, float]:
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def emit(bench: str, metric: str, *, value: float, baseline: str, baseline_value: float, target: str,
         **extra: Any) -> dict[str, Any]:
    doc = {"bench": bench, "metric": metric, "value": round(value, 2), "baseline": baseline,
           "baseline_value": round(baseline_value, 2),
           "ratio": round(value / baseline_value, 3) if baseline_value else None, "target": target, **extra}
    print(json.dumps(doc), flush=True)
    return doc


def report_pair(bench: str, cand: Pair, base: Pair, *, baseline: str, target_p50: str, target_p99: str,
                **extra: Any) -> None:
    m50, lo50, hi50 = ratio_stats(cand.p50, base.p50)
    m99, lo99, hi99 = ratio_stats(cand.p99, base.p99)
    c50, b50 = statistics.median(cand.p50), statistics.median(base.p50)
    emit(bench, "p50_us", value=c50, baseline=baseline, baseline_value=b50, target=target_p50,
         ratio_median=round(m50, 3), ratio_min=round(lo50, 3),
         ratio_max=round(hi50, 3), delta_us=round(c50 - b50, 2), **extra)
    emit(bench, "p99_us", value=statistics.median(cand.p99), baseline=baseline,
         baseline_value=statistics.median(base.p99), target=target_p99,
         ratio_median=round(m99, 3), ratio_min=round(lo99, 3), ratio_max=round(hi99, 3), **extra)
