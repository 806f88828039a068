"""Firmware profiles: per-device-class settings the agent runs with (a shared contract).

A profile is a TOML file in ``firmware_profiles/`` (shipped in the wheel as
``agent/profiles/builtin/``) saying what a device class is (architecture, cores, memory, power
class) and how the agent should use it (runtime and accelerator preference order, thread counts,
spinning, model-size limit, memory budget, allowed quantizations). This package turns those files
into frozen, validated dataclasses and explains every rejected file precisely; see
``docs/firmware-profiles.md``.

Standard library only, and no I/O at import time: files are read only when a function is called.
"""

from agent.profiles._loader import (
    CORES_RANGE,
    MAX_MODEL_MB_RANGE,
    MEMORY_MB_RANGE,
    MIN_AGENT_MEMORY_BUDGET_MB,
    PROFILE_NAME_PATTERN,
    builtin_profiles_dir,
    load_profile,
    load_profiles,
    parse_profile,
    resolve_profile,
)
from agent.profiles._model import (
    ARCHITECTURES,
    CPU_EXECUTION_PROVIDER,
    CPU_TFLITE_DELEGATES,
    EDGETPU_DELEGATE_LIBRARY,
    GRAPH_OPTIMIZATIONS,
    MIB,
    QUANTIZATIONS,
    RUNTIMES,
    TFLITE_DELEGATES,
    Architecture,
    FirmwareProfile,
    GraphOptimization,
    OnnxSettings,
    ProfileError,
    ProfileLimits,
    Quantization,
    RuntimeName,
    TfliteDelegate,
    TfliteSettings,
    UnknownProfileError,
)

__all__ = [
    "ARCHITECTURES",
    "CORES_RANGE",
    "CPU_EXECUTION_PROVIDER",
    "CPU_TFLITE_DELEGATES",
    "EDGETPU_DELEGATE_LIBRARY",
    "GRAPH_OPTIMIZATIONS",
    "MAX_MODEL_MB_RANGE",
    "MEMORY_MB_RANGE",
    "MIB",
    "MIN_AGENT_MEMORY_BUDGET_MB",
    "PROFILE_NAME_PATTERN",
    "QUANTIZATIONS",
    "RUNTIMES",
    "TFLITE_DELEGATES",
    "Architecture",
    "FirmwareProfile",
    "GraphOptimization",
    "OnnxSettings",
    "ProfileError",
    "ProfileLimits",
    "Quantization",
    "RuntimeName",
    "TfliteDelegate",
    "TfliteSettings",
    "UnknownProfileError",
    "builtin_profiles_dir",
    "load_profile",
    "load_profiles",
    "parse_profile",
    "resolve_profile",
]
