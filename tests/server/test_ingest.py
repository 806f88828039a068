"""Telemetry ingestion: idempotent by (device, stream, seq), gaps asked for, batches in one transaction,
bad input counted and survived. Runs on SQLite and PostgreSQL (``db_url``)."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Engine

from agent.protocol import Ack, Status, encode
from fleet_server.db import DatabaseUnavailableError, create_db_engine
from fleet_server.ingest import ACK_MAX_RANGES, BatchWriter, Decoded, Ingestor, Received, StreamSnapshot
from fleet_server.models import Device, DriftWindowRecord, EventRecord, StreamState, table_of
from tests.server.support import T0, baseline, event, frame, heartbeat, raw, status, window

BASE = baseline()


def rows(engine: Engine, model: Any, **where: Any) -> list[dict[str, Any]]:
    t = table_of(model)
    q = sa.select(t)
    for k, v in where.items():
        q = q.where(t.c[k] == v)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(q).mappings()]


def stream(engine: Engine, device: str, name: str = "drift") -> dict[str, Any]:
    (row,) = rows(engine, StreamState, device_id=device, stream=name)
    return row


def ack_for(acks: tuple[Ack, ...], device: str, name: str = "drift") -> Ack:
    (ack,) = [a for a in acks if a.device_id == device and a.stream == name]
    return ack


def test_duplicate_three_times_across_restart_stored_once_and_counted(db_url: str, engine: Engine) -> None:
    msg = frame(window("cam-1", 0, BASE))
    first = BatchWriter(engine, Ingestor(max_frame_bytes=256 * 1024))
    assert first.write([msg]).stored == 1
    assert first.write([msg]).duplicates == 1
    # Restart: a new process, a new engine, fresh in-memory state: the trackers come from stream_states.
    engine2 = create_db_engine(db_url)
    try:
        second = BatchWriter(engine2, Ingestor(max_frame_bytes=256 * 1024))
        result = second.write([msg, msg])
        assert (result.stored, result.duplicates) == (0, 2)
        assert ack_for(result.acks, "cam-1") == Ack(device_id="cam-1", stream="drift", seqs=((0, 0),), missing=())
        assert second.ingestor.metrics.duplicates == 2
    finally:
        engine2.dispose()
    assert len(rows(engine, DriftWindowRecord)) == 1
    st = stream(engine, "cam-1")
    assert (st["duplicates"], st["received_count"], st["ranges"], st["high_water"]) == (3, 1, [[0, 0]], 0)


def test_gaps_are_asked_for_until_resent(writer: BatchWriter) -> None:
    result = writer.write([frame(window("cam-1", s, BASE)) for s in (0, 1, 4, 7)])
    ack = ack_for(result.acks, "cam-1")
    assert ack.seqs == ((0, 1), (4, 4), (7, 7)) and ack.missing == ((2, 3), (5, 6))
    result = writer.write([frame(window("cam-1", s, BASE)) for s in (3, 5, 6)])
    ack = ack_for(result.acks, "cam-1")
    assert ack.seqs == ((0, 1), (3, 7)) and ack.missing == ((2, 2),)
    result = writer.write([frame(window("cam-1", 2, BASE))])
    assert ack_for(result.acks, "cam-1") == Ack(device_id="cam-1", stream="drift", seqs=((0, 7),), missing=())


def test_streams_are_independent_per_device_and_stream(writer: BatchWriter, engine: Engine) -> None:
    result = writer.write([frame(window("cam-1", 0, BASE)), frame(window("cam-2", 0, BASE)),
                           frame(event("cam-1", 0)), frame(event("cam-1", 2))])
    assert result.stored == 4 and result.duplicates == 0
    assert ack_for(result.acks, "cam-1", "events").missing == ((1, 1),)
    assert ack_for(result.acks, "cam-2").seqs == ((0, 0),)
    assert len(rows(engine, EventRecord)) == 2 and len(rows(engine, DriftWindowRecord)) == 2


def test_duplicates_inside_one_batch_stored_once(writer: BatchWriter, engine: Engine) -> None:
    msg = frame(window("cam-1", 3, BASE))
    result = writer.write([msg, msg, msg])
    assert (result.stored, result.duplicates) == (1, 2)
    assert stream(engine, "cam-1")["duplicates"] == 2 and len(rows(engine, DriftWindowRecord)) == 1


def test_merged_window_supersedes_the_range_it_replaces(writer: BatchWriter, engine: Engine) -> None:
    writer.write([frame(window("cam-1", s, BASE)) for s in (0, 1, 2)])
    # The device merged 3..5 while offline and sends them as window 6 (replaces 3..5); also a window 7
    # that supersedes windows 0..1 the server already holds.
    result = writer.write([frame(window("cam-1", 6, BASE, replaces=(3, 5))),
                           frame(window("cam-1", 7, BASE, replaces=(0, 1)))])
    assert ack_for(result.acks, "cam-1") == Ack(device_id="cam-1", stream="drift", seqs=((0, 7),), missing=())
    assert sorted(r["seq"] for r in rows(engine, DriftWindowRecord)) == [2, 6, 7]
    late = writer.write([frame(window("cam-1", 4, BASE)), frame(window("cam-1", 0, BASE))])
    assert (late.stored, late.duplicates) == (0, 2)
    st = stream(engine, "cam-1")
    assert st["ranges"] == [[0, 7]] and st["received_count"] == 8


def test_merged_window_in_the_same_batch_drops_the_windows_it_replaces(writer: BatchWriter, engine: Engine) -> None:
    result = writer.write([frame(window("cam-1", 0, BASE)), frame(window("cam-1", 1, BASE)),
                           frame(window("cam-1", 3, BASE, replaces=(0, 2)))])
    assert ack_for(result.acks, "cam-1").seqs == ((0, 3),)
    assert [r["seq"] for r in rows(engine, DriftWindowRecord)] == [3]
    (w,) = rows(engine, DriftWindowRecord)
    assert (w["replaces_first"], w["replaces_last"]) == (0, 2)


def test_malformed_oversized_and_unknown_messages_are_counted_and_survived(engine: Engine) -> None:
    writer = BatchWriter(engine, Ingestor(max_frame_bytes=4096))
    good = frame(window("cam-1", 0, BASE, rows=10))
    unknown_type = b"\x01" + msgpack.packb({"t": "telepathy", "v": [1, 0], "device_id": "cam-1"})
    future_major = b"\x01" + msgpack.packb({"t": "heartbeat", "v": [2, 0], "device_id": "cam-1"})
    big = window("cam-1", 1, baseline(features=32, bins=16, seed=3), rows=1000)
    batch = [
        raw("fleet/v1/cam-1/drift", b"\x01\xc1garbage"),
        raw("fleet/v1/cam-1/drift", b""),
        raw("fleet/v1/cam-1/heartbeat", unknown_type),
        raw("fleet/v1/cam-1/heartbeat", future_major),
        raw("fleet/v1/cam-1/drift", encode(big, compress=False)),  # > 4096 bytes
        raw("fleet/v1/CAM/drift", encode(heartbeat("cam-1"))),
        raw("fleet/v1/cam-2/heartbeat", encode(heartbeat("cam-1"))),  # speaks for another device
        raw("fleet/v1/cam-1/drift", encode(heartbeat("cam-1"))),  # wrong channel
        raw("elsewhere/x", b"\x01"),
        good,
    ]
    result = writer.write(batch)
    assert result.stored == 1
    m = writer.ingestor.metrics
    assert dict(m.rejected) == {"malformed": 2, "unknown_type": 1, "unsupported_version": 1, "oversized": 1,
                                "bad_topic": 4}
    assert m.received == len(batch) and m.windows_stored == 1
    assert writer.write([frame(window("cam-1", 2, BASE))]).stored == 1  # still ingesting


def test_unknown_device_refused_without_auto_registration(engine: Engine) -> None:
    writer = BatchWriter(engine, Ingestor(max_frame_bytes=256 * 1024, auto_register=False))
    result = writer.write([frame(window("stranger", 0, BASE)), frame(status("stranger"))])
    assert result.stored == 0 and result.acks == ()
    assert writer.ingestor.metrics.rejected["unknown_device"] == 2
    assert rows(engine, Device) == [] and rows(engine, StreamState) == []
    BatchWriter(engine, Ingestor(max_frame_bytes=256 * 1024)).write([frame(heartbeat("stranger"))])  # registers
    assert writer.write([frame(window("stranger", 0, BASE))]).stored == 1


def test_status_heartbeat_and_cleared_status_update_the_device(writer: BatchWriter, engine: Engine) -> None:
    writer.write([frame(status("cam-1"), at=T0), frame(heartbeat("cam-1", 99.0), at=T0 + 5)])
    (dev,) = rows(engine, Device)
    assert (dev["last_status"], dev["agent_version"], dev["uptime_s"], dev["schema_version"]) == (
        "online", "0.1.0", 99.0, "1.0")
    assert dev["last_seen_at"].timestamp() == T0 + 5 and dev["first_seen_at"].timestamp() == T0
    writer.write([frame(Status.offline("cam-1"), at=T0 + 10)])
    assert rows(engine, Device)[0]["last_status"] == "offline"
    writer.write([Received("fleet/v1/cam-1/status", b"", T0 + 20)])
    dev = rows(engine, Device)[0]
    assert dev["last_status"] is None and dev["agent_version"] == "0.1.0" and dev["first_seen_at"].timestamp() == T0


def test_deploy_event_breaking_the_vocabulary_rules_is_stored_and_counted(writer: BatchWriter,
                                                                          engine: Engine) -> None:
    result = writer.write([frame(event("cam-1", 0, "failed", command_id="c1")),  # failed needs a reason
                           frame(event("cam-1", 1, "received", command_id="c1"))])
    assert result.stored == 2 and writer.ingestor.metrics.deploy_rule_violations == 1
    assert [r["kind"] for r in sorted(rows(engine, EventRecord), key=lambda r: r["seq"])] == ["failed", "received"]


def test_one_transaction_per_batch_with_bulk_inserts(writer: BatchWriter, engine: Engine) -> None:
    commits: list[int] = []
    inserts: list[str] = []
    sa_event.listen(engine, "commit", lambda conn: commits.append(1))

    def on_execute(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO DRIFT_WINDOWS"):
            inserts.append(statement)

    sa_event.listen(engine, "before_cursor_execute", on_execute)
    batch = [frame(window(f"cam-{d}", s, BASE, rows=10)) for d in range(10) for s in range(20)]
    batch += [frame(heartbeat(f"cam-{d}")) for d in range(10)] + [frame(event("cam-0", 0))]
    result = writer.write(batch)
    assert result.stored == 201 and len(result.acks) == 11
    assert len(commits) == 1
    assert 1 <= len(inserts) <= 2  # executemany (or insertmanyvalues pages), never one statement per row
    commits.clear()
    writer.write(batch)  # all duplicates: still one transaction
    assert len(commits) == 1


def test_a_message_the_database_refuses_is_isolated(writer: BatchWriter, engine: Engine,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real = writer._transaction

    def refusing(decoded: list[Decoded]) -> Any:
        if any(d.device_id == "poison" for d in decoded):
            raise sa.exc.IntegrityError("INSERT ...", {}, Exception("refused"))
        return real(decoded)

    monkeypatch.setattr(writer, "_transaction", refusing)
    result = writer.write([frame(window("cam-1", 0, BASE)), frame(window("poison", 0, BASE)),
                           frame(window("cam-2", 0, BASE))])
    assert result.stored == 2 and result.rejected == 1
    assert {a.device_id for a in result.acks} == {"cam-1", "cam-2", "poison"}
    # The refused message is named in the Ack's ``rejected`` extension, so the device parks it instead of
    # resending it forever (agent.telemetry.outbox).
    assert ack_for(result.acks, "poison").extra == {"rejected": [[0, 0]]}
    assert ack_for(result.acks, "poison").seqs == ()
    assert writer.ingestor.metrics.rejected["db_error"] == 1 and writer.ingestor.metrics.batches_failed == 1


def test_unreachable_database_raises_and_acks_nothing() -> None:
    engine = create_db_engine("postgresql://nobody@127.0.0.1:9/none")
    writer = BatchWriter(engine, Ingestor(max_frame_bytes=256 * 1024))
    with pytest.raises(DatabaseUnavailableError):
        writer.write([frame(window("cam-1", 0, BASE))])
    assert writer.ingestor.metrics.windows_stored == 0 and writer.ingestor.metrics.batches_failed == 1
    engine.dispose()


# -- the pure core, without a database ------------------------------------------------------------------


def _decoded(msgs: list[Received], ingestor: Ingestor) -> list[Decoded]:
    return ingestor.decode_all(msgs)


def test_range_cap_bounds_a_hostile_stream() -> None:
    ing = Ingestor(max_frame_bytes=256 * 1024, max_ranges=16)
    every_other = [frame(window("evil", 2 * i, BASE, rows=1)) for i in range(40)]
    plan = ing.plan(_decoded(every_other, ing), devices={"evil": {}}, streams={}, now=T0)
    (st,) = plan.streams
    assert len(st["ranges"]) == 16 and plan.rejected["range_cap"] == 24
    (ack,) = plan.acks
    refused = [[2 * i, 2 * i] for i in range(16, 40)]
    assert ack.extra["rejected"] == refused  # the device may stop resending them
    assert not any(a <= 2 * i <= b for a, b in ack.missing for i in range(16, 40))  # and is not asked to
    # A seq adjacent to a held range is still accepted when the cap is reached.
    adjacent = [frame(window("evil", 1, BASE, rows=1))]
    snap = StreamSnapshot(tuple((a, b) for a, b in st["ranges"]))
    plan = ing.plan(_decoded(adjacent, ing), devices={"evil": {}}, streams={("evil", "drift"): snap}, now=T0)
    assert len(plan.windows) == 1 and not plan.rejected


def test_ack_stays_bounded_when_a_stream_has_many_ranges() -> None:
    ing = Ingestor(max_frame_bytes=256 * 1024, max_ranges=100_000)
    held = tuple((3 * i, 3 * i) for i in range(3000))  # 3000 ranges, 2999 gaps
    plan = ing.plan(_decoded([frame(window("cam-1", 9001, BASE, rows=1))], ing), devices={"cam-1": {}},
                    streams={("cam-1", "drift"): StreamSnapshot(held)}, now=T0)
    (ack,) = plan.acks
    assert ack.seqs == ((9001, 9001),)
    assert len(ack.missing) == ACK_MAX_RANGES and ack.missing[-1] == (8998, 9000)
    assert len(encode(ack)) < 64 * 1024


def test_plan_does_not_mutate_its_inputs() -> None:
    ing = Ingestor(max_frame_bytes=256 * 1024)
    snap = StreamSnapshot(((0, 4),), duplicates=1)
    devices = {"cam-1": {"models": [], "last_seen_at": None}}
    plan = ing.plan(_decoded([frame(window("cam-1", 2, BASE)), frame(window("cam-1", 6, BASE))], ing),
                    devices=devices, streams={("cam-1", "drift"): snap}, now=T0)
    assert snap == StreamSnapshot(((0, 4),), duplicates=1) and devices["cam-1"]["last_seen_at"] is None
    assert plan.streams[0]["duplicates"] == 2 and plan.acks[0].missing == ((5, 5),)
    assert ing.metrics.duplicates == 0  # counted only once committed


def test_two_replicas_sharing_the_traffic_never_double_count(db_url: str, engine: Engine) -> None:
    """MQTT v5 shared subscriptions spread messages of one device over replicas: the row locks on the stream
    states keep the result exact (and the fixed lock order keeps the writers from deadlocking)."""
    import threading

    frames = [frame(window(f"cam-{d}", s, BASE, rows=5)) for s in range(30) for d in range(8)]
    redelivered = frames[::7]  # some messages reach both replicas
    parts = [frames[0::2] + redelivered, frames[1::2] + redelivered]
    engines = [create_db_engine(db_url) for _ in parts]
    writers = [BatchWriter(e, Ingestor(max_frame_bytes=256 * 1024)) for e in engines]
    errors: list[BaseException] = []

    def replica(w: BatchWriter, msgs: list[Received]) -> None:
        try:
            for i in range(0, len(msgs), 16):
                w.write(msgs[i:i + 16])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=replica, args=(w, p)) for w, p in zip(writers, parts, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for e in engines:
        e.dispose()
    assert not errors
    assert len(rows(engine, DriftWindowRecord)) == len(frames)
    states = rows(engine, StreamState)
    assert len(states) == 8 and all(s["ranges"] == [[0, 29]] and s["received_count"] == 30 for s in states)
    # Each redelivered message arrived three times (its own replica, then once more at each): 2 duplicates.
    assert sum(s["duplicates"] for s in states) == 2 * len(redelivered)
    assert sum(w.ingestor.metrics.windows_stored for w in writers) == len(frames)
