"""Generate the full-integer (int8) TFLite demo model ``agent/demo/models/digits_int8.tflite``.

What
    A small Keras MLP for the 8x8 digits data set (64 pixel values 0..16 -> 10 classes):
    ``features [1, 64] float32 -> Rescaling(1/16) -> Dense(32, relu) -> Dense(10, softmax)
    -> probabilities [1, 10] float32``, converted with ``tf.lite.TFLiteConverter`` using
    ``Optimize.DEFAULT``, a representative data set made of training rows and
    ``supported_ops=[TFLITE_BUILTINS_INT8]``: every op computes in int8, only the input QUANTIZE and
    the output DEQUANTIZE touch float32 (input/output types are deliberately left float32, so a
    client sends the same float features as to the ONNX models). TFLite batch is fixed at 1; the
    agent batches for TFLite itself, so the schema still says ``[-1, 64]``.

    Also writes ``digits_int8.schema.json`` (model I/O schema) and ``digits_int8.samples.json``
    (first 24 held-out test rows, labels, and the top-1 predictions of the int8 model computed with
    LiteRT, the runtime that serves it on the device).

Why
    The agent's LiteRT backend and its tests need a small, real, fully int8 model with known
    provenance; TensorFlow is only needed to *make* it and must never become a project dependency.

How
    Two stages, because TensorFlow and the project's runtime live in different virtualenvs:

    1. ``convert`` (default, needs TensorFlow): train, convert, check the int8 accuracy with TF's
       bundled TFLite interpreter, write the ``.tflite`` and ``.schema.json``; then run stage 2 in a
       subprocess with the project interpreter (``--litert-python``, default ``.venv/bin/python``).
    2. ``--verify`` (needs only numpy, scikit-learn, ai-edge-litert): load the file with
       ``ai_edge_litert.interpreter.Interpreter``, check float32 I/O and int8 internals, recompute the
       test accuracy (must equal the schema's ``accuracy_int8``), write ``.samples.json`` and print
       the batch-1 ``set_tensor + invoke + get_tensor`` latency.

Run (from the repository root)::

    python3 -m venv /tmp/tfgen && /tmp/tfgen/bin/pip install tensorflow-cpu scikit-learn
    /tmp/tfgen/bin/python scripts/gen_tflite_model.py                   # convert + verify
    .venv/bin/python scripts/gen_tflite_model.py --verify               # verify (+ samples) only

The data split (stratified, test_size=0.25, random_state=0), Keras initialisation, shuffling and
calibration are all seeded and TF op determinism is enabled, so re-running gives the same files.
See ``docs/models.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = REPO_ROOT / "agent" / "demo" / "models"
STEM = "digits_int8"
MODEL_NAME = "digits-tflite"
GENERATOR = "scripts/gen_tflite_model.py"
DEFAULT_LITERT_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"

SEED = 0
TEST_SIZE = 0.25
N_SAMPLES = 24
N_FEATURES = 64
N_CLASSES = 10
HIDDEN = 32
EPOCHS = 150
BATCH_SIZE = 32
INPUT_NAME = "features"
OUTPUT_NAME = "probabilities"
PIXEL_MAX = 16.0
RANGE_MARGIN = 0.10  # schema min/max = training min/max widened by 10% of the span on each side
INLINE_DICT_CHARS = 140  # sidecar JSON layout: flat dicts up to this length stay on one line
DATASET = (
    "sklearn.datasets.load_digits (UCI optical digits 8x8, 1797 rows, 64 pixel features 0..16); "
    "stratified split test_size=0.25 random_state=0"
)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


def load_split() -> tuple[F64, F64, I64, I64]:
    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data.astype(np.float64),
        data.target.astype(np.int64),
        test_size=TEST_SIZE,
        random_state=SEED,
        stratify=data.target,
    )
    return x_train, x_test, y_train, y_test


def _display(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


# --- sidecar JSON (same layout and range rule as scripts/gen_onnx_models.py) -----------------------


def _dumps(obj: Any, level: int = 0) -> str:
    """JSON with 2-space indent, but lists of scalars and short flat dicts kept on one line."""
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


def feature_ranges(x_train: F64) -> list[dict[str, Any]]:
    lo = x_train.min(axis=0)
    hi = x_train.max(axis=0)
    margin = RANGE_MARGIN * (hi - lo)
    lo = np.clip(lo - margin, 0.0, PIXEL_MAX)  # clamped to the physical pixel range 0..16
    hi = np.clip(hi + margin, 0.0, PIXEL_MAX)
    names = [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
    return [
        {
            "name": name,
            "min": round(float(a), 6),
            "max": round(float(b), 6),
            "out_of_range": "serve",
            "non_finite": "reject",
        }
        for name, a, b in zip(names, lo, hi, strict=True)
    ]


def schema_doc(x_train: F64, n_test: int, acc_float: float, acc_int8: float) -> dict[str, Any]:
    return {
        "format": 1,
        "model": MODEL_NAME,
        "version": 1,
        "runtime": "tflite",
        "quantization": "int8",
        "inputs": [
            {
                "name": INPUT_NAME,
                "dtype": "float32",
                "shape": [-1, N_FEATURES],
                "features": feature_ranges(x_train),
            }
        ],
        "outputs": [
            {
                "name": OUTPUT_NAME,
                "dtype": "float32",
                "shape": [-1, N_CLASSES],
                "labels": [str(d) for d in range(N_CLASSES)],
            }
        ],
        "metadata": {
            "dataset": DATASET,
            "generator": GENERATOR,
            "accuracy_float": round(acc_float, 4),
            "accuracy_int8": round(acc_int8, 4),
            "test_rows": n_test,
        },
    }


# --- stage 1: train + convert (TensorFlow) --------------------------------------------------------


def convert(out_dir: Path, litert_python: Path | None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # bit-stable float math across CPUs
    import tensorflow as tf

    # Expected and harmless here: float32 I/O is intended, and tf.lite.Interpreter is only used as
    # a cross-check (the file is verified with LiteRT in stage 2).
    warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
    warnings.filterwarnings("ignore", message=r"\s*Warning: tf.lite.Interpreter is deprecated")

    t_start = time.perf_counter()
    tf.keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()

    x_train, x_test, y_train, y_test = load_split()
    x_train32 = x_train.astype(np.float32)
    x_test32 = x_test.astype(np.float32)

    keras = tf.keras
    inputs = keras.Input(shape=(N_FEATURES,), name=INPUT_NAME)
    x = keras.layers.Rescaling(1.0 / PIXEL_MAX, name="scale")(inputs)
    x = keras.layers.Dense(HIDDEN, activation="relu", name="dense0")(x)
    outputs = keras.layers.Dense(N_CLASSES, activation="softmax", name=OUTPUT_NAME)(x)
    model = keras.Model(inputs, outputs, name="digits_tflite")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x_train32, y_train, epochs=EPOCHS, batch_size=BATCH_SIZE, shuffle=True, verbose=0)
    keras_top1 = model.predict(x_test32, verbose=0).argmax(axis=1)
    acc_float = float(np.mean(keras_top1 == y_test))

    def representative_dataset() -> Iterator[list[F32]]:
        for row in x_train32:  # every training row, in split order
            yield [row[None, :]]

    # Export signature ``serving_default(features[1, 64]) -> {"probabilities": [1, 10]}`` through Keras'
    # ExportArchive (which freezes the Keras 3 variables correctly for the converter).
    def serve(features: Any) -> dict[str, Any]:
        return {OUTPUT_NAME: model(features, training=False)}

    with tempfile.TemporaryDirectory(prefix=f"{STEM}-") as saved_model_dir:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            "serving_default",
            serve,
            input_signature=[tf.TensorSpec([1, N_FEATURES], tf.float32, name=INPUT_NAME)],
        )
        with contextlib.redirect_stdout(io.StringIO()):  # "Saved artifact at ..." chatter
            archive.write_out(saved_model_dir)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        # inference_input_type / inference_output_type stay float32 on purpose.
        tflite_bytes: bytes = converter.convert()

    # Cross-check with the TFLite interpreter bundled in TF (the file is re-checked with LiteRT below).
    interpreter = tf.lite.Interpreter(model_content=tflite_bytes, num_threads=1)
    int8_top1 = predict_all(interpreter, x_test32)
    acc_int8 = float(np.mean(int8_top1 == y_test))
    agreement = float(np.mean(int8_top1 == keras_top1))

    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / f"{STEM}.tflite"
    model_path.write_bytes(tflite_bytes)
    schema_path = out_dir / f"{STEM}.schema.json"
    write_json(schema_path, schema_doc(x_train, len(y_test), acc_float, acc_int8))

    print(f"{STEM}  ({MODEL_NAME}, Keras 64-{HIDDEN}-10, {EPOCHS} epochs, TensorFlow {tf.__version__})")
    print(f"  wrote {_display(model_path)}  {len(tflite_bytes):,} bytes")
    print(f"        sha256 {hashlib.sha256(tflite_bytes).hexdigest()}")
    print(f"  wrote {_display(schema_path)}  {schema_path.stat().st_size:,} bytes")
    print(
        f"  accuracy on {len(y_test)} test rows: keras float {acc_float:.4f}, tflite int8 {acc_int8:.4f}"
        f" (int8/float top-1 agreement {agreement:.4f})"
    )
    print(f"  converted in {time.perf_counter() - t_start:.1f} s")

    if litert_python is None:
        print(
            "  --no-verify: samples not written; run `.venv/bin/python scripts/gen_tflite_model.py --verify`"
        )
        return 0
    if not litert_python.exists():
        print(f"error: {litert_python} not found; pass --litert-python or --no-verify", file=sys.stderr)
        return 2
    cmd = [str(litert_python), str(Path(__file__).resolve()), "--verify", "--out-dir", str(out_dir)]
    sys.stdout.flush()
    return subprocess.run(cmd, check=False).returncode


# --- stage 2: verify with LiteRT, write samples (no TensorFlow) -----------------------------------


def predict_all(interpreter: Any, x: F32) -> I64:
    """Top-1 for every row, one invoke per row (the model's batch dimension is fixed at 1)."""
    interpreter.allocate_tensors()
    in_index = interpreter.get_input_details()[0]["index"]
    out_index = interpreter.get_output_details()[0]["index"]
    top1 = np.empty(len(x), dtype=np.int64)
    for i, row in enumerate(x):
        interpreter.set_tensor(in_index, row[None, :])
        interpreter.invoke()
        top1[i] = int(np.argmax(interpreter.get_tensor(out_index)[0]))
    return top1


def check_int8(interpreter: Any) -> dict[str, Any]:
    """Assert float32 I/O at [1, 64] / [1, 10] and int8 compute everywhere in between."""
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()
    assert inp["dtype"] == np.float32 and list(inp["shape"]) == [1, N_FEATURES], inp
    assert out["dtype"] == np.float32 and list(out["shape"]) == [1, N_CLASSES], out
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()  # no public API lists ops and their tensors
    op_names = [op["op_name"] for op in ops]
    for op in ops:
        io = [i for i in [*op["inputs"], *op["outputs"]] if i >= 0]
        if op["op_name"] == "QUANTIZE" and list(op["inputs"]) == [inp["index"]]:
            assert tensors[op["outputs"][0]]["dtype"] == np.int8, op
        elif op["op_name"] == "DEQUANTIZE" and list(op["outputs"]) == [out["index"]]:
            assert tensors[op["inputs"][0]]["dtype"] == np.int8, op
        else:
            # Biases of FULLY_CONNECTED are int32 (int8 x int8 accumulators); everything else int8.
            dtypes = {tensors[i]["dtype"] for i in io}
            assert dtypes <= {np.int8, np.int32}, (op, dtypes)
            assert tensors[op["outputs"][0]]["dtype"] == np.int8, op
    assert "FULLY_CONNECTED" in op_names
    n_int8 = sum(1 for t in tensors.values() if t["dtype"] == np.int8)
    n_float = sum(1 for t in tensors.values() if t["dtype"] == np.float32)
    return {"ops": op_names, "int8_tensors": n_int8, "float32_tensors": n_float}


def latency_p50_us(interpreter: Any, row: F32, warmup: int = 300, runs: int = 3000) -> tuple[float, float]:
    """p50/p90 of one batch-1 ``set_tensor + invoke + get_tensor`` in microseconds."""
    in_index = interpreter.get_input_details()[0]["index"]
    out_index = interpreter.get_output_details()[0]["index"]
    x = row[None, :]

    def once() -> None:
        interpreter.set_tensor(in_index, x)
        interpreter.invoke()
        interpreter.get_tensor(out_index)

    for _ in range(warmup):
        once()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        once()
        times.append(time.perf_counter_ns() - t0)
    q = statistics.quantiles(times, n=10)
    return statistics.median(times) / 1000.0, q[8] / 1000.0


def verify(out_dir: Path) -> int:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    model_path = out_dir / f"{STEM}.tflite"
    schema_path = out_dir / f"{STEM}.schema.json"
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    _, x_test, _, y_test = load_split()
    x_test32 = x_test.astype(np.float32)

    # The default interpreter hands the whole graph to the XNNPACK delegate, which hides the ops, so
    # the int8 check inspects the plain builtin kernels; predictions are made with both (the agent
    # uses the default) and must agree.
    plain = Interpreter(
        model_path=str(model_path),
        num_threads=1,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    plain.allocate_tensors()
    census = check_int8(plain)
    interpreter = Interpreter(model_path=str(model_path), num_threads=1)
    top1 = predict_all(interpreter, x_test32)
    if not np.array_equal(top1, predict_all(plain, x_test32)):
        print("error: XNNPACK and builtin-kernel predictions differ", file=sys.stderr)
        return 1
    acc_int8 = round(float(np.mean(top1 == y_test)), 4)
    if acc_int8 != schema["metadata"]["accuracy_int8"]:
        print(
            f"error: LiteRT accuracy {acc_int8} != schema accuracy_int8 {schema['metadata']['accuracy_int8']}"
            " (computed by TF's TFLite interpreter)",
            file=sys.stderr,
        )
        return 1

    samples_path = out_dir / f"{STEM}.samples.json"
    write_json(
        samples_path,
        {
            "model": MODEL_NAME,
            # Pixel values are small integers, exact in float32.
            "inputs": {INPUT_NAME: [[float(v) for v in row] for row in x_test[:N_SAMPLES]]},
            "labels": [int(v) for v in y_test[:N_SAMPLES]],
            "label_names": schema["outputs"][0]["labels"],
            "expected_top1": [int(v) for v in top1[:N_SAMPLES]],
        },
    )
    p50, p90 = latency_p50_us(interpreter, x_test32[0])
    p50_plain, p90_plain = latency_p50_us(plain, x_test32[0])
    import ai_edge_litert

    version = getattr(ai_edge_litert, "__version__", "?")
    print(f"{STEM}  verified with ai_edge_litert {version} Interpreter (num_threads=1)")
    print(
        f"  ops {census['ops']}; {census['int8_tensors']} int8 / {census['float32_tensors']} float32 tensors"
    )
    print(f"  LiteRT int8 accuracy {acc_int8:.4f} == schema accuracy_int8")
    print(f"  wrote {_display(samples_path)}  {samples_path.stat().st_size:,} bytes")
    print(
        f"  batch-1 set_tensor+invoke+get_tensor: p50 {p50:.1f} us, p90 {p90:.1f} us (default, XNNPACK);"
        f" p50 {p50_plain:.1f} us, p90 {p90_plain:.1f} us (builtin kernels, no delegate)"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out-dir", type=Path, default=OUT_DIR, help="output directory (default: %(default)s)"
    )
    stage = parser.add_mutually_exclusive_group()
    stage.add_argument("--verify", action="store_true", help="only verify with LiteRT and write the samples")
    stage.add_argument("--no-verify", action="store_true", help="only train and convert (TensorFlow side)")
    parser.add_argument(
        "--litert-python",
        type=Path,
        default=DEFAULT_LITERT_PYTHON,
        help="interpreter with ai-edge-litert used for the verify stage (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    out_dir = args.out_dir.resolve()
    if args.verify:
        return verify(out_dir)
    return convert(out_dir, None if args.no_verify else args.litert_python)


if __name__ == "__main__":
    sys.exit(main())
