"""Builders for the server tests: a baseline, device windows binned against it, and wire frames."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from agent.drift import CategoricalCounts, Edges, NumericHistogram, Summary
from agent.protocol import DriftWindow, Event, Heartbeat, Message, Status, encode, message_topic
from fleet_server.ingest import Received

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WINDOW_S = 300.0
T0 = 1_750_000_000.0 - (1_750_000_000.0 % 86400)  # a UTC midnight


def baseline(features: int = 3, bins: int = 8, *, seed: int = 0, categorical: bool = True) -> Summary:
    """A training baseline: ``features`` numeric features (quantile edges) plus one categorical one."""
    rng = np.random.default_rng(seed)
    pairs: list[tuple[str, NumericHistogram | CategoricalCounts]] = []
    for i in range(features):
        train = rng.normal(i, 1.0, 5000)
        pairs.append((f"f{i:02d}", NumericHistogram.from_values(Edges.quantiles(train, bins), train)))
    if categorical:
        pairs.append(("weather", CategoricalCounts.from_values(rng.choice(["fog", "rain", "sun"], 1000))))
    return Summary(pairs)


def window_summary(base: Summary, rows: int = 100, *, shift: float = 0.0, seed: int = 1) -> Summary:
    """One device window binned against ``base`` (``shift`` moves every numeric feature: drift)."""
    rng = np.random.default_rng(seed)
    s = Summary.empty_like(base)
    numeric = s.numeric_names
    if numeric:
        s.add_rows(rng.normal(np.arange(len(numeric)) + shift, 1.0, (rows, len(numeric))))
    if "weather" in s:
        s["weather"].add(rng.choice(["fog", "rain", "sun", "snow"], rows))
    return s


def window(device: str, seq: int, base: Summary, *, model: str = "m", version: int = 1, rows: int = 100,
           shift: float = 0.0, start: float | None = None, replaces: tuple[int, int] | None = None,
           seed: int | None = None) -> DriftWindow:
    s = window_summary(base, rows, shift=shift, seed=seq if seed is None else seed)
    ws = T0 + seq * WINDOW_S if start is None else start
    return DriftWindow(device_id=device, stream_seq=seq, model=model, version=version, window_start=ws,
                       window_end=ws + WINDOW_S, samples=rows, replaces=replaces,
                       features=s.to_dict()["features"], slis={"p50_ms": 1.5, "errors": 0})


def event(device: str, seq: int, kind: str = "note", **kw: Any) -> Event:
    return Event(device_id=device, stream_seq=seq, kind=kind, at=T0 + seq, **kw)


def status(device: str, state: str = "online") -> Status:
    return Status(device_id=device, state=state, agent_version="0.1.0", models=(), sent_at=T0)


def heartbeat(device: str, uptime: float = 12.0) -> Heartbeat:
    return Heartbeat(device_id=device, sent_at=T0, uptime_s=uptime)


def frame(msg: Message, at: float | None = None) -> Received:
    return Received(message_topic(msg), encode(msg), time.time() if at is None else at)


def raw(topic: str, payload: bytes) -> Received:
    return Received(topic, payload, time.time())


def assert_same_summary(got: Summary | dict[str, Any], want: Summary) -> None:
    """Counts (bins, underflow, overflow, nan, n, categories) exactly equal; moments equal up to float rounding
    (Chan's merge is associative only up to rounding, and the server merges in its own order)."""
    g = got if isinstance(got, dict) else got.to_dict()
    w = want.to_dict()
    assert list(g["features"]) == list(w["features"])
    for name, wf in w["features"].items():  # type: ignore[union-attr]
        gf = g["features"][name]
        exact = {k: v for k, v in wf.items() if k not in ("mean", "m2")}
        assert {k: gf[k] for k in exact} == exact, name
        for k in ("mean", "m2"):
            if k in wf:
                assert abs(gf[k] - wf[k]) <= 1e-9 * max(1.0, abs(wf[k])), (name, k)
