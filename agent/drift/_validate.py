"""Strict readers for the dict form of the layout (private helpers of :mod:`agent.drift`).

The dict form arrives from the network (JSON or msgpack), so nothing in it is trusted: every reader
checks the Python type, the range and the size, and raises :class:`InvalidSummaryError` naming the field
path (e.g. ``features['temp'].counts[3]``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TypeAlias

from agent.drift.errors import InvalidSummaryError

__all__ = [
    "EXTENSION_PREFIX",
    "INT64_MAX",
    "JsonValue",
    "check_keys",
    "join",
    "read_count",
    "read_float",
    "read_float_list",
    "read_int",
    "read_int_list",
    "read_mapping",
    "read_optional_float",
]

JsonValue: TypeAlias = "bool | int | float | str | list[JsonValue] | dict[str, JsonValue] | None"
"""A value of the plain-Python dict form: what ``json`` and ``msgpack`` encode and decode losslessly."""

EXTENSION_PREFIX = "x_"
"""Keys starting with this prefix are ignored (and dropped) by ``from_dict``: forward-compatible extras."""

INT64_MAX = 2**63 - 1


def join(path: str, key: str) -> str:
    """Return the field path of ``key`` inside the object at ``path``."""
    return f"{path}.{key}" if path else key


def read_mapping(value: object, path: str, what: str) -> Mapping[str, object]:
    """Return ``value`` as a mapping with ``str`` keys, or raise naming ``path``."""
    if not isinstance(value, Mapping):
        raise InvalidSummaryError(
            path or "<root>", f"must be an object/map ({what}) but is {type(value).__name__}"
        )
    for key in value:
        if not isinstance(key, str):
            raise InvalidSummaryError(
                path or "<root>", f"has a non-string key {key!r}", "all keys of the layout are strings"
            )
    return value


def check_keys(
    obj: Mapping[str, object], path: str, required: frozenset[str], optional: frozenset[str] = frozenset()
) -> None:
    """Reject missing required keys and unknown keys; keys starting with ``x_`` are tolerated."""
    for key in required:
        if key not in obj:
            raise InvalidSummaryError(join(path, key), "is missing", "every field of the layout is required")
    for key in obj:
        if key in required or key in optional or key.startswith(EXTENSION_PREFIX):
            continue
        raise InvalidSummaryError(
            join(path, key),
            "is not a field of drift layout 1",
            "remove it (a typo?), or prefix private extension fields with 'x_' so readers ignore them",
        )


def read_int(value: object, path: str, *, minimum: int = 0, maximum: int = INT64_MAX) -> int:
    """Return ``value`` as an ``int`` in ``[minimum, maximum]`` (``bool`` and floats are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSummaryError(path, f"must be an integer but is {type(value).__name__} ({value!r})")
    if value < minimum:
        raise InvalidSummaryError(path, f"must be >= {minimum} but is {value}")
    if value > maximum:
        raise InvalidSummaryError(path, f"must be <= {maximum} but is {value}")
    return value


def read_count(value: object, path: str) -> int:
    """Return ``value`` as a non-negative count that fits an int64."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSummaryError(
            path, f"must be a non-negative integer count but is {type(value).__name__} ({value!r})"
        )
    if value < 0:
        raise InvalidSummaryError(path, f"is a count and cannot be negative ({value})")
    if value > INT64_MAX:
        raise InvalidSummaryError(path, f"does not fit an int64 ({value})")
    return value


def read_float(value: object, path: str) -> float:
    """Return ``value`` as a finite ``float``; JSON integers are accepted, booleans are not."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidSummaryError(path, f"must be a number but is {type(value).__name__} ({value!r})")
    try:
        result = float(value)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        raise InvalidSummaryError(path, f"must be finite but is {result!r}")
    return result


def read_optional_float(value: object, path: str) -> float | None:
    """Like :func:`read_float` but ``None`` (JSON ``null``) is allowed."""
    return None if value is None else read_float(value, path)


def _read_list(value: object, path: str, max_len: int) -> list[object] | tuple[object, ...]:
    if not isinstance(value, list | tuple):
        raise InvalidSummaryError(path, f"must be an array but is {type(value).__name__}")
    if len(value) > max_len:  # checked before looking at the items: bounded work on hostile input
        raise InvalidSummaryError(path, f"has {len(value)} entries, more than the maximum {max_len}")
    return value


def read_float_list(value: object, path: str, *, max_len: int) -> list[float]:
    """Return ``value`` as a list of at most ``max_len`` finite floats."""
    items = _read_list(value, path, max_len)
    return [read_float(item, f"{path}[{i}]") for i, item in enumerate(items)]


def read_int_list(value: object, path: str, *, max_len: int) -> list[int]:
    """Return ``value`` as a list of at most ``max_len`` non-negative int64 counts."""
    items = _read_list(value, path, max_len)
    return [read_count(item, f"{path}[{i}]") for i, item in enumerate(items)]
