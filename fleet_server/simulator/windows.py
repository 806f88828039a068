"""Drift windows and SLIs of simulated devices: binned with ``agent.drift`` against a baseline, shifted per version.

Generating histograms for every window of every device would cost more than the rest of the simulator together, so
:class:`WindowFactory` keeps a small pool of window *variants* per (model, version): ``pool`` summaries, each of
``samples`` rows drawn from the baseline (shifted by the version's ``drift_shift``) with its own seed, plus their
SLI maps. A device's window ``k`` uses variant ``hash(device, k) % pool``. The server merges windows exactly, so a
fleet's merged view is the sum of real, correctly binned summaries; only the independence between windows is
approximated.

Sampling from a baseline: a numeric feature draws bins in proportion to the baseline counts (underflow and overflow
as one bin-width beyond the edges), then uniform within the bin, then adds ``shift`` baseline standard deviations; a
categorical feature draws categories in proportion to its counts and moves ``min(1, |shift| / 3)`` of the mass to a
new category (``"__sim_drift__"``).

The ``slis`` map follows ``agent.telemetry.slis`` format 1 exactly (``format``, ``requests``, ``ok``, ``errors``,
``latency_us`` over the same fixed log-spaced bins); the server may not import that agent module, so the bin edges
are restated here and a test pins them to the agent's.
"""

from __future__ import annotations

import bisect
import io
import math
from collections.abc import Mapping
from typing import Any, Final, TypeAlias

import numpy as np

from agent.bundle import Manifest, read_manifest
from agent.drift import CategoricalCounts, Edges, NumericHistogram, Summary
from fleet_server.simulator.scenario import Scenario, unit_hash

__all__ = ["DRIFT_CATEGORY", "LATENCY_EDGES_US", "Baselines", "WindowFactory", "bundle_baseline", "default_baseline",
           "slis_map"]

Baselines: TypeAlias = Mapping[str | tuple[str, int], Summary]
"""Drift baselines by model name, or by ``(model, version)`` for one version (looked up first)."""

DRIFT_CATEGORY: Final = "__sim_drift__"

SLIS_FORMAT: Final = 1
LATENCY_EDGES_US: Final[tuple[float, ...]] = tuple(10.0 ** (k / 10) for k in range(81))
"""Inner latency bin edges in microseconds: the same as ``agent.telemetry.slis.LATENCY_EDGES_US``."""
_LATENCY_BINS: Final = len(LATENCY_EDGES_US) + 1
_EDGES: Final = np.asarray(LATENCY_EDGES_US)


def default_baseline(seed: int = 0, features: int = 4, bins: int = 10) -> Summary:
    """A synthetic training baseline for models without one: ``features`` numeric features ``f00..`` drawn from
    ``N(i, 1)`` with quantile edges, plus a categorical ``kind`` feature."""
    rng = np.random.default_rng(seed)
    pairs: list[tuple[str, NumericHistogram | CategoricalCounts]] = []
    for i in range(features):
        train = rng.normal(float(i), 1.0, 5000)
        pairs.append((f"f{i:02d}", NumericHistogram.from_values(Edges.quantiles(train, bins), train)))
    pairs.append(("kind", CategoricalCounts.from_values(rng.choice(["a", "b", "c"], 3000, p=[0.5, 0.3, 0.2]))))
    return Summary(pairs)


def bundle_baseline(bundle: bytes) -> tuple[tuple[str, int], Summary]:
    """``((model, version), baseline)`` from a bundle's manifest (not verified: the simulator only needs the bins
    the server will score that version's windows against)."""
    manifest_bytes, _ = read_manifest(io.BytesIO(bundle))
    manifest = Manifest.from_bytes(manifest_bytes)
    return (manifest.model, manifest.version), manifest.drift_baseline()


def slis_map(requests: int, errors: int, latencies_us: np.ndarray) -> dict[str, Any]:
    """The ``slis`` map of a window (``agent.telemetry.slis`` format 1): ``requests`` of which ``errors`` failed
    (code ``inference_failed``); ``latencies_us`` are the answered requests' latencies."""
    ok = requests - errors
    out: dict[str, Any] = {"format": SLIS_FORMAT, "requests": int(requests), "ok": int(ok)}
    if errors:
        out["errors"] = {"inference_failed": int(errors)}
    values = np.asarray(latencies_us, dtype=np.float64).ravel()
    if values.size:
        idx = np.searchsorted(_EDGES, np.where(values > 0.0, values, 0.0), side="right")
        counts = np.bincount(idx, minlength=_LATENCY_BINS)
        nonzero = np.flatnonzero(counts)
        first, last = int(nonzero[0]), int(nonzero[-1])
        positive = values[values > 0.0]
        out["latency_us"] = {
            "first": first,
            "counts": [int(c) for c in counts[first:last + 1]],
            "sum": round(float(positive.sum()), 1) if positive.size else 0.0,
            "max": round(float(positive.max()), 1) if positive.size else 0.0,
        }
    return out


def latency_bin(latency_us: float) -> int:
    """Bin index of one latency (as ``agent.telemetry.slis.latency_bin``)."""
    return 0 if not latency_us > 0.0 else bisect.bisect_right(LATENCY_EDGES_US, latency_us)


def _sample_numeric(hist: NumericHistogram, n: int, shift: float, rng: np.random.Generator) -> np.ndarray:
    edges = hist.edges.values
    width = float(edges[-1] - edges[0]) / max(1, len(edges) - 1)
    lows = np.concatenate(([edges[0] - width], edges))
    highs = np.concatenate((edges, [edges[-1] + width]))
    weights = np.concatenate(([hist.underflow], hist.counts, [hist.overflow])).astype(np.float64)
    if weights.sum() <= 0:
        weights = np.ones_like(weights)
    chosen = rng.choice(len(weights), size=n, p=weights / weights.sum())
    values = rng.uniform(lows[chosen], highs[chosen])
    if shift:
        var = hist.variance
        std = math.sqrt(var) if var is not None and var > 0 else max(width, 1e-9) * len(hist.counts) / 4
        values = values + shift * std
    return values


def _sample_categorical(counts: CategoricalCounts, n: int, shift: float, rng: np.random.Generator) -> np.ndarray:
    names = list(counts.counts)
    weights = np.asarray([counts.counts[c] for c in names], dtype=np.float64)
    if not names or weights.sum() <= 0:
        names, weights = ["a"], np.ones(1)
    values = rng.choice(np.asarray(names, dtype=object), size=n, p=weights / weights.sum())
    moved = min(1.0, abs(shift) / 3.0)
    if moved > 0:
        values[rng.random(n) < moved] = DRIFT_CATEGORY
    return values


class WindowFactory:
    """Pools of (features, slis) window variants per (model, version); see the module docs."""

    def __init__(self, scenario: Scenario, baselines: Baselines | None = None, *, pool: int = 8) -> None:
        self.scenario = scenario
        self.baselines = dict(baselines or {})
        self.pool = pool
        self._default: Summary | None = None
        self._cache: dict[tuple[str, int, int], tuple[dict[str, Any], dict[str, Any]]] = {}

    def baseline(self, model: str, version: int | None = None) -> Summary:
        """The baseline windows of ``model`` (at ``version``) are binned against: the ``(model, version)`` entry,
        else the ``model`` entry, else a synthetic default."""
        base = self.baselines.get((model, version)) if version is not None else None
        if base is None:
            base = self.baselines.get(model)
        if base is not None:
            return base
        if self._default is None:
            self._default = default_baseline(self.scenario.seed)
        return self._default

    def variant(self, device_id: str, model: str, version: int, k: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Features and SLIs for window ``k`` of ``device_id`` (shared, read-only: do not mutate them)."""
        index = int(unit_hash(self.scenario.seed, device_id, f"window:{k}") * self.pool)
        key = (model, version, index)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = self._make(model, version, index)
        return found

    def _make(self, model: str, version: int, index: int) -> tuple[dict[str, Any], dict[str, Any]]:
        s = self.scenario
        behaviour = s.behaviour(model, version)
        seed = int(unit_hash(s.seed, f"{model}@{version}", f"variant:{index}") * 2**62)
        rng = np.random.default_rng(seed)
        base = self.baseline(model, version)
        summary = Summary.empty_like(base)
        n = s.window_samples
        numeric = summary.numeric_names
        if numeric:
            columns = []
            for name in numeric:
                hist = base[name]
                assert isinstance(hist, NumericHistogram)
                columns.append(_sample_numeric(hist, n, behaviour.drift_shift, rng))
            summary.add_rows(np.column_stack(columns))
        for name in summary.names:
            feature = base[name]
            if isinstance(feature, CategoricalCounts):
                target = summary[name]
                assert isinstance(target, CategoricalCounts)
                target.add(_sample_categorical(feature, n, behaviour.drift_shift, rng))
        errors = int(rng.binomial(n, behaviour.error_rate)) if behaviour.error_rate > 0 else 0
        latencies = rng.lognormal(math.log(behaviour.latency_ms * 1000.0), 0.25, n - errors)
        features: dict[str, Any] = summary.to_dict()["features"]  # type: ignore[assignment]
        return features, slis_map(n, errors, latencies)
