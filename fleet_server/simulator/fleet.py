"""``SimulatedFleet``: many simulated agents on one MQTT broker, for tests, benchmarks and the demo.

    fleet = SimulatedFleet(Scenario(groups=(DeviceGroup(count=500, labels={"ring": "canary"}),)),
                           "127.0.0.1", 1883, trust_root=root)
    fleet.start()
    assert fleet.wait_connected(30)
    ...                                    # the server sends orders; devices answer over MQTT
    fleet.kinds("sim-00001", "cmd-1")      # ['received', 'downloading', 'verified', 'installed', 'healthy']
    fleet.stats().events_sent["healthy"]
    fleet.stop()

Connection model (``mode``): ``"per_device"`` gives every device its own MQTT connection with client id = device id
and its last will (what a real fleet looks like to the broker: per-device wills, sessions and ACLs);
``"multiplexed"`` puts ``devices_per_connection`` devices on one connection (no per-device will: a device going
offline publishes the retained offline status itself, and commands that reach it while it is away are dropped and
counted, like a broker that queues nothing; the server resends). ``"auto"`` picks per-device up to
``auto_per_device_max`` (200) devices: paho clients in the same process that use paho's threaded loop (the server's
``MqttIngestService``) call ``select()``, which fails once descriptors pass 1024, and an in-process embedded broker
doubles the descriptors per connection. Either way one engine thread runs everything (:mod:`.engine`).

Determinism: device ids, labels, outcomes, jitter and window variants derive from the scenario seed
(:func:`~fleet_server.simulator.scenario.plan_devices`); wall-clock timing and the server's ordering are not part of
it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent.bundle import DeploymentOrder, TrustRoot
from agent.protocol import Channel, ProtocolError, device_topic, parse_device_topic
from fleet_server.simulator.device import EventView, SimDevice
from fleet_server.simulator.download import DownloadResult, fetch_bundle
from fleet_server.simulator.engine import Engine
from fleet_server.simulator.scenario import DevicePlan, Outcome, Scenario, plan_devices
from fleet_server.simulator.stats import SimStats
from fleet_server.simulator.transport import LinkSettings, MqttLink
from fleet_server.simulator.windows import Baselines, WindowFactory

__all__ = ["DeviceView", "Mode", "SimulatedFleet"]

log = logging.getLogger("fleet_server.simulator")

Mode = Literal["auto", "per_device", "multiplexed"]

_CHANNELS = (Channel.STATUS, Channel.EVENTS, Channel.DRIFT, Channel.HEARTBEAT)


@dataclass(frozen=True)
class DeviceView:
    """A snapshot of one simulated device."""

    device_id: str
    group: str
    labels: Mapping[str, str]
    profile: str
    outcome: Outcome
    offline_planned: bool
    connected: bool
    online: bool
    models: Mapping[str, int]
    previous: Mapping[str, int]
    events: tuple[EventView, ...]
    applied: Mapping[str, tuple[str, str | None]]
    unacked: Mapping[str, int]


class _Host:
    """The :class:`~fleet_server.simulator.device.DeviceHost` of a fleet's devices: engine clock and timers, the
    fleet's links for publishing, a thread pool for real downloads."""

    def __init__(self, fleet: SimulatedFleet) -> None:
        self.fleet = fleet
        self.stats = fleet._stats

    def now(self) -> float:
        return self.fleet.engine.clock()

    def wall(self) -> float:
        return self.fleet._wall()

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        self.fleet.engine.call_later(delay, fn)

    def publish(self, device: SimDevice, channel: Channel, payload: bytes, *, retain: bool = False) -> bool:
        if not device.online:
            return False
        fleet = self.fleet
        return fleet._link_of[device.device_id].publish(fleet._topic(device.device_id, channel), payload,
                                                        retain=retain)

    def download(self, device: SimDevice, order: DeploymentOrder, done: Callable[[str | None], None]) -> None:
        fleet = self.fleet
        cfg = fleet.scenario.download
        if fleet._pool is None:
            fleet._pool = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="sim-download")
        assert order.url is not None and order.token is not None and order.bundle_length is not None
        future = fleet._pool.submit(fetch_bundle, order.url, order.token, mode=cfg.mode, range_bytes=cfg.range_bytes,
                                    expected_length=order.bundle_length, timeout_s=cfg.timeout_s)
        stats = self.stats

        def finished(f: Future[DownloadResult]) -> None:
            def deliver() -> None:
                result = f.result()
                if result.error is None:
                    stats.downloads_ok += 1
                else:
                    stats.downloads_failed += 1
                    log.info("%s: download failed: %s", device.device_id, result.detail)
                stats.download_bytes += result.received
                done(result.error)

            fleet.engine.call_soon_threadsafe(deliver)

        future.add_done_callback(finished)


class SimulatedFleet:
    """Simulated agents speaking the wire contract over MQTT (see the module docs).

    ``trust_root``: the root orders are verified against (``TrustRoot`` or its bytes); ``None`` accepts orders
    unverified (device, replay and expiry rules still apply). ``baselines``: drift baselines by model or
    ``(model, version)`` (e.g. :func:`~fleet_server.simulator.windows.bundle_baseline` of the bundles the server
    scores against; default: a synthetic one). ``installed``: per-device overrides of pre-installed versions.
    ``state_path``: a JSON file keeping stream numbers, versions and order sequences across runs against the same
    server database (a real agent persists these; without it a second run's seq 0 would be a duplicate to the
    server).
    """

    def __init__(self, scenario: Scenario, host: str = "127.0.0.1", port: int = 1883, *,
                 trust_root: TrustRoot | bytes | None = None, baselines: Baselines | None = None,
                 mode: Mode = "auto", devices_per_connection: int = 50, auto_per_device_max: int = 200,
                 keepalive_s: int = 60, connect_rate: float = 2000.0,
                 installed: Mapping[str, Mapping[str, int]] | None = None, state_path: Path | None = None,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time) -> None:
        if mode not in ("auto", "per_device", "multiplexed"):
            raise ValueError(f"mode must be auto, per_device or multiplexed, got {mode!r}")
        if devices_per_connection < 1 or connect_rate <= 0:
            raise ValueError("devices_per_connection must be >= 1 and connect_rate > 0")
        self.scenario = scenario
        self.plans: tuple[DevicePlan, ...] = plan_devices(scenario)
        count = len(self.plans)
        self.mode: Literal["per_device", "multiplexed"] = (
            ("per_device" if count <= auto_per_device_max else "multiplexed") if mode == "auto" else mode)
        self.settings = LinkSettings(host=host, port=port, keepalive_s=keepalive_s)
        self.devices_per_connection = devices_per_connection
        self.connect_rate = connect_rate
        self.trust_root = TrustRoot.from_bytes(trust_root) if isinstance(trust_root, bytes) else trust_root
        self.state_path = state_path
        self._wall = wall_clock
        self._stats = SimStats()
        self.engine = Engine(clock=clock)
        self.windows = WindowFactory(scenario, baselines)
        self._host = _Host(self)
        self.devices: dict[str, SimDevice] = {}
        for plan in self.plans:
            self.devices[plan.device_id] = SimDevice(plan, scenario, self._host, self.windows,
                                                     trust_root=self.trust_root)
        for device_id, models in (installed or {}).items():
            dev = self._device(device_id)
            dev.models.update({str(m): int(v) for m, v in models.items()})
            for m in models:
                dev.slots.setdefault(str(m), "a")
        if state_path is not None and state_path.exists():
            saved = json.loads(state_path.read_text())
            for device_id, state in saved.get("devices", {}).items():
                if device_id in self.devices:
                    self.devices[device_id].restore(state)
        self.links: list[MqttLink] = []
        self._link_of: dict[str, MqttLink] = {}
        self._members: dict[int, list[SimDevice]] = {}
        self._offline_scheduled: set[str] = set()
        self._topics: dict[str, dict[Channel, str]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._started = False
        self._stopped = False
        self._build_links()

    # -- construction -------------------------------------------------------------------------------------------

    def _topic(self, device_id: str, channel: Channel) -> str:
        topics = self._topics.get(device_id)
        if topics is None:
            topics = self._topics[device_id] = {ch: device_topic(device_id, ch) for ch in _CHANNELS}
        return topics[channel]

    def _device(self, device_id: str) -> SimDevice:
        try:
            return self.devices[device_id]
        except KeyError:
            raise KeyError(f"no simulated device {device_id!r}") from None

    def _build_links(self) -> None:
        if self.mode == "per_device":
            for dev in self.devices.values():
                topics = [device_topic(dev.device_id, Channel.COMMANDS), device_topic(dev.device_id, Channel.ACKS)]
                link = MqttLink(self.engine, self.settings, dev.device_id, topics, stats=self._stats,
                                on_message=dev.on_message, on_up=self._up_one(dev), on_ready=lambda: None,
                                on_down=dev.on_disconnected,
                                will=(self._topic(dev.device_id, Channel.STATUS), dev.offline_status()))
                self.links.append(link)
                self._link_of[dev.device_id] = link
                self._members[id(link)] = [dev]
            return
        devs = list(self.devices.values())
        per = self.devices_per_connection
        for i in range(0, len(devs), per):
            group = devs[i:i + per]
            topics = [t for d in group for t in (device_topic(d.device_id, Channel.COMMANDS),
                                                 device_topic(d.device_id, Channel.ACKS))]
            members = {d.device_id: d for d in group}
            link = MqttLink(self.engine, self.settings, f"{self.scenario.id_prefix}-mux-{i // per:04d}", topics,
                            stats=self._stats, on_message=self._mux_router(members), on_up=self._up_many(members),
                            on_ready=lambda: None, on_down=self._down_many(members))
            self.links.append(link)
            self._members[id(link)] = group
            for d in group:
                self._link_of[d.device_id] = link

    def _up_one(self, dev: SimDevice) -> Callable[[], None]:
        def up() -> None:
            dev.on_connected()
            self._maybe_plan_offline(dev)
        return up

    def _up_many(self, members: Mapping[str, SimDevice]) -> Callable[[], None]:
        def up() -> None:
            for dev in members.values():
                if dev.online:
                    dev.on_connected()
                    self._maybe_plan_offline(dev)
        return up

    def _down_many(self, members: Mapping[str, SimDevice]) -> Callable[[], None]:
        def down() -> None:
            for dev in members.values():
                dev.on_disconnected()
        return down

    def _mux_router(self, members: Mapping[str, SimDevice]) -> Callable[[str, bytes], None]:
        def route(topic: str, payload: bytes) -> None:
            try:
                device_id, channel = parse_device_topic(topic)
            except ProtocolError:
                self._stats.ignored += 1
                return
            dev = members.get(device_id)
            if dev is None:
                self._stats.ignored += 1
                log.debug("ignoring a message on %s: not a device of this connection", topic)
                return
            if not dev.online:
                if channel is Channel.COMMANDS:
                    self._stats.commands_lost_offline += 1
                return
            dev.on_message(topic, payload)
        return route

    def _maybe_plan_offline(self, dev: SimDevice) -> None:
        if dev.plan.offline and dev.device_id not in self._offline_scheduled:
            self._offline_scheduled.add(dev.device_id)
            plan = self.scenario.offline
            self.engine.call_later(plan.after_s, lambda: self._go_offline(dev.device_id, plan.for_s))

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread and connect every link (paced at ``connect_rate`` connections per second)."""
        if self._stopped:
            raise RuntimeError("a stopped SimulatedFleet cannot be started again; create a new one")
        if self._started:
            return
        self._started = True
        with self.engine.lock:
            for dev in self.devices.values():
                dev.start()
            for i, link in enumerate(self.links):
                self.engine.call_later(i / self.connect_rate, link.connect)
            self.engine.every(0.5, self._keepalive)
            self.engine.every(1.0, self._check_outboxes)
        self.engine.start()

    def _keepalive(self) -> None:
        for link in self.links:
            link.misc()

    def _check_outboxes(self) -> None:
        now = self.engine.clock()
        for dev in self.devices.values():
            dev.check_outbox(now)

    def wait_connected(self, timeout: float = 30.0) -> bool:
        """Block until every link that is not deliberately away is subscribed (``False`` on timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.engine.lock:
                if all(link.ready or link.state == "away" for link in self.links):
                    return True
            time.sleep(0.02)
        return False

    def stop(self, timeout: float = 5.0) -> None:
        """Publish each device's retained offline status, disconnect cleanly, stop the engine, save the state."""
        if not self._started:
            return

        def begin() -> None:
            for link in self.links:
                finals = [(self._topic(d.device_id, Channel.STATUS), d.offline_status())
                          for d in self._devices_on(link) if d.online]
                link.close(finals, timeout=min(timeout, 2.0))

        self.engine.run_sync(begin)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.engine.lock:
                if all(link.closed for link in self.links):
                    break
            time.sleep(0.02)

        def force() -> None:
            for link in self.links:
                if not link.closed:
                    link.force_close()

        self.engine.run_sync(force)
        self.engine.stop()
        self.engine.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self.state_path is not None:
            self.save_state(self.state_path)
        self._started = False
        self._stopped = True

    def __enter__(self) -> SimulatedFleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def save_state(self, path: Path) -> None:
        """Write every device's persisted state (stream numbers, versions, order sequence) to ``path``."""
        with self.engine.lock:
            doc = {"devices": {d.device_id: d.snapshot_state() for d in self.devices.values()}}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, sort_keys=True))
        tmp.replace(path)

    def _devices_on(self, link: MqttLink) -> Iterable[SimDevice]:
        return self._members[id(link)]

    # -- control ------------------------------------------------------------------------------------------------

    def go_offline(self, device_id: str, for_s: float | None = None) -> None:
        """Take a device away now (per-device mode: the socket closes without DISCONNECT, the broker publishes its
        will); it comes back after ``for_s`` seconds, or at :meth:`go_online`."""
        self._device(device_id)
        self.engine.run_sync(lambda: self._go_offline(device_id, for_s))

    def go_online(self, device_id: str) -> None:
        """Bring a device back (reconnects with its persistent session: queued commands arrive)."""
        self._device(device_id)
        self.engine.run_sync(lambda: self._go_online(device_id))

    def _go_offline(self, device_id: str, for_s: float | None) -> None:
        dev = self.devices[device_id]
        if not dev.online:
            return
        link = self._link_of[device_id]
        if self.mode == "per_device":
            dev.online = False
            link.drop()
            dev.on_disconnected()
        else:
            link.publish(self._topic(device_id, Channel.STATUS), dev.offline_status(), retain=True)
            dev.online = False
            dev.on_disconnected()
        if for_s is not None:
            self.engine.call_later(for_s, lambda: self._go_online(device_id))

    def _go_online(self, device_id: str) -> None:
        dev = self.devices[device_id]
        if dev.online:
            return
        dev.online = True
        link = self._link_of[device_id]
        if self.mode == "per_device":
            link.connect()
        elif link.up:
            dev.on_connected()

    def preseed(self, device_ids: Iterable[str], model: str, version: int) -> None:
        """Make ``model`` ``version`` installed on these devices (before or after start; after start a fresh
        status goes out)."""
        ids = list(device_ids)
        for d in ids:
            self._device(d)

        def apply() -> None:
            for d in ids:
                dev = self.devices[d]
                dev.models[model] = version
                dev.slots.setdefault(model, "a")
                if dev.connected:
                    dev.publish_status()

        self.engine.run_sync(apply)

    # -- introspection ------------------------------------------------------------------------------------------

    @property
    def device_ids(self) -> list[str]:
        return [p.device_id for p in self.plans]

    def stats(self) -> SimStats:
        """A snapshot of the counters."""
        with self.engine.lock:
            return self._stats.copy()

    def connected_count(self) -> int:
        with self.engine.lock:
            return sum(1 for d in self.devices.values() if d.connected and d.online)

    def device(self, device_id: str) -> DeviceView:
        dev = self._device(device_id)
        with self.engine.lock:
            p = dev.plan
            return DeviceView(device_id=dev.device_id, group=p.group, labels=p.labels, profile=p.profile,
                              outcome=p.outcome, offline_planned=p.offline, connected=dev.connected,
                              online=dev.online, models=dict(dev.models), previous=dict(dev.previous),
                              events=tuple(dev.events), applied=dict(dev.applied), unacked=dev.unacked)

    def events(self, device_id: str, command_id: str | None = None) -> list[EventView]:
        dev = self._device(device_id)
        with self.engine.lock:
            return [e for e in dev.events if command_id is None or e.command_id == command_id]

    def kinds(self, device_id: str, command_id: str | None = None) -> list[str]:
        """Event kinds a device sent (optionally about one command), in order."""
        return [e.kind for e in self.events(device_id, command_id)]

    def versions(self, model: str) -> dict[str, int | None]:
        """Current version of ``model`` on every device (``None``: not installed)."""
        with self.engine.lock:
            return {d.device_id: d.models.get(model) for d in self.devices.values()}

    def unacked(self) -> int:
        """Stream messages not yet acknowledged by the server, fleet-wide."""
        with self.engine.lock:
            return sum(sum(d.unacked.values()) for d in self.devices.values())
