"""Generate the two int8-quantized ONNX demo models shipped in ``agent/demo/models/``.

What
    * ``cancer_mlp_int8.onnx``  - breast cancer (30 features, 2 classes), MLP (16,) relu, alpha=1.0.
    * ``digits_mlp_int8.onnx``  - 8x8 digits (64 features, 10 classes), MLP (1152, 1152, 1152) relu:
      the largest plain MLP whose int8 file stays under 3 MB, so one batch-1 ``session.run`` has a
      measurable cost (tens of microseconds on an AVX-512 x86 core, more on an edge CPU).

    For each model it also writes ``<stem>.schema.json`` (the model I/O schema the agent parses) and
    ``<stem>.samples.json`` (the first 24 rows of the held-out test split, their true labels and the
    int8 model's own top-1 predictions computed with onnxruntime, the runtime that serves it).

Why
    The agent and its tests need small but *real* quantized models with known provenance instead of
    random weights: predictions can be checked against labels, and the latency is representative.

How
    1. Load a data set that scikit-learn ships (no download); stratified split, test_size=0.25,
       random_state=0.
    2. Train an ``sklearn.neural_network.MLPClassifier`` (fixed ``random_state``).
    3. Build the float ONNX graph by hand with ``onnx.helper`` (opset 17, no skl2onnx):
       ``features [N, F]`` -> preprocessing -> MatMul+Add+Relu -> MatMul+Add -> Softmax ->
       ``probabilities [N, C]``. The float graph must reproduce sklearn's ``predict_proba``.
       Preprocessing:
         - cancer: explicit ``Sub(mean)`` + ``Mul(1/std)`` nodes that stay float32. The raw features span
           five orders of magnitude (smoothness ~0.1, area ~2500), so a single per-tensor int8 scale
           on the raw input would erase the small features; quantization starts after standardization.
         - digits: the ``x / 16`` scaling is folded into the first layer's weights; the raw 0..16
           pixel values quantize almost losslessly with one per-tensor scale.
    4. ``onnxruntime.quantization.quantize_static`` (QDQ format, int8 weights *and* activations,
       per-tensor, MinMax calibration over all training rows). MatMul/Add/Relu are quantized; the
       final Softmax stays float32 so the output probabilities keep full resolution.
    5. Verify: the file contains QuantizeLinear/DequantizeLinear with int8 zero points and int8
       weights, onnxruntime loads it, accuracy is measured on the test split, batch-1 latency p50
       is measured with ``intra_op_num_threads=1``.

Run (from the repository root, with the project virtualenv)::

    .venv/bin/python scripts/gen_onnx_models.py            # both models
    .venv/bin/python scripts/gen_onnx_models.py --only cancer_mlp_int8

Everything is seeded, so re-running produces the same files. See ``docs/models.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = REPO_ROOT / "agent" / "demo" / "models"
GENERATOR = "scripts/gen_onnx_models.py"

SEED = 0
TEST_SIZE = 0.25
N_SAMPLES = 24
OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17; readable by every onnxruntime >= 1.13
INPUT_NAME = "features"
OUTPUT_NAME = "probabilities"
RANGE_MARGIN = 0.10  # schema min/max = training min/max widened by 10% of the span on each side
MAX_DIGITS_BYTES = 3_000_000
INLINE_DICT_CHARS = 140  # sidecar JSON layout: flat dicts up to this length stay on one line

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Dataset:
    description: str
    feature_names: list[str]
    class_names: list[str]
    x_train: F64
    x_test: F64
    y_train: I64
    y_test: I64
    # Physically possible value range of every feature; the schema ranges are clamped to it.
    physical_range: tuple[float, float]


@dataclass(frozen=True)
class Spec:
    stem: str
    model_name: str
    load: Callable[[], Dataset]
    hidden: tuple[int, ...]
    max_iter: int
    alpha: float  # L2 penalty of MLPClassifier
    # "standardize": float Sub/Mul nodes in front of the quantized part; "scale16": x/16 folded in W1.
    preprocessing: str
    max_bytes: int | None = None


def _split(x: F64, y: I64) -> tuple[F64, F64, I64, I64]:
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_SIZE, random_state=SEED, stratify=y
    )
    return x_train, x_test, y_train, y_test


def load_cancer() -> Dataset:
    data = load_breast_cancer()
    x_train, x_test, y_train, y_test = _split(data.data.astype(np.float64), data.target.astype(np.int64))
    return Dataset(
        description=(
            "sklearn.datasets.load_breast_cancer (Wisconsin Diagnostic Breast Cancer, 569 rows, "
            "30 features); stratified split test_size=0.25 random_state=0"
        ),
        feature_names=[str(n) for n in data.feature_names],
        class_names=[str(n) for n in data.target_names],
        x_train=x_train,
        x_test=x_test,
        y_train=y_train,
        y_test=y_test,
        # Every feature is a non-negative measurement (lengths, areas, gray-level std, ratios).
        physical_range=(0.0, float("inf")),
    )


def load_digits_dataset() -> Dataset:
    data = load_digits()
    x_train, x_test, y_train, y_test = _split(data.data.astype(np.float64), data.target.astype(np.int64))
    return Dataset(
        description=(
            "sklearn.datasets.load_digits (UCI optical digits 8x8, 1797 rows, 64 pixel features 0..16); "
            "stratified split test_size=0.25 random_state=0"
        ),
        feature_names=[f"pixel_{r}_{c}" for r in range(8) for c in range(8)],
        class_names=[str(d) for d in range(10)],
        x_train=x_train,
        x_test=x_test,
        y_train=y_train,
        y_test=y_test,
        physical_range=(0.0, 16.0),
    )


SPECS: tuple[Spec, ...] = (
    Spec(
        stem="cancer_mlp_int8",
        model_name="cancer-mlp",
        load=load_cancer,
        hidden=(16,),
        max_iter=1000,
        # Best 5-fold CV score on the *training* split among alpha in {1e-4, 1e-3, 1e-2, 0.1, 1.0}.
        alpha=1.0,
        preprocessing="standardize",
    ),
    Spec(
        stem="digits_mlp_int8",
        model_name="digits-mlp",
        load=load_digits_dataset,
        # Largest conventional MLP under the 3 MB budget. At ~50 int8 GMAC/s (AVX-512 VNNI) a batch-1
        # run costs ~40 us here; reaching 100 us would take ~8 MB of weights (see docs/models.md).
        hidden=(1152, 1152, 1152),
        max_iter=30,
        alpha=1e-4,  # sklearn's default
        preprocessing="scale16",
        max_bytes=MAX_DIGITS_BYTES,
    ),
)


# --------------------------------------------------------------------------------------------------
# Training and graph construction
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessing:
    """Affine per-feature transform ``(x - offset) * scale`` applied before the MLP."""

    offset: F64
    scale: F64


def fit_preprocessing(spec: Spec, x_train: F64) -> Preprocessing:
    n = x_train.shape[1]
    if spec.preprocessing == "standardize":
        std = x_train.std(axis=0)
        std[std == 0.0] = 1.0
        return Preprocessing(offset=x_train.mean(axis=0), scale=1.0 / std)
    if spec.preprocessing == "scale16":
        return Preprocessing(offset=np.zeros(n), scale=np.full(n, 1.0 / 16.0))
    raise ValueError(spec.preprocessing)


def train(spec: Spec, ds: Dataset, pre: Preprocessing) -> MLPClassifier:
    clf = MLPClassifier(
        hidden_layer_sizes=spec.hidden,
        activation="relu",
        solver="adam",
        max_iter=spec.max_iter,
        alpha=spec.alpha,
        random_state=SEED,
    )
    with warnings.catch_warnings():
        # The digits MLP deliberately stops early (bounded generation time); it is accurate anyway.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit((ds.x_train - pre.offset) * pre.scale, ds.y_train)
    return clf


def _f32(a: npt.ArrayLike) -> F32:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def build_float_graph(spec: Spec, ds: Dataset, pre: Preprocessing, clf: MLPClassifier) -> onnx.ModelProto:
    """Hand-build the float32 inference graph equivalent to ``clf.predict_proba(preprocess(x))``."""
    n_features = len(ds.feature_names)
    n_classes = len(ds.class_names)
    weights = [np.asarray(w, dtype=np.float64) for w in clf.coefs_]
    biases = [np.asarray(b, dtype=np.float64) for b in clf.intercepts_]

    if clf.out_activation_ == "logistic":
        # Binary sklearn MLPs have one logistic output unit z; softmax([0, z]) == [1 - sigmoid(z),
        # sigmoid(z)], which is exactly predict_proba. Prepend an all-zero logit column.
        weights[-1] = np.concatenate([np.zeros_like(weights[-1]), weights[-1]], axis=1)
        biases[-1] = np.concatenate([np.zeros(1), biases[-1]])
    elif clf.out_activation_ != "softmax":
        raise ValueError(f"unsupported output activation {clf.out_activation_}")
    assert weights[-1].shape[1] == n_classes

    initializers: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    current = INPUT_NAME

    if spec.preprocessing == "standardize":
        # Kept as explicit float nodes (excluded from quantization, see module docstring).
        initializers += [
            numpy_helper.from_array(_f32(pre.offset), "standardize_mean"),
            numpy_helper.from_array(_f32(pre.scale), "standardize_inv_std"),
        ]
        nodes += [
            helper.make_node("Sub", [current, "standardize_mean"], ["centered"], name="standardize_sub"),
            helper.make_node(
                "Mul", ["centered", "standardize_inv_std"], ["standardized"], name="standardize_mul"
            ),
        ]
        current = "standardized"
    else:
        # Fold (x - offset) * scale into the first layer: W' = diag(scale) W, b' = b - (offset*scale) W.
        biases[0] = biases[0] - (pre.offset * pre.scale) @ weights[0]
        weights[0] = weights[0] * pre.scale[:, None]

    n_layers = len(weights)
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        layer = f"dense{i}"
        initializers += [
            numpy_helper.from_array(_f32(w), f"{layer}_weight"),
            numpy_helper.from_array(_f32(b), f"{layer}_bias"),
        ]
        nodes += [
            helper.make_node(
                "MatMul", [current, f"{layer}_weight"], [f"{layer}_matmul"], name=f"{layer}_matmul"
            ),
            helper.make_node(
                "Add", [f"{layer}_matmul", f"{layer}_bias"], [f"{layer}_out"], name=f"{layer}_add"
            ),
        ]
        current = f"{layer}_out"
        if i < n_layers - 1:
            nodes.append(helper.make_node("Relu", [current], [f"{layer}_relu"], name=f"{layer}_relu"))
            current = f"{layer}_relu"
    nodes.append(helper.make_node("Softmax", [current], [OUTPUT_NAME], name="softmax", axis=-1))

    graph = helper.make_graph(
        nodes,
        spec.model_name.replace("-", "_"),
        inputs=[helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", n_features])],
        outputs=[helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", n_classes])],
        initializer=initializers,
        doc_string=f"{spec.model_name}: MLP{spec.hidden} relu, softmax output; generated by {GENERATOR}",
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="edge-fleet",
        producer_version="1",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


# --------------------------------------------------------------------------------------------------
# Quantization and verification
# --------------------------------------------------------------------------------------------------


class RowCalibrationReader(CalibrationDataReader):  # type: ignore[misc]
    """Feeds the training rows to the calibrator in fixed-size batches, in a fixed order."""

    def __init__(self, rows: F32, batch_size: int = 64) -> None:
        self._batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        self._pos = 0

    def get_next(self) -> dict[str, F32] | None:
        if self._pos >= len(self._batches):
            return None
        batch = self._batches[self._pos]
        self._pos += 1
        return {INPUT_NAME: batch}

    def rewind(self) -> None:
        self._pos = 0


def quantize(spec: Spec, float_model: onnx.ModelProto, calibration_rows: F32) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory(prefix=f"{spec.stem}-") as tmp:
        src = Path(tmp) / "float.onnx"
        dst = Path(tmp) / "int8.onnx"
        onnx.save_model(float_model, src)
        # quantize_static logs a "consider pre-processing" warning on the root logger. The optional
        # pre-processing (shape inference + graph optimisation) would fuse MatMul+Add into Gemm; the
        # hand-built graph is already fully shaped, so it is skipped on purpose.
        root_logger = logging.getLogger()
        previous_level = root_logger.level
        root_logger.setLevel(logging.ERROR)
        try:
            quantize_static(
                src,
                dst,
                RowCalibrationReader(calibration_rows),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["MatMul", "Add", "Relu"],
                per_channel=False,
                reduce_range=False,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        finally:
            root_logger.setLevel(previous_level)
        model = onnx.load_model(dst)
    model.producer_name = "edge-fleet"
    model.producer_version = "1"
    helper.set_model_props(
        model,
        {"model": spec.model_name, "version": "1", "quantization": "int8", "generator": GENERATOR},
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def check_int8(model: onnx.ModelProto) -> dict[str, int]:
    """Assert the quantized graph really computes in int8; return a small census for the report."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q_nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dq_nodes = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    if not q_nodes or not dq_nodes:
        raise AssertionError("no QuantizeLinear/DequantizeLinear nodes: the model is not quantized")
    for node in q_nodes + dq_nodes:
        zero_point = inits.get(node.input[2]) if len(node.input) > 2 else None
        if zero_point is None or zero_point.dtype != np.int8:
            raise AssertionError(f"{node.name}: zero point is not an int8 initializer")
    matmul_weight_inputs = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    producers = {out: n for n in model.graph.node for out in n.output}
    int8_weights = 0
    for name in matmul_weight_inputs:
        dq = producers.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or inits[dq.input[0]].dtype != np.int8:
            raise AssertionError(f"MatMul weight {name} is not a dequantized int8 initializer")
        int8_weights += int(inits[dq.input[0]].size)
    float_params = sum(int(a.size) for a in inits.values() if a.dtype == np.float32 and a.size > 1)
    return {
        "quantize_nodes": len(q_nodes),
        "dequantize_nodes": len(dq_nodes),
        "int8_weight_params": int8_weights,
        "float32_tensor_params": float_params,
    }


def session(model_bytes: bytes, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def predict(sess: ort.InferenceSession, x: F32) -> F32:
    out = sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    return np.asarray(out, dtype=np.float32)


def latency_p50_us(
    sess: ort.InferenceSession, row: F32, warmup: int = 300, runs: int = 3000
) -> tuple[float, float]:
    """p50/p90 wall time of one batch-1 ``session.run`` in microseconds."""
    feed = {INPUT_NAME: row}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        sess.run(None, feed)
        times.append(time.perf_counter_ns() - t0)
    q = statistics.quantiles(times, n=10)
    return statistics.median(times) / 1000.0, q[8] / 1000.0


# --------------------------------------------------------------------------------------------------
# Sidecar files
# --------------------------------------------------------------------------------------------------


def _dumps(obj: Any, level: int = 0) -> str:
    """JSON with 2-space indent, but lists of scalars and flat dicts kept on one line."""
    pad = "  " * level
    flat = (str, int, float, bool, type(None))

    def is_flat(value: Any) -> bool:
        if isinstance(value, list):
            return all(isinstance(v, flat) for v in value)
        if isinstance(value, dict):
            return all(isinstance(v, flat) or (isinstance(v, list) and is_flat(v)) for v in value.values())
        return True

    if is_flat(obj):
        inline = json.dumps(obj, ensure_ascii=False)
        if not isinstance(obj, dict) or len(inline) <= INLINE_DICT_CHARS:
            return inline
    if isinstance(obj, list):
        items = [f"{pad}  {_dumps(v, level + 1)}" for v in obj]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    items = [f"{pad}  {json.dumps(k)}: {_dumps(v, level + 1)}" for k, v in obj.items()]
    return "{\n" + ",\n".join(items) + f"\n{pad}}}"


def write_json(path: Path, obj: Any) -> None:
    path.write_text(_dumps(obj) + "\n", encoding="utf-8")


def feature_ranges(ds: Dataset) -> list[dict[str, Any]]:
    lo = ds.x_train.min(axis=0)
    hi = ds.x_train.max(axis=0)
    margin = RANGE_MARGIN * (hi - lo)
    lo, hi = lo - margin, hi + margin
    lo = np.clip(lo, *ds.physical_range)
    hi = np.clip(hi, *ds.physical_range)
    return [
        {
            "name": name,
            "min": round(float(a), 6),
            "max": round(float(b), 6),
            "out_of_range": "serve",
            "non_finite": "reject",
        }
        for name, a, b in zip(ds.feature_names, lo, hi, strict=True)
    ]


def schema_doc(spec: Spec, ds: Dataset, acc_float: float, acc_int8: float) -> dict[str, Any]:
    return {
        "format": 1,
        "model": spec.model_name,
        "version": 1,
        "runtime": "onnx",
        "quantization": "int8",
        "inputs": [
            {
                "name": INPUT_NAME,
                "dtype": "float32",
                "shape": [-1, len(ds.feature_names)],
                "features": feature_ranges(ds),
            }
        ],
        "outputs": [
            {
                "name": OUTPUT_NAME,
                "dtype": "float32",
                "shape": [-1, len(ds.class_names)],
                "labels": ds.class_names,
            }
        ],
        "metadata": {
            "dataset": ds.description,
            "generator": GENERATOR,
            "accuracy_float": round(acc_float, 4),
            "accuracy_int8": round(acc_int8, 4),
            "test_rows": len(ds.y_test),
        },
    }


def samples_doc(spec: Spec, ds: Dataset, expected_top1: I64) -> dict[str, Any]:
    rows = ds.x_test[:N_SAMPLES]
    return {
        "model": spec.model_name,
        # The original float64 values; cast to float32 they are exactly the rows that were scored.
        "inputs": {INPUT_NAME: [[float(v) for v in row] for row in rows]},
        "labels": [int(v) for v in ds.y_test[:N_SAMPLES]],
        "label_names": ds.class_names,
        "expected_top1": [int(v) for v in expected_top1[:N_SAMPLES]],
    }


# --------------------------------------------------------------------------------------------------


def _display(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def generate(spec: Spec, out_dir: Path) -> None:
    t_start = time.perf_counter()
    ds = spec.load()
    pre = fit_preprocessing(spec, ds.x_train)
    clf = train(spec, ds, pre)
    x_train = _f32(ds.x_train)
    x_test = _f32(ds.x_test)

    sk_proba = clf.predict_proba((ds.x_test - pre.offset) * pre.scale)
    acc_sklearn = float(np.mean(sk_proba.argmax(axis=1) == ds.y_test))

    float_model = build_float_graph(spec, ds, pre, clf)
    float_proba = predict(session(float_model.SerializeToString()), x_test)
    max_diff = float(np.abs(float_proba - sk_proba).max())
    if max_diff > 1e-4 or not np.array_equal(float_proba.argmax(axis=1), sk_proba.argmax(axis=1)):
        raise AssertionError(f"hand-built float graph disagrees with sklearn (max |dp| = {max_diff:.2e})")
    acc_float = float(np.mean(float_proba.argmax(axis=1) == ds.y_test))

    int8_model = quantize(spec, float_model, x_train)
    census = check_int8(int8_model)
    int8_bytes = int8_model.SerializeToString()
    if spec.max_bytes is not None and len(int8_bytes) > spec.max_bytes:
        raise AssertionError(f"{spec.stem}: {len(int8_bytes)} bytes > limit {spec.max_bytes}")

    sess = session(int8_bytes)
    meta_in = sess.get_inputs()[0]
    meta_out = sess.get_outputs()[0]
    assert (meta_in.name, meta_in.type, meta_in.shape) == (
        INPUT_NAME,
        "tensor(float)",
        ["N", x_test.shape[1]],
    )
    assert (meta_out.name, meta_out.type, meta_out.shape) == (
        OUTPUT_NAME,
        "tensor(float)",
        ["N", len(ds.class_names)],
    )
    int8_proba = predict(sess, x_test)
    int8_top1 = int8_proba.argmax(axis=1).astype(np.int64)
    acc_int8 = float(np.mean(int8_top1 == ds.y_test))
    agreement = float(np.mean(int8_top1 == float_proba.argmax(axis=1)))
    # Batch-1 predictions must be the same as the batched ones the samples file records.
    for i in range(N_SAMPLES):
        if int(predict(sess, x_test[i : i + 1]).argmax()) != int(int8_top1[i]):
            raise AssertionError(f"batch-1 prediction differs from batched prediction for test row {i}")

    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / f"{spec.stem}.onnx"
    model_path.write_bytes(int8_bytes)
    write_json(out_dir / f"{spec.stem}.schema.json", schema_doc(spec, ds, acc_float, acc_int8))
    write_json(out_dir / f"{spec.stem}.samples.json", samples_doc(spec, ds, int8_top1))

    p50, p90 = latency_p50_us(session(model_path.read_bytes()), x_test[:1])
    float_size = len(float_model.SerializeToString())
    print(f"{spec.stem}  ({spec.model_name}, MLP{spec.hidden}, trained {clf.n_iter_} epochs)")
    print(f"  wrote {_display(model_path)}  {len(int8_bytes):,} bytes (float graph {float_size:,})")
    print(f"        sha256 {hashlib.sha256(int8_bytes).hexdigest()}")
    for suffix in ("schema.json", "samples.json"):
        path = out_dir / f"{spec.stem}.{suffix}"
        print(f"  wrote {_display(path)}  {path.stat().st_size:,} bytes")
    print(
        f"  accuracy on {len(ds.y_test)} test rows: sklearn {acc_sklearn:.4f}, float onnx {acc_float:.4f},"
        f" int8 onnx {acc_int8:.4f} (int8/float top-1 agreement {agreement:.4f})"
    )
    print(f"  int8 census: {census}")
    print(
        f"  batch-1 session.run, intra_op_num_threads=1: p50 {p50:.1f} us, p90 {p90:.1f} us"
        f"  (onnxruntime {ort.__version__})"
    )
    print(f"  done in {time.perf_counter() - t_start:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", choices=[s.stem for s in SPECS], action="append", help="generate only this model"
    )
    parser.add_argument(
        "--out-dir", type=Path, default=OUT_DIR, help="output directory (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    np.random.seed(SEED)
    for spec in SPECS:
        if args.only and spec.stem not in args.only:
            continue
        generate(spec, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
