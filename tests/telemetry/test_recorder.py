"""Drift recording with the real runtimes and the real demo models: histograms, SLIs, bad input, buffer limits.

Requests run through a real ``ModelHost`` (ONNX Runtime / LiteRT); the recorder is ticked by hand (or by its
worker thread in one test) and its windows are compared with binning the very same rows directly.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from agent.bundle import Manifest
from agent.bundle.container import read_manifest
from agent.demo import MODELS_DIR
from agent.drift import CategoricalCounts, Edges, NumericHistogram, Summary
from agent.model import ModelSchema, RequestError
from agent.protocol import DriftWindow, decode, encode
from agent.runtime import LoadedModel, ModelHost, ModelSpec, load_schema_file
from agent.telemetry import (
    LATENCY_BINS,
    ClosedWindow,
    DriftRecorder,
    TelemetryHub,
    WindowPolicy,
    latency_quantiles,
    schema_edges,
)
from tests.conftest import profile, samples

MODELS = [("cancer_mlp_int8", ".onnx"), ("digits_mlp_int8", ".onnx"), ("digits_int8", ".tflite")]
T0 = 1_800_000_000.0


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def schema_of(stem: str, **changes: Any) -> ModelSchema:
    doc = json.loads((MODELS_DIR / f"{stem}.schema.json").read_text())
    policy = changes.pop("policy", None)
    if policy is not None:
        for f in doc["inputs"][0]["features"]:
            f.update(policy)
    doc.update(changes)
    return ModelSchema.from_dict(doc)


def rows_of(stem: str) -> np.ndarray:
    return np.asarray(samples(stem)["inputs"]["features"], dtype=np.float32)


@pytest.fixture
def host() -> Iterator[ModelHost]:
    h = ModelHost(profile("generic-x86-64"))
    yield h
    h.close()


def make_hub(clock: Clock, **kw: Any) -> TelemetryHub:
    seq = itertools.count()
    return TelemetryHub(device_id="dev-0001", seq=lambda: next(seq), clock=clock, **kw)


def load(host: ModelHost, stem: str, suffix: str = ".onnx", schema: ModelSchema | None = None,
         swap: bool = False) -> LoadedModel:
    spec = ModelSpec(MODELS_DIR / f"{stem}{suffix}", schema or load_schema_file(MODELS_DIR / f"{stem}.schema.json"))
    return host.swap(spec) if swap else host.load(spec)


def run(model: LoadedModel, batches: list[np.ndarray]) -> np.ndarray:
    """Infer every batch; return the probabilities in request order."""
    out = [model.infer({"features": b}).outputs["probabilities"] for b in batches]
    return np.concatenate(out)


def summary_of(window: DriftWindow | ClosedWindow) -> Summary:
    return Summary.from_dict({"layout": 1, "features": dict(window.features)})


def assert_numeric_matches(got: NumericHistogram, edges: Edges, values: np.ndarray) -> None:
    """Counts exactly those of binning ``values`` column-wise (the sort path); moments to float rounding."""
    want = NumericHistogram.from_values(edges, values.astype(np.float64))
    assert got.edges == edges
    assert got.counts.tolist() == want.counts.tolist()
    assert (got.underflow, got.overflow, got.nan, got.n) == (want.underflow, want.overflow, want.nan, want.n)
    assert (got.min, got.max) == (want.min, want.max)
    assert got.mean == pytest.approx(want.mean, rel=1e-9, abs=1e-12)
    assert got.m2 == pytest.approx(want.m2, rel=1e-9, abs=1e-9)


def plain_json(value: Any) -> None:
    """JSON-compatible plain data only (no numpy scalars or arrays anywhere)."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert type(k) is str
            plain_json(v)
    elif isinstance(value, list):
        for v in value:
            plain_json(v)
    else:
        assert value is None or type(value) in (bool, int, float, str), f"{value!r} is {type(value)}"
        if type(value) is float:
            assert math.isfinite(value)


# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize(("stem", "suffix"), MODELS)
def test_window_histograms_equal_direct_binning_of_the_same_rows(host: ModelHost, stem: str, suffix: str) -> None:
    clock = Clock()
    hub = make_hub(clock)
    model = load(host, stem, suffix)
    recorder = hub.attach(model)
    x = rows_of(stem)
    batches = [x[i : i + 1] for i in range(len(x))] + [x[:5], x[3:10]]  # singles and batched requests
    probs = run(model, batches[: len(x)])
    hub.tick()  # first flush: the singles
    probs = np.concatenate([probs, run(model, batches[len(x) :])])
    clock.t += 1.0
    hub.tick()  # second flush merges into the same window
    clock.t += 300.0
    (window,) = hub.tick()
    rows = np.concatenate(batches)
    assert window.samples == len(rows) == 24 + 12
    assert (window.model, window.version, window.device_id) == (model.name, model.version, "dev-0001")
    assert (window.window_start, window.window_end) == (T0, T0 + 301.0)
    got = summary_of(window)
    names = [f.name for f in model.schema.inputs[0].features]
    labels = list(model.schema.outputs[0].labels)
    assert list(got) == [*names, *(f"probabilities[{lab}]" for lab in labels), "probabilities.class"]
    for j, name in enumerate(names):
        edges = schema_edges(model.schema.inputs[0].features[j])
        feature = got[name]
        assert isinstance(feature, NumericHistogram)
        assert_numeric_matches(feature, edges, rows[:, j])
    for k, lab in enumerate(labels):
        feature = got[f"probabilities[{lab}]"]
        assert isinstance(feature, NumericHistogram)
        assert_numeric_matches(feature, Edges.uniform(0.0, 1.0, 20), probs[:, k])
    predicted = CategoricalCounts(labels)
    predicted.add(np.asarray(labels)[probs.argmax(axis=1)])
    assert got["probabilities.class"] == predicted
    assert window.slis["requests"] == window.slis["ok"] == len(batches)
    assert window.slis["drift_edges"] == "schema"
    assert window.slis["loads"] == 1
    assert sum(window.slis["latency_us"]["counts"]) == len(batches)
    assert recorder.rows_binned == len(rows) and recorder.rows_dropped == 0
    plain_json(dict(window.slis))
    plain_json(dict(window.features))
    message = window.message(7)
    assert decode(encode(message)) == message and decode(window.encode(7)) == message
    (queued,) = hub.drain_windows()  # numbered by the hub's seq()
    assert queued == window.message(0)


@pytest.mark.integration
def test_bundle_baseline_edges_are_the_windows_edges(host: ModelHost) -> None:
    from agent.bundletool.build import build_bundle

    stem = "cancer_mlp_int8"
    x = rows_of(stem)
    schema_doc = json.loads((MODELS_DIR / f"{stem}.schema.json").read_text())
    built = build_bundle(model=MODELS_DIR / f"{stem}.onnx", schema_doc=schema_doc, name="cancer-mlp", version=4,
                         reference=x.astype(np.float64), health_rows=x[:3])
    manifest_bytes, _sigs = read_manifest(io.BytesIO(built.data))
    manifest = Manifest.from_bytes(manifest_bytes)
    baseline = manifest.drift_baseline()
    clock = Clock()
    hub = make_hub(clock)
    model = host.load(ModelSpec(MODELS_DIR / f"{stem}.onnx", manifest.schema))
    hub.attach(model, baseline=baseline)
    run(model, [x[i : i + 1] for i in range(len(x))])
    hub.detach("cancer-mlp")  # e.g. unloaded: the open window closes now
    (window,) = hub.drain_windows()
    assert window.version == 4 and window.slis["drift_edges"] == "baseline"
    got = summary_of(window)
    for j, name in enumerate(baseline.names):
        feature, base = got[name], baseline[name]
        assert isinstance(feature, NumericHistogram) and isinstance(base, NumericHistogram)
        assert feature.edges == base.edges
        assert_numeric_matches(feature, base.edges, x[:, j])
    # A window merges with the baseline bin by bin: the point of taking its edges.
    merged = Summary((n, got[n]) for n in baseline.names).merge(baseline)
    assert merged[baseline.names[0]].total == 2 * len(x)


@pytest.mark.integration
def test_baseline_missing_features_fall_back_to_schema_edges_and_say_mixed(host: ModelHost) -> None:
    stem = "cancer_mlp_int8"
    x = rows_of(stem)
    feats = load_schema_file(MODELS_DIR / f"{stem}.schema.json").inputs[0].features
    baseline = Summary((f.name, NumericHistogram.from_values(Edges.quantiles(x[:, j], 8), x[:, j]))
                       for j, f in enumerate(feats[:10]))
    rec = DriftRecorder(load_schema_file(MODELS_DIR / f"{stem}.schema.json"), device_id="dev-1", clock=Clock(),
                        baseline=baseline)
    assert rec.plan.edges_source == "mixed"
    first, eleventh = rec.plan.template[feats[0].name], rec.plan.template[feats[10].name]
    assert isinstance(first, NumericHistogram) and isinstance(eleventh, NumericHistogram)
    base = baseline[feats[0].name]
    assert isinstance(base, NumericHistogram) and first.edges == base.edges
    assert eleventh.edges == schema_edges(feats[10])


@pytest.mark.integration
def test_slis_count_answers_errors_and_flags_and_rejected_requests_are_not_binned(host: ModelHost) -> None:
    stem = "cancer_mlp_int8"
    clock = Clock()
    hub = make_hub(clock)
    model = load(host, stem)
    hub.attach(model)
    x = rows_of(stem)
    run(model, [x[i : i + 1] for i in range(10)])
    far = x[:1].copy()
    far[0, 0] = 1e6  # out of the declared range: served (policy "serve") and flagged
    assert model.infer({"features": far}).flags is not None
    bad = x[:1].copy()
    bad[0, 3] = np.nan  # non-finite: rejected (policy "reject")
    attempts = [
        {"features": bad},
        {"features": x[:1].astype(np.float64)},  # dtype_mismatch
        {"features": x[:1, :29]},  # shape_mismatch
        {"features": x[:1], "extra": x[:1]},  # unknown_input
        {},  # missing_input
    ]
    for inputs in attempts:
        with pytest.raises(RequestError):
            model.infer(inputs)
    # Runtime failures and back-pressure are counted through the same path infer uses for them.
    model.count_error("inference_failed")
    model.count_error("busy")
    model.count_error("busy")
    clock.t += 300.0
    (window,) = hub.tick()
    slis = window.slis
    assert slis["ok"] == 11 and slis["requests"] == 11 + 8
    assert slis["errors"] == {"non_finite": 1, "dtype_mismatch": 1, "shape_mismatch": 1, "unknown_input": 1,
                              "missing_input": 1, "inference_failed": 1, "busy": 2}
    assert slis["served_out_of_range"] == 1
    assert "served_non_finite" not in slis and "rows_dropped" not in slis  # zero counters are left out
    assert window.samples == 11  # rejected requests never reach the histograms
    got = summary_of(window)
    radius = got["mean radius"]
    assert isinstance(radius, NumericHistogram) and radius.overflow == 1 and radius.total == 11
    assert model.stats.requests == slis["requests"]  # the SLIs agree with the host's own counters
    q = latency_quantiles(slis)
    assert q["p50"] is not None and q["p99"] is not None
    assert 0 < q["p50"] <= q["p95"] <= q["p99"] <= slis["latency_us"]["max"]  # type: ignore[operator]
    assert len(slis["latency_us"]["counts"]) + slis["latency_us"]["first"] <= LATENCY_BINS


@pytest.mark.integration
def test_nan_inf_and_out_of_range_values_land_in_their_own_counters(host: ModelHost) -> None:
    stem = "cancer_mlp_int8"
    schema = schema_of(stem, policy={"non_finite": "serve", "out_of_range": "serve"})
    clock = Clock()
    hub = make_hub(clock)
    model = load(host, stem, schema=schema)
    hub.attach(model)
    x = rows_of(stem)
    cases = [np.nan, np.inf, -np.inf, 1e30, -1e30, 5.0]
    batch = np.repeat(x[:1], len(cases), axis=0)
    batch[:, 0] = cases
    res = model.infer({"features": batch})
    assert res.flags is not None and res.flags.non_finite == ("mean radius",)
    model.infer({"features": x[:2]})
    clock.t += 300.0
    (window,) = hub.tick()
    radius = summary_of(window)["mean radius"]
    assert isinstance(radius, NumericHistogram)
    assert (radius.nan, radius.overflow, radius.underflow) == (1, 2, 3)  # +inf & 1e30; -inf, -1e30 & 5.0 < min
    assert radius.n == 5  # finite values only: 1e30, -1e30, 5.0 and the two clean rows
    assert radius.total == 8
    assert window.slis["served_non_finite"] == 1 and window.slis["served_out_of_range"] == 1
    assert window.samples == 8


@pytest.mark.integration
def test_categorical_input_feature_from_the_baseline_counts_unknown_categories(host: ModelHost) -> None:
    stem = "cancer_mlp_int8"
    x = rows_of(stem)
    feats = load_schema_file(MODELS_DIR / f"{stem}.schema.json").inputs[0].features
    # Pretend feature 0 is a category code with three known values (cap 3: more names go to "other").
    baseline = Summary([(feats[0].name, CategoricalCounts(["10", "11", "12"], max_categories=3)),
                        *((f.name, NumericHistogram(schema_edges(f))) for f in feats[1:])])
    schema = schema_of(stem, policy={"non_finite": "serve"})
    clock = Clock()
    hub = make_hub(clock)
    model = load(host, stem, schema=schema)
    hub.attach(model, baseline=baseline)
    batch = np.repeat(x[:1], 6, axis=0)
    batch[:, 0] = [10, 11, 11, 13.5, 99, np.nan]
    model.infer({"features": batch})
    clock.t += 300.0
    (window,) = hub.tick()
    codes = summary_of(window)[feats[0].name]
    assert isinstance(codes, CategoricalCounts)
    assert dict(codes.counts) == {"10": 1, "11": 2, "12": 0}
    assert (codes.other, codes.missing) == (2, 1)  # "13.5" and "99" beyond the cap; NaN is missing
    assert window.slis["drift_edges"] == "baseline"


@pytest.mark.integration
def test_full_buffer_drops_rows_and_counts_them_but_keeps_every_sli(host: ModelHost) -> None:
    stem = "digits_mlp_int8"
    clock = Clock()
    hub = make_hub(clock, capacity=4, flush_entries=4)
    model = load(host, stem)
    recorder = hub.attach(model)
    x = rows_of(stem)
    run(model, [x[i : i + 1] for i in range(7)] + [x[7:10]])  # 8 requests, 10 rows; room for 4 requests
    assert recorder.pending == 4 and recorder.rows_dropped == 1 + 1 + 1 + 3
    clock.t += 300.0
    (window,) = hub.tick()
    assert window.samples == 4
    assert window.slis["rows_dropped"] == 6
    assert window.slis["ok"] == window.slis["requests"] == 8
    assert sum(window.slis["latency_us"]["counts"]) == 8
    probs = summary_of(window)["probabilities.class"]
    assert isinstance(probs, CategoricalCounts) and probs.total == 4
    # After the tick the buffer has room again.
    run(model, [x[i : i + 1] for i in range(3)])
    assert recorder.pending == 3 and recorder.rows_dropped == 6


@pytest.mark.integration
def test_swap_closes_the_old_versions_window_at_once(host: ModelHost) -> None:
    stem = "cancer_mlp_int8"
    clock = Clock()
    got: list[DriftWindow] = []
    seq = itertools.count(100)
    hub = TelemetryHub(device_id="dev-0001", seq=lambda: next(seq), clock=clock, on_window=got.append)
    v1 = load(host, stem)
    hub.attach(v1)
    x = rows_of(stem)
    run(v1, [x[i : i + 1] for i in range(5)])
    clock.t += 12.5
    v2 = load(host, stem, schema=schema_of(stem, version=2), swap=True)
    hub.attach(v2)
    assert [(w.version, w.samples, w.window_start, w.window_end, w.stream_seq) for w in got] == [
        (1, 5, T0, T0 + 12.5, 100)]
    assert got[0].slis["loads"] == 1 and "swaps" not in got[0].slis
    assert v1.observer is None and v1.observer_error is None  # the old version is no longer observed
    assert host.infer("cancer-mlp", {"features": x[:3]}).version == 2
    clock.t += 300.0
    hub.tick()
    assert [(w.version, w.samples, w.window_start) for w in got[1:]] == [(2, 3, T0 + 12.5)]
    assert got[1].slis["swaps"] == 1 and got[1].stream_seq == 101
    # Unloading closes the open window too (an idle one is not sent).
    host.unload("cancer-mlp")
    hub.detach("cancer-mlp")
    assert len(got) == 2 and hub.recorder("cancer-mlp") is None


@pytest.mark.integration
def test_sync_attaches_new_and_swapped_models_and_detaches_unloaded_ones(host: ModelHost) -> None:
    clock = Clock()
    hub = make_hub(clock)
    a = load(host, "cancer_mlp_int8")
    b = load(host, "digits_mlp_int8")
    hub.sync(host.models())
    assert a.observer is not None and b.observer is not None
    b2 = load(host, "digits_mlp_int8", schema=schema_of("digits_mlp_int8", version=3), swap=True)
    host.unload("cancer-mlp")
    hub.sync(host.models(), baseline_for=lambda m: None)
    assert hub.recorder("cancer-mlp") is None
    rec = hub.recorder("digits-mlp")
    assert rec is not None and rec.version == 3 and b2.observer == rec.observe
    windows = hub.drain_windows()  # cancer's window (a load) and digits v1's (a load), both closed
    assert sorted((w.model, w.version) for w in windows) == [("cancer-mlp", 1), ("digits-mlp", 1)]


@pytest.mark.integration
def test_worker_thread_bins_in_the_background_and_stop_flushes_everything(host: ModelHost) -> None:
    stem = "cancer_mlp_int8"
    got: list[DriftWindow] = []
    lock = threading.Lock()

    def sink(w: DriftWindow) -> None:
        with lock:
            got.append(w)

    seq = itertools.count()
    hub = TelemetryHub(device_id="dev-0001", seq=lambda: next(seq), on_window=sink, flush_entries=8, flush_s=0.05,
                       policy=WindowPolicy(max_samples=50))
    model = load(host, stem)
    recorder = hub.attach(model)
    hub.start()
    try:
        x = rows_of(stem)
        n = 0
        for _ in range(5):
            n += len(x)
            run(model, [x[i : i + 1] for i in range(len(x))])
        deadline = time.monotonic() + 10
        while recorder.rows_binned < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert recorder.rows_binned == n  # binned by the worker, without any tick from here
    finally:
        hub.stop()
    assert [w.samples for w in got] == [50, 50, 20]  # two full windows, the rest flushed at stop
    assert [w.stream_seq for w in got] == [0, 1, 2]
    assert sum(w.slis["ok"] for w in got) == n
    assert model.observer is None  # stop detaches


@pytest.mark.integration
def test_a_failing_observer_never_fails_a_request(host: ModelHost, caplog: pytest.LogCaptureFixture) -> None:
    model = load(host, "cancer_mlp_int8")

    def broken(*_args: object) -> None:
        raise RuntimeError("telemetry bug")

    model.observer = broken
    model.observer_error = broken
    x = rows_of("cancer_mlp_int8")
    assert model.infer({"features": x[:1]}).outputs["probabilities"].shape == (1, 2)
    with pytest.raises(RequestError):
        model.infer({"features": x[:1, :3]})
    assert model.stats.ok == 1 and model.stats.errors["shape_mismatch"] == 1
    assert "observer of cancer-mlp failed" in caplog.text


@pytest.mark.integration
def test_the_observer_gets_inputs_outputs_latency_and_flags(host: ModelHost) -> None:
    model = load(host, "cancer_mlp_int8")
    seen: list[tuple[Any, ...]] = []
    model.observer = lambda *args: seen.append(args)
    x = rows_of("cancer_mlp_int8")[:2].copy()
    x[1, 0] = 1e6
    res = model.infer({"features": x})
    ((inputs, outputs, latency, flags),) = seen
    assert inputs["features"] is x and outputs["probabilities"] is res.outputs["probabilities"]
    assert 0 < latency < 5.0 and flags == res.flags


# ------------------------------------------------------------------------------------------------------------------
# Wire size
# ------------------------------------------------------------------------------------------------------------------


def _window_32x16(*, quantile_edges: bool, samples: int) -> DriftWindow:
    """A 5-minute window of a 32-feature model (16 bins), 2-class output, realistic SLIs."""
    rng = np.random.default_rng(7)
    names = [f"{part} {stat}" for stat in ("mean", "error", "worst", "trend")
             for part in ("radius", "texture", "perimeter", "area", "smoothness", "compactness", "concavity",
                          "symmetry")]
    scale, offset = rng.uniform(0.01, 500.0, 32), rng.uniform(0.0, 1000.0, 32)
    train = rng.normal(size=(20_000, 32)) * scale + offset
    features = [{"name": n, "min": float(train[:, i].min()), "max": float(train[:, i].max())}
                for i, n in enumerate(names)]
    schema = ModelSchema.from_dict({
        "format": 1, "model": "wire-32", "version": 7, "runtime": "onnx", "quantization": "int8",
        "inputs": [{"name": "features", "dtype": "float32", "shape": [-1, 32], "features": features}],
        "outputs": [{"name": "probabilities", "dtype": "float32", "shape": [-1, 2], "labels": ["bad", "good"]}],
    })
    baseline = (Summary((n, NumericHistogram.from_values(Edges.quantiles(train[:, i], 16), train[:, i]))
                        for i, n in enumerate(names)) if quantile_edges else None)
    clock = Clock()
    rec = DriftRecorder(schema, device_id="dev-0001", clock=clock, baseline=baseline, capacity=100_000,
                        flush_entries=100_000)
    x = (rng.normal(size=(samples, 32)) * scale + offset).astype(np.float32)
    p = rng.beta(0.5, 0.5, size=(samples, 1)).astype(np.float32)
    probs = np.hstack([p, 1 - p])
    lat = rng.lognormal(math.log(40e-6), 0.5, samples)
    for i in range(samples):
        rec.observe({"features": x[i : i + 1]}, {"probabilities": probs[i : i + 1]}, float(lat[i]), None)
    for code in ("busy",) * 7 + ("shape_mismatch",):
        rec.observe_error(code)
    clock.t += 300.0
    (window,) = rec.process()
    return window.message(123_456)


@pytest.mark.parametrize("samples", [3_000, 9_999])
def test_encoded_size_of_a_32_feature_window(samples: int, capsys: pytest.CaptureFixture[str]) -> None:
    """Measured: schema edges 4.6-4.9 KB, raw quantile baseline edges 7.3-7.5 KB (target 4 KB; see
    docs/telemetry.md: the edges themselves, 17 float64 per feature, are most of what is left)."""
    schema_window = _window_32x16(quantile_edges=False, samples=samples)
    baseline_window = _window_32x16(quantile_edges=True, samples=samples)
    sizes = {"schema_edges": len(encode(schema_window)), "quantile_edges": len(encode(baseline_window))}
    with capsys.disabled():
        print(f"\n32 features x 16 bins + 2-class output + SLIs, {samples} samples: {sizes} bytes")
    for w in (schema_window, baseline_window):
        assert w.samples == samples and w.slis["requests"] == samples + 8
        assert decode(encode(w)) == w
        summary_of(w)  # the features are a valid layout-1 summary
    # Regression bounds at the measured figures (the 4 KB target is not met; the gap is documented).
    assert sizes["schema_edges"] <= 5_000
    assert sizes["quantile_edges"] <= 7_700
    # Compact SLIs: nothing but what happened.
    assert set(schema_window.slis) == {"format", "requests", "ok", "errors", "latency_us", "drift_edges"}


def test_schema_edges_compress_better_than_arbitrary_uniform_edges() -> None:
    import zlib

    import msgpack

    rng = np.random.default_rng(3)
    los, his = rng.uniform(-100, 100, 64), rng.uniform(0.5, 500, 64)
    from agent.model import FeatureSpec

    grid = [schema_edges(FeatureSpec(f"f{i}", float(lo), float(lo + w))).tolist()
            for i, (lo, w) in enumerate(zip(los, his, strict=True))]
    plain = [Edges.uniform(float(lo), float(lo + w), 16).tolist() for lo, w in zip(los, his, strict=True)]
    grid_bytes = len(zlib.compress(msgpack.packb(grid), 9))
    plain_bytes = len(zlib.compress(msgpack.packb(plain), 9))
    assert grid_bytes < 0.75 * plain_bytes


@pytest.mark.integration
@pytest.mark.parametrize("labels", [True, False])
def test_big_requests_are_kept_by_reference_and_binned_with_the_small_ones(host: ModelHost, labels: bool) -> None:
    """Small tensors are copied on the hot path, big ones (> 16 KiB) referenced, non-contiguous ones too; with the
    labels removed the output is not summarised and the recorder takes its general (input-only) path."""
    stem = "cancer_mlp_int8"
    doc = json.loads((MODELS_DIR / f"{stem}.schema.json").read_text())
    if not labels:
        del doc["outputs"][0]["labels"]
    clock = Clock()
    hub = make_hub(clock)
    model = load(host, stem, schema=ModelSchema.from_dict(doc))
    recorder = hub.attach(model)
    assert [t.name for t in recorder.plan.tensors] == (["features", "probabilities"] if labels else ["features"])
    x = rows_of(stem)
    big = np.ascontiguousarray(np.resize(x, (200, 30)))  # 24 000 bytes
    strided = np.asfortranarray(np.resize(x[::-1], (300, 30)))  # big and not C-contiguous
    batches = [x[:1], big, x[1:3], strided, x[3:4]]
    run(model, batches)
    big[:] = 0.0  # the caller reusing its (big) array before the tick would change what is binned: don't
    big[:] = np.resize(x, (200, 30))
    clock.t += 300.0
    (window,) = hub.tick()
    rows = np.concatenate(batches)
    assert window.samples == len(rows) == 1 + 200 + 2 + 300 + 1
    got = summary_of(window)
    for j, f in enumerate(model.schema.inputs[0].features):
        feature = got[f.name]
        assert isinstance(feature, NumericHistogram)
        assert_numeric_matches(feature, schema_edges(f), rows[:, j])
    assert ("probabilities.class" in got) is labels


@pytest.mark.integration
def test_on_closed_lets_the_sink_number_windows_and_retries_after_a_failure(host: ModelHost) -> None:
    """The outbox's way: ``outbox.append("drift", closed.encode)`` allocates the number inside its transaction."""
    frames: dict[int, bytes] = {}
    failing = [True]

    def append(make_message: Callable[[int], bytes]) -> None:  # a stand-in for Outbox.append("drift", ...)
        if failing[0]:
            raise OSError("disk full")
        seq = len(frames)
        frames[seq] = make_message(seq)

    clock = Clock()
    hub = TelemetryHub(device_id="dev-0001", clock=clock, on_closed=lambda w: append(w.encode))
    model = load(host, "cancer_mlp_int8")
    hub.attach(model)
    x = rows_of("cancer_mlp_int8")
    model.infer({"features": x[:2]})
    clock.t += 300.0
    (first,) = hub.tick()  # closed, but the sink failed: kept
    assert frames == {} and hub.windows_sent == 0
    failing[0] = False
    model.infer({"features": x[:3]})
    clock.t += 300.0
    (second,) = hub.tick()  # delivers the kept window first, then the new one
    assert [decode(frames[i]) for i in (0, 1)] == [first.message(0), second.message(1)]
    assert hub.windows_sent == 2 and hub.windows_lost == 0
    with pytest.raises(ValueError, match="either on_closed"):
        TelemetryHub(device_id="dev-0001")
    with pytest.raises(ValueError, match="either on_closed"):
        TelemetryHub(device_id="dev-0001", seq=lambda: 0, on_closed=lambda w: None)
