"""The combining micro-batcher: pure logic with real threads (no model runtime)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from agent.runtime import BusyError
from agent.runtime.batcher import CombiningBatcher


def test_uncontended_call_runs_in_caller_thread() -> None:
    seen: list[int] = []
    b = CombiningBatcher(lambda x: seen.append(threading.get_ident()) or x * 2,
                         lambda xs: [x * 2 for x in xs], max_batch=8, max_pending=4)
    assert b.submit(21) == 42
    assert seen == [threading.get_ident()]
    assert b.batches == 0


def test_concurrent_requests_are_batched_and_each_gets_its_own_result() -> None:
    gate = threading.Event()
    batch_sizes: list[int] = []

    def one(x: int) -> int:
        gate.wait(5)
        return x * 10

    def many(xs: Sequence[int]) -> list[int | BaseException]:
        batch_sizes.append(len(xs))
        return [x * 10 for x in xs]

    b = CombiningBatcher(one, many, max_batch=16, max_pending=64)
    results: dict[int, int] = {}

    def call(i: int) -> None:
        results[i] = b.submit(i)

    first = threading.Thread(target=call, args=(0,))
    first.start()
    while not b._active:  # the first call holds the model
        time.sleep(0.001)
    others = [threading.Thread(target=call, args=(i,)) for i in range(1, 9)]
    for t in others:
        t.start()
    while b.pending < 8:
        time.sleep(0.001)
    gate.set()
    for t in [first, *others]:
        t.join(5)
    assert results == {i: i * 10 for i in range(9)}
    assert batch_sizes == [8]


def test_full_queue_answers_busy_at_once() -> None:
    gate = threading.Event()
    b = CombiningBatcher(lambda x: gate.wait(5) and x, list, max_batch=4, max_pending=2)
    threads = [threading.Thread(target=b.submit, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.02)
    while b.pending < 2:
        time.sleep(0.001)
    with pytest.raises(BusyError, match="busy"):
        b.submit(99)
    assert b.rejected_busy == 1
    gate.set()
    for t in threads:
        t.join(5)
    assert b.submit(5) == 5  # still serving after the flood


def test_error_in_batch_fails_only_its_own_request() -> None:
    gate = threading.Event()

    def many(xs: Sequence[int]) -> list[int | BaseException]:
        return [ValueError("bad item") if x == 3 else x for x in xs]

    b = CombiningBatcher(lambda x: gate.wait(5) and x, many, max_batch=8, max_pending=8)
    out: dict[int, object] = {}

    def call(i: int) -> None:
        try:
            out[i] = b.submit(i)
        except ValueError as exc:
            out[i] = exc

    ts = [threading.Thread(target=call, args=(i,)) for i in range(5)]
    ts[0].start()
    while not b._active:
        time.sleep(0.001)
    for t in ts[1:]:
        t.start()
    while b.pending < 4:
        time.sleep(0.001)
    gate.set()
    for t in ts:
        t.join(5)
    assert isinstance(out[3], ValueError)
    assert [out[i] for i in (0, 1, 2, 4)] == [0, 1, 2, 4]


def test_stress_every_request_answered_exactly_once() -> None:
    b = CombiningBatcher(lambda x: x + 1, lambda xs: [x + 1 for x in xs], max_batch=8, max_pending=10_000)
    results: list[list[int]] = [[] for _ in range(8)]

    def worker(k: int) -> None:
        for i in range(500):
            results[k].append(b.submit(k * 1000 + i))

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    for k in range(8):
        assert results[k] == [k * 1000 + i + 1 for i in range(500)]
    assert not b._active and b.pending == 0
