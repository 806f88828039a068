"""Drift accounting cost and drift-window size.

1. Inference plus drift accounting vs inference alone: in-process ``LoadedModel.infer`` at batch 1 on cancer-mlp
   (30 features) and digits-mlp (64 features), the same loaded model with its observer set (A) and unset (B),
   interleaved A B A B ..., with the telemetry worker thread running as in production (it bins every 4096
   requests or every second). Each A phase ends with a synchronous ``tick`` so every row it produced is binned
   inside its own measurement. Reported per model: mean wall time per call, p50 per call, and process CPU time
   per call (both threads: what the device pays in total). Target (PERFORMANCE.md): <= 1.02x.
2. Encoded size of a 5-minute window with 32 numeric features x 16 bins + a 2-class output + SLIs, with
   ``agent.protocol.encode`` (zlib above 512 bytes): edges from a schema (what the recorder builds without a
   bundle) and raw quantile edges (what ``edge-bundle build`` puts in a baseline today). Target <= 4 KB.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from collections.abc import Callable

import numpy as np

from agent.demo import MODELS_DIR
from agent.drift import Edges, NumericHistogram, Summary
from agent.model import ModelSchema
from agent.profiles import builtin_profiles_dir, resolve_profile
from agent.runtime import LoadedModel, ModelHost, ModelSpec, load_schema_file
from agent.telemetry import DriftRecorder, TelemetryHub, WindowPolicy
from bench.common import emit

WINDOW_TARGET_BYTES = 4096


def _row(stem: str) -> np.ndarray:
    s = json.loads((MODELS_DIR / f"{stem}.samples.json").read_text())
    return np.asarray(s["inputs"]["features"][:1], dtype=np.float32)


def _phase(model: LoadedModel, rows: list[np.ndarray], n: int, after: Callable[[], object] | None) -> tuple[
        float, float, float]:
    """Mean wall us/call, p50 us/call, CPU us/call (process-wide) of ``n`` calls (+ ``after`` in the totals)."""
    clock = time.perf_counter_ns
    samples = [0] * n
    k = len(rows)
    cpu0, wall0 = time.process_time_ns(), clock()
    for i in range(n):
        feeds = {"features": rows[i % k]}
        t0 = clock()
        model.infer(feeds)
        samples[i] = clock() - t0
    if after is not None:
        after()
    wall, cpu = clock() - wall0, time.process_time_ns() - cpu0
    samples.sort()
    return wall / n / 1000, samples[n // 2] / 1000, cpu / n / 1000


def _overhead_of(host: ModelHost, hub: TelemetryHub, stem: str, repeats: int, n: int) -> None:
    schema = load_schema_file(MODELS_DIR / f"{stem}.schema.json")
    model = host.load(ModelSpec(MODELS_DIR / f"{stem}.onnx", schema))
    recorder = hub.attach(model)
    observer, observer_error = model.observer, model.observer_error
    # Fresh arrays per request, as the local API makes them (the recorder keeps references, no copy).
    rows = [_row(stem).copy() for _ in range(1024)]

    def with_drift() -> tuple[float, float, float]:
        model.observer, model.observer_error = observer, observer_error
        return _phase(model, rows, n, hub.tick)

    def without() -> tuple[float, float, float]:
        model.observer = model.observer_error = None
        return _phase(model, rows, n, None)

    with_drift()
    without()  # warm-up
    a_runs, b_runs = [], []
    for _ in range(repeats):
        a_runs.append(with_drift())
        b_runs.append(without())
    for idx, metric, target in ((0, "mean_us_per_call", "<= 1.02x"), (1, "p50_us", "<= 1.02x"),
                                (2, "cpu_us_per_call", "<= 1.02x (worker thread included)")):
        a = [r[idx] for r in a_runs]
        b = [r[idx] for r in b_runs]
        ratios = [x / y for x, y in zip(a, b, strict=True)]
        emit("telemetry_drift_overhead", metric, value=statistics.median(a),
             baseline="same LoadedModel.infer without observer", baseline_value=statistics.median(b),
             target=target, model=schema.model, batch=1, repeats=repeats, calls=n,
             ratio_median=round(statistics.median(ratios), 3), ratio_min=round(min(ratios), 3),
             ratio_max=round(max(ratios), 3), rows_binned=recorder.rows_binned, rows_dropped=recorder.rows_dropped)


def bench_overhead(repeats: int, n: int) -> None:
    profile = resolve_profile("generic-x86-64", builtin_profiles_dir())
    host = ModelHost(profile)
    seq = itertools.count()
    # As in production: every closed window is encoded (the outbox's make_message), here then thrown away.
    hub = TelemetryHub(device_id="bench-device", on_closed=lambda w: w.encode(next(seq)), policy=WindowPolicy())
    hub.start()
    try:
        for stem in ("cancer_mlp_int8", "digits_mlp_int8"):
            _overhead_of(host, hub, stem, repeats, n)
    finally:
        hub.stop()
        host.close()


def _window_32x16(quantile_edges: bool, samples: int, rng: np.random.Generator) -> int:
    """Encoded bytes of a realistic window: 32 features x 16 bins, 2-class output, SLIs."""
    names = [f"{part} {stat}" for stat in ("mean", "error", "worst", "trend")
             for part in ("radius", "texture", "perimeter", "area", "smoothness", "compactness", "concavity",
                          "symmetry")]
    scale = rng.uniform(0.01, 500.0, 32)
    offset = rng.uniform(0.0, 1000.0, 32)
    train = rng.normal(size=(20_000, 32)) * scale + offset
    features = []
    for i, name in enumerate(names):
        lo, hi = float(train[:, i].min()), float(train[:, i].max())
        features.append({"name": name, "min": lo, "max": hi, "out_of_range": "serve", "non_finite": "reject"})
    schema = ModelSchema.from_dict({
        "format": 1, "model": "bench-32", "version": 7, "runtime": "onnx", "quantization": "int8",
        "inputs": [{"name": "features", "dtype": "float32", "shape": [-1, 32], "features": features}],
        "outputs": [{"name": "probabilities", "dtype": "float32", "shape": [-1, 2], "labels": ["bad", "good"]}],
    })
    baseline = None
    if quantile_edges:
        baseline = Summary((name, NumericHistogram.from_values(Edges.quantiles(train[:, i], 16), train[:, i]))
                           for i, name in enumerate(names))
    clock = [1_700_000_000.0]
    rec = DriftRecorder(schema, device_id="bench-device-0001", clock=lambda: clock[0], baseline=baseline)
    x = (rng.normal(size=(samples, 32)) * scale + offset).astype(np.float32)
    p = rng.beta(0.5, 0.5, size=(samples, 1)).astype(np.float32)
    probs = np.hstack([p, 1 - p])
    lat = rng.lognormal(np.log(40e-6), 0.5, samples)
    for i in range(samples):
        rec.observe({"features": x[i : i + 1]}, {"probabilities": probs[i : i + 1]}, float(lat[i]), None)
        if i % 4096 == 4095:
            rec.process()
    for _ in range(7):
        rec.observe_error("busy")
    rec.observe_error("shape_mismatch")
    clock[0] += 300.0
    windows = rec.process()
    assert len(windows) == 1 and windows[0].samples == samples
    return len(windows[0].encode(1_234_567))


def bench_window_size() -> None:
    for quantile, label in ((False, "schema min/max, uniform 16 bins on a binary grid"),
                            (True, "bundle baseline, raw Edges.quantiles(train, 16)")):
        for samples in (3_000, 9_999):
            size = _window_32x16(quantile, samples, np.random.default_rng(7))
            emit("telemetry_window_size", "encoded_bytes", value=size, baseline="target bytes",
                 baseline_value=WINDOW_TARGET_BYTES, target="<= 4096 bytes", features=32, bins=16,
                 edges=label, samples=samples, outputs="2-class probabilities + predicted class",
                 met=size <= WINDOW_TARGET_BYTES)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    repeats, n = (5, 20_000) if args.quick else (9, 60_000)
    bench_window_size()
    bench_overhead(repeats, n)


if __name__ == "__main__":
    main()
