"""The Prometheus text exposition format, one helper for every part of ``/metrics``."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["metric_lines"]


def metric_lines(name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float]]) -> list[str]:
    """``# HELP``, ``# TYPE`` and one line per ``(labels, value)`` sample (``labels`` as ``{k="v"}`` or "").
    Integers are written exactly (no exponent), floats in their shortest round-trip form."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{labels} {value if isinstance(value, int) else repr(float(value))}" for labels, value in samples]
    return lines
