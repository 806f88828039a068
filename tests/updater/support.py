"""Test support for the update path: keys, trust roots and REAL bundles around the demo int8 models.

Everything is built with the same `agent.bundle` code the release tooling uses; nothing here bypasses a check.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import (
    MANIFEST_PREFIX,
    ORDER_PREFIX,
    ROOT_PREFIX,
    SigningKey,
    build_manifest,
    canonical_json,
    make_order_signed,
    make_root_signed,
    sign_document,
    write_bundle,
)
from agent.demo import MODELS_DIR
from agent.drift import Edges, Summary

YEAR = 365 * 24 * 3600


def snapshot(state_dir: Path) -> dict[str, str]:
    """Every file under models/ with its SHA-256: 'unchanged' means this dict is equal before and after."""
    out = {}
    base = state_dir / "models"
    if base.is_dir():
        for p in sorted(base.rglob("*")):
            if p.is_file() and p.name != "install.json":
                out[str(p.relative_to(state_dir))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Keys:
    root: list[SigningKey] = field(default_factory=lambda: [SigningKey.generate()])
    release: list[SigningKey] = field(default_factory=lambda: [SigningKey.generate()])
    orders: list[SigningKey] = field(default_factory=lambda: [SigningKey.generate()])
    release_threshold: int = 1
    version: int = 1

    def root_bytes(self, *, expires_at: float | None = None, signers: list[SigningKey] | None = None) -> bytes:
        signed = make_root_signed(
            version=self.version, expires_at=int(expires_at or time.time() + 10 * YEAR),
            keys={"root": [k.public for k in self.root], "release": [k.public for k in self.release],
                  "orders": [k.public for k in self.orders]},
            thresholds={"root": 1, "release": self.release_threshold, "orders": 1},
        )
        return sign_document(signed, ROOT_PREFIX, signers if signers is not None else self.root)


def _demo(stem: str) -> tuple[dict[str, Any], dict[str, Any]]:
    schema = json.loads((MODELS_DIR / f"{stem}.schema.json").read_text())
    samples = json.loads((MODELS_DIR / f"{stem}.samples.json").read_text())
    return schema, samples


def baseline_for(schema: dict[str, Any], rows: np.ndarray) -> dict[str, Any]:
    feats = schema["inputs"][0]["features"]
    names = [f["name"] for f in feats]
    from agent.drift import NumericHistogram

    hists = {}
    for i, n in enumerate(names):
        col = rows[:, i]
        lo, hi = float(col.min()), float(col.max())
        if hi <= lo:
            hi = lo + 1.0
        hists[n] = NumericHistogram.from_values(Edges.uniform(lo, hi, 8), col)
    return Summary(hists).to_dict()


def make_bundle(
    keys: Keys,
    *,
    stem: str = "cancer_mlp_int8",
    version: int = 1,
    model: str | None = None,
    created_at: float | None = None,
    expires_at: float | None = None,
    profiles: tuple[str, ...] = ("generic-x86-64", "raspberry-pi-4", "raspberry-pi-5", "jetson-orin-nano",
                                 "coral-dev-board"),
    signers: list[SigningKey] | None = None,
    model_bytes: bytes | None = None,
    health_overrides: dict[str, Any] | None = None,
) -> bytes:
    """A real, signed bundle of a demo model (the ONNX or TFLite file, its schema, a drift baseline and
    health-check samples taken from the model's own held-out rows)."""
    schema, samples = _demo(stem)
    suffix = ".tflite" if stem.endswith("tflite") or stem == "digits_int8" else ".onnx"
    name = model or schema["model"]
    schema = {**schema, "model": name, "version": version}
    data = model_bytes if model_bytes is not None else (MODELS_DIR / f"{stem}{suffix}").read_bytes()
    rows = np.asarray(samples["inputs"]["features"], dtype=np.float32)
    model_file = f"model{suffix}"
    # Expected outputs: what the real runtime gives for the first 4 rows (computed once per stem).
    expected = _expected_outputs(stem, suffix, rows[:4])
    health = {"inputs": {"features": rows[:4].tolist()}, "expected": {"probabilities": expected},
              "atol": 0.02, "top1_must_match": True, "latency_budget_ms": 500.0, "soak_s": 0.0,
              "max_error_rate": 0.05, **(health_overrides or {})}
    now = time.time()
    manifest = build_manifest(
        model=name, version=version, created_at=int(created_at if created_at is not None else now - 60),
        expires_at=int(expires_at if expires_at is not None else now + YEAR), runtime=schema["runtime"],
        profiles=list(profiles), model_file=model_file,
        files=[(model_file, data)], schema=schema,
        drift={"baseline": baseline_for(schema, rows), "thresholds": {"psi_warn": 0.1, "psi_alert": 0.25,
                                                                         "min_samples": 200}},
        health=health, metadata={"model_card": f"demo {name} v{version}", "training_data": "sklearn"},
    )
    manifest_bytes = canonical_json(manifest)
    sigs = [{"keyid": k.public.keyid, "sig": k.sign(MANIFEST_PREFIX + manifest_bytes)}
            for k in (signers if signers is not None else keys.release)]
    out = io.BytesIO()
    write_bundle(out, manifest_bytes, sigs, [(model_file, data)])
    return out.getvalue()


_EXPECTED: dict[str, list[list[float]]] = {}


def _expected_outputs(stem: str, suffix: str, rows: np.ndarray) -> list[list[float]]:
    if stem not in _EXPECTED:
        from agent.profiles import builtin_profiles_dir, resolve_profile
        from agent.runtime import ModelHost, ModelSpec, load_schema_file

        host = ModelHost(resolve_profile("generic-x86-64", builtin_profiles_dir()))
        m = host.load(ModelSpec(MODELS_DIR / f"{stem}{suffix}", load_schema_file(MODELS_DIR / f"{stem}.schema.json")))
        out = m.backend.run({"features": rows})
        _EXPECTED[stem] = np.asarray(next(iter(out.values())), dtype=np.float64).tolist()
        host.close()
    return _EXPECTED[stem]


def make_order(keys: Keys, bundle: bytes, *, device_id: str, url: str, token: str, sequence: int,
               command_id: str | None = None, version: int | None = None, model: str | None = None,
               allow_downgrade: bool = False, expires_in: float = 3600, issued_at: float | None = None,
               action: str = "deploy", cancels: str | None = None, signers: list[SigningKey] | None = None,
               digest: str | None = None, length: int | None = None) -> dict[str, Any]:
    from agent.bundle import read_manifest

    manifest_bytes, _ = read_manifest(io.BytesIO(bundle))
    manifest = json.loads(manifest_bytes)
    now = issued_at if issued_at is not None else time.time()
    fields: dict[str, Any] = {
        "command_id": command_id or f"cmd-{sequence}", "action": action, "device_id": device_id,
        "rollout_id": "ro-test", "sequence": sequence, "issued_at": int(now), "expires_at": int(now + expires_in),
    }
    if action == "deploy":
        fields.update(model=model or manifest["model"], version=version if version is not None else manifest["version"],
                      bundle_digest=digest or hashlib.sha256(manifest_bytes).hexdigest(),
                      bundle_length=length if length is not None else len(bundle), url=url, token=token,
                      token_expires_at=int(now + expires_in), allow_downgrade=allow_downgrade)
    else:
        fields["cancels"] = cancels
    signed = make_order_signed(**fields)
    return json.loads(sign_document(signed, ORDER_PREFIX, signers if signers is not None else keys.orders))
