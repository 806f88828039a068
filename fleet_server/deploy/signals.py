"""Drift and inference-SLI signals for the rollout gates, read from stored telemetry.

The policy takes one report per device (:class:`~fleet_server.rollouts.Signals`): the device's latest drift window
scored against a baseline (:class:`~fleet_server.rollouts.DeviceDrift`) and the same window's SLI summary
(:class:`~fleet_server.rollouts.DeviceSli`), each tagged with the model version it was measured on. This module
picks the windows and scores them:

* **Canary**: devices of this rollout on the new version (installed or healthy); their latest window on the
  rollout's version, received within ``lookback_s``.
* **Control**: target devices not on the new version, the last-ranked first (they are reached last, so they are
  the natural holdout), at most ``control_cap`` of them; their latest window on any other version.
* **Baseline**: the ``baselines`` table row of the window's (model, version), else the ``drift.baseline`` of that
  version's bundle manifest (thresholds likewise). A window is scored against the baseline of the version it was
  measured on, so canary and control are each judged on their own model's bins; a version with no baseline gives
  no drift report (the gate then lacks data, and waits when ``required``).
* **SLI**: ``requests``; errors as the sum of ``slis["errors"]`` (a code -> count map; an int is taken as is;
  otherwise ``requests - ok``); p99 latency from the ``latency_us`` histogram (upper edge of the bin holding the
  99th percentile, capped at ``max``), in milliseconds.

Scores are cached by window id (windows never change), so a tick rescoring the same windows costs a dict lookup.
Malformed windows (not the drift layout, unscoreable against the baseline, SLIs of the wrong shape) are left out
and counted in :attr:`SignalReader.skipped`.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from agent.drift import LAYOUT_VERSION, DriftLayoutError, DriftThresholds, Summary, score_summary
from fleet_server.deploy.bridge import chunks
from fleet_server.deploy.store import ts
from fleet_server.models import Baseline, BundleRecord, DriftWindowRecord, table_of
from fleet_server.rollouts import DeviceDrift, DeviceSli, DriftLevel, Signals

__all__ = ["SignalReader", "p99_ms", "sli_of"]

log = logging.getLogger(__name__)

_WINDOWS = table_of(DriftWindowRecord)
_BASELINES = table_of(Baseline)
_BUNDLES = table_of(BundleRecord)

_LATENCY_BINS = 82  # agent.telemetry.slis: [0, 1 us), 80 bins of 10**(1/10), [100 s, inf)


def _upper_edge_us(index: int) -> float:
    if index <= 0:
        return 1.0
    if index >= _LATENCY_BINS - 1:
        return math.inf
    return float(10.0 ** (index / 10))


def p99_ms(slis: Mapping[str, Any]) -> float | None:
    """The 99th percentile latency in ms from a window's ``latency_us`` histogram (``None``: no latencies)."""
    lat = slis.get("latency_us")
    if not isinstance(lat, Mapping):
        return None
    first, counts = lat.get("first", 0), lat.get("counts")
    if (isinstance(first, bool) or not isinstance(first, int) or first < 0 or not isinstance(counts, list)
            or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts)):
        raise ValueError("slis.latency_us must have an int 'first' and a list of counts")
    total = sum(counts)
    if total == 0:
        return None
    rank = math.ceil(0.99 * total)
    seen = 0
    edge = math.inf
    for i, c in enumerate(counts):
        seen += c
        if seen >= rank:
            edge = _upper_edge_us(first + i)
            break
    top = lat.get("max")
    if isinstance(top, int | float) and not isinstance(top, bool) and math.isfinite(top) and top > 0:
        edge = min(edge, float(top))
    return edge / 1000.0 if math.isfinite(edge) else None


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def sli_of(version: int, slis: Mapping[str, Any]) -> DeviceSli | None:
    """A window's SLI report, or ``None`` when it has no request count (``ValueError`` for a malformed one)."""
    requests = _count(slis.get("requests"))
    if requests is None:
        return None
    errors_in = slis.get("errors")
    if isinstance(errors_in, Mapping):
        counts = [_count(v) for v in errors_in.values()]
        if any(c is None for c in counts):
            raise ValueError("slis.errors must map codes to non-negative counts")
        errors = sum(c for c in counts if c is not None)
    elif isinstance(errors_in, int) and not isinstance(errors_in, bool) and errors_in >= 0:
        errors = errors_in
    else:
        ok = _count(slis.get("ok"))
        errors = requests - ok if ok is not None and ok <= requests else 0
    p99 = p99_ms(slis)
    return DeviceSli(version=version, requests=requests, errors=min(errors, requests),
                     latency_p99_ms=p99 if p99 is not None else 0.0)


@dataclass(frozen=True, slots=True)
class _Scored:
    version: int
    drift: DeviceDrift | None
    sli: DeviceSli | None


class SignalReader:
    """Reads and scores the windows a rollout's gates judge (see the module docstring). Holds a bounded cache of
    scored windows; one instance per rollout loop."""

    def __init__(self, *, lookback_s: float = 3600.0, control_cap: int = 500, cache_size: int = 100_000) -> None:
        self.lookback_s = lookback_s
        self.control_cap = control_cap
        self.cache_size = cache_size
        self.skipped = 0
        self._cache: OrderedDict[int, _Scored] = OrderedDict()
        self._fresh: dict[int, _Scored] = {}

    def _baseline(self, conn: sa.Connection, memo: dict[tuple[str, int], tuple[Summary, DriftThresholds] | None],
                  model: str, version: int) -> tuple[Summary, DriftThresholds] | None:
        key = (model, version)
        if key in memo:
            return memo[key]
        found: tuple[Summary, DriftThresholds] | None = None
        try:
            row = conn.execute(sa.select(_BASELINES.c.summary, _BASELINES.c.thresholds).where(
                _BASELINES.c.model == model, _BASELINES.c.version == version)).first()
            if row is not None:
                found = Summary.from_dict(row.summary), DriftThresholds.from_dict(row.thresholds or {})
            else:
                manifest = conn.execute(sa.select(_BUNDLES.c.manifest).where(
                    _BUNDLES.c.model == model, _BUNDLES.c.version == version)).scalar()
                drift = manifest.get("drift") if isinstance(manifest, Mapping) else None
                if isinstance(drift, Mapping) and isinstance(drift.get("baseline"), Mapping):
                    found = (Summary.from_dict(drift["baseline"]),
                             DriftThresholds.from_dict(drift.get("thresholds") or {}))
        except (DriftLayoutError, ValueError) as exc:
            log.warning("signals: baseline of %s version %s unusable: %s", model, version, exc)
            found = None
        memo[key] = found
        return found

    def _score(self, row: Mapping[str, Any], base: tuple[Summary, DriftThresholds] | None) -> _Scored:
        drift: DeviceDrift | None = None
        sli: DeviceSli | None = None
        version = int(row["version"])
        if base is not None:
            try:
                current = Summary.from_dict({"layout": LAYOUT_VERSION, "features": row["features"]})
                report = score_summary(base[0], current, base[1])
                if report.level != "insufficient":
                    drift = DeviceDrift(version, DriftLevel(report.level), float(report.drifted_share))
            except (DriftLayoutError, ValueError) as exc:
                self.skipped += 1
                log.debug("signals: window %s not scored: %s", row["id"], exc)
        try:
            slis = row["slis"]
            sli = sli_of(version, slis) if isinstance(slis, Mapping) else None
        except ValueError as exc:
            self.skipped += 1
            log.debug("signals: window %s SLIs unusable: %s", row["id"], exc)
        return _Scored(version, drift, sli)

    def control_group(self, ranked: Sequence[str], not_on_new: Collection[str]) -> list[str]:
        """Up to ``control_cap`` devices of ``not_on_new``, the last-ranked first."""
        out: list[str] = []
        for device in reversed(ranked):
            if device in not_on_new:
                out.append(device)
                if len(out) >= self.control_cap:
                    break
        return out

    def read(self, conn: sa.Connection, *, model: str, version: int, canary: Collection[str],
             control: Collection[str], now: float, drift: bool = True, sli: bool = True) -> Signals:
        """Reports of the ``canary`` (on ``version``) and ``control`` (any other version) devices."""
        if not (drift or sli) or not (canary or control):
            return Signals()
        since = ts(now - self.lookback_s)
        self._fresh.clear()
        canary_set, control_set = set(canary), set(control)
        latest: dict[str, tuple[float, int]] = {}
        for part in chunks(sorted(canary_set | control_set)):
            q = sa.select(_WINDOWS.c.id, _WINDOWS.c.device_id, _WINDOWS.c.version, _WINDOWS.c.window_start).where(
                _WINDOWS.c.model == model, _WINDOWS.c.device_id.in_(part), _WINDOWS.c.received_at >= since)
            for r in conn.execute(q):
                on_new = r.version == version
                if (r.device_id in canary_set) != on_new:
                    continue  # a canary device's window on another version, or a control device's on the new one
                key = (float(r.window_start), int(r.id))
                if r.device_id not in latest or key > latest[r.device_id]:
                    latest[r.device_id] = key
        wanted = {wid for _, wid in latest.values()}
        missing = sorted(w for w in wanted if w not in self._cache)
        memo: dict[tuple[str, int], tuple[Summary, DriftThresholds] | None] = {}
        for ids in chunks(missing, 500):
            rows = conn.execute(sa.select(_WINDOWS.c.id, _WINDOWS.c.version, _WINDOWS.c.features, _WINDOWS.c.slis)
                                .where(_WINDOWS.c.id.in_(ids))).mappings()
            for row in map(dict, rows):
                base = self._baseline(conn, memo, model, int(row["version"]))
                result = self._score(row, base)
                if base is None:  # not cached: a baseline registered later must still score this window
                    self._fresh[int(row["id"])] = result
                else:
                    self._remember(int(row["id"]), result)
        drift_out: dict[str, DeviceDrift] = {}
        sli_out: dict[str, DeviceSli] = {}
        for device, (_, wid) in latest.items():
            scored: _Scored | None = self._cache.get(wid) or self._fresh.get(wid)
            if scored is None:
                continue
            if wid in self._cache:
                self._cache.move_to_end(wid)
            if drift and scored.drift is not None:
                drift_out[device] = scored.drift
            if sli and scored.sli is not None:
                sli_out[device] = scored.sli
        return Signals(drift=drift_out, sli=sli_out)

    def _remember(self, window_id: int, scored: _Scored) -> None:
        self._cache[window_id] = scored
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
