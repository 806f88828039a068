"""The bundle manifest: what a release signs about one model version, parsed strictly into frozen records.

The manifest covers every payload file's length and SHA-256, so the signature over the manifest bytes is a
signature over the whole bundle, and ``sha256(manifest bytes)`` is the bundle's identity. Format 1 rejects unknown
keys (a new field means a new format number), and every error names the field at fault.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from agent.bundle.canonical import canonical_json, strict_loads
from agent.bundle.errors import FormatError
from agent.drift import Summary
from agent.model import InvalidModelRefError, ModelSchema, validate_model_name, validate_version
from agent.profiles import PROFILE_NAME_PATTERN

__all__ = [
    "FILE_PATH_PATTERN",
    "MANIFEST_FORMAT",
    "MANIFEST_TYPE",
    "MAX_FILES",
    "MAX_MANIFEST_BYTES",
    "MAX_SIGNATURES_BYTES",
    "PAYLOAD_PREFIX",
    "RUNTIME_SUFFIXES",
    "FileEntry",
    "HealthSpec",
    "Manifest",
    "build_manifest",
]

MANIFEST_TYPE: Final = "edge-bundle-manifest"
MANIFEST_FORMAT: Final = 1
MAX_MANIFEST_BYTES: Final = 1 << 20
"""Largest accepted ``manifest.json`` (1 MiB): checked on the tar header, before a byte of it is read."""
MAX_SIGNATURES_BYTES: Final = 64 << 10
"""Largest accepted ``signatures.json`` (64 KiB)."""
MAX_FILES: Final = 64
"""Most payload files a bundle may carry."""
FILE_PATH_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
"""A payload file name: no directories, cannot be ``.``/``..``, at most 64 characters."""
PAYLOAD_PREFIX: Final = "payload/"
"""Payload file ``path`` is stored in the archive as ``payload/<path>``."""
RUNTIME_SUFFIXES: Final[Mapping[str, str]] = {"onnx": ".onnx", "tflite": ".tflite"}
"""Runtime -> required suffix of ``model_file``."""

_PATH_RE: Final = re.compile(FILE_PATH_PATTERN)
_PROFILE_RE: Final = re.compile(PROFILE_NAME_PATTERN)
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_MAX_INT: Final = 2**63 - 1
_MAX_RANK: Final = 8
_MAX_PROFILES: Final = 64
_TOP_KEYS: Final = frozenset({"type", "format", "model", "version", "created_at", "expires_at", "runtime", "profiles",
                              "model_file", "files", "schema", "drift", "health", "metadata"})
_HEALTH_KEYS: Final = frozenset({"inputs", "expected", "atol", "top1_must_match", "latency_budget_ms", "soak_s",
                                 "max_error_rate"})
_THRESHOLD_KEYS: Final = frozenset({"psi_warn", "psi_alert", "min_samples"})


# -- small validators (FormatError naming the field) ----------------------------------------------------------------

def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _obj(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise FormatError(f"{where} must be an object, got {type(value).__name__}")
    return value


def _exact_keys(d: Mapping[str, Any], where: str, keys: frozenset[str]) -> None:
    extra, missing = sorted(set(d) - keys), sorted(keys - set(d))
    if extra:
        raise FormatError(f"{where}: unknown key(s) {', '.join(map(_short, extra))}; format 1 allows only "
                          f"{', '.join(sorted(keys))}")
    if missing:
        raise FormatError(f"{where}: missing key(s) {', '.join(missing)}")


def _int(value: object, where: str, lo: int = 0, hi: int = _MAX_INT) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise FormatError(f"{where} must be an integer from {lo} to {hi}, got {_short(value)}")
    return value


def _num(value: object, where: str, *, lo: float = 0.0, hi: float = math.inf, lo_open: bool = False) -> float:
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            or value > hi or value < lo or (lo_open and value == lo)):
        bound = f"> {lo}" if lo_open else f">= {lo}"
        upper = f" and <= {hi}" if math.isfinite(hi) else ""
        raise FormatError(f"{where} must be a finite number {bound}{upper}, got {_short(value)}")
    return value


def _list_of_shape(value: object, where: str) -> tuple[int, ...]:
    """Shape of a rectangular nested list of numbers/bools (at most 8 levels, no empty dimension)."""
    shape: list[int] = []
    level: list[Any] = [value]
    for _ in range(_MAX_RANK + 1):
        lists = [isinstance(x, list) for x in level]
        if all(lists):
            n = len(level[0])
            if n == 0 or any(len(x) != n for x in level):
                raise FormatError(f"{where} must be a non-empty rectangular nested list (ragged or empty at depth "
                                  f"{len(shape)})")
            shape.append(n)
            level = [y for x in level for y in x]
        elif any(lists):
            raise FormatError(f"{where} mixes lists and numbers at depth {len(shape)}")
        else:
            if not shape:
                raise FormatError(f"{where} must be a nested list of numbers, got {type(value).__name__}")
            for x in level:
                if not isinstance(x, int | float):  # bool is an int; the parser already refused NaN/Infinity
                    raise FormatError(f"{where} holds {_short(x)}; values must be numbers or booleans")
            return tuple(shape)
    raise FormatError(f"{where} is nested deeper than {_MAX_RANK} levels")


def _check_tensor_values(value: object, where: str, shape: tuple[int, ...]) -> None:
    got = _list_of_shape(value, where)
    if len(got) != len(shape) or any(d >= 0 and g != d for g, d in zip(got, shape, strict=False)):
        want = "[" + ", ".join("N" if d < 0 else str(d) for d in shape) + "]"
        raise FormatError(f"{where} has shape {list(got)}; the schema declares {want}")


# -- records --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FileEntry:
    """One payload file: its name (``payload/<path>`` in the archive), length in bytes and SHA-256 (hex)."""

    path: str
    length: int
    sha256: str

    @classmethod
    def of(cls, path: str, data: bytes) -> FileEntry:
        """The entry describing ``data`` stored as ``path``."""
        return cls(path, len(data), hashlib.sha256(data).hexdigest())

    @property
    def member_name(self) -> str:
        """The archive member name, ``payload/<path>``."""
        return PAYLOAD_PREFIX + self.path

    def to_dict(self) -> dict[str, Any]:
        """The JSON form ``{"path", "length", "sha256"}``."""
        return {"path": self.path, "length": self.length, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, value: object, where: str = "file") -> FileEntry:
        """Parse and validate one ``files[]`` entry."""
        d = _obj(value, where)
        _exact_keys(d, where, frozenset({"path", "length", "sha256"}))
        path = d["path"]
        if not isinstance(path, str) or _PATH_RE.fullmatch(path) is None:
            raise FormatError(f"{where}.path = {_short(path)}: must match {FILE_PATH_PATTERN} (a plain file name)")
        length = _int(d["length"], f"{where}.length")
        digest = d["sha256"]
        if not isinstance(digest, str) or _HEX64.fullmatch(digest) is None:
            raise FormatError(f"{where}.sha256 must be 64 lower-case hex characters, got {_short(digest)}")
        return cls(path, length, digest)


@dataclass(frozen=True, slots=True)
class HealthSpec:
    """The post-install check: sample inputs and the outputs they must give, latency budget and soak.

    ``inputs`` maps every schema input to a nested list; ``expected`` maps some outputs to the values the model must
    reproduce within ``atol`` (and the same top-1 class when ``top1_must_match``). After activation the model soaks
    for ``soak_s`` seconds during which its live error rate must stay at or below ``max_error_rate``.
    """

    inputs: Mapping[str, list[Any]]
    expected: Mapping[str, list[Any]]
    atol: float
    top1_must_match: bool
    latency_budget_ms: float
    soak_s: float
    max_error_rate: float

    @classmethod
    def from_dict(cls, value: object, schema: ModelSchema | None = None, where: str = "health") -> HealthSpec:
        """Parse and validate; with ``schema``, inputs must be exactly its inputs and expected a subset of its
        outputs, each of the declared rank and fixed dimensions."""
        d = _obj(value, where)
        _exact_keys(d, where, _HEALTH_KEYS)
        inputs = dict(_obj(d["inputs"], f"{where}.inputs"))
        expected = dict(_obj(d["expected"], f"{where}.expected"))
        if schema is not None:
            in_specs = {t.name: t for t in schema.inputs}
            out_specs = {t.name: t for t in schema.outputs}
            if set(inputs) != set(in_specs):
                raise FormatError(f"{where}.inputs must give exactly the schema's inputs "
                                  f"{', '.join(sorted(in_specs))}; got {', '.join(map(_short, sorted(inputs)))}")
            unknown = sorted(set(expected) - set(out_specs))
            if unknown:
                raise FormatError(f"{where}.expected names {_short(unknown[0])}, which is not a schema output "
                                  f"({', '.join(sorted(out_specs))})")
            for name, v in inputs.items():
                _check_tensor_values(v, f"{where}.inputs[{name!r}]", in_specs[name].shape)
            for name, v in expected.items():
                _check_tensor_values(v, f"{where}.expected[{name!r}]", out_specs[name].shape)
        else:
            for name, v in [*inputs.items(), *expected.items()]:
                _list_of_shape(v, f"{where}[{_short(name)}]")
        top1 = d["top1_must_match"]
        if not isinstance(top1, bool):
            raise FormatError(f"{where}.top1_must_match must be true or false, got {_short(top1)}")
        return cls(
            inputs=inputs,
            expected=expected,
            atol=_num(d["atol"], f"{where}.atol"),
            top1_must_match=top1,
            latency_budget_ms=_num(d["latency_budget_ms"], f"{where}.latency_budget_ms", lo_open=True),
            soak_s=_num(d["soak_s"], f"{where}.soak_s"),
            max_error_rate=_num(d["max_error_rate"], f"{where}.max_error_rate", hi=1.0),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"inputs": dict(self.inputs), "expected": dict(self.expected), "atol": self.atol,
                "top1_must_match": self.top1_must_match, "latency_budget_ms": self.latency_budget_ms,
                "soak_s": self.soak_s, "max_error_rate": self.max_error_rate}


@dataclass(frozen=True, slots=True)
class Manifest:
    """A parsed, validated manifest (format 1). Signature and expiry are checked by ``verify_bundle``, not here.

    ``drift`` is the validated ``{"baseline": <Summary dict>, "thresholds": {...}}`` object; use
    :meth:`drift_baseline` for the baseline as a :class:`~agent.drift.Summary` in the schema's feature order.
    """

    model: str
    version: int
    created_at: float
    expires_at: float
    runtime: str
    profiles: tuple[str, ...]
    model_file: str
    files: tuple[FileEntry, ...]
    schema: ModelSchema
    drift: Mapping[str, Any]
    health: HealthSpec
    metadata: Mapping[str, Any]

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse manifest bytes: at most 1 MiB, strict canonical JSON, every field valid (:class:`FormatError`)."""
        if isinstance(data, bytes | bytearray | memoryview) and len(data) > MAX_MANIFEST_BYTES:
            raise FormatError(f"manifest is {len(data)} bytes; at most {MAX_MANIFEST_BYTES} are allowed")
        return cls.from_dict(strict_loads(data))

    @classmethod
    def from_dict(cls, doc: object) -> Manifest:
        """Validate a parsed manifest object; :class:`FormatError` names the field (``manifest.files[0].sha256``)."""
        d = _obj(doc, "manifest")
        _exact_keys(d, "manifest", _TOP_KEYS)
        if d["type"] != MANIFEST_TYPE:
            raise FormatError(f"manifest.type = {_short(d['type'])}; expected {MANIFEST_TYPE!r}")
        if isinstance(d["format"], bool) or d["format"] != MANIFEST_FORMAT:
            raise FormatError(f"manifest.format = {_short(d['format'])}; this agent reads format {MANIFEST_FORMAT}")
        try:
            model = validate_model_name(d["model"])
            version = validate_version(d["version"])
        except InvalidModelRefError as exc:
            raise FormatError(f"manifest: {exc}") from None
        created_at = _num(d["created_at"], "manifest.created_at")
        expires_at = _num(d["expires_at"], "manifest.expires_at")
        if not expires_at > created_at:
            raise FormatError(f"manifest.expires_at ({expires_at}) must be later than created_at ({created_at})")
        runtime = d["runtime"]
        if not isinstance(runtime, str) or runtime not in RUNTIME_SUFFIXES:
            raise FormatError(f"manifest.runtime = {_short(runtime)}; allowed: {', '.join(RUNTIME_SUFFIXES)}")
        profiles = cls._profiles(d["profiles"])
        files = cls._files(d["files"])
        model_file = d["model_file"]
        suffix = RUNTIME_SUFFIXES[runtime]
        if not isinstance(model_file, str) or model_file not in {f.path for f in files}:
            raise FormatError(f"manifest.model_file = {_short(model_file)} must be the path of one of manifest.files")
        if not model_file.endswith(suffix):
            raise FormatError(f"manifest.model_file = {model_file!r} must end with {suffix!r} for runtime {runtime!r}")
        try:
            schema = ModelSchema.from_dict(d["schema"])
        except (ValueError, TypeError) as exc:
            raise FormatError(f"manifest.schema: {exc}") from None
        for key, mine, theirs in (("model", model, schema.model), ("version", version, schema.version),
                                  ("runtime", runtime, schema.runtime)):
            if mine != theirs:
                raise FormatError(f"manifest.schema.{key} = {_short(theirs)} differs from manifest.{key} = "
                                  f"{_short(mine)}; they must be equal")
        drift = cls._drift(d["drift"])
        health = HealthSpec.from_dict(d["health"], schema, "manifest.health")
        metadata = dict(_obj(d["metadata"], "manifest.metadata"))
        return cls(model, version, created_at, expires_at, runtime, profiles, model_file, files, schema, drift,
                   health, metadata)

    @staticmethod
    def _profiles(value: object) -> tuple[str, ...]:
        if not isinstance(value, list) or not 1 <= len(value) <= _MAX_PROFILES:
            raise FormatError(f"manifest.profiles must be a list of 1 to {_MAX_PROFILES} firmware profile names")
        for i, name in enumerate(value):
            if not isinstance(name, str) or len(name) > 64 or _PROFILE_RE.fullmatch(name) is None:
                raise FormatError(f"manifest.profiles[{i}] = {_short(name)} is not a firmware profile name "
                                  f"({PROFILE_NAME_PATTERN}, at most 64 characters)")
        if len(set(value)) != len(value):
            raise FormatError("manifest.profiles lists a profile twice")
        return tuple(value)

    @staticmethod
    def _files(value: object) -> tuple[FileEntry, ...]:
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_FILES:
            raise FormatError(f"manifest.files must be a list of 1 to {MAX_FILES} file entries")
        files = tuple(FileEntry.from_dict(v, f"manifest.files[{i}]") for i, v in enumerate(value))
        seen: set[str] = set()
        for f in files:
            if f.path in seen:
                raise FormatError(f"manifest.files lists {f.path!r} twice; paths must be unique")
            seen.add(f.path)
        return files

    @staticmethod
    def _drift(value: object) -> dict[str, Any]:
        d = _obj(value, "manifest.drift")
        _exact_keys(d, "manifest.drift", frozenset({"baseline", "thresholds"}))
        try:
            Summary.from_dict(_obj(d["baseline"], "manifest.drift.baseline"))
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            raise FormatError(f"manifest.drift.baseline: {exc}") from None
        t = _obj(d["thresholds"], "manifest.drift.thresholds")
        _exact_keys(t, "manifest.drift.thresholds", _THRESHOLD_KEYS)
        warn = _num(t["psi_warn"], "manifest.drift.thresholds.psi_warn")
        _num(t["psi_alert"], "manifest.drift.thresholds.psi_alert", lo=warn)
        _int(t["min_samples"], "manifest.drift.thresholds.min_samples", lo=1)
        return dict(d)

    # -- views -------------------------------------------------------------------------------------------------

    @property
    def model_entry(self) -> FileEntry:
        """The :class:`FileEntry` of ``model_file``."""
        return next(f for f in self.files if f.path == self.model_file)

    def drift_baseline(self) -> Summary:
        """The training baseline as a :class:`~agent.drift.Summary`, features in the schema's order.

        Canonical JSON sorts object keys, so the stored ``features`` object is in name order; the layout order
        (the column order of ``Summary.add_rows``) is restored from the schema: the schema's input features first,
        in schema order, then any other baseline features by name.
        """
        summary = Summary.from_dict(self.drift["baseline"])
        order: list[str] = []
        for tensor in self.schema.inputs:
            for feature in tensor.features:
                if feature.name in summary and feature.name not in order:
                    order.append(feature.name)
        placed = set(order)
        order += sorted(n for n in summary.names if n not in placed)
        return Summary((name, summary[name]) for name in order)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (the schema in :meth:`ModelSchema.to_dict` form). For manifests made by
        :func:`build_manifest`, ``canonical_json(m.to_dict())`` is the signed byte string."""
        return {
            "type": MANIFEST_TYPE, "format": MANIFEST_FORMAT, "model": self.model, "version": self.version,
            "created_at": self.created_at, "expires_at": self.expires_at, "runtime": self.runtime,
            "profiles": list(self.profiles), "model_file": self.model_file,
            "files": [f.to_dict() for f in self.files], "schema": self.schema.to_dict(), "drift": dict(self.drift),
            "health": self.health.to_dict(), "metadata": dict(self.metadata),
        }


def _plain(value: Any) -> Any:
    """numpy arrays/scalars to lists/Python numbers (health samples are often built with numpy)."""
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else value


def build_manifest(*, model: str, version: int, created_at: float, expires_at: float, runtime: str,
                   profiles: Sequence[str], model_file: str, files: Sequence[FileEntry | tuple[str, bytes]],
                   schema: ModelSchema | Mapping[str, Any], drift: Mapping[str, Any],
                   health: HealthSpec | Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Build and validate a manifest object (sign ``canonical_json`` of the result).

    ``files`` are :class:`FileEntry` or ``(path, bytes)`` pairs (hashed here). ``schema`` is normalised through
    :class:`ModelSchema`; ``drift["baseline"]`` may be a :class:`~agent.drift.Summary`. Raises :class:`FormatError`
    if the result would not parse, so a release tool cannot produce a bundle every device rejects.
    """
    entries = [f if isinstance(f, FileEntry) else FileEntry.of(f[0], f[1]) for f in files]
    schema_doc = schema.to_dict() if isinstance(schema, ModelSchema) else dict(schema)
    try:
        schema_doc = ModelSchema.from_dict(schema_doc).to_dict()
    except (ValueError, TypeError) as exc:
        raise FormatError(f"manifest.schema: {exc}") from None
    drift_doc = dict(drift)
    if isinstance(drift_doc.get("baseline"), Summary):
        drift_doc["baseline"] = drift_doc["baseline"].to_dict()
    health_doc = health.to_dict() if isinstance(health, HealthSpec) else dict(health)
    for key in ("inputs", "expected"):
        if isinstance(health_doc.get(key), Mapping):
            health_doc[key] = {k: _plain(v) for k, v in health_doc[key].items()}
    doc = {
        "type": MANIFEST_TYPE, "format": MANIFEST_FORMAT, "model": model, "version": version,
        "created_at": created_at, "expires_at": expires_at, "runtime": runtime, "profiles": list(profiles),
        "model_file": model_file, "files": [e.to_dict() for e in entries], "schema": schema_doc, "drift": drift_doc,
        "health": health_doc, "metadata": dict(metadata or {}),
    }
    plain = strict_loads(canonical_json(doc))  # JSON values only, exactly what a device will parse
    Manifest.from_dict(plain)
    result: dict[str, Any] = plain
    return result
