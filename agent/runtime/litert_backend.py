"""LiteRT (TensorFlow Lite) adapter: the only module that imports ``ai_edge_litert`` / ``tflite_runtime``.

``ai-edge-litert`` is the maintained successor of ``tflite-runtime`` (2.14 fails with NumPy 2); the old package
is used only where the new one is not installed. Delegates come from the firmware profile in preference order;
a delegate whose library is missing (the Edge TPU's ``libedgetpu.so.1`` off a Coral board) is skipped with the
reason, and the built-in CPU kernels (XNNPACK) are the last resort.

A LiteRT interpreter is not thread-safe and has a fixed batch size (1 here); the batcher serialises calls and
this adapter runs a larger batch row by row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from agent.runtime.backend import Fallback, TensorInfo, usable_threads
from agent.runtime.errors import InferenceFailedError, ModelLoadError

if TYPE_CHECKING:
    from agent.profiles import TfliteSettings

__all__ = ["DELEGATE_LIBRARIES", "LiteRtBackend", "load_litert"]

DELEGATE_LIBRARIES = {"edgetpu": "libedgetpu.so.1", "gpu": "libtensorflowlite_gpu_delegate.so"}
_BUILTIN = {"xnnpack", "cpu"}


def _interpreter_api() -> tuple[Any, Callable[..., Any], str]:
    try:
        from ai_edge_litert import interpreter as lit

        return lit.Interpreter, lit.load_delegate, "litert"
    except ImportError:
        pass
    try:  # pragma: no cover - only where ai-edge-litert is unavailable
        from tflite_runtime import interpreter as tfl

        return tfl.Interpreter, tfl.load_delegate, "tflite-runtime"
    except ImportError as exc:  # pragma: no cover
        raise ModelLoadError(
            "LiteRT is not installed; install the agent with the 'litert' extra (pip install 'edge-fleet[litert]')"
        ) from exc


class LiteRtBackend:
    """One interpreter with tensors allocated; ``run`` sets, invokes and gets."""

    def __init__(self, interp: Any, runtime: str, accelerator: str, fallbacks: tuple[Fallback, ...],
                 adjustments: tuple[str, ...] = ()) -> None:
        self._interp = interp
        self.adjustments = adjustments
        self.runtime = runtime
        self.accelerator = accelerator
        self.fallbacks = fallbacks
        ins, outs = _io_details(interp)
        self._in_index = {d["name"]: d["index"] for d in ins}
        self._out = [(d["name"], d["index"]) for d in outs]
        self.inputs = tuple(TensorInfo(d["name"], np.dtype(d["dtype"]), _free_batch(d)) for d in ins)
        self.outputs = tuple(TensorInfo(d["name"], np.dtype(d["dtype"]), _free_batch(d)) for d in outs)
        self.dynamic_batch = False
        self._set = interp.set_tensor
        self._invoke = interp.invoke
        self._get = interp.get_tensor

    def run(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        rows = next(iter(inputs.values())).shape[0]
        try:
            if rows == 1:
                for name, arr in inputs.items():
                    self._set(self._in_index[name], arr)
                self._invoke()
                return {name: self._get(idx) for name, idx in self._out}
            parts: dict[str, list[npt.NDArray[Any]]] = {name: [] for name, _ in self._out}
            for r in range(rows):
                for name, arr in inputs.items():
                    self._set(self._in_index[name], arr[r : r + 1])
                self._invoke()
                for name, idx in self._out:
                    parts[name].append(self._get(idx))
            return {name: np.concatenate(p) for name, p in parts.items()}
        except (RuntimeError, ValueError) as exc:
            raise InferenceFailedError(f"LiteRT failed: {exc}") from exc

    def close(self) -> None:
        self._interp = None


def _io_details(interp: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Input and output details named as the model's signature names them (``features``), not by the converter's
    internal tensor names (``serving_default_features:0``); models without a signature keep the tensor names."""
    signatures = interp.get_signature_list()
    if not signatures:
        return list(interp.get_input_details()), list(interp.get_output_details())
    key = "serving_default" if "serving_default" in signatures else sorted(signatures)[0]
    runner = interp.get_signature_runner(key)

    def named(details: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
        return [{**d, "name": name} for name, d in details.items()]

    return named(runner.get_input_details()), named(runner.get_output_details())


def _free_batch(detail: Mapping[str, Any]) -> tuple[int, ...]:
    shape = [int(d) for d in detail["shape"]]
    if shape and shape[0] == 1:
        shape[0] = -1  # batch runs row by row
    return tuple(shape)


def load_litert(path: Path, settings: TfliteSettings | None) -> LiteRtBackend:
    """Create an interpreter with the first delegate that loads, falling back in the profile's order."""
    interpreter_cls, load_delegate, runtime = _interpreter_api()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    threads, note = usable_threads(settings.threads if settings is not None else 1)
    adjustments = (note,) if note else ()
    wanted = tuple(settings.delegates) if settings is not None else ()
    fallbacks: list[Fallback] = []
    for name in wanted:
        if name in _BUILTIN:
            break
        lib = DELEGATE_LIBRARIES.get(name)
        if lib is None:
            fallbacks.append(Fallback(name, "unknown delegate"))
            continue
        try:
            delegate = load_delegate(lib)
        except (ValueError, OSError, RuntimeError) as exc:
            fallbacks.append(Fallback(name, f"delegate library {lib} not loadable here: {exc}"))
            continue
        try:
            interp = interpreter_cls(model_content=data, num_threads=threads, experimental_delegates=[delegate])
            interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            fallbacks.append(Fallback(name, f"delegate {name} refused the model: {exc}"))
            continue
        return LiteRtBackend(interp, runtime, name, tuple(fallbacks), adjustments)
    try:
        interp = interpreter_cls(model_content=data, num_threads=threads)
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path} is not a valid TFLite model: {exc}") from exc
    return LiteRtBackend(interp, runtime, "cpu", tuple(fallbacks), adjustments)
