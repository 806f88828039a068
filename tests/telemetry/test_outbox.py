"""The store-and-forward outbox: sequences, server acks, bounds (merge before drop), poison, crash safety."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.drift import Edges, NumericHistogram, Summary
from agent.protocol import DriftWindow, Event, decode, encode
from agent.telemetry.outbox import (
    Outbox,
    OutboxClosedError,
    OutboxError,
    OutboxLimits,
    OutboxMessageError,
)

REPO = Path(__file__).resolve().parents[2]
DEV = "dev-1"
EDGES = Edges.uniform(0.0, 1.0, 4)


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def window(seq: int, *, model: str = "m", version: int = 1, values: tuple[float, ...] = (0.1, 0.6, 0.9),
           slis: dict[str, object] | None = None) -> bytes:
    hist = NumericHistogram.from_values(EDGES, np.array(values))
    return encode(DriftWindow(device_id=DEV, stream_seq=seq, model=model, version=version,
                              window_start=60.0 * seq, window_end=60.0 * seq + 60, samples=len(values),
                              features={"x": hist.to_dict()},
                              slis=slis if slis is not None else {"format": 1, "requests": len(values),
                                                                   "ok": len(values)}))


def event(seq: int, kind: str = "received") -> bytes:
    return encode(Event(device_id=DEV, stream_seq=seq, kind=kind, at=1.0, command_id="c-1"))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def outbox(tmp_path: Path, clock: Clock) -> Iterator[Outbox]:
    with Outbox(tmp_path / "outbox" / "outbox.sqlite", clock=clock) as ob:
        yield ob


def seqs(ob: Outbox, stream: str = "drift") -> list[int]:
    return [m.seq for m in ob.pending(stream, 10_000)]


# -- sequences ---------------------------------------------------------------------------------------


def test_sequence_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    with Outbox(path) as ob:
        assert [ob.append("drift", window) for _ in range(3)] == [0, 1, 2]
        assert [ob.append("events", event) for _ in range(2)] == [0, 1]
        ob.ack("drift", [(0, 2)])  # acknowledged and deleted: the counter must not go back
    with Outbox(path) as ob:
        assert ob.append("drift", window) == 3
        assert ob.append("events", event) == 2
        stats = ob.stats().streams
        assert (stats["drift"].next_seq, stats["drift"].pending, stats["drift"].acked) == (4, 1, 3)
        assert (stats["events"].next_seq, stats["events"].pending) == (3, 3)
        assert ob.pending("drift")[0].payload == window(3)
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_failed_message_build_does_not_use_a_sequence_number(outbox: Outbox) -> None:
    def boom(seq: int) -> bytes:
        raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError):
        outbox.append("drift", boom)
    with pytest.raises(OutboxMessageError, match="stream_seq 7"):
        outbox.append("drift", lambda seq: window(7))  # built with another number
    with pytest.raises(OutboxMessageError, match="carries DriftWindow"):
        outbox.append("drift", event)  # wrong message type for the stream
    with pytest.raises(OutboxMessageError, match="does not decode"):
        outbox.append("drift", lambda seq: b"\x01garbage")
    with pytest.raises(ValueError, match="unknown stream"):
        outbox.append("status", window)
    with pytest.raises(OutboxError, match="re-entrant"):
        outbox.append("drift", lambda seq: (outbox.append("events", event), window(seq))[1])
    assert outbox.append("drift", window) == 0
    assert seqs(outbox) == [0] and seqs(outbox, "events") == []


def test_closed_outbox_refuses(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.sqlite")
    with pytest.raises(OutboxClosedError):
        ob.pending("drift")
    ob.open().close()
    with pytest.raises(OutboxClosedError):
        ob.append("drift", window)


def test_corrupt_database_is_an_outbox_error(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(OutboxError, match="not a usable outbox"):
        Outbox(path).open()


# -- acknowledgements --------------------------------------------------------------------------------


def test_server_ack_deletes_only_acknowledged_messages(outbox: Outbox) -> None:
    for _ in range(10):
        outbox.append("drift", window)
    for _ in range(3):
        outbox.append("events", event)
    result = outbox.ack("drift", [(0, 2), (5, 5), (40, 50)])  # 40..50 were never sent: ignored
    assert result.acked == 4
    assert seqs(outbox) == [3, 4, 6, 7, 8, 9]
    assert seqs(outbox, "events") == [0, 1, 2]  # another stream's numbers are not touched
    assert outbox.ack("drift", [(0, 2)]).acked == 0  # acking twice is harmless
    assert outbox.stats().streams["drift"].acked == 4


def test_missing_ranges_are_resent_first(outbox: Outbox, clock: Clock) -> None:
    for _ in range(6):
        outbox.append("drift", window)
    outbox.append("events", event)
    result = outbox.ack("drift", [(0, 1)], missing=[(3, 3), (5, 9)])
    assert result.resend == 2  # 3 and 5; 6..9 do not exist
    batch = outbox.drain_batch(1000.0, after={"drift": 5, "events": 0})
    assert [(m.stream, m.seq, m.resend) for m in batch] == [("drift", 3, True), ("drift", 5, True)]
    outbox.mark_sent(batch)
    outbox.reset_drain()
    assert [m.seq for m in outbox.drain_batch(1000.0, after={"drift": 5, "events": 0})] == []


def test_invalid_ack_ranges_are_refused(outbox: Outbox) -> None:
    outbox.append("drift", window)
    with pytest.raises(ValueError):
        outbox.ack("drift", [(3, 1)])
    with pytest.raises(ValueError):
        outbox.ack("drift", [(0, 5), (2, 3)])
    assert seqs(outbox) == [0]


# -- bounds -------------------------------------------------------------------------------------------


def _decoded(ob: Outbox, stream: str = "drift") -> list[DriftWindow]:
    out = []
    for m in ob.pending(stream, 10_000):
        msg = decode(m.payload)
        assert isinstance(msg, DriftWindow)
        out.append(msg)
    return out


def test_outbox_full_merges_oldest_windows_before_dropping(tmp_path: Path, clock: Clock) -> None:
    size = len(window(0))
    limits = OutboxLimits(max_bytes=int(size * 10.5), merge_max=4)
    values = [(0.1 * (i % 10), 0.05, 0.95, 0.5 + 0.01 * i) for i in range(11)]
    originals = [Summary.from_dict({"layout": 1, "features": decode(window(i, values=v)).features})  # type: ignore[union-attr]
                 for i, v in enumerate(values)]
    with Outbox(tmp_path / "o.sqlite", limits=limits, clock=clock) as ob:
        for v in values:
            ob.append("drift", lambda seq, v=v: window(seq, values=v))  # type: ignore[misc]
        stats = ob.stats().streams["drift"]
        assert stats.dropped == 0, "nothing may be dropped while windows can still be merged"
        assert (stats.merges, stats.merged_windows) == (1, 4)
        assert stats.pending_bytes <= limits.max_bytes
        windows = _decoded(ob)
        assert [w.stream_seq for w in windows] == [4, 5, 6, 7, 8, 9, 10, 11]
        merged = windows[-1]
        assert merged.stream_seq == 11 and merged.replaces == (0, 3)  # states the range it stands for
        assert merged.samples == 16 and (merged.window_start, merged.window_end) == (0.0, 240.0)
        expected = originals[0].merge(originals[1]).merge(originals[2]).merge(originals[3])
        assert Summary.from_dict({"layout": 1, "features": merged.features}) == expected  # exact counts
        assert merged.slis == {"format": 1, "requests": 16, "ok": 16}


def test_merged_window_slis_are_the_exact_sum(tmp_path: Path) -> None:
    from agent.telemetry import slis as slis_mod
    parts = []
    for i in range(3):
        s = slis_mod.WindowSlis()
        s.add_ok_batch(np.array([100.0 * (i + 1), 2500.0, 40.0]))
        s.count_error("busy", i)
        s.loads = i % 2
        parts.append(s)
    total = slis_mod.WindowSlis()
    for s in parts:
        total.merge_from(s)
    size = len(window(0, slis=parts[0].to_dict({"drift_edges": "schema"})))
    with Outbox(tmp_path / "o.sqlite", limits=OutboxLimits(max_bytes=int(size * 2.5), merge_max=3)) as ob:
        for s in parts:
            ob.append("drift", lambda seq, s=s: window(seq, slis=s.to_dict({"drift_edges": "schema"})))  # type: ignore[misc]
        merged = _decoded(ob)[-1]
    assert merged.replaces == (0, 2)
    assert merged.slis == total.to_dict({"drift_edges": "schema"})


def test_merge_never_bridges_models_versions_or_gaps(tmp_path: Path, clock: Clock) -> None:
    size = len(window(0))
    models = [("a", 1), ("a", 1), ("a", 2), ("a", 2), ("b", 2), ("a", 2), ("a", 2), ("a", 2)]
    with Outbox(tmp_path / "o.sqlite", clock=clock, limits=OutboxLimits(max_bytes=size * 100)) as ob:
        for model, version in models:
            ob.append("drift", lambda seq, m=model, v=version: window(seq, model=m, version=v))  # type: ignore[misc]
        ob.ack("drift", [(6, 6)])  # a hole between 5 and 7
        ob.limits = OutboxLimits(max_bytes=size * 6 + size // 2, merge_max=16)
        ob.expire()
        windows = _decoded(ob)
    merged = [w for w in windows if w.replaces is not None]
    assert [(w.model, w.version, w.replaces) for w in merged] == [("a", 1, (0, 1))]
    ob2_limits = OutboxLimits(max_bytes=size * 3, merge_max=16)
    with Outbox(tmp_path / "o.sqlite", clock=clock, limits=ob2_limits) as ob:
        windows = _decoded(ob)
        stats = ob.stats().streams["drift"]
    covered: list[int] = []
    for w in windows:
        covered += list(range(w.replaces[0], w.replaces[1] + 1)) if w.replaces else []
        covered.append(w.stream_seq)
    assert len(covered) == len(set(covered)), "a merged window must never stand for a seq another one holds"
    assert 6 not in covered and stats.merges >= 2


def test_long_outage_coarsens_at_most_merge_max_then_drops_the_oldest(tmp_path: Path, clock: Clock) -> None:
    size = len(window(0))
    with Outbox(tmp_path / "o.sqlite", clock=clock, limits=OutboxLimits(max_bytes=size * 10, merge_max=4)) as ob:
        for _ in range(200):
            ob.append("drift", window)
        windows = _decoded(ob)
        stats = ob.stats().streams["drift"]
    assert stats.pending_bytes <= size * 10 and stats.merges > 0 and stats.dropped_bytes > 0
    assert max(w.samples for w in windows) <= 3 * 4, "a merged window stands for at most merge_max windows"
    covered = sorted(s for w in windows for s in ([*range(w.replaces[0], w.replaces[1] + 1)] if w.replaces else [])
                     + [w.stream_seq])
    assert len(covered) == len(set(covered)) and covered[-1] == stats.next_seq - 1  # the newest data is kept


def test_outbox_full_drops_oldest_and_counts_when_nothing_can_merge(tmp_path: Path, clock: Clock) -> None:
    size = len(event(0))
    with Outbox(tmp_path / "o.sqlite", clock=clock, limits=OutboxLimits(max_bytes=size * 5)) as ob:
        for _ in range(8):
            ob.append("events", event)  # events are never merged
        assert seqs(ob, "events") == [3, 4, 5, 6, 7]
        assert ob.stats().streams["events"].dropped_bytes == 3
        wsize = len(window(0))
        ob.limits = OutboxLimits(max_bytes=size * 5 + wsize * 2)
        for i in range(4):  # alternating models: no run to merge, so the oldest drift window goes first
            ob.append("drift", lambda seq, i=i: window(seq, model="ab"[i % 2]))  # type: ignore[misc]
        stats = ob.stats().streams
        assert seqs(ob, "drift") == [2, 3] and stats["drift"].dropped_bytes == 2
        assert seqs(ob, "events") == [3, 4, 5, 6, 7], "events go only when no drift window is left"
        assert ob.stats().dropped == 5


def test_age_bound_drops_old_messages(tmp_path: Path, clock: Clock) -> None:
    with Outbox(tmp_path / "o.sqlite", clock=clock, limits=OutboxLimits(max_age_s=3600)) as ob:
        ob.append("drift", window)
        ob.append("events", event)
        clock.t += 1800
        ob.append("drift", window)
        clock.t += 1801
        assert ob.expire() == 2
        assert seqs(ob) == [1] and seqs(ob, "events") == []
        stats = ob.stats().streams
        assert (stats["drift"].dropped_age, stats["events"].dropped_age) == (1, 1)


# -- poison --------------------------------------------------------------------------------------------


def test_poison_message_missing_k_times_is_parked_and_the_rest_flow(outbox: Outbox, clock: Clock) -> None:
    outbox.limits = OutboxLimits(poison_after=3, missing_grace_s=10)
    for _ in range(5):
        outbox.append("drift", window)
    outbox.drain_batch(1000.0)  # all five sent once
    parked = 0
    rounds = 0
    for _ in range(10):
        rounds += 1
        result = outbox.ack("drift", [(0, 1), (3, 4)], missing=[(2, 2)])  # the server never stores 2
        parked += result.parked
        if parked:
            break
        batch = outbox.drain_batch(1000.0, after={"drift": 4, "events": -1})
        assert [m.seq for m in batch] == [2]
        outbox.mark_sent(batch)
        clock.t += 1
        assert outbox.ack("drift", [], missing=[(2, 2)]).resend == 0, "a resend in flight is not counted again"
        clock.t += 10
    assert parked == 1 and rounds == 4
    assert seqs(outbox) == []
    [p] = outbox.parked()
    assert (p.stream, p.seq, p.reason) == ("drift", 2, "missing") and p.payload == window(2)
    assert outbox.append("drift", window) == 5  # the rest keeps flowing
    assert seqs(outbox) == [5] and outbox.stats().streams["drift"].parked == 1


def test_poison_message_rejected_k_times_is_parked(outbox: Outbox) -> None:
    outbox.limits = OutboxLimits(poison_after=2)
    for _ in range(3):
        outbox.append("events", event)
    assert outbox.ack("events", [(0, 0)], rejected=[(1, 1)]).parked == 0
    assert outbox.pending("events")[0].resend
    assert outbox.ack("events", [(0, 0)], rejected=[(1, 1)]).parked == 1
    assert seqs(outbox, "events") == [2]
    assert [p.reason for p in outbox.parked("events")] == ["rejected"]


def test_parked_table_is_bounded(outbox: Outbox) -> None:
    outbox.limits = OutboxLimits(poison_after=1, max_parked=2)
    for _ in range(4):
        outbox.append("events", event)
    for seq in range(4):
        outbox.ack("events", [], rejected=[(seq, seq)])
    assert [p.seq for p in outbox.parked()] == [2, 3]
    assert outbox.stats().streams["events"].parked_dropped == 2


# -- drain pacing --------------------------------------------------------------------------------------


def test_drain_batch_paces_to_the_rate_events_first(outbox: Outbox, clock: Clock) -> None:
    for _ in range(50):
        outbox.append("drift", window)
    for _ in range(3):
        outbox.append("events", event)
    first = outbox.drain_batch(10.0)  # burst: half a second's worth
    assert [(m.stream, m.seq) for m in first] == [("events", 0), ("events", 1), ("events", 2), ("drift", 0),
                                                  ("drift", 1)]
    assert outbox.drain_batch(10.0, after={"events": 2, "drift": 1}) == []
    clock.t += 0.301
    assert [m.seq for m in outbox.drain_batch(10.0, after={"events": 2, "drift": 1})] == [2, 3, 4]
    clock.t += 100
    assert len(outbox.drain_batch(10.0, after={"events": 2, "drift": 4})) == 5  # never more than the burst
    clock.t += 100
    assert len(outbox.drain_batch(10.0, after={"events": 2, "drift": 4}, limit=2)) == 2
    with pytest.raises(ValueError):
        outbox.drain_batch(0.0)


# -- crash safety --------------------------------------------------------------------------------------

APPEND_LOOP = r"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from tests.telemetry.test_outbox import event, window
from agent.telemetry.outbox import Outbox, OutboxLimits
size = len(window(0))
ob = Outbox(Path(sys.argv[1]), limits=OutboxLimits(max_bytes=size * 40, merge_max=4)).open()
while True:
    d = ob.append("drift", window)
    e = ob.append("events", event)
    if e % 25 == 0 and e:
        ob.ack("events", [(0, e - 10)])
    print(d, e, flush=True)
"""


def _check_consistent(path: Path) -> tuple[int, int]:
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    with Outbox(path) as ob:
        stats = ob.stats().streams
        events = seqs(ob, "events")
        assert events == list(range(events[0], events[-1] + 1)), "event seqs must stay contiguous"
        assert events[-1] == stats["events"].next_seq - 1
        covered: list[int] = []
        for w in _decoded(ob):
            if w.replaces is not None:
                covered += range(w.replaces[0], w.replaces[1] + 1)
            covered.append(w.stream_seq)
        assert len(covered) == len(set(covered)), "two stored windows stand for the same seq"
        # The newest append is there; holes are windows dropped by the byte bound (counted).
        assert max(covered) == stats["drift"].next_seq - 1
        assert stats["drift"].dropped_bytes > 0 or sorted(covered) == list(range(stats["drift"].next_seq))
        return stats["drift"].next_seq, stats["events"].next_seq


@pytest.mark.integration
def test_crash_safety_sigkill_during_append_loop(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    last_drift = last_event = -1
    for kill_after in (150, 400, 90):
        proc = subprocess.Popen([sys.executable, "-c", APPEND_LOOP, str(path), str(REPO)], cwd=REPO,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        for lines, line in enumerate(proc.stdout, 1):
            d, e = map(int, line.split())
            assert d > last_drift and e > last_event, "a sequence number was reused after a crash"
            last_drift, last_event = d, e
            if lines >= kill_after:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(10)
        proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        next_drift, next_event = _check_consistent(path)
        # Everything reported as committed is there (an append may also have committed just before the kill).
        assert next_drift >= last_drift + 1 and next_event >= last_event + 1
        last_drift, last_event = next_drift - 1, next_event - 1


# -- property: what is pending is what was appended and not acknowledged ------------------------------

ops = st.lists(st.one_of(
    st.tuples(st.just("append"), st.sampled_from(["drift", "events"]), st.just(0), st.just(0)),
    st.tuples(st.just("ack"), st.sampled_from(["drift", "events"]), st.integers(0, 30), st.integers(0, 5)),
), max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops)
def test_pending_is_appended_minus_acknowledged(tmp_path: Path, ops: list[tuple[str, str, int, int]]) -> None:
    model: dict[str, list[int]] = {"drift": [], "events": []}
    nxt = {"drift": 0, "events": 0}
    path = tmp_path / f"p-{uuid.uuid4().hex}.sqlite"
    with Outbox(path) as ob:
        for op, stream, first, span in ops:
            if op == "append":
                build = window if stream == "drift" else event
                assert ob.append(stream, build) == nxt[stream]
                model[stream].append(nxt[stream])
                nxt[stream] += 1
            else:
                ob.ack(stream, [(first, first + span)])
                model[stream] = [s for s in model[stream] if not first <= s <= first + span]
        for stream, expected in model.items():
            assert seqs(ob, stream) == expected
            assert ob.stats().streams[stream].next_seq == nxt[stream]
