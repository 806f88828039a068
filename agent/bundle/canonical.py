"""Canonical JSON: the one byte form of every signed document, and the strict parser that enforces it.

Signatures cover exact bytes, so a verifier never re-serialises what it checks: it verifies the bytes it received,
parses them strictly, and requires that they are already canonical. One byte form per document means nothing can
hide in formatting (whitespace, key order, escapes, duplicate keys that two parsers resolve differently).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, NoReturn

from agent.bundle.errors import FormatError

__all__ = ["canonical_json", "strict_loads"]


def canonical_json(obj: Any) -> bytes:
    """``obj`` as canonical JSON bytes (sorted keys, no whitespace, UTF-8, no NaN/Infinity); any ``Mapping`` is
    written as an object.

    Raises :class:`FormatError` for a value JSON cannot represent exactly (NaN, a lone surrogate, bytes, a
    non-string key mix, nesting deeper than Python can recurse).
    """
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                          default=_mapping_as_dict)
        return text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise FormatError(f"cannot encode as canonical JSON: {exc}; use only str keys and JSON values "
                          "(no NaN/Infinity, no bytes, no lone surrogates)") from None


def _mapping_as_dict(value: object) -> dict[str, Any]:
    """Let read-only mappings (``MappingProxyType``...) serialise like the dicts they stand for."""
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not a JSON value")


def _reject_constant(name: str) -> NoReturn:
    raise FormatError(f"JSON contains {name}: NaN and Infinity are not allowed in signed documents")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise FormatError(f"JSON number {text[:40]} overflows a float; numbers must be finite")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise FormatError(f"JSON object has the key {key[:60]!r} twice; duplicate keys are not allowed")
        out[key] = value
    return out


def strict_loads(data: bytes, *, require_canonical: bool = True) -> Any:
    """Parse ``data`` as strict JSON; with ``require_canonical`` also require ``canonical_json(result) == data``.

    Rejected with :class:`FormatError` naming the problem: non-bytes input, invalid UTF-8, syntax errors, trailing
    data, duplicate keys, NaN/Infinity (also as overflowing numbers such as ``1e999``), integers beyond Python's
    digit limit, nesting too deep, lone surrogates, and (when required) any byte difference from the canonical form.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise FormatError(f"expected JSON bytes, got {type(data).__name__}")
    raw = bytes(data)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"not valid UTF-8 at byte {exc.start}: signed documents are UTF-8 JSON") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant,
                         parse_float=_finite_float)
    except FormatError:
        raise
    except json.JSONDecodeError as exc:
        raise FormatError(f"not valid JSON: {exc.msg} at character {exc.pos}") from None
    except RecursionError:
        raise FormatError("JSON is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer longer than Python's digit limit
        raise FormatError(f"not acceptable JSON: {exc}") from None
    canonical = canonical_json(obj)  # also rejects lone surrogates, which cannot be encoded as UTF-8
    if require_canonical and canonical != raw:
        at = next((i for i, (a, b) in enumerate(zip(canonical, raw, strict=False)) if a != b),
                  min(len(canonical), len(raw)))
        raise FormatError(f"JSON is not in canonical form (first difference at byte {at}); write it with "
                          "canonical_json: sorted keys, no whitespace, UTF-8, shortest float repr")
    return obj
