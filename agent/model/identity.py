"""Model identity: a model is named; its versions are integers.

Names are what requests, bundles, rollouts and telemetry use to refer to a model, so they follow the
same rule as device ids on the wire (lower case, digits, ``.``, ``_``, ``-``; at most 64 characters):
they appear in MQTT topics and in file names on the device and must never carry a wildcard or a path.
Versions are plain integers compared as integers, never strings (``"3.10" < "3.9"``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["MODEL_NAME_PATTERN", "InvalidModelRefError", "ModelRef", "validate_model_name", "validate_version"]

MODEL_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_MAX_VERSION = 2**63 - 1


class InvalidModelRefError(ValueError):
    """A model name or version does not follow the identity rules."""


def validate_model_name(name: object) -> str:
    """Return ``name`` if it is a valid model name, else raise :class:`InvalidModelRefError`."""
    if not isinstance(name, str) or MODEL_NAME_PATTERN.fullmatch(name) is None:
        raise InvalidModelRefError(
            f"invalid model name {name!r}: use 1-64 characters from a-z 0-9 . _ - starting with a letter or digit"
        )
    return name


def validate_version(version: object) -> int:
    """Return ``version`` if it is a valid model version (an integer 0..2**63-1, not a bool)."""
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= _MAX_VERSION:
        raise InvalidModelRefError(f"invalid model version {version!r}: versions are integers from 0 to 2**63-1")
    return version


@dataclass(frozen=True, slots=True, order=True)
class ModelRef:
    """One version of one model, e.g. ``cancer-mlp@3``."""

    name: str
    version: int

    def __post_init__(self) -> None:
        validate_model_name(self.name)
        validate_version(self.version)

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """Parse ``name@version``."""
        name, sep, version = text.rpartition("@")
        if not sep or not version.isdigit():
            raise InvalidModelRefError(f"invalid model reference {text!r}: expected NAME@VERSION, e.g. cancer-mlp@3")
        return cls(name, int(version))
