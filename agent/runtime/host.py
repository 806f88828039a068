"""Hosts several models at once and serves requests to them.

A request names a model; the host checks it against that model's schema (every request), runs it through the
model's batcher, and counts what happened. Loading checks the firmware profile's limits (runtime supported,
model size, quantization, the agent's memory budget) and that the schema agrees with what the runtime reports,
so a model that would fail on the first request fails at load instead. ``swap`` loads the new version before it
switches, so requests never see a missing model (seed F7, cold starts).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.model import InputChecker, ModelSchema, RequestError, SchemaError, ServedFlags
from agent.profiles import FirmwareProfile
from agent.runtime.backend import Backend
from agent.runtime.batcher import CombiningBatcher
from agent.runtime.errors import InferenceFailedError, ModelLoadError, UnknownModelError

__all__ = [
    "ErrorObserver", "InferObserver", "InferResult", "LoadedModel", "ModelHost", "ModelSpec", "current_rss_bytes",
    "load_schema_file",
]

Arrays = Mapping[str, npt.NDArray[Any]]
InferObserver = Callable[[Arrays, dict[str, npt.NDArray[Any]], float, ServedFlags | None], None]
"""``observer(inputs, outputs, latency_s, flags)``: called on the request's thread after each successful ``infer``.

``latency_s`` covers the schema check, queueing in the batcher and the runtime call; ``flags`` are the served
out-of-range / non-finite features (``None`` for a clean request). It must be cheap (keep references, do the work
elsewhere) and must not keep the request waiting; an exception it raises is logged and swallowed."""
ErrorObserver = Callable[[str], None]
"""``observer_error(code)``: called for every request counted as an error (same ``code`` as ``ModelStats.errors``)."""
_perf_counter = time.perf_counter
_RUNTIME_OF_SUFFIX = {".onnx": "onnx", ".tflite": "tflite"}
# Rough cost of a loaded model relative to its file size (weights, arena, session); checked before loading.
_LOAD_COST_FACTOR = 3
log = logging.getLogger("edge_agent.runtime")


def current_rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model file and its schema, ready to load."""

    path: Path
    schema: ModelSchema


def load_schema_file(path: Path) -> ModelSchema:
    """Read a ``.schema.json`` file; errors name the file."""
    try:
        doc = json.loads(path.read_bytes())
    except OSError as exc:
        raise ModelLoadError(f"cannot read schema file {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ModelLoadError(f"schema file {path} is not valid JSON: {exc}") from exc
    try:
        return ModelSchema.from_dict(doc)
    except SchemaError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class InferResult:
    """Outputs of one request, and which model version produced them."""

    model: str
    version: int
    outputs: dict[str, npt.NDArray[Any]]
    flags: ServedFlags | None = None


@dataclass(slots=True)
class ModelStats:
    """Counters for one model (read by the local API and, later, the SLI windows)."""

    requests: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    served_out_of_range: Counter[str] = field(default_factory=Counter)
    served_non_finite: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "ok": self.ok,
            "errors": dict(self.errors),
            "served_out_of_range": dict(self.served_out_of_range),
            "served_non_finite": dict(self.served_non_finite),
        }


class LoadedModel:
    """One model version: schema checker + runtime backend + batcher + counters.

    ``observer`` / ``observer_error`` (both ``None`` by default) let telemetry see every request without the host
    knowing about it (``agent.telemetry`` attaches them); with none set the hot path pays two attribute checks.
    """

    def __init__(self, spec: ModelSpec, backend: Backend, *, max_batch: int, max_pending: int, rss_cost: int) -> None:
        self.spec = spec
        self.schema = spec.schema
        self.name = spec.schema.model
        self.version = spec.schema.version
        self.backend = backend
        self.checker = InputChecker(spec.schema)
        self.rss_cost = rss_cost
        self.stats = ModelStats()
        self._stats_lock = threading.Lock()
        self.observer: InferObserver | None = None
        self.observer_error: ErrorObserver | None = None
        self.batcher: CombiningBatcher[Arrays, dict[str, npt.NDArray[Any]]] = CombiningBatcher(
            backend.run, self._run_batch, max_batch=max_batch if backend.dynamic_batch else 1,
            max_pending=max_pending, name=self.name,
        )

    def _run_batch(self, items: Sequence[Arrays]) -> list[dict[str, npt.NDArray[Any]] | BaseException]:
        """One runtime call for several requests: concatenate on the batch axis, split the outputs."""
        sizes = [next(iter(it.values())).shape[0] for it in items]
        try:
            merged = {k: np.concatenate([it[k] for it in items]) for k in items[0]}
            out = self.backend.run(merged)
        except InferenceFailedError:
            # Isolate the bad request: run each on its own so one cannot fail the others.
            results: list[dict[str, npt.NDArray[Any]] | BaseException] = []
            for it in items:
                try:
                    results.append(self.backend.run(it))
                except InferenceFailedError as exc:
                    results.append(exc)
            return results
        bounds = np.cumsum([0, *sizes])
        return [{k: v[bounds[i] : bounds[i + 1]] for k, v in out.items()} for i in range(len(items))]

    def infer(self, inputs: Arrays) -> InferResult:
        observer = self.observer
        started = _perf_counter() if observer is not None else 0.0
        try:
            flags = self.checker.check(inputs)
            outputs = self.batcher.submit(inputs)
        except (RequestError, InferenceFailedError) as exc:
            self.count_error(exc.code)
            raise
        except Exception as exc:  # BusyError and anything unforeseen from the runtime adapter
            self.count_error(getattr(exc, "code", "internal"))
            raise
        with self._stats_lock:
            self.stats.requests += 1
            self.stats.ok += 1
            if flags is not None:
                self.stats.served_out_of_range.update(flags.out_of_range)
                self.stats.served_non_finite.update(flags.non_finite)
        if observer is not None:
            try:
                observer(inputs, outputs, _perf_counter() - started, flags)
            except Exception:  # telemetry must never fail a request that was served
                log.exception("inference observer of %s failed", self.name)
        return InferResult(self.name, self.version, outputs, flags)

    def count_error(self, code: str) -> None:
        with self._stats_lock:
            self.stats.requests += 1
            self.stats.errors[code] += 1
        observer_error = self.observer_error
        if observer_error is not None:
            try:
                observer_error(code)
            except Exception:  # telemetry must never change how a request fails
                log.exception("error observer of %s failed", self.name)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "runtime": self.backend.runtime,
            "accelerator": self.backend.accelerator,
            "fallbacks": [{"wanted": f.wanted, "reason": f.reason} for f in self.backend.fallbacks],
            "adjustments": list(self.backend.adjustments),
            "quantization": self.schema.quantization,
            "inputs": [
                {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.schema.inputs
            ],
            "outputs": [
                {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "labels": list(t.labels)}
                for t in self.schema.outputs
            ],
        }


def _default_loaders() -> dict[str, Callable[[Path, FirmwareProfile], Backend]]:
    def onnx(path: Path, profile: FirmwareProfile) -> Backend:
        from agent.runtime.onnx_backend import load_onnx

        return load_onnx(path, profile.onnx)

    def tflite(path: Path, profile: FirmwareProfile) -> Backend:
        from agent.runtime.litert_backend import load_litert

        return load_litert(path, profile.tflite)

    return {"onnx": onnx, "tflite": tflite}


class ModelHost:
    """The models this agent serves, by name. Thread-safe for concurrent ``infer`` and ``load``/``swap``."""

    def __init__(
        self,
        profile: FirmwareProfile,
        *,
        max_batch: int = 16,
        max_pending: int = 64,
        rss: Callable[[], int] = current_rss_bytes,
        loaders: Mapping[str, Callable[[Path, FirmwareProfile], Backend]] | None = None,
    ) -> None:
        self.profile = profile
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._rss = rss
        self._loaders = dict(loaders) if loaders is not None else _default_loaders()
        self._models: dict[str, LoadedModel] = {}
        self._load_lock = threading.Lock()
        #: Called with each model right after it starts serving (load or swap), e.g. to attach telemetry.
        self.listeners: list[Callable[[LoadedModel], None]] = []

    # -- loading -------------------------------------------------------------------------------------------
    def _check_limits(self, spec: ModelSpec, replacing: LoadedModel | None) -> int:
        schema, path, limits = spec.schema, spec.path, self.profile.limits
        if not self.profile.supports_runtime(schema.runtime):
            raise ModelLoadError(
                f"model '{schema.model}' needs runtime '{schema.runtime}', which firmware profile "
                f"'{self.profile.name}' does not list (it has: {', '.join(self.profile.runtime_order)})"
            )
        suffix_runtime = _RUNTIME_OF_SUFFIX.get(path.suffix)
        if suffix_runtime != schema.runtime:
            raise ModelLoadError(
                f"model file {path.name} does not look like a '{schema.runtime}' model "
                f"(expected a {'.onnx' if schema.runtime == 'onnx' else '.tflite'} file)"
            )
        if not self.profile.supports_quantization(schema.quantization):
            raise ModelLoadError(
                f"model '{schema.model}' is quantized as {schema.quantization}; profile '{self.profile.name}' "
                f"supports {', '.join(sorted(limits.quantizations))}"
            )
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ModelLoadError(f"model file {path} is missing or unreadable: {exc.strerror or exc}") from exc
        if size == 0:
            raise ModelLoadError(f"model file {path} is empty")
        if size > limits.max_model_bytes:
            raise ModelLoadError(
                f"model file {path.name} is {size} bytes; profile '{self.profile.name}' allows at most "
                f"{limits.max_model_bytes} bytes"
            )
        budget = limits.agent_memory_budget_bytes
        rss = self._rss()
        freed = replacing.rss_cost if replacing is not None else 0
        estimate = size * _LOAD_COST_FACTOR
        if rss and rss - freed + estimate > budget:
            raise ModelLoadError(
                f"loading '{schema.model}' (about {estimate // 1024} KiB) would exceed the agent memory budget "
                f"of {budget // 2**20} MiB (in use: {rss // 2**20} MiB); unload a model or use a larger profile"
            )
        return size

    def _build(self, spec: ModelSpec, replacing: LoadedModel | None) -> LoadedModel:
        size = self._check_limits(spec, replacing)
        before = self._rss()
        backend = self._loaders[spec.schema.runtime](spec.path, self.profile)
        try:
            _check_schema_matches(spec, backend)
            after = self._rss()
            budget = self.profile.limits.agent_memory_budget_bytes
            freed = replacing.rss_cost if replacing is not None else 0
            if after and after - freed > budget:
                raise ModelLoadError(
                    f"after loading '{spec.schema.model}' the agent uses {after // 2**20} MiB, over its memory "
                    f"budget of {budget // 2**20} MiB; model not loaded"
                )
        except ModelLoadError:
            backend.close()
            raise
        for fb in backend.fallbacks:
            log.warning(
                "fallback for %s: %s skipped (%s); using %s",
                spec.schema.model, fb.wanted, fb.reason, backend.accelerator,
                extra={"model": spec.schema.model, "wanted": fb.wanted, "reason": fb.reason,
                       "using": backend.accelerator},
            )
        for note in backend.adjustments:
            log.info("runtime setting for %s adjusted: %s", spec.schema.model, note,
                     extra={"model": spec.schema.model, "adjustment": note})
        return LoadedModel(spec, backend, max_batch=self._max_batch, max_pending=self._max_pending,
                           rss_cost=max(after - before, size) if after and before else size)

    def load(self, spec: ModelSpec) -> LoadedModel:
        """Load a model that is not served yet; raises :class:`ModelLoadError` with the reason."""
        with self._load_lock:
            if spec.schema.model in self._models:
                raise ModelLoadError(f"model '{spec.schema.model}' is already loaded; use swap to replace it")
            model = self._build(spec, None)
            self._models = {**self._models, model.name: model}
        log.info("model loaded: %s@%d on %s/%s", model.name, model.version, model.backend.runtime,
                 model.backend.accelerator, extra={"model": model.name, "version": model.version})
        self._notify(model)
        return model

    def swap(self, spec: ModelSpec) -> LoadedModel:
        """Load ``spec`` next to the running version, then switch to it in one step."""
        with self._load_lock:
            old = self._models.get(spec.schema.model)
            model = self._build(spec, old)
            self._models = {**self._models, model.name: model}  # readers see old or new, never neither
        log.info("model swapped: %s -> %s@%d", f"@{old.version}" if old else "(none)", model.name, model.version,
                 extra={"model": model.name, "version": model.version})
        self._notify(model)
        return model

    def _notify(self, model: LoadedModel) -> None:
        for listener in self.listeners:
            try:
                listener(model)
            except Exception:  # a listener must never break serving
                log.exception("model listener failed for %s@%d", model.name, model.version)

    def unload(self, name: str) -> None:
        with self._load_lock:
            models = dict(self._models)
            model = models.pop(name, None)
            self._models = models
        if model is None:
            raise UnknownModelError(f"model '{name}' is not loaded")

    # -- serving -------------------------------------------------------------------------------------------
    def get(self, name: str) -> LoadedModel:
        try:
            return self._models[name]
        except KeyError:
            loaded = ", ".join(sorted(self._models)) or "none"
            raise UnknownModelError(f"model '{name}' is not loaded (loaded: {loaded})") from None

    def infer(self, name: str, inputs: Arrays) -> InferResult:
        """Check ``inputs`` against the model's schema and run them."""
        return self.get(name).infer(inputs)

    def models(self) -> list[LoadedModel]:
        return sorted(self._models.values(), key=lambda m: m.name)

    def close(self) -> None:
        with self._load_lock:
            models, self._models = self._models, {}
        for m in models.values():
            m.backend.close()


def _check_schema_matches(spec: ModelSpec, backend: Backend) -> None:
    """The schema must describe the model the runtime loaded: same names, dtypes and compatible shapes."""
    for kind, declared, actual in (("input", spec.schema.inputs, backend.inputs),
                                   ("output", spec.schema.outputs, backend.outputs)):
        have = {t.name: t for t in actual}
        if {t.name for t in declared} != set(have):
            raise ModelLoadError(
                f"schema of '{spec.schema.model}' declares {kind}s {sorted(t.name for t in declared)} but the "
                f"model file has {sorted(have)}"
            )
        for t in declared:
            real = have[t.name]
            if np.dtype(t.dtype) != real.dtype:
                raise ModelLoadError(
                    f"schema of '{spec.schema.model}' says {kind} '{t.name}' is {t.dtype}; the model has {real.dtype}"
                )
            if len(t.shape) != len(real.shape) or any(
                d not in (r, -1) and r != -1 for d, r in zip(t.shape, real.shape, strict=True)
            ):
                raise ModelLoadError(
                    f"schema of '{spec.schema.model}' says {kind} '{t.name}' has shape {list(t.shape)}; the model "
                    f"has {list(real.shape)}"
                )
