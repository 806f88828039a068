"""What a model runtime adapter provides, and the pure rules for choosing one.

Each foreign runtime is imported in exactly one adapter module (``onnx_backend``, ``litert_backend``), lazily,
so a device that only runs TFLite never imports ONNX Runtime. Foreign exceptions become
:mod:`agent.runtime.errors` types inside the adapter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["Backend", "Fallback", "TensorInfo", "choose_in_order", "usable_threads"]

Arrays = Mapping[str, npt.NDArray[Any]]


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """A tensor as the runtime sees it (shape uses -1 for free dimensions)."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Fallback:
    """A preferred provider/delegate that was skipped, and why (logged and shown in the model list)."""

    wanted: str
    reason: str


class Backend(Protocol):
    """A loaded model in one runtime. Not required to be thread-safe: the batcher serialises calls."""

    runtime: str
    accelerator: str
    fallbacks: tuple[Fallback, ...]
    adjustments: tuple[str, ...]
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    dynamic_batch: bool

    def run(self, inputs: Arrays) -> dict[str, npt.NDArray[Any]]:
        """Run one request (any batch size the schema allows)."""
        ...

    def close(self) -> None:
        """Release the runtime's resources."""
        ...


def usable_threads(wanted: int) -> tuple[int, str | None]:
    """Cap a profile's thread count at the CPUs this process may run on.

    A profile describes the device family; the process may get fewer CPUs (a cgroup/cpuset, a smaller board,
    a CI runner). More compute threads than CPUs makes tail latency collapse (measured: p99 8 ms instead of
    70 us with 4 spinning threads on 2 CPUs).
    """
    import os

    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        cpus = os.cpu_count() or 1
    if wanted <= cpus:
        return wanted, None
    return cpus, f"profile asks for {wanted} threads; only {cpus} CPU(s) available to this process, using {cpus}"


def choose_in_order(
    preferred: Sequence[str], available: Sequence[str], *, why_missing: str
) -> tuple[list[str], list[Fallback]]:
    """Keep the preferred entries that are available, in preference order; explain the ones skipped."""
    have = set(available)
    chosen = [p for p in preferred if p in have]
    skipped = [Fallback(p, why_missing) for p in preferred if p not in have]
    return chosen, skipped
