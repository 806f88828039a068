"""Combining micro-batcher with a bounded queue.

There is no dispatcher thread. The first caller that finds the model idle runs its own request at once, in its
own thread (no hand-off, so an uncontended call costs two lock operations). Callers that arrive while the model
is busy park in a bounded queue; when the running caller finishes, it takes up to ``max_batch`` parked requests,
makes the first of them the next runner and wakes it. That runner executes them as one batch (one runtime call
where the model has a free batch dimension) and hands results to the others. So under load requests batch
themselves, each caller waits for at most the batch in front of it, and a full queue answers ``busy`` at once:
memory stays bounded and the client learns to back off.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from agent.runtime.errors import BusyError

__all__ = ["CombiningBatcher"]

In = TypeVar("In")
Out = TypeVar("Out")

_WAITING, _LEAD, _DONE = 0, 1, 2


class _Slot(Generic[In, Out]):
    __slots__ = ("batch", "error", "item", "result", "state", "wake")

    def __init__(self, item: In) -> None:
        self.item = item
        self.state = _WAITING
        self.result: Out | None = None
        self.error: BaseException | None = None
        self.batch: list[_Slot[In, Out]] = []
        self.wake = threading.Lock()
        self.wake.acquire()


class CombiningBatcher(Generic[In, Out]):
    """Runs ``run_one`` for a lone request and ``run_batch`` for requests that queued up together.

    ``run_batch`` returns one result or exception per item, in order, so one bad item fails only itself.
    """

    def __init__(
        self,
        run_one: Callable[[In], Out],
        run_batch: Callable[[Sequence[In]], Sequence[Out | BaseException]],
        *,
        max_batch: int,
        max_pending: int,
        name: str = "model",
    ) -> None:
        if max_batch < 1 or max_pending < 1:
            raise ValueError("max_batch and max_pending must be at least 1")
        self._run_one = run_one
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._name = name
        self._lock = threading.Lock()
        self._active = False
        self._pending: deque[_Slot[In, Out]] = deque()
        self.batches = 0
        self.batched_items = 0
        self.rejected_busy = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(self, item: In) -> Out:
        """Run ``item`` (now, or batched with others); raise :class:`BusyError` if the queue is full."""
        with self._lock:
            if not self._active:
                self._active = True
                slot = None
            else:
                if len(self._pending) >= self._max_pending:
                    self.rejected_busy += 1
                    raise BusyError(
                        f"model '{self._name}' is busy: {len(self._pending)} requests already queued "
                        f"(limit {self._max_pending}); retry later"
                    )
                slot = _Slot[In, Out](item)
                self._pending.append(slot)
        if slot is None:
            try:
                return self._run_one(item)
            finally:
                self._hand_off()
        slot.wake.acquire()  # released when our result is ready or when we are made the next runner
        if slot.state == _LEAD:
            self._lead(slot.batch)
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]

    def _lead(self, batch: list[_Slot[In, Out]]) -> None:
        try:
            if len(batch) == 1:
                try:
                    batch[0].result = self._run_one(batch[0].item)
                except Exception as exc:  # noqa: BLE001 - handed to the caller that owns the request
                    batch[0].error = exc
            else:
                self.batches += 1
                self.batched_items += len(batch)
                try:
                    results = self._run_batch([s.item for s in batch])
                except Exception as exc:  # noqa: BLE001 - every caller in the batch gets the error
                    results = [exc] * len(batch)
                for s, r in zip(batch, results, strict=True):
                    if isinstance(r, BaseException):
                        s.error = r
                    else:
                        s.result = r
        finally:
            for s in batch[1:]:
                s.state = _DONE
                s.wake.release()
            batch[0].state = _DONE
            self._hand_off()

    def _hand_off(self) -> None:
        with self._lock:
            if not self._pending:
                self._active = False
                return
            n = min(self._max_batch, len(self._pending))
            batch = [self._pending.popleft() for _ in range(n)]
        leader = batch[0]
        leader.batch = batch
        leader.state = _LEAD
        leader.wake.release()
