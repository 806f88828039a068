"""The simulator's single thread: a selector over many sockets, a timer heap, and a thread-safe call queue.

Thousands of simulated devices cannot each have a thread (2 cores, modest memory), so one :class:`Engine` thread
runs everything: socket readiness (``on_readable``/``on_writable`` of the handler registered with a socket), timers
(:meth:`call_later`), periodic tickers (:meth:`every`) and calls posted from other threads
(:meth:`call_soon_threadsafe`, which wakes the selector through a socket pair). All processing happens while holding
:attr:`lock`, so other threads take the same lock to read a consistent snapshot.

A callback that raises is logged and counted (:attr:`errors`); it never stops the loop.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

__all__ = ["Engine", "IoHandler"]

log = logging.getLogger("fleet_server.simulator")

T = TypeVar("T")


class IoHandler(Protocol):
    """What a socket registered with :attr:`Engine.selector` carries as its data."""

    def on_readable(self) -> None: ...

    def on_writable(self) -> None: ...


class Engine:
    """Selector + timers + posted calls on one thread (see the module docs)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_wait_s: float = 0.05) -> None:
        self.clock = clock
        self.max_wait_s = max_wait_s
        self.selector = selectors.DefaultSelector()
        self.lock = threading.RLock()
        self.errors = 0
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._calls: deque[Callable[[], None]] = deque()
        self._tickers: list[list[Any]] = []  # [interval, next_at, fn]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- scheduling (call_at/call_later/every: engine thread, or before start) ----------------------------

    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (when, next(self._order), fn))

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        self.call_at(self.clock() + max(0.0, delay), fn)

    def every(self, interval: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` every ``interval`` seconds (drift-free enough for housekeeping)."""
        self._tickers.append([interval, self.clock() + interval, fn])

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the engine thread as soon as possible (any thread may call this)."""
        self._calls.append(fn)
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def run_sync(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run ``fn`` on the engine thread and return its result (runs inline when not started or on the engine
        thread itself)."""
        if self._thread is None or threading.current_thread() is self._thread:
            with self.lock:
                return fn()
        done = threading.Event()
        box: list[Any] = []

        def call() -> None:
            try:
                box.append((True, fn()))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                box.append((False, exc))
            finally:
                done.set()

        self.call_soon_threadsafe(call)
        if not done.wait(timeout):
            raise TimeoutError(f"the simulator engine did not run the call within {timeout} s")
        ok, value = box[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    # -- lifecycle ---------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fleet-simulator", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.call_soon_threadsafe(lambda: None)
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def close(self) -> None:
        """Release the selector and the wake-up sockets (after :meth:`stop`)."""
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self._wake_r)
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- the loop ----------------------------------------------------------------------------------------

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # the top of a task: log with context, keep the simulator running
            self.errors += 1
            log.exception("simulator callback failed")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.run_once()

    def run_once(self) -> None:
        """One iteration: wait for sockets (at most until the next timer), then handle what is due."""
        now = self.clock()
        wait = self.max_wait_s
        if self._timers:
            wait = min(wait, max(0.0, self._timers[0][0] - now))
        if self._calls:
            wait = 0.0
        ready = self.selector.select(wait)
        with self.lock:
            for key, mask in ready:
                handler = key.data
                if handler is None:
                    with contextlib.suppress(BlockingIOError, OSError):
                        while self._wake_r.recv(4096):
                            pass
                    continue
                if mask & selectors.EVENT_READ:
                    self._guard(handler.on_readable)
                if mask & selectors.EVENT_WRITE:
                    self._guard(handler.on_writable)
            while self._calls:
                self._guard(self._calls.popleft())
            now = self.clock()
            while self._timers and self._timers[0][0] <= now:
                _, _, fn = heapq.heappop(self._timers)
                self._guard(fn)
            for ticker in self._tickers:
                if now >= ticker[1]:
                    ticker[1] = now + ticker[0]
                    self._guard(ticker[2])
