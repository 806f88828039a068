"""On-device inference: runtime adapters, the micro-batcher and the model host."""

from agent.runtime.errors import (
    BusyError,
    InferenceFailedError,
    ModelLoadError,
    RuntimeErrorBase,
    UnknownModelError,
)
from agent.runtime.host import InferResult, LoadedModel, ModelHost, ModelSpec, load_schema_file

__all__ = [
    "BusyError",
    "InferResult",
    "InferenceFailedError",
    "LoadedModel",
    "ModelHost",
    "ModelLoadError",
    "ModelSpec",
    "RuntimeErrorBase",
    "UnknownModelError",
    "load_schema_file",
]
