"""Device telemetry: streaming drift summaries and inference SLIs per model version, rolled into windows.

* :class:`TelemetryHub` — attach it to loaded models (``hub.attach(model, baseline)``); one worker thread bins
  what the inference threads buffered and closes windows; each :class:`ClosedWindow` goes to ``on_closed`` (the
  outbox numbers it: ``outbox.append("drift", closed.encode)``), or the hub numbers it with ``seq()`` and the
  :class:`~agent.protocol.DriftWindow` goes to ``on_window`` or waits in :meth:`TelemetryHub.drain_windows`.
* :class:`DriftRecorder` — one model version: the hot-path observer, batched binning, its :class:`WindowRoller`.
* :class:`WindowRoller` / :class:`WindowPolicy` / :class:`ClosedWindow` — when a window closes (time, samples,
  swap) and what it becomes.
* :class:`WindowSlis`, :func:`latency_quantiles` — the ``slis`` map of a window and p50/p95/p99 from it.

See ``docs/telemetry.md`` ("On the device").
"""

from agent.telemetry.recorder import (
    PROBABILITY_BINS,
    SCHEMA_BINS,
    DriftPlan,
    DriftRecorder,
    TelemetryHub,
    build_plan,
    schema_edges,
)
from agent.telemetry.slis import (
    LATENCY_BINS,
    LATENCY_BINS_PER_DECADE,
    LATENCY_EDGES_US,
    SLIS_FORMAT,
    WindowSlis,
    latency_bin,
    latency_bin_counts,
    latency_quantiles,
)
from agent.telemetry.windows import ClosedWindow, OpenWindow, WindowPolicy, WindowRoller

__all__ = [
    "LATENCY_BINS",
    "LATENCY_BINS_PER_DECADE",
    "LATENCY_EDGES_US",
    "PROBABILITY_BINS",
    "SCHEMA_BINS",
    "SLIS_FORMAT",
    "ClosedWindow",
    "DriftPlan",
    "DriftRecorder",
    "OpenWindow",
    "TelemetryHub",
    "WindowPolicy",
    "WindowRoller",
    "WindowSlis",
    "build_plan",
    "latency_bin",
    "latency_bin_counts",
    "latency_quantiles",
    "schema_edges",
]
