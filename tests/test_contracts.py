"""The shared contracts agree with each other: what one package writes, the other reads.

The golden drift windows on the wire carry histograms in the drift layout, so the server (which decodes the
frame with agent.protocol and merges with agent.drift) and the agent (which builds them) meet on these bytes.
"""

from __future__ import annotations

from pathlib import Path

from agent.drift import LAYOUT_VERSION, NumericHistogram, Summary
from agent.protocol import DriftWindow, decode, encode

GOLDEN = Path(__file__).parent / "golden" / "protocol"


def _window(name: str) -> DriftWindow:
    msg = decode((GOLDEN / f"{name}.msgpack").read_bytes())
    assert isinstance(msg, DriftWindow)
    return msg


def test_golden_drift_window_histograms_are_drift_layout() -> None:
    w = _window("drift_window")
    summary = Summary.from_dict({"layout": LAYOUT_VERSION, "features": dict(w.features)})
    h = summary["brightness"]
    assert isinstance(h, NumericHistogram)
    assert h.counts.tolist() == [3, 40, 500, 600, 57]
    assert (h.underflow, h.overflow, h.nan) == (0, 1, 0)
    assert h.total == 1201


def test_compressed_window_merges_exactly_with_itself() -> None:
    w = _window("drift_window_compressed")
    s = Summary.from_dict({"layout": LAYOUT_VERSION, "features": dict(w.features)})
    merged = s.merge(s)
    for name in s.names:
        a, m = s[name], merged[name]
        assert isinstance(a, NumericHistogram) and isinstance(m, NumericHistogram)
        assert (m.counts == 2 * a.counts).all()
        assert m.overflow == 2 * a.overflow


def test_window_built_from_a_summary_round_trips_through_the_codec() -> None:
    w = _window("drift_window")
    s = Summary.from_dict({"layout": LAYOUT_VERSION, "features": dict(w.features)})
    again = DriftWindow(device_id=w.device_id, stream_seq=w.stream_seq + 1, model=w.model, version=w.version,
                        window_start=w.window_start, window_end=w.window_end, samples=w.samples, replaces=None,
                        features=s.to_dict()["features"], slis=w.slis)
    back = decode(encode(again))
    assert isinstance(back, DriftWindow)
    assert Summary.from_dict({"layout": LAYOUT_VERSION, "features": dict(back.features)}) == s
