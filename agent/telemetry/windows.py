"""Drift windows: when the open window of a model version closes, and what the closed window becomes.

A :class:`WindowRoller` owns the open window of one model version: its drift accumulators (started empty from a
template :class:`~agent.drift.Summary`, so every window bins on the same edges), its SLI counters and its sample
count. A window closes when it is ``max_seconds`` old or holds ``max_samples`` samples, whichever comes first, or
at once when the model is swapped, unloaded or the agent stops (:meth:`WindowRoller.close`). A closed window is a
:class:`ClosedWindow`: everything of an :class:`agent.protocol.DriftWindow` but its stream sequence number, which
whoever persists it allocates (:meth:`ClosedWindow.message` / :meth:`ClosedWindow.encode` take it), e.g.
``outbox.append("drift", closed.encode)``.

Pure logic: time comes from the injected clock (or the ``now`` argument), nothing here does I/O or starts threads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.drift import FeatureSummary, Summary
from agent.protocol import DriftWindow, encode
from agent.telemetry.slis import WindowSlis

__all__ = ["ClosedWindow", "OpenWindow", "WindowPolicy", "WindowRoller"]


@dataclass(frozen=True, slots=True)
class WindowPolicy:
    """When a window closes: at ``max_seconds`` of age or ``max_samples`` samples, whichever comes first."""

    max_seconds: float = 300.0
    max_samples: int = 10_000

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_seconds) and self.max_seconds > 0):
            raise ValueError(f"max_seconds must be a positive number of seconds, got {self.max_seconds!r}")
        if isinstance(self.max_samples, bool) or not isinstance(self.max_samples, int) or self.max_samples < 1:
            raise ValueError(f"max_samples must be a positive integer, got {self.max_samples!r}")


@dataclass(slots=True)
class OpenWindow:
    """The window being filled: start time, drift accumulators (layout order), SLIs and samples binned."""

    start: float
    features: dict[str, FeatureSummary]
    slis: WindowSlis = field(default_factory=WindowSlis)
    samples: int = 0


@dataclass(frozen=True, slots=True)
class ClosedWindow:
    """A closed window, ready to become a :class:`DriftWindow` once it has a stream sequence number.

    ``features`` (feature name -> layout-1 feature dict) and ``slis`` are plain JSON data; treat them as read-only.
    """

    device_id: str
    model: str
    version: int
    window_start: float
    window_end: float
    samples: int
    features: dict[str, Any]
    slis: dict[str, Any]

    def message(self, stream_seq: int) -> DriftWindow:
        """The wire message with this sequence number on the device's ``drift`` stream."""
        return DriftWindow(device_id=self.device_id, stream_seq=stream_seq, model=self.model, version=self.version,
                           window_start=self.window_start, window_end=self.window_end, samples=self.samples,
                           features=self.features, slis=self.slis)

    def encode(self, stream_seq: int) -> bytes:
        """The encoded frame (``agent.protocol.encode``): fits ``Outbox.append("drift", closed.encode)``."""
        return encode(self.message(stream_seq))


class WindowRoller:
    """The open window of one model version and the rules that close it.

    Idle windows (without any request, load or swap) are restarted instead of closed, so nothing is sent for them.
    ``meta`` is merged into every window's ``slis`` (e.g. ``{"drift_edges": "schema"}``).
    """

    def __init__(
        self,
        *,
        device_id: str,
        model: str,
        version: int,
        template: Summary,
        clock: Callable[[], float],
        policy: WindowPolicy | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self.device_id = device_id
        self.model = model
        self.version = version
        self.template = template
        self.policy = policy or WindowPolicy()
        self.meta = dict(meta or {})
        self._clock = clock
        self._window: OpenWindow | None = None
        self.closed = 0
        """Windows closed (and not idle) so far."""

    # -- the open window -----------------------------------------------------------------------------------------

    @property
    def window(self) -> OpenWindow:
        """The open window (opened now if there is none)."""
        if self._window is None:
            self._window = self._open(self._clock())
        return self._window

    def _open(self, start: float) -> OpenWindow:
        return OpenWindow(start, {name: feature.empty_like() for name, feature in self.template.items()})

    def open_at(self, start: float) -> OpenWindow:
        """Open the window at ``start`` if none is open (e.g. when the model was loaded); return the open one."""
        if self._window is None:
            self._window = self._open(start)
        return self._window

    def room(self) -> int:
        """Samples the open window takes before it is full (at least 1)."""
        return max(1, self.policy.max_samples - self.window.samples)

    def due(self, now: float | None = None) -> str | None:
        """Why the open window must close now: ``"samples"``, ``"time"``, or ``None``."""
        w = self._window
        if w is None:
            return None
        if w.samples >= self.policy.max_samples:
            return "samples"
        t = self._clock() if now is None else now
        if t - w.start >= self.policy.max_seconds:
            return "time"
        return None

    # -- closing -------------------------------------------------------------------------------------------------

    def poll(self, now: float | None = None) -> ClosedWindow | None:
        """Close the open window if it is due (by samples or time); returns it unless it was idle."""
        t = self._clock() if now is None else now
        if self.due(t) is None:
            return None
        return self.close(t)

    def close(self, now: float | None = None) -> ClosedWindow | None:
        """Close the open window now (model swapped/unloaded, agent stopping, or due); the next opens at ``now``.

        Returns the :class:`ClosedWindow`, or ``None`` when the window was idle (nothing to report).
        """
        t = self._clock() if now is None else now
        w = self._window
        if w is None:
            self._window = self._open(t)
            return None
        end = max(t, w.start)  # a clock stepping back must not make window_end < window_start
        self._window = self._open(end)
        if w.slis.empty and w.samples == 0:
            return None
        return self._message(w, end)

    def _message(self, w: OpenWindow, end: float) -> ClosedWindow:
        features: dict[str, Any] = {}
        for name, feature in w.features.items():  # Summary(...).to_dict()["features"], without the wrapper
            features[name] = feature.to_dict()
        self.closed += 1
        return ClosedWindow(self.device_id, self.model, self.version, w.start, end, w.samples, features,
                            w.slis.to_dict(self.meta))
