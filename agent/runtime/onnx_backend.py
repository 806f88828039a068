"""ONNX Runtime adapter: the only module that imports ``onnxruntime``.

Execution providers are taken from the firmware profile in preference order; those this build of ONNX Runtime
does not have (TensorRT or CUDA on a CPU-only machine) are skipped with a recorded reason, and CPU is always
last. Thread counts and spinning come from the profile: spinning burns a core while idle (measured: 106% vs 8%
CPU at 100 req/s), so low-power profiles turn it off.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from agent.runtime.backend import Fallback, TensorInfo, choose_in_order, usable_threads
from agent.runtime.errors import InferenceFailedError, ModelLoadError

if TYPE_CHECKING:
    from agent.profiles import OnnxSettings

__all__ = ["OnnxBackend", "load_onnx"]

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int16)": np.int16,
    "tensor(int32)": np.int32, "tensor(int64)": np.int64, "tensor(bool)": np.bool_,
}
_OPT_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "all": "ORT_ENABLE_ALL"}


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - exercised only on devices without the extra
        raise ModelLoadError(
            "ONNX Runtime is not installed; install the agent with the 'onnx' extra (pip install 'edge-fleet[onnx]')"
        ) from exc
    return onnxruntime


def _ort_errors(ort: Any) -> tuple[type[BaseException], ...]:
    state = ort.capi.onnxruntime_pybind11_state
    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    found = tuple(getattr(state, n) for n in names if hasattr(state, n))
    return (*found, RuntimeError, ValueError, TypeError)


def _info(arg: Any) -> TensorInfo:
    dtype = _ORT_TYPES.get(arg.type)
    if dtype is None:
        raise ModelLoadError(f"tensor '{arg.name}' has type {arg.type}, which the agent does not serve")
    shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in arg.shape)
    return TensorInfo(arg.name, np.dtype(dtype), shape)


class OnnxBackend:
    """One ``InferenceSession``. ``run`` is a thin call: feeds in, named outputs back."""

    runtime = "onnxruntime"

    def __init__(self, session: Any, errors: tuple[type[BaseException], ...], fallbacks: tuple[Fallback, ...],
                 adjustments: tuple[str, ...] = ()) -> None:
        self._session = session
        self._errors = errors
        self.fallbacks = fallbacks
        self.adjustments = adjustments
        self.accelerator: str = session.get_providers()[0]
        self.inputs = tuple(_info(a) for a in session.get_inputs())
        self.outputs = tuple(_info(a) for a in session.get_outputs())
        self._output_names = [o.name for o in self.outputs]
        self.dynamic_batch = all(t.shape and t.shape[0] == -1 for t in self.inputs)

    def run(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        try:
            results = self._session.run(self._output_names, inputs)
        except self._errors as exc:
            raise InferenceFailedError(f"onnxruntime failed: {exc}") from exc
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        self._session = None


def load_onnx(path: Path, settings: OnnxSettings | None) -> OnnxBackend:
    """Create a session for ``path`` with the profile's providers, threads and spinning."""
    ort = _ort()
    errors = _ort_errors(ort)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    preferred: tuple[str, ...] = ("CPUExecutionProvider",)
    notes: list[str] = []
    if settings is not None:
        intra, note = usable_threads(settings.intra_op_threads)
        notes += [note] if note else []
        opts.intra_op_num_threads = intra
        opts.inter_op_num_threads = usable_threads(settings.inter_op_threads)[0]
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.allow_spinning else "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "1" if settings.allow_spinning else "0")
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[settings.graph_optimization])
        preferred = tuple(settings.execution_providers)
    else:
        opts.intra_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    chosen, skipped = choose_in_order(
        preferred, ort.get_available_providers(), why_missing="not available in this onnxruntime build"
    )
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    try:
        session = ort.InferenceSession(data, sess_options=opts, providers=chosen)
    except errors as exc:
        raise ModelLoadError(f"{path} is not a valid ONNX model for this runtime: {exc}") from exc
    active = session.get_providers()
    # A provider can be compiled in yet fail to initialise (no GPU, missing libraries): ORT then drops it.
    skipped += [Fallback(p, "failed to initialise on this machine") for p in chosen if p not in active]
    return OnnxBackend(session, errors, tuple(skipped), tuple(notes))
