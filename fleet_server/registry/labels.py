"""Device labels and cohort selectors: the rules for keys and values, and matching.

A label is ``key=value`` (``site=berlin``); a device has at most :data:`MAX_LABELS`. A cohort selector is a
``{key: value}`` map that a device matches when it carries every pair; ``{}`` matches no device (the cohort
then has explicit members only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from agent.protocol import IDENTIFIER_PATTERN

__all__ = [
    "LABEL_KEY_PATTERN",
    "LABEL_VALUE_PATTERN",
    "MAX_LABELS",
    "MAX_SELECTOR_KEYS",
    "selector_matches",
]

LABEL_KEY_PATTERN: Final = f"^{IDENTIFIER_PATTERN}$"
"""Label keys follow the wire identifier rule: ``[a-z0-9][a-z0-9._-]{0,63}``."""
LABEL_VALUE_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""Label values: letters (either case), digits, ``.``, ``_``, ``-``; 1 to 64 characters, no ``=``."""
MAX_LABELS: Final = 32
"""Most labels one device may carry."""
MAX_SELECTOR_KEYS: Final = 16
"""Most ``key: value`` pairs in one cohort selector."""


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Whether a device with ``labels`` matches ``selector`` (every pair present; ``{}`` matches nothing)."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())
