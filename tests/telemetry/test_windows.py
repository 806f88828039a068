"""Window rollover (time, sample count, swap), the SLI map and latency quantiles, schema-derived edges.

The roller is pure logic driven by an injected clock; the rollover tests at the end run real requests through a
real ``ModelHost`` and tick the recorder by hand.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from agent.demo import MODELS_DIR
from agent.drift import CategoricalCounts, Edges, NumericHistogram, Summary
from agent.model import FeatureSpec
from agent.protocol import DriftWindow, decode, encode
from agent.runtime import ModelHost, ModelSpec, load_schema_file
from agent.telemetry import (
    LATENCY_BINS,
    LATENCY_EDGES_US,
    ClosedWindow,
    TelemetryHub,
    WindowPolicy,
    WindowRoller,
    WindowSlis,
    latency_bin,
    latency_bin_counts,
    latency_quantiles,
    schema_edges,
)
from tests.conftest import profile, samples

T0 = 1_800_000_000.0


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def template() -> Summary:
    return Summary([("temp", NumericHistogram(Edges.uniform(0.0, 40.0, 4))),
                    ("mode", CategoricalCounts(["a", "b"]))])


def roller(clock: Clock, **policy: Any) -> WindowRoller:
    return WindowRoller(device_id="dev-0001", model="m", version=3, template=template(), clock=clock,
                        policy=WindowPolicy(**policy), meta={"drift_edges": "schema"})


def fill(r: WindowRoller, rows: int, *, values: float = 10.0) -> None:
    w = r.window
    hist = w.features["temp"]
    assert isinstance(hist, NumericHistogram)
    w.features["temp"] = hist.merge(NumericHistogram.from_values(hist.edges, np.full(rows, values)))
    w.samples += rows
    for _ in range(rows):
        w.slis.count_ok(25.0)


# -- the roller (pure) ---------------------------------------------------------------------------------------------


def test_window_closes_by_time_and_the_next_one_starts_where_it_ended() -> None:
    clock = Clock()
    r = roller(clock)
    r.open_at(T0)
    fill(r, 3)
    assert r.poll(T0 + 299.9) is None and r.due(T0 + 299.9) is None
    clock.t = T0 + 300.0
    assert r.due() == "time"
    w = r.poll()
    assert isinstance(w, ClosedWindow)
    assert (w.window_start, w.window_end, w.samples) == (T0, T0 + 300.0, 3)
    assert (w.device_id, w.model, w.version) == ("dev-0001", "m", 3)
    assert w.slis["drift_edges"] == "schema" and w.slis["ok"] == 3
    temp = Summary.from_dict({"layout": 1, "features": dict(w.features)})["temp"]
    assert isinstance(temp, NumericHistogram) and temp.counts.tolist() == [0, 3, 0, 0]
    assert r.window.start == T0 + 300.0 and r.window.samples == 0  # contiguous windows, fresh accumulators
    message = w.message(5)
    assert isinstance(message, DriftWindow) and message.stream_seq == 5
    assert decode(encode(message)) == message


def test_window_closes_by_sample_count_whichever_comes_first() -> None:
    clock = Clock()
    r = roller(clock, max_samples=5)
    r.open_at(T0)
    fill(r, 4)
    assert r.room() == 1 and r.poll(T0 + 1) is None
    fill(r, 1)
    assert r.due(T0 + 1) == "samples"
    w = r.poll(T0 + 1)
    assert w is not None and w.samples == 5 and w.window_end == T0 + 1
    assert r.room() == 5


def test_idle_windows_are_restarted_not_sent() -> None:
    clock = Clock()
    r = roller(clock)
    r.open_at(T0)
    assert r.poll(T0 + 301) is None  # nothing happened in 5 minutes: nothing to send
    assert r.window.start == T0 + 301
    r.window.slis.loads += 1  # a load alone is worth reporting
    w = r.close(T0 + 302)
    assert w is not None and w.samples == 0 and w.slis["loads"] == 1
    assert r.close(T0 + 303) is None
    fill(r, 1)
    w2 = r.close(T0 + 304)
    assert w2 is not None and w2.samples == 1 and r.closed == 2


def test_a_clock_stepping_back_never_makes_a_window_end_before_it_starts() -> None:
    clock = Clock()
    r = roller(clock)
    r.open_at(T0)
    fill(r, 2)
    w = r.close(T0 - 50.0)  # NTP stepped the clock back
    assert w is not None and w.window_start == w.window_end == T0


@pytest.mark.parametrize("bad", [{"max_seconds": 0}, {"max_seconds": math.inf}, {"max_samples": 0},
                                 {"max_samples": 2.5}, {"max_samples": True}])
def test_window_policy_refuses_nonsense(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="max_"):
        WindowPolicy(**bad)


# -- SLIs ----------------------------------------------------------------------------------------------------------


def test_latency_edges_are_fixed_log_spaced_microseconds() -> None:
    assert LATENCY_BINS == 82 and len(LATENCY_EDGES_US) == 81
    assert LATENCY_EDGES_US[0] == 1.0 and LATENCY_EDGES_US[10] == pytest.approx(10.0)
    assert LATENCY_EDGES_US[-1] == pytest.approx(1e8)
    ratios = np.diff(np.log10(LATENCY_EDGES_US))
    assert np.allclose(ratios, 0.1)
    assert latency_bin(0.5) == 0 and latency_bin(1.0) == 1 and latency_bin(1e9) == LATENCY_BINS - 1
    assert latency_bin(float("nan")) == 0
    values = np.array([0.2, 1.0, 9.99, 10.0, 55.0, 1e12])
    counts = latency_bin_counts(values)
    assert len(counts) == LATENCY_BINS and sum(counts) == len(values)
    assert counts == np.bincount([latency_bin(v) for v in values], minlength=LATENCY_BINS).tolist()


def test_latency_quantiles_are_within_a_bin_of_the_true_percentiles() -> None:
    rng = np.random.default_rng(11)
    lat = rng.lognormal(math.log(80.0), 0.7, 50_000)  # microseconds
    s = WindowSlis()
    s.add_ok_batch(lat)
    d = s.to_dict()
    q = latency_quantiles(d)
    for key, pct in (("p50", 50), ("p95", 95), ("p99", 99)):
        true = float(np.percentile(lat, pct))
        assert q[key] == pytest.approx(true, rel=0.06), key  # bins are 26 % wide; interpolation does better
    assert d["latency_us"]["max"] == round(float(lat.max()), 1)
    assert d["latency_us"]["sum"] == round(float(lat.sum()), 1)
    # Windows merge by adding counts: quantiles of several windows at once.
    a, b = WindowSlis(), WindowSlis()
    a.add_ok_batch(lat[:20_000])
    b.add_ok_batch(lat[20_000:])
    assert latency_quantiles([a.to_dict(), b.to_dict()]) == pytest.approx(q)
    assert latency_quantiles({"requests": 0, "ok": 0}) == {"p50": None, "p95": None, "p99": None}
    assert latency_quantiles(d, (0.0, 1.0))["p100"] == d["latency_us"]["max"]


def test_slis_map_is_plain_json_and_leaves_out_zero_counters() -> None:
    s = WindowSlis()
    s.count_ok(12.0)
    s.count_ok(30.0, out_of_range=True)
    s.add_ok_batch(np.array([15.0, 18.0]), non_finite=1)
    s.count_error("busy")
    s.count_error("shape_mismatch", 2)
    s.swaps = 1
    d = s.to_dict({"drift_edges": "baseline"})
    assert json.loads(json.dumps(d)) == d
    assert d == {
        "format": 1, "requests": 7, "ok": 4, "errors": {"busy": 1, "shape_mismatch": 2},
        "served_out_of_range": 1, "served_non_finite": 1,
        "latency_us": {"first": latency_bin(12.0), "counts": d["latency_us"]["counts"], "sum": 75.0, "max": 30.0},
        "swaps": 1, "drift_edges": "baseline",
    }
    assert sum(d["latency_us"]["counts"]) == 4 and d["latency_us"]["counts"][0] > 0
    assert d["latency_us"]["counts"][-1] > 0  # trimmed at both ends
    assert all(type(v) is int for v in d["latency_us"]["counts"])
    assert WindowSlis().to_dict() == {"format": 1, "requests": 0, "ok": 0}


# -- schema-derived edges ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("lo", "hi"), [(5.6491, 30.1519), (0.0, 2734.06), (0.043643, 0.151487), (-1e-3, 1e-3),
                                        (1000.1, 1000.2), (-5e7, 3e9), (0.0, 16.0)])
def test_schema_edges_are_16_uniform_bins_covering_the_declared_range(lo: float, hi: float) -> None:
    e = schema_edges(FeatureSpec("f", lo, hi))
    v = e.values
    assert e.bins == 16
    assert v[0] <= lo and v[-1] >= hi
    width = (hi - lo) / 16
    assert (lo - v[0]) + (v[-1] - hi) < 0.02 * width  # widened by < 2 % of a bin
    assert np.allclose(np.diff(v), np.diff(v)[0], rtol=0, atol=1e-12 * max(abs(lo), abs(hi), 1.0))


def test_schema_edges_for_constant_and_unbounded_features() -> None:
    const = schema_edges(FeatureSpec("pixel_0_0", 0.0, 0.0))
    assert const.bins == 1 and const.lo == 0.0
    h = NumericHistogram.from_values(const, np.array([0.0, 0.0, 1.0, -1.0]))
    assert (h.counts.tolist(), h.underflow, h.overflow) == ([2], 1, 1)
    both = schema_edges(FeatureSpec("x"))
    assert both.lo == -1e6 and both.hi == 1e6 and 0.0 in both.values.tolist()
    low_only = schema_edges(FeatureSpec("x", 0.0, None))
    assert low_only.lo == 0.0 and low_only.hi == 1e6
    high_only = schema_edges(FeatureSpec("x", None, 5.0))
    assert high_only.hi == 5.0 and high_only.lo == -1e6


# -- rollover with the real runtime ----------------------------------------------------------------------------------


@pytest.fixture
def host() -> Iterator[ModelHost]:
    h = ModelHost(profile("generic-x86-64"))
    h.load(ModelSpec(MODELS_DIR / "cancer_mlp_int8.onnx", load_schema_file(MODELS_DIR / "cancer_mlp_int8.schema.json")))
    yield h
    h.close()


def rows() -> np.ndarray:
    return np.asarray(samples("cancer_mlp_int8")["inputs"]["features"], dtype=np.float32)


@pytest.mark.integration
def test_rollover_by_count_splits_a_flush_into_full_windows(host: ModelHost) -> None:
    clock = Clock()
    seq = itertools.count()
    hub = TelemetryHub(device_id="dev-0001", seq=lambda: next(seq), clock=clock, policy=WindowPolicy(max_samples=10))
    model = host.get("cancer-mlp")
    hub.attach(model)
    x = rows()
    for i in range(23):
        model.infer({"features": x[i : i + 1]})
    model.infer({"features": x[:6]})  # one request of 6 rows: samples 23 .. 28
    windows = hub.tick()
    assert [w.samples for w in windows] == [10, 10]  # one flush, two full windows, the rest stays open
    assert [w.stream_seq for w in hub.drain_windows()] == [0, 1]  # numbered by seq() as they closed
    assert [w.slis["ok"] for w in windows] == [10, 10]
    assert windows[0].slis["loads"] == 1 and "loads" not in windows[1].slis
    clock.t += 300.0
    (last,) = hub.tick()
    assert last.samples == 9 and last.slis["ok"] == 4  # 3 single rows + the 6-row request (kept whole)
    assert sum(w.samples for w in [*windows, last]) == 29
    # Every window's histograms hold exactly its own rows.
    for w in (*windows, last):
        radius = Summary.from_dict({"layout": 1, "features": dict(w.features)})["mean radius"]
        assert isinstance(radius, NumericHistogram) and radius.total == w.samples


@pytest.mark.integration
def test_rollover_by_time_with_an_injected_clock(host: ModelHost) -> None:
    clock = Clock()
    seq = itertools.count()
    hub = TelemetryHub(device_id="dev-0001", seq=lambda: next(seq), clock=clock)  # 300 s / 10 000 samples
    model = host.get("cancer-mlp")
    hub.attach(model)
    x = rows()
    model.infer({"features": x[:2]})
    clock.t += 120.0
    assert hub.tick() == []
    model.infer({"features": x[2:3]})
    clock.t += 179.0
    assert hub.tick() == []  # 299 s
    clock.t += 1.0
    (w1,) = hub.tick()
    assert (w1.window_start, w1.window_end, w1.samples, w1.slis["ok"]) == (T0, T0 + 300.0, 3, 2)
    clock.t += 300.0
    assert hub.tick() == []  # an idle window is not sent
    model.infer({"features": x[:1]})
    clock.t += 300.0
    (w2,) = hub.tick()
    assert (w2.window_start, w2.window_end, w2.samples) == (T0 + 600.0, T0 + 900.0, 1)
    assert [w.stream_seq for w in hub.drain_windows()] == [0, 1]  # the idle window used no number
