"""Building a bundle from a model file (library form of ``edge-bundle build``; the demo uses it too)."""

from __future__ import annotations

import io
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent import __version__

__all__ = ["BuildOptions", "BuiltBundle", "build_bundle", "compatible_profiles", "run_model"]

DAY = 24 * 3600


@dataclass(frozen=True)
class BuildOptions:
    """Everything ``edge-bundle build`` takes besides the inputs; defaults match the CLI's."""

    bins: int = 16
    atol: float = 0.02
    latency_budget_ms: float = 50.0
    soak_s: float = 60.0
    max_error_rate: float = 0.05
    psi_warn: float = 0.1
    psi_alert: float = 0.25
    min_samples: int = 200
    expires_days: float = 365.0
    profiles: Sequence[str] | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BuiltBundle:
    data: bytes
    digest: str
    profiles: tuple[str, ...]
    signatures: int


def run_model(path: Path, schema: Any, rows: npt.NDArray[Any]) -> dict[str, npt.NDArray[Any]]:
    """Expected health-check outputs come from the real runtime the device will use."""
    from agent.profiles import builtin_profiles_dir, resolve_profile
    from agent.runtime import ModelHost, ModelSpec

    host = ModelHost(resolve_profile("generic-x86-64", builtin_profiles_dir()))
    try:
        m = host.load(ModelSpec(path, schema))
        x = np.asarray(rows, dtype=m.checker.dtype_of(schema.inputs[0].name))
        return m.backend.run({schema.inputs[0].name: x})
    finally:
        host.close()


def compatible_profiles(runtime: str, quantization: str, size: int) -> list[str]:
    from agent.profiles import builtin_profiles_dir, load_profiles

    return sorted(name for name, p in load_profiles(builtin_profiles_dir()).items()
                  if p.supports_runtime(runtime) and p.supports_quantization(quantization)
                  and size <= p.limits.max_model_bytes)


def build_bundle(*, model: Path, schema_doc: Mapping[str, Any], name: str, version: int,
                 reference: npt.NDArray[Any], health_rows: npt.NDArray[Any], signers: Sequence[Any] = (),
                 options: BuildOptions = BuildOptions()) -> BuiltBundle:
    """Build (and optionally sign) a bundle; raises ``ValueError`` (bad inputs) or ``agent.bundle.BundleError``."""
    import hashlib

    from agent.bundle import MANIFEST_PREFIX, build_manifest, canonical_json, write_bundle
    from agent.drift import Edges, NumericHistogram, Summary
    from agent.model import ModelSchema

    runtime = {".onnx": "onnx", ".tflite": "tflite"}.get(model.suffix)
    if runtime is None:
        raise ValueError(f"{model}: the model must be a .onnx or .tflite file")
    model_bytes = model.read_bytes()
    schema = ModelSchema.from_dict({**schema_doc, "model": name, "version": version, "runtime": runtime})
    feats = schema.inputs[0].features
    if reference.ndim != 2 or reference.shape[1] != len(feats):
        raise ValueError(f"reference data must be rows x {len(feats)} features (got shape {list(reference.shape)})")
    baseline = Summary({f.name: NumericHistogram.from_values(Edges.quantiles(reference[:, i], options.bins),
                                                              reference[:, i]) for i, f in enumerate(feats)})
    expected = run_model(model, schema, health_rows)
    profiles = list(options.profiles) if options.profiles else compatible_profiles(
        runtime, schema.quantization, len(model_bytes))
    model_file = f"model{model.suffix}"
    now = int(time.time())
    manifest = build_manifest(
        model=name, version=version, created_at=now, expires_at=now + int(options.expires_days * DAY),
        runtime=runtime, profiles=profiles, model_file=model_file, files=[(model_file, model_bytes)],
        schema=schema.to_dict(),
        drift={"baseline": baseline.to_dict(), "thresholds": {"psi_warn": options.psi_warn,
                                                              "psi_alert": options.psi_alert,
                                                              "min_samples": options.min_samples}},
        health={"inputs": {schema.inputs[0].name: health_rows.tolist()},
                "expected": {k: v.tolist() for k, v in expected.items()}, "atol": options.atol,
                "top1_must_match": True, "latency_budget_ms": options.latency_budget_ms, "soak_s": options.soak_s,
                "max_error_rate": options.max_error_rate},
        metadata={"built_by": f"edge-bundle {__version__}", **options.metadata})
    manifest_bytes = canonical_json(manifest)
    sigs = [{"keyid": k.public.keyid, "sig": k.sign(MANIFEST_PREFIX + manifest_bytes)} for k in signers]
    buf = io.BytesIO()
    write_bundle(buf, manifest_bytes, sigs, [(model_file, model_bytes)])
    return BuiltBundle(buf.getvalue(), hashlib.sha256(manifest_bytes).hexdigest(), tuple(profiles), len(sigs))
