"""Model identity and the model I/O schema (a shared contract: stdlib and numpy only)."""

from agent.model.identity import (
    MODEL_NAME_PATTERN,
    InvalidModelRefError,
    ModelRef,
    validate_model_name,
    validate_version,
)
from agent.model.schema import (
    DTYPES,
    SCHEMA_FORMAT,
    FeatureSpec,
    InputChecker,
    ModelSchema,
    Policy,
    RequestError,
    SchemaError,
    ServedFlags,
    TensorSpec,
)

__all__ = [
    "DTYPES",
    "MODEL_NAME_PATTERN",
    "SCHEMA_FORMAT",
    "FeatureSpec",
    "InputChecker",
    "InvalidModelRefError",
    "ModelRef",
    "ModelSchema",
    "Policy",
    "RequestError",
    "SchemaError",
    "ServedFlags",
    "TensorSpec",
    "validate_model_name",
    "validate_version",
]
