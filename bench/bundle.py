"""Bundle verification throughput against plain SHA-256 over the same file, interleaved.

Target (signed-bundles issue): verify a 100 MB bundle at >= 0.9x ``hashlib.sha256`` throughput in the same run.
Verification is one streaming pass: tar headers, manifest signature, and each payload's SHA-256 (no sink: the
bytes are only hashed, as in ``edge-bundle verify``). The file is read from the page cache in both cases.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

from agent.bundle import MANIFEST_PREFIX, TrustRoot, build_manifest, canonical_json, verify_bundle, write_bundle
from bench.common import emit
from tests.updater.support import Keys, baseline_for

MIB = 1 << 20


def make(path: Path, size: int, keys: Keys) -> None:
    import json

    import numpy as np

    from agent.demo import MODELS_DIR

    payload = os.urandom(size)
    schema = json.loads((MODELS_DIR / "cancer_mlp_int8.schema.json").read_text())
    rows = np.asarray(json.loads((MODELS_DIR / "cancer_mlp_int8.samples.json").read_text())["inputs"]["features"])
    now = int(time.time())
    manifest = build_manifest(
        model="big-model", version=1, created_at=now - 60, expires_at=now + 86400, runtime="onnx",
        profiles=["generic-x86-64"], model_file="model.onnx", files=[("model.onnx", payload)],
        schema={**schema, "model": "big-model"}, drift={"baseline": baseline_for(schema, rows),
               "thresholds": {"psi_warn": 0.1, "psi_alert": 0.25, "min_samples": 200}},
        health={"inputs": {"features": rows[:1].tolist()}, "expected": {"probabilities": [[0.5, 0.5]]},
                "atol": 0.5, "top1_must_match": False, "latency_budget_ms": 100.0, "soak_s": 0.0,
                "max_error_rate": 0.05})
    mb = canonical_json(manifest)
    sigs = [{"keyid": k.public.keyid, "sig": k.sign(MANIFEST_PREFIX + mb)} for k in keys.release]
    with open(path, "wb") as f:
        write_bundle(f, mb, sigs, [("model.onnx", payload)])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    size = (32 if args.quick else 100) * MIB
    repeats = 5 if args.quick else 9
    keys = Keys()
    root = TrustRoot.from_bytes(keys.root_bytes())
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "big.bundle"
        make(path, size, keys)
        total = path.stat().st_size
        sha256_file(path)  # warm the page cache
        ours, base = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            with open(path, "rb", buffering=0) as f:
                verify_bundle(f, root, now=time.time())
            ours.append(total / (time.perf_counter() - t0) / MIB)
            t0 = time.perf_counter()
            sha256_file(path)
            base.append(total / (time.perf_counter() - t0) / MIB)
    ratios = [a / b for a, b in zip(ours, base, strict=True)]
    emit("bundle_verify", "throughput_mib_s", value=statistics.median(ours),
         baseline="hashlib.sha256 over the same file, 1 MiB reads", baseline_value=statistics.median(base),
         target=">= 0.9x", ratio_median=round(statistics.median(ratios), 3), ratio_min=round(min(ratios), 3),
         ratio_max=round(max(ratios), 3), bundle_mib=round(total / MIB, 1))


if __name__ == "__main__":
    main()
