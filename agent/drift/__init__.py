"""Drift summaries: the shared layout of feature histograms used by the agent, the server and bundles.

The device agent bins its inference inputs into a :class:`Summary` built with
:meth:`Summary.empty_like` from the model bundle's training baseline; the fleet server decodes
summaries with :meth:`Summary.from_dict`, merges them exactly with :meth:`Summary.merge` and scores
them against the same baseline. Fixed edges taken from the baseline are what make a device window, a
merged fleet view and the training data directly comparable.

This package is a contract: it imports only the standard library and numpy and does no I/O. The
layout is documented in ``docs/drift-layout.md`` and pinned by ``tests/golden/drift_summary_v1.json``.
"""

from agent.drift._validate import JsonValue
from agent.drift.batch import BatchBinner
from agent.drift.categorical import (
    CATEGORICAL_KIND,
    DEFAULT_MAX_CATEGORIES,
    MAX_CATEGORIES_LIMIT,
    CategoricalCounts,
)
from agent.drift.edges import MAX_BINS, Edges
from agent.drift.errors import (
    CategoryCapMismatchError,
    DriftLayoutError,
    EdgesMismatchError,
    FeatureMismatchError,
    InvalidEdgesError,
    InvalidInputError,
    InvalidSummaryError,
    MergeMismatchError,
    MomentOverflowError,
    UnsupportedLayoutError,
)
from agent.drift.layout import LAYOUT_VERSION, FeatureSummary, Summary, feature_from_dict
from agent.drift.numeric import NUMERIC_KIND, NumericHistogram
from agent.drift.scores import (
    DEFAULT_PSI_EPS,
    LEVELS,
    ChiSquareResult,
    DriftReport,
    DriftScorer,
    DriftThresholds,
    FeatureScore,
    Hysteresis,
    HysteresisState,
    InvalidThresholdsError,
    Level,
    Metric,
    StateLevel,
    chi2_sf,
    chi_square,
    js_distance,
    ks_binned,
    nan_rate_delta,
    psi,
    psi_counts,
    regularized_upper_gamma,
    score_many,
    score_merged,
    score_summary,
    wasserstein1,
)

__all__ = [
    "CATEGORICAL_KIND",
    "DEFAULT_MAX_CATEGORIES",
    "LAYOUT_VERSION",
    "MAX_BINS",
    "MAX_CATEGORIES_LIMIT",
    "NUMERIC_KIND",
    "BatchBinner",
    "CategoricalCounts",
    "CategoryCapMismatchError",
    "DriftLayoutError",
    "Edges",
    "EdgesMismatchError",
    "FeatureMismatchError",
    "FeatureSummary",
    "InvalidEdgesError",
    "InvalidInputError",
    "InvalidSummaryError",
    "JsonValue",
    "MergeMismatchError",
    "MomentOverflowError",
    "NumericHistogram",
    "Summary",
    "UnsupportedLayoutError",
    "feature_from_dict",
]

# Drift scores (agent.drift.scores).
__all__ += [
    "DEFAULT_PSI_EPS",
    "LEVELS",
    "ChiSquareResult",
    "DriftReport",
    "DriftScorer",
    "DriftThresholds",
    "FeatureScore",
    "Hysteresis",
    "HysteresisState",
    "InvalidThresholdsError",
    "Level",
    "Metric",
    "StateLevel",
    "chi2_sf",
    "chi_square",
    "js_distance",
    "ks_binned",
    "nan_rate_delta",
    "psi",
    "psi_counts",
    "regularized_upper_gamma",
    "score_many",
    "score_merged",
    "score_summary",
    "wasserstein1",
]
