"""An embedded MQTT broker for demos and tests: amqtt (pure Python, MQTT 3.1.1) in a background thread.

    broker = EmbeddedBroker()          # 127.0.0.1, a free port
    port = broker.start()              # returns once the listener accepts connections
    ...
    broker.stop()

**Not for production.** It listens without TLS, lets anyone in (anonymous), has no ACLs and keeps nothing on disk;
amqtt keeps no session for an anonymous client, so it queues nothing for an offline subscriber and forgets every
subscription at a disconnect or restart. That is exactly why the wire contract never relies on a broker's queue:
devices keep each message until the *server* acknowledges it, and the server resends commands until answered.
Production runs mosquitto (or an MQTT cluster) with TLS, per-device certificates whose CN is the client id and
username, an ACL with ``%u`` patterns and persistence (``docs/wire-contract.md``, ARCHITECTURE.md "MQTT").

The broker runs on its own asyncio loop in a daemon thread, so synchronous code (a CLI demo, a pytest fixture) can
start and stop it. ``start()`` after ``stop()`` starts a fresh broker on the same port (a broker restart: all
sessions and retained messages are gone). Nothing in ``agent/`` may import this module (the device speaks to any
broker through ``agent.telemetry.mqtt``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any, Self

__all__ = ["BrokerError", "EmbeddedBroker"]

log = logging.getLogger("fleet_server.broker")


class BrokerError(RuntimeError):
    """The embedded broker could not start (port taken, bad address) or stop in time."""


class _SnapshotDict(dict[str, Any]):
    """A dict whose iteration runs over a copy of its keys or items, so it may change meanwhile."""

    def __iter__(self) -> Any:
        return iter(list(super().keys()))

    def items(self) -> Any:
        return list(super().items())


class EmbeddedBroker:
    """amqtt's broker on ``host:port`` (``port=0``: a free port, reported by :meth:`start` and :attr:`port`)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, start_timeout_s: float = 10.0,
                 shutdown_timeout_s: float = 3.0) -> None:
        self.host = host
        self._port = port
        self._start_timeout_s = start_timeout_s
        self._shutdown_timeout_s = shutdown_timeout_s
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None

    @property
    def port(self) -> int:
        """The listening port (the one chosen by the OS once started with ``port=0``)."""
        return self._port

    @property
    def running(self) -> bool:
        return self._thread is not None

    def config(self) -> dict[str, Any]:
        """The amqtt configuration: one plain TCP listener, anonymous clients, no $SYS, no packet logging."""
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self._port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

    def start(self) -> int:
        """Start the broker thread; return the port once the listener accepts connections."""
        if self._thread is not None:
            return self._port
        ready = threading.Event()
        failure: list[Exception] = []
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._astart())
            except Exception as exc:  # noqa: BLE001 - handed to start()'s caller, which raises BrokerError
                failure.append(exc)
                ready.set()
                self._close_loop(loop)
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                self._close_loop(loop)

        thread = threading.Thread(target=run, name=f"embedded-broker-{self.host}:{self._port}", daemon=True)
        self._loop = loop
        thread.start()
        if not ready.wait(self._start_timeout_s):
            raise BrokerError(f"the embedded broker did not start within {self._start_timeout_s} s")
        if failure:
            thread.join(self._start_timeout_s)
            self._loop = None
            raise BrokerError(f"the embedded broker cannot listen on {self.host}:{self._port}: {failure[0]}") \
                from failure[0]
        self._thread = thread
        log.info("embedded MQTT broker listening on %s:%s (anonymous, no TLS: demos and tests only)",
                 self.host, self._port)
        return self._port

    async def _astart(self) -> None:
        from amqtt.broker import Broker  # the server extra; imported only when a broker is started

        writers = self._writers

        class TrackingBroker(Broker):  # type: ignore[misc]  # amqtt is untyped
            """Remembers client connections so :meth:`EmbeddedBroker.stop` can cut every one of them."""

            async def stream_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                       listener_name: str) -> None:
                writers.add(writer)
                try:
                    await super().stream_connected(reader, writer, listener_name)
                finally:
                    writers.discard(writer)

            async def _publish_retained_messages_for_subscription(self, subscription: Any, session: Any) -> None:
                # amqtt 0.12 replays every topic's retained messages to a reconnecting client, subscribed or not
                # (another device's retained status reached it): only topics this session subscribes to.
                subscribers = self._subscriptions.get(subscription[0], ())
                if any(s.client_id == session.client_id for s, _ in subscribers):
                    await super()._publish_retained_messages_for_subscription(subscription, session)

        broker = TrackingBroker(self.config(), loop=asyncio.get_running_loop())
        # amqtt 0.12 iterates this dict across awaits and deletes from it while iterating ("dictionary changed
        # size during iteration" when many clients connect at once): iterate over snapshots instead.
        broker._subscriptions = _SnapshotDict(broker._subscriptions)
        await broker.start()
        self._broker = broker
        # amqtt has no public accessor for the bound address; its listener servers are asyncio.Server objects.
        server = broker._servers["default"].instance
        self._port = int(server.sockets[0].getsockname()[1])

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the broker down (clients are disconnected) and join its thread. Idempotent."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        try:
            future = asyncio.run_coroutine_threadsafe(self._astop(), loop)
            future.result(timeout)
        except (TimeoutError, RuntimeError, OSError) as exc:
            log.warning("embedded broker shutdown was not clean: %s", exc)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            self._thread = None
            self._loop = None
            self._broker = None
        if thread.is_alive():
            raise BrokerError(f"the embedded broker thread did not stop within {timeout} s")

    async def _astop(self) -> None:
        """Stop listening at once (the port is free for a restart), let amqtt shut down for a bounded time (its
        handler shutdown can wait forever on a reader task cancelled before it ran), then cut every client
        connection that is still open, so clients notice the broker is gone without waiting for keepalive."""
        broker = self._broker
        if broker is None:
            return
        for server in list(broker._servers.values()):
            server.instance.close()
        try:
            await asyncio.wait_for(broker.shutdown(), self._shutdown_timeout_s)
        except Exception:  # best effort: whatever amqtt raised, the connections are cut below
            log.warning("amqtt did not shut down cleanly within %s s; cutting connections",
                        self._shutdown_timeout_s, exc_info=True)
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    @staticmethod
    def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
        """Cancel whatever amqtt left running, then close the loop (no 'Task was destroyed' warnings)."""
        tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(RuntimeError):
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
