"""The typed form of a firmware profile, its vocabularies, and the errors the loader raises.

Everything here is a plain immutable record: the validation lives in :mod:`agent.profiles._loader`,
so a ``FirmwareProfile`` obtained from the loader is known to satisfy every rule in
``docs/firmware-profiles.md``. Code that builds these records by hand (tests, the fleet server)
takes that responsibility on itself.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, TypeAlias

Architecture: TypeAlias = Literal["aarch64", "x86_64", "armv7l"]
"""CPU architecture as reported by ``platform.machine()`` on Linux."""

RuntimeName: TypeAlias = Literal["onnx", "tflite"]
"""A model runtime the agent can drive: ONNX Runtime or LiteRT (TensorFlow Lite)."""

GraphOptimization: TypeAlias = Literal["disabled", "basic", "extended", "all"]
"""ONNX Runtime graph optimisation level (``ORT_DISABLE_ALL`` ... ``ORT_ENABLE_ALL``)."""

TfliteDelegate: TypeAlias = Literal["edgetpu", "gpu", "xnnpack", "cpu"]
"""A LiteRT delegate; ``xnnpack`` and ``cpu`` both mean LiteRT's built-in CPU kernels."""

Quantization: TypeAlias = Literal["int8", "uint8", "int4", "fp16", "bf16", "fp32"]
"""Numeric format of a model's weights/activations, as declared in a bundle's manifest."""

ARCHITECTURES: tuple[Architecture, ...] = ("aarch64", "x86_64", "armv7l")
RUNTIMES: tuple[RuntimeName, ...] = ("onnx", "tflite")
GRAPH_OPTIMIZATIONS: tuple[GraphOptimization, ...] = ("disabled", "basic", "extended", "all")
TFLITE_DELEGATES: tuple[TfliteDelegate, ...] = ("edgetpu", "gpu", "xnnpack", "cpu")
CPU_TFLITE_DELEGATES: frozenset[TfliteDelegate] = frozenset({"xnnpack", "cpu"})
"""Delegates that mean "LiteRT's own CPU kernels"; always available, so they must come last."""
QUANTIZATIONS: tuple[Quantization, ...] = ("int8", "uint8", "int4", "fp16", "bf16", "fp32")

CPU_EXECUTION_PROVIDER = "CPUExecutionProvider"
"""ONNX Runtime's always-present provider; every provider list must end with it."""

EDGETPU_DELEGATE_LIBRARY = "libedgetpu.so.1"
"""Shared library LiteRT loads (``load_delegate``) for the ``edgetpu`` delegate (Coral runtime)."""

MIB = 1024 * 1024
"""Profiles count memory in MB meaning MiB: ``memory_mb = 1024`` is 1 073 741 824 bytes."""


@dataclass(frozen=True, slots=True)
class OnnxSettings:
    """How the agent configures an ONNX Runtime session on this device.

    ``execution_providers`` is a preference order; the agent uses the first ones that the installed
    onnxruntime build offers and logs why each skipped one was skipped. It always ends with
    ``CPUExecutionProvider`` so there is a provider that cannot be missing.
    """

    execution_providers: tuple[str, ...]
    intra_op_threads: int
    inter_op_threads: int
    allow_spinning: bool
    graph_optimization: GraphOptimization


@dataclass(frozen=True, slots=True)
class TfliteSettings:
    """How the agent configures a LiteRT interpreter on this device.

    ``delegates`` is a preference order (may be empty: plain CPU kernels); a delegate whose library
    or hardware is absent is skipped with a logged reason. ``threads`` sizes the CPU kernels' pool.
    """

    delegates: tuple[TfliteDelegate, ...]
    threads: int


@dataclass(frozen=True, slots=True)
class ProfileLimits:
    """Resource limits the agent enforces, in bytes (the TOML file states them in MiB).

    ``max_model_bytes`` caps the size of a model file the agent accepts for this device;
    ``agent_memory_budget_bytes`` is the resident memory the agent (runtimes included) may use;
    ``quantizations`` are the model formats the device is allowed to run.
    """

    max_model_bytes: int
    agent_memory_budget_bytes: int
    quantizations: frozenset[Quantization]


@dataclass(frozen=True, slots=True)
class FirmwareProfile:
    """A validated firmware profile: what one device class is and how the agent should run on it.

    Field meanings, units and allowed ranges are documented in ``docs/firmware-profiles.md``.
    ``runtime_order`` is the preference order of runtimes; ``onnx``/``tflite`` are set exactly when
    that runtime appears in ``runtime_order``.
    """

    name: str
    display_name: str
    architecture: Architecture
    cores: int
    memory_mb: int
    low_power: bool
    source: tuple[str, ...]
    runtime_order: tuple[RuntimeName, ...]
    onnx: OnnxSettings | None
    tflite: TfliteSettings | None
    limits: ProfileLimits

    def supports_runtime(self, name: str) -> bool:
        """Whether this device may run models with runtime ``name`` (``"onnx"`` or ``"tflite"``)."""
        return name in self.runtime_order

    def supports_quantization(self, quantization: str) -> bool:
        """Whether models quantized as ``quantization`` (e.g. ``"int8"``) are allowed on this device."""
        return quantization in self.limits.quantizations


class ProfileError(ValueError):
    """A firmware profile (or the place profiles are read from) is unusable.

    ``str(error)`` names the file, the field, what is wrong and what is allowed, so it can be shown
    to an operator as is. ``path`` is the filesystem path when one is known (``None`` for
    :func:`parse_profile` on in-memory data); ``field`` is the dotted TOML key at fault, e.g.
    ``"runtimes.onnx.intra_op_threads"``, or ``""`` when the problem concerns the whole file.
    """

    def __init__(self, message: str, *, path: str | None = None, field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.field = field


class UnknownProfileError(ProfileError):
    """No profile with the requested name exists; ``available`` lists the names that do."""

    def __init__(self, name: str, available: Iterable[str], *, path: str | None = None) -> None:
        self.name = name
        self.available = tuple(sorted(available))
        where = f" in {path}" if path else ""
        listing = ", ".join(self.available) if self.available else "(none)"
        close = difflib.get_close_matches(name, self.available, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        super().__init__(
            f"unknown firmware profile {name!r}{hint}; available profiles{where}: {listing}",
            path=path,
            field="name",
        )

    def __reduce__(self) -> tuple[object, ...]:
        """Pickle by name/available/path: the constructor takes those, not the message."""
        return (_rebuild_unknown, (self.name, self.available, self.path))


def _rebuild_unknown(name: str, available: tuple[str, ...], path: str | None) -> UnknownProfileError:
    """Unpickling helper for :class:`UnknownProfileError` (keyword-only ``path``)."""
    return UnknownProfileError(name, available, path=path)
