"""In-process agent call vs the raw runtime call, and the local API round trip vs the in-process call.

Targets (issue: foundation): in-process p50 <= raw + 5 us on tiny models (schema check included), <= 1.05x on
models of 100 us or more; p99 <= 1.10x. Local API round trip adds < 100 us p50 over the in-process call at
batch 1. The raw baselines use the same session options the agent uses (the profile's threads, no spinning).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from agent.demo import MODELS_DIR, demo_config_text
from agent.localapi import LocalClient
from agent.profiles import FirmwareProfile, builtin_profiles_dir, resolve_profile
from agent.runtime import ModelHost, ModelSpec, load_schema_file
from agent.runtime.backend import usable_threads
from bench.common import interleaved, report_pair

REPO = Path(__file__).resolve().parents[1]


def _rows(stem: str, n: int) -> np.ndarray:
    s = json.loads((MODELS_DIR / f"{stem}.samples.json").read_text())
    rows = np.asarray(s["inputs"]["features"], dtype=np.float32)
    return np.resize(rows, (n, rows.shape[1])).astype(np.float32)


def _raw_onnx(path: Path, profile: FirmwareProfile, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    """The baseline: a bare InferenceSession with the same options the agent derives from the profile."""
    import onnxruntime as ort

    assert profile.onnx is not None
    so = ort.SessionOptions()
    so.intra_op_num_threads = usable_threads(profile.onnx.intra_op_threads)[0]
    so.inter_op_num_threads = usable_threads(profile.onnx.inter_op_threads)[0]
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if profile.onnx.allow_spinning else "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    return lambda: sess.run(out_names, feeds)


def _raw_litert(path: Path, profile: FirmwareProfile, x: np.ndarray) -> Callable[[], object]:
    """The baseline: a bare LiteRT interpreter, set_tensor + invoke + get_tensor."""
    from ai_edge_litert.interpreter import Interpreter

    assert profile.tflite is not None
    interp = Interpreter(model_path=str(path), num_threads=usable_threads(profile.tflite.threads)[0])
    interp.allocate_tensors()
    runner = interp.get_signature_runner()
    i_idx = runner.get_input_details()["features"]["index"]
    o_idx = runner.get_output_details()["probabilities"]["index"]
    del runner  # a live signature runner pins tensor buffers and makes invoke() refuse

    def raw() -> object:
        interp.set_tensor(i_idx, x)
        interp.invoke()
        return interp.get_tensor(o_idx)
    return raw


def bench_in_process(repeats: int, n: int) -> None:
    profile = resolve_profile("generic-x86-64", builtin_profiles_dir())
    host = ModelHost(profile)
    # digits-mlp at batch 16 and 64 stands in for a model of 100 us or more (one call costs that much).
    cases = [("cancer_mlp_int8", ".onnx", 1), ("digits_mlp_int8", ".onnx", 1), ("digits_mlp_int8", ".onnx", 16),
             ("digits_mlp_int8", ".onnx", 64), ("digits_int8", ".tflite", 1)]
    for stem, suffix in sorted({(c[0], c[1]) for c in cases}):
        host.load(ModelSpec(MODELS_DIR / f"{stem}{suffix}", load_schema_file(MODELS_DIR / f"{stem}.schema.json")))
    for stem, suffix, batch in cases:
        schema = load_schema_file(MODELS_DIR / f"{stem}.schema.json")
        model = host.get(schema.model)
        x = _rows(stem, batch)
        feeds = {"features": x}
        path = MODELS_DIR / f"{stem}{suffix}"
        if suffix == ".onnx":
            raw, baseline = _raw_onnx(path, profile, feeds), "onnxruntime InferenceSession.run"
        else:
            raw, baseline = _raw_litert(path, profile, x), "LiteRT set_tensor+invoke+get_tensor"
        cand, base = interleaved(functools.partial(model.infer, feeds), raw, repeats=repeats, n=n)
        report_pair("inference_in_process", cand, base, baseline=baseline,
                    target_p50="<= raw + 5 us (tiny) / <= 1.05x (>= 100 us)", target_p99="<= 1.10x",
                    model=schema.model, batch=batch)


def bench_local_api(repeats: int, n: int) -> None:
    """Agent in its own process (as deployed); client here. Baseline: the in-process call on the same row."""
    work = Path(tempfile.mkdtemp(prefix="bench-", dir="/tmp"))
    sock = work / "api.sock"
    cfg = work / "agent.toml"
    cfg.write_text(demo_config_text(work / "state", sock, models=("cancer_mlp_int8.onnx",)))
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = LocalClient(sock)
        client.wait_ready(alive=lambda: proc.poll() is None)
        profile = resolve_profile("generic-x86-64", builtin_profiles_dir())
        host = ModelHost(profile)
        schema = load_schema_file(MODELS_DIR / "cancer_mlp_int8.schema.json")
        model = host.load(ModelSpec(MODELS_DIR / "cancer_mlp_int8.onnx", schema))
        x = _rows("cancer_mlp_int8", 1)
        row = x.tolist()

        def api_call() -> object:
            return client.infer("cancer-mlp", {"features": row})

        def in_process() -> object:
            return model.infer({"features": x})

        cand, base = interleaved(api_call, in_process, repeats=repeats, n=n)
        report_pair("local_api_round_trip", cand, base, baseline="in-process host.infer (same row)",
                    target_p50="adds < 100 us p50", target_p99="-", model="cancer-mlp", batch=1,
                    transport="HTTP/1.1 + JSON over a Unix socket, keep-alive")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    repeats, n = (5, 500) if args.quick else (9, 2000)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    bench_in_process(repeats, n)
    bench_local_api(repeats, n // 2)


if __name__ == "__main__":
    main()
