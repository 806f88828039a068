"""The model input/output schema and the per-request check.

A schema travels with every model (today as a ``<model>.schema.json`` sidecar; inside the signed bundle
manifest once bundles land) and says, per input tensor, its name, dtype and shape, and per feature (the last
dimension) the declared value range and what to do with a value outside it or a NaN/inf: ``reject`` the
request, or ``serve`` it and count it (seed failure mode F1: a silent schema change upstream).

The check runs on every request, so it has a fast path: one vectorised range test per input that also catches
NaN and inf (comparisons with NaN are false). Only a request that fails it takes the slow path that works out
which feature is at fault and what its policy says.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.model.identity import InvalidModelRefError, validate_model_name, validate_version

__all__ = [
    "DTYPES",
    "SCHEMA_FORMAT",
    "FeatureSpec",
    "InputChecker",
    "ModelSchema",
    "Policy",
    "RequestError",
    "SchemaError",
    "ServedFlags",
    "TensorSpec",
]

SCHEMA_FORMAT = 1
DTYPES: frozenset[str] = frozenset(
    {"float32", "float64", "float16", "int8", "uint8", "int16", "int32", "int64", "bool"}
)
RUNTIMES: frozenset[str] = frozenset({"onnx", "tflite"})
_MAX_RANK = 8


class SchemaError(ValueError):
    """A schema document is invalid; the message names the field and what is allowed."""


class RequestError(ValueError):
    """A request does not fit the model's schema. ``code`` is stable and machine-readable.

    Codes: ``unknown_input``, ``missing_input``, ``dtype_mismatch``, ``shape_mismatch``, ``out_of_range``,
    ``non_finite``. ``field`` names the input (``features``) or the feature (``features[3] mean area``).
    """

    def __init__(self, code: str, field: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.field = field
        self.message = message


class Policy(StrEnum):
    """What to do with a value outside the declared range, or a NaN/inf."""

    REJECT = "reject"
    SERVE = "serve"


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """One feature (one position along the input's last dimension)."""

    name: str
    min: float | None = None
    max: float | None = None
    out_of_range: Policy = Policy.SERVE
    non_finite: Policy = Policy.REJECT


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output tensor. ``shape`` uses -1 for a free dimension (the batch)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    features: tuple[FeatureSpec, ...] = ()
    labels: tuple[str, ...] = ()

    def describe_shape(self) -> str:
        return "[" + ", ".join("N" if d < 0 else str(d) for d in self.shape) + "]"


@dataclass(frozen=True, slots=True)
class ModelSchema:
    """Name, version, runtime and I/O of one model version."""

    model: str
    version: int
    runtime: str
    quantization: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, doc: object) -> ModelSchema:
        """Validate and build a schema from its JSON form; raises :class:`SchemaError` naming the field."""
        d = _mapping(doc, "schema")
        _only_keys(d, "schema", {"format", "model", "version", "runtime", "quantization", "inputs", "outputs",
                                 "metadata"})
        fmt = d.get("format")
        if fmt != SCHEMA_FORMAT:
            raise SchemaError(f"schema.format = {fmt!r} is not supported; this agent reads format {SCHEMA_FORMAT}")
        try:
            model = validate_model_name(d.get("model"))
            version = validate_version(d.get("version"))
        except InvalidModelRefError as exc:
            raise SchemaError(f"schema: {exc}") from None
        runtime = d.get("runtime")
        if runtime not in RUNTIMES:
            raise SchemaError(f"schema.runtime = {runtime!r}; allowed: {', '.join(sorted(RUNTIMES))}")
        quant = d.get("quantization")
        if not isinstance(quant, str) or not quant:
            raise SchemaError("schema.quantization must be a non-empty string such as 'int8'")
        inputs = _tensors(d.get("inputs"), "schema.inputs", with_features=True)
        outputs = _tensors(d.get("outputs"), "schema.outputs", with_features=False)
        meta = d.get("metadata", {})
        if not isinstance(meta, Mapping):
            raise SchemaError("schema.metadata must be an object")
        return cls(model, version, str(runtime), quant, inputs, outputs, dict(meta))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (inverse of :meth:`from_dict`)."""

        def tensor(t: TensorSpec) -> dict[str, Any]:
            out: dict[str, Any] = {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
            if t.features:
                out["features"] = [
                    {"name": f.name, "min": f.min, "max": f.max, "out_of_range": f.out_of_range.value,
                     "non_finite": f.non_finite.value}
                    for f in t.features
                ]
            if t.labels:
                out["labels"] = list(t.labels)
            return out

        return {
            "format": SCHEMA_FORMAT,
            "model": self.model,
            "version": self.version,
            "runtime": self.runtime,
            "quantization": self.quantization,
            "inputs": [tensor(t) for t in self.inputs],
            "outputs": [tensor(t) for t in self.outputs],
            "metadata": dict(self.metadata),
        }


@dataclass(frozen=True, slots=True)
class ServedFlags:
    """Features that were out of range or non-finite in a request that was still served (to be counted)."""

    out_of_range: tuple[str, ...] = ()
    non_finite: tuple[str, ...] = ()


class _CompiledInput:
    __slots__ = ("dtype", "fixed", "has_features", "hi", "lo", "ndim", "spec")

    def __init__(self, spec: TensorSpec) -> None:
        self.spec = spec
        self.dtype = np.dtype(spec.dtype)
        self.ndim = len(spec.shape)
        self.fixed = tuple((i, d) for i, d in enumerate(spec.shape) if d >= 0)
        self.has_features = bool(spec.features) and self.dtype.kind in "fiu"
        if self.has_features:
            big = float(np.finfo(np.float64).max)
            self.lo = np.array([-big if f.min is None else f.min for f in spec.features], dtype=np.float64)
            self.hi = np.array([big if f.max is None else f.max for f in spec.features], dtype=np.float64)
            if self.dtype.kind == "f":
                # Compare in the tensor's own dtype (no upcast on the hot path); clip the bounds to it.
                info = np.finfo(self.dtype)
                self.lo = np.clip(self.lo, info.min, info.max).astype(self.dtype)
                self.hi = np.clip(self.hi, info.min, info.max).astype(self.dtype)


class InputChecker:
    """Checks requests against a schema's inputs; built once per loaded model."""

    __slots__ = ("_by_name", "_inputs", "_names")

    def __init__(self, schema: ModelSchema) -> None:
        self._inputs = tuple(_CompiledInput(t) for t in schema.inputs)
        self._by_name = {c.spec.name: c for c in self._inputs}
        self._names = frozenset(self._by_name)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(c.spec.name for c in self._inputs)

    def dtype_of(self, name: str) -> np.dtype[Any]:
        return self._by_name[name].dtype

    def check(self, inputs: Mapping[str, npt.NDArray[Any]]) -> ServedFlags | None:
        """Return ``None`` for a clean request, :class:`ServedFlags` for one served with flagged values.

        Raises :class:`RequestError` for a request that must be rejected.
        """
        if len(inputs) != len(self._inputs):
            self._name_error(inputs)
        flags: ServedFlags | None = None
        for c in self._inputs:
            try:
                a = inputs[c.spec.name]
            except KeyError:
                self._name_error(inputs)
            if a.dtype != c.dtype:
                raise RequestError(
                    "dtype_mismatch", c.spec.name,
                    f"input '{c.spec.name}' has dtype {a.dtype}; the model expects {c.dtype}",
                )
            shape = a.shape
            if len(shape) != c.ndim or any(shape[i] != d for i, d in c.fixed) or 0 in shape:
                raise RequestError(
                    "shape_mismatch", c.spec.name,
                    f"input '{c.spec.name}' has shape {list(shape)}; the model expects {c.spec.describe_shape()} "
                    "(N = batch, at least 1)",
                )
            if c.has_features and not ((a >= c.lo) & (a <= c.hi)).all():
                f = self._slow_path(c, a)
                if f is not None:
                    flags = f if flags is None else ServedFlags(
                        flags.out_of_range + f.out_of_range, flags.non_finite + f.non_finite)
        return flags

    def _name_error(self, inputs: Mapping[str, object]) -> None:
        unknown = sorted(set(inputs) - self._names)
        if unknown:
            raise RequestError(
                "unknown_input", unknown[0],
                f"unknown input '{unknown[0]}'; the model's inputs are: {', '.join(self.input_names)}",
            )
        missing = sorted(self._names - set(inputs))
        raise RequestError(
            "missing_input", missing[0],
            f"missing input '{missing[0]}'; the model's inputs are: {', '.join(self.input_names)}",
        )

    @staticmethod
    def _slow_path(c: _CompiledInput, a: npt.NDArray[Any]) -> ServedFlags | None:
        feats = c.spec.features
        flat = a.reshape(-1, len(feats))
        finite = np.isfinite(flat) if c.dtype.kind == "f" else np.ones(flat.shape, dtype=bool)
        bad_nonfinite = (~finite).any(axis=0)
        with np.errstate(invalid="ignore"):
            outside = (finite & ((flat < c.lo) | (flat > c.hi))).any(axis=0)
        served_nf: list[str] = []
        served_oor: list[str] = []
        for i in np.flatnonzero(bad_nonfinite):
            f = feats[i]
            label = f"{c.spec.name}[{i}] {f.name}"
            if f.non_finite is Policy.REJECT:
                raise RequestError("non_finite", label, f"feature {label} is NaN or infinite; this model rejects that")
            served_nf.append(f.name)
        for i in np.flatnonzero(outside):
            f = feats[i]
            label = f"{c.spec.name}[{i}] {f.name}"
            if f.out_of_range is Policy.REJECT:
                vals = flat[:, i][finite[:, i]]
                raise RequestError(
                    "out_of_range", label,
                    f"feature {label} = {float(vals.min()) if vals.size else math.nan:g}..{float(vals.max()):g} "
                    f"is outside the declared range [{f.min}, {f.max}]; this model rejects that",
                )
            served_oor.append(f.name)
        if not served_nf and not served_oor:
            return None
        return ServedFlags(tuple(served_oor), tuple(served_nf))


def _mapping(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SchemaError(f"{where} must be an object, got {type(value).__name__}")
    return value


def _only_keys(d: Mapping[str, Any], where: str, allowed: set[str]) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise SchemaError(f"{where}: unknown key(s) {', '.join(extra)}; allowed: {', '.join(sorted(allowed))}")


def _tensors(value: object, where: str, *, with_features: bool) -> tuple[TensorSpec, ...]:
    if not isinstance(value, list) or not value:
        raise SchemaError(f"{where} must be a non-empty list of tensors")
    out: list[TensorSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        w = f"{where}[{i}]"
        t = _mapping(item, w)
        _only_keys(t, w, {"name", "dtype", "shape", "features", "labels"})
        name = t.get("name")
        if not isinstance(name, str) or not name or len(name) > 128:
            raise SchemaError(f"{w}.name must be a non-empty string of at most 128 characters")
        if name in seen:
            raise SchemaError(f"{w}.name '{name}' appears twice")
        seen.add(name)
        dtype = t.get("dtype")
        if dtype not in DTYPES:
            raise SchemaError(f"{w}.dtype = {dtype!r}; allowed: {', '.join(sorted(DTYPES))}")
        shape = t.get("shape")
        if (not isinstance(shape, list) or not 1 <= len(shape) <= _MAX_RANK
                or any(isinstance(d, bool) or not isinstance(d, int) or d == 0 or d < -1 for d in shape)):
            raise SchemaError(
                f"{w}.shape must be a list of 1..{_MAX_RANK} positive integers or -1 (free), got {shape!r}")
        features: tuple[FeatureSpec, ...] = ()
        if "features" in t:
            if not with_features:
                raise SchemaError(f"{w}.features is only allowed on inputs")
            features = _features(t["features"], f"{w}.features", shape[-1])
        labels_raw = t.get("labels", [])
        if not isinstance(labels_raw, list) or not all(isinstance(x, str) for x in labels_raw):
            raise SchemaError(f"{w}.labels must be a list of strings")
        out.append(TensorSpec(name, str(dtype), tuple(shape), features, tuple(labels_raw)))
    return tuple(out)


def _features(value: object, where: str, last_dim: int) -> tuple[FeatureSpec, ...]:
    if not isinstance(value, list):
        raise SchemaError(f"{where} must be a list")
    if last_dim < 0 or len(value) != last_dim:
        raise SchemaError(f"{where} has {len(value)} entries; it must have one per column of the last dimension "
                          f"({last_dim if last_dim > 0 else 'which must then be fixed'})")
    out: list[FeatureSpec] = []
    for i, item in enumerate(value):
        w = f"{where}[{i}]"
        f = _mapping(item, w)
        _only_keys(f, w, {"name", "min", "max", "out_of_range", "non_finite"})
        name = f.get("name")
        if not isinstance(name, str) or not name:
            raise SchemaError(f"{w}.name must be a non-empty string")
        bounds: list[float | None] = []
        for key in ("min", "max"):
            v = f.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)):
                raise SchemaError(f"{w}.{key} must be a finite number or null, got {v!r}")
            bounds.append(None if v is None else float(v))
        lo, hi = bounds
        if lo is not None and hi is not None and lo > hi:
            raise SchemaError(f"{w}: min {lo} is greater than max {hi}")
        policies: list[Policy] = []
        for key, default in (("out_of_range", Policy.SERVE), ("non_finite", Policy.REJECT)):
            raw = f.get(key, default.value)
            try:
                policies.append(Policy(raw))
            except ValueError:
                raise SchemaError(f"{w}.{key} = {raw!r}; allowed: reject, serve") from None
        out.append(FeatureSpec(name, lo, hi, policies[0], policies[1]))
    return tuple(out)
