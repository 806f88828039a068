"""The manifest parser: strict, canonical, every field checked, every error naming the field."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from agent.bundle import (
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    FileEntry,
    FormatError,
    HealthSpec,
    Manifest,
    build_manifest,
    canonical_json,
)
from tests.bundle.helpers import FAKE_MODEL, tiny_manifest


def _parse(doc: dict[str, Any]) -> Manifest:
    return Manifest.from_bytes(canonical_json(doc))


def test_round_trip_through_bytes_keeps_every_field() -> None:
    doc = tiny_manifest()
    m = _parse(doc)
    assert m.to_dict() == doc
    assert m.files == (FileEntry.of("model.onnx", FAKE_MODEL),)
    assert m.model_entry.member_name == "payload/model.onnx"
    assert isinstance(m.health, HealthSpec) and m.health.inputs == {"x": [[0.5, 0.5]]}
    assert list(m.drift_baseline().names) == ["b", "a"]  # schema order, not the sorted stored order


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        keys = path.split(".")
        target: Any = doc
        for k in keys[:-1]:
            target = target[int(k)] if isinstance(target, list) else target[k]
        last = keys[-1]
        if value is _DELETE:
            del target[last]
        elif isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return apply


_DELETE = object()

MUTATIONS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "unknown top-level key": (_set("surprise", 1), "surprise"),
    "missing key": (_set("health", _DELETE), "missing key(s) health"),
    "wrong type": (_set("type", "edge-trust-root"), "manifest.type"),
    "format 2": (_set("format", 2), "manifest.format"),
    "format true": (_set("format", True), "manifest.format"),
    "bad model name": (_set("model", "Toy Model"), "model name"),
    "bool version": (_set("version", True), "version"),
    "negative version": (_set("version", -1), "version"),
    "float version": (_set("version", 1.0), "version"),
    "expires before created": (_set("expires_at", 0), "expires_at"),
    "string time": (_set("created_at", "yesterday"), "manifest.created_at"),
    "unknown runtime": (_set("runtime", "pytorch"), "manifest.runtime"),
    "no profiles": (_set("profiles", []), "manifest.profiles"),
    "bad profile name": (_set("profiles", ["Raspberry Pi"]), "manifest.profiles[0]"),
    "duplicate profile": (_set("profiles", ["raspberry-pi-4", "raspberry-pi-4"]), "twice"),
    "path with directory": (_set("files.0.path", "dir/model.onnx"), "manifest.files[0].path"),
    "path dotdot": (_set("files.0.path", ".."), "manifest.files[0].path"),
    "path too long": (_set("files.0.path", "a" * 65), "manifest.files[0].path"),
    "negative length": (_set("files.0.length", -1), "manifest.files[0].length"),
    "upper-case digest": (_set("files.0.sha256", "AB" * 32), "manifest.files[0].sha256"),
    "extra file key": (_set("files.0.mode", 420), "manifest.files[0]"),
    "no files": (_set("files", []), "manifest.files"),
    "too many files": (_set("files", [FileEntry(f"f{i}", 0, "00" * 32).to_dict() for i in range(MAX_FILES + 1)]),
                       "manifest.files"),
    "duplicate file": (_set("files", [FileEntry.of("model.onnx", b"").to_dict()] * 2), "twice"),
    "model file not listed": (_set("model_file", "other.onnx"), "manifest.model_file"),
    "model file wrong suffix": (_set("files.0.path", "model.tflite"), "manifest.model_file"),
    "schema of another model": (_set("schema.model", "other"), "manifest.schema.model"),
    "schema of another version": (_set("schema.version", 2), "manifest.schema.version"),
    "schema of another runtime": (_set("schema.runtime", "tflite"), "manifest.schema.runtime"),
    "invalid schema": (_set("schema.inputs", []), "manifest.schema"),
    "baseline not a summary": (_set("drift.baseline", {"layout": 1, "features": {"a": {"kind": "x"}}}),
                               "manifest.drift.baseline"),
    "baseline of another layout": (_set("drift.baseline.layout", 2), "manifest.drift.baseline"),
    "missing thresholds": (_set("drift.thresholds", _DELETE), "manifest.drift"),
    "alert below warn": (_set("drift.thresholds.psi_alert", 0.01), "psi_alert"),
    "zero min samples": (_set("drift.thresholds.min_samples", 0), "min_samples"),
    "health input not in schema": (_set("health.inputs", {"z": [[1, 2]]}), "manifest.health.inputs"),
    "health input wrong shape": (_set("health.inputs", {"x": [[1, 2, 3]]}), "shape"),
    "health input ragged": (_set("health.inputs", {"x": [[1, 2], [3]]}), "rectangular"),
    "health input strings": (_set("health.inputs", {"x": [["a", "b"]]}), "numbers"),
    "health expected unknown output": (_set("health.expected", {"p": [[1, 2]]}), "not a schema output"),
    "negative atol": (_set("health.atol", -0.1), "manifest.health.atol"),
    "zero latency budget": (_set("health.latency_budget_ms", 0), "latency_budget_ms"),
    "error rate over 1": (_set("health.max_error_rate", 1.5), "max_error_rate"),
    "top1 as int": (_set("health.top1_must_match", 1), "top1_must_match"),
    "metadata not an object": (_set("metadata", []), "manifest.metadata"),
}


@pytest.mark.parametrize("mutation", MUTATIONS.values(), ids=MUTATIONS.keys())
def test_invalid_manifest_field_rejected_naming_the_field(
        mutation: tuple[Callable[[dict[str, Any]], None], str]) -> None:
    apply, fragment = mutation
    doc = copy.deepcopy(tiny_manifest())
    apply(doc)
    with pytest.raises(FormatError) as info:
        _parse(doc)
    assert fragment in str(info.value), str(info.value)
    assert info.value.reason == "malformed"


def test_manifest_over_its_cap_rejected_before_parsing() -> None:
    with pytest.raises(FormatError, match="at most"):
        Manifest.from_bytes(b" " * (MAX_MANIFEST_BYTES + 1))


def test_non_canonical_manifest_rejected() -> None:
    data = canonical_json(tiny_manifest())
    with pytest.raises(FormatError, match="canonical"):
        Manifest.from_bytes(data.replace(b'"format":1', b'"format": 1'))


def test_build_manifest_accepts_numpy_samples_and_summary_objects() -> None:
    import numpy as np

    from agent.drift import Summary
    from tests.bundle.helpers import tiny_baseline, tiny_schema

    doc = build_manifest(
        model="toy", version=1, created_at=1, expires_at=2, runtime="onnx", profiles=("generic-x86-64",),
        model_file="model.onnx", files=[FileEntry.of("model.onnx", FAKE_MODEL)], schema=tiny_schema(),
        drift={"baseline": Summary.from_dict(tiny_baseline()),
               "thresholds": {"psi_warn": 0.1, "psi_alert": 0.25, "min_samples": 200}},
        health={"inputs": {"x": np.asarray([[0.5, 0.5]], dtype=np.float32)}, "expected": {}, "atol": 0.1,
                "top1_must_match": False, "latency_budget_ms": 10.0, "soak_s": 0.0, "max_error_rate": 0.0},
    )
    m = _parse(doc)
    assert m.health.inputs == {"x": [[0.5, 0.5]]} and m.metadata == {}
    again = build_manifest(
        model="toy", version=1, created_at=1, expires_at=2, runtime="onnx", profiles=("generic-x86-64",),
        model_file="model.onnx", files=[("model.onnx", FAKE_MODEL)], schema=m.schema, drift=m.drift, health=m.health)
    assert again == doc


def test_build_manifest_refuses_an_invalid_manifest() -> None:
    with pytest.raises(FormatError, match="model_file"):
        tiny_manifest(files=[("weights.bin", FAKE_MODEL)])
