"""Post-install health check: the bundle's own samples must give the expected outputs, fast enough.

Run after the new model is loaded and before the install is committed (RAUC/Mender "mark good" step). Samples
come from the signed manifest, so a model that passes its signature but is broken (wrong export, bad
quantization, a runtime incompatibility) is caught here and rolled back. The live soak that follows watches real
traffic's runtime error rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.bundle import HealthSpec
from agent.model import RequestError
from agent.runtime import InferenceFailedError, LoadedModel

__all__ = ["HealthResult", "SoakMonitor", "run_health_check"]


@dataclass(frozen=True, slots=True)
class HealthResult:
    ok: bool
    reason: str  # "ok", "health_check" or "latency"
    message: str
    p50_ms: float | None = None


def run_health_check(model: LoadedModel, spec: HealthSpec, *, repeats: int = 21,
                     clock: Callable[[], float] = time.perf_counter) -> HealthResult:
    """Check outputs (absolute tolerance, and top-1 where asked) and latency (median of ``repeats`` runs)."""
    try:
        inputs = {k: np.asarray(v, dtype=model.checker.dtype_of(k)) for k, v in spec.inputs.items()}
        model.checker.check(inputs)
        outputs = model.backend.run(inputs)
    except (KeyError, ValueError, TypeError, RequestError, InferenceFailedError) as exc:
        return HealthResult(False, "health_check", f"the health-check samples could not be run: {exc}")
    for name, expected_raw in spec.expected.items():
        got = outputs.get(name)
        expected = np.asarray(expected_raw, dtype=np.float64)
        if got is None or got.shape != expected.shape:
            return HealthResult(False, "health_check",
                                f"output '{name}' has shape {None if got is None else list(got.shape)}; "
                                f"the samples expect {list(expected.shape)}")
        diff = float(np.max(np.abs(got.astype(np.float64) - expected))) if expected.size else 0.0
        if not np.isfinite(got).all() or diff > spec.atol:
            return HealthResult(False, "health_check",
                                f"output '{name}' differs from the expected samples by {diff:.4g} "
                                f"(tolerance {spec.atol})")
        if spec.top1_must_match and expected.ndim >= 1 and expected.shape[-1] > 1 and not np.array_equal(
                np.argmax(got, axis=-1), np.argmax(expected, axis=-1)):
            return HealthResult(False, "health_check", f"output '{name}' picks other classes than the samples")
    first = {k: v[:1] for k, v in inputs.items()}
    times = []
    for _ in range(repeats):
        t0 = clock()
        model.backend.run(first)
        times.append(clock() - t0)
    p50_ms = float(np.median(times)) * 1000
    if p50_ms > spec.latency_budget_ms:
        return HealthResult(False, "latency", f"median latency {p50_ms:.2f} ms is over the budget of "
                                              f"{spec.latency_budget_ms} ms", p50_ms)
    return HealthResult(True, "ok", f"samples within {spec.atol}, median latency {p50_ms:.2f} ms", p50_ms)


class SoakMonitor:
    """Watches live traffic on a newly activated model for ``soak_s``: runtime error rate within budget."""

    def __init__(self, model: LoadedModel, spec: HealthSpec, *, started: float, min_requests: int = 20) -> None:
        self.model = model
        self.spec = spec
        self.until = started + spec.soak_s
        self.min_requests = min_requests
        self._base = self._counts()

    def _counts(self) -> tuple[int, int]:
        s = self.model.stats
        return s.requests, s.errors.get("inference_failed", 0)

    def status(self, now: float) -> tuple[str, str]:
        """``("soaking" | "passed" | "failed", message)``."""
        req, err = self._counts()
        req -= self._base[0]
        err -= self._base[1]
        rate = err / req if req else 0.0
        if req >= self.min_requests and rate > self.spec.max_error_rate:
            return "failed", (f"live runtime error rate {rate:.1%} over {req} requests is above "
                              f"{self.spec.max_error_rate:.1%}")
        if now < self.until:
            return "soaking", f"{req} requests, error rate {rate:.1%}"
        return "passed", f"soak of {self.spec.soak_s:.0f} s passed: {req} requests, error rate {rate:.1%}"

    def describe(self) -> dict[str, Any]:
        return {"until": self.until, "max_error_rate": self.spec.max_error_rate}
