"""Typed errors of the drift summary layout.

Every error raised on purpose by :mod:`agent.drift` derives from :class:`DriftLayoutError`, which is a
:class:`ValueError`, so a caller can catch one class for "this summary / these values cannot be used".
Messages say what was wrong *and* what to do about it, because they end up in device logs and server
responses read by people who did not write the code.
"""

from __future__ import annotations

__all__ = [
    "CategoryCapMismatchError",
    "DriftLayoutError",
    "EdgesMismatchError",
    "FeatureMismatchError",
    "InvalidEdgesError",
    "InvalidInputError",
    "InvalidSummaryError",
    "MergeMismatchError",
    "MomentOverflowError",
    "UnsupportedLayoutError",
]


class DriftLayoutError(ValueError):
    """Base class of every error raised by the drift summary layout."""


class InvalidEdgesError(DriftLayoutError):
    """Bin edges that break the rules (finite, strictly increasing, 2..1025 values)."""


class InvalidInputError(DriftLayoutError):
    """Values handed to ``add``/``add_rows`` that cannot be binned (wrong dtype or shape)."""


class InvalidSummaryError(DriftLayoutError):
    """A dict form (decoded JSON / msgpack) that does not follow the layout.

    ``field`` is the path of the offending field, e.g. ``features['temp'].counts[3]``, so a server can
    point at the exact problem in its response.
    """

    def __init__(self, field: str, problem: str, fix: str = "") -> None:
        self.field = field
        self.problem = problem
        self.fix = fix or "produce the summary with agent.drift (to_dict) or follow docs/drift-layout.md"
        super().__init__(f"invalid drift summary: field {field!r} {problem}; {self.fix}")

    def __reduce__(self) -> tuple[type[InvalidSummaryError], tuple[str, str, str]]:
        """Keep the structured arguments when the error is pickled (e.g. across processes)."""
        return (type(self), (self.field, self.problem, self.fix))


class UnsupportedLayoutError(InvalidSummaryError):
    """The summary declares a ``layout`` version this code does not know."""


class MergeMismatchError(DriftLayoutError):
    """Two summaries that cannot be merged because they were not built from the same baseline."""


class EdgesMismatchError(MergeMismatchError):
    """Two numeric histograms with different bin edges."""


class CategoryCapMismatchError(MergeMismatchError):
    """Two categorical counts with different ``max_categories``."""


class FeatureMismatchError(MergeMismatchError):
    """Two summaries whose feature names, order or kinds differ."""


class MomentOverflowError(DriftLayoutError):
    """Running moments overflowed float64 (values of magnitude around 1e154 or more).

    The histogram is left unchanged when this is raised, so the accumulator stays usable.
    """
