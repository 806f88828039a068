"""The runtime's error families. Each tells the caller what to do:

- :class:`ModelLoadError`: the model cannot be served (missing/corrupt file, over a limit, schema and model
  disagree, runtime not installed). Report and keep serving the other models; the agent never starts half-ready.
- :class:`BusyError`: back-pressure; the caller may retry later. Nothing was run.
- :class:`InferenceFailedError`: the runtime raised while running a request; counted, reported, serving goes on.
- :class:`UnknownModelError`: the request named a model that is not loaded.
- :class:`agent.model.RequestError` (not here): the request does not fit the schema; the caller must fix it.
"""

from __future__ import annotations

__all__ = ["BusyError", "InferenceFailedError", "ModelLoadError", "RuntimeErrorBase", "UnknownModelError"]


class RuntimeErrorBase(Exception):
    """Base of the runtime's own errors; ``code`` is stable and machine-readable."""

    code = "runtime_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelLoadError(RuntimeErrorBase):
    code = "model_load_failed"


class BusyError(RuntimeErrorBase):
    code = "busy"


class InferenceFailedError(RuntimeErrorBase):
    code = "inference_failed"


class UnknownModelError(RuntimeErrorBase):
    code = "unknown_model"
