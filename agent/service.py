"""The agent process: wires config, profile, model host and local API together and runs until SIGTERM.

Start-up order matters (seed F7, cold starts): every configured model is loaded and checked *before* the socket
accepts requests and before systemd is told ``READY=1``; a model that fails to load stops the start with its
reason (systemd restarts us and the journal says why) rather than serving half the models silently.
SIGTERM/SIGINT stop accepting, let in-flight requests finish, remove the socket and exit 0.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
import time
from collections import deque
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.config import AgentConfig
from agent.fsutil import atomic_write
from agent.localapi.server import LocalApiServer
from agent.profiles import FirmwareProfile, builtin_profiles_dir, resolve_profile
from agent.runtime import ModelHost, ModelSpec, load_schema_file
from agent.statedir import LAYOUT_VERSION, StateLayout

if TYPE_CHECKING:
    from agent.updater.updater import InstallOutcome, UpdateEvent, Updater

__all__ = ["Agent", "sd_notify"]

log = logging.getLogger("edge_agent")


def sd_notify(message: str) -> bool:
    """Tell systemd about our state (``READY=1``, ``STOPPING=1``) if it is listening; no dependency needed."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(addr)
            s.sendall(message.encode())
        except OSError:
            return False
    return True


class Agent:
    """Constructed with its collaborators; ``start()`` does the I/O; ``run()`` blocks until a stop signal."""

    def __init__(self, config: AgentConfig, profile: FirmwareProfile, host: ModelHost, api: LocalApiServer,
                 updater: Updater | None = None) -> None:
        self.config = config
        self.profile = profile
        self.host = host
        self.api = api
        self.updater = updater
        self.state = "starting"
        self.events: deque[UpdateEvent] = deque(maxlen=256)
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        # Telemetry and the fleet connection (only with [mqtt]); created in start().
        self.outbox: Any = None
        self.hub: Any = None
        self.mqtt: Any = None
        self.commands: Any = None
        self._command_queue: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=64)
        self.commands_dropped = 0

    @classmethod
    def from_config(cls, config: AgentConfig) -> Agent:
        profile = resolve_profile(config.profile, config.profiles_dir or builtin_profiles_dir())
        host = ModelHost(profile, max_batch=config.api.max_batch, max_pending=config.api.max_pending)
        agent: Agent | None = None
        api = LocalApiServer(host, config.api, ready=lambda: agent.state if agent else "starting",
                             admin=lambda: agent)
        agent = cls(config, profile, host, api)
        if config.updates.trust_root is not None:
            from agent.updater.updater import Updater, UpdateSettings  # the update stack loads only when enabled

            agent.updater = Updater(
                device_id=config.device_id, layout=StateLayout(config.state_dir), host=host, profile=profile,
                events=agent.on_update_event,
                settings=UpdateSettings(crash_loop_limit=config.updates.crash_loop_limit),
            )
        return agent

    def start(self) -> None:
        started = time.monotonic()
        layout = StateLayout(self.config.state_dir)
        for d in (layout.root, layout.models, layout.downloads, layout.outbox_dir):
            d.mkdir(parents=True, exist_ok=True)
        layout.keys.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not layout.layout_marker.exists():
            atomic_write(layout.layout_marker, f"{LAYOUT_VERSION}\n".encode())
        if self.config.mqtt is not None:
            self._start_telemetry(layout)
        installed: list[str] = []
        if self.updater is not None:
            assert self.config.updates.trust_root is not None
            self.updater.trust.provision(self.config.updates.trust_root)
            self.updater.recover()
            installed = self.updater.load_installed()
        for entry in self.config.models:
            schema = load_schema_file(entry.schema)
            if schema.model in installed:
                log.warning("model '%s' is installed from a signed bundle; ignoring the [[models]] file %s",
                            schema.model, entry.path)
                continue
            self.host.load(ModelSpec(entry.path, schema))
        if self.updater is not None:
            self.updater.resume_pending()
            self._ticker = threading.Thread(target=self._tick_loop, name="updater-tick", daemon=True)
            self._ticker.start()
        self.api.start()
        if self.mqtt is not None:
            self.mqtt.start()
        self.state = "ready"
        sd_notify(f"READY=1\nSTATUS=serving {len(self.host.models())} model(s)")
        log.info(
            "edge-agent %s ready: device %s, profile %s, %d model(s), %.0f ms to ready",
            __version__, self.config.device_id, self.profile.name, len(self.host.models()),
            (time.monotonic() - started) * 1000,
            extra={"device_id": self.config.device_id, "profile": self.profile.name,
                   "ready_ms": round((time.monotonic() - started) * 1000, 1)},
        )

    def on_update_event(self, event: UpdateEvent) -> None:
        """Deployment events: kept for the admin API and, with a fleet connection, queued in the outbox."""
        self.events.append(event)
        if self.commands is not None:
            self.commands.publish_event(event)
        if event.kind == "rolled_back" and self.mqtt is not None:
            self.mqtt.publish_status()  # a first install rolled back unloads the model: no listener call

    def _start_telemetry(self, layout: StateLayout) -> None:
        """Outbox (durable, acknowledged by the server), drift windows, and the MQTT connection."""
        from agent.telemetry import TelemetryHub, WindowPolicy
        from agent.telemetry.mqtt import AgentMqtt, MqttSettings, TlsSettings
        from agent.telemetry.outbox import Outbox, OutboxLimits

        mq, tel = self.config.mqtt, self.config.telemetry
        assert mq is not None
        self.outbox = Outbox(layout.outbox_db, limits=OutboxLimits(max_bytes=tel.outbox_max_bytes,
                                                                   max_age_s=tel.outbox_max_age_s)).open()
        outbox = self.outbox
        self.hub = TelemetryHub(device_id=self.config.device_id,
                                on_closed=lambda w: outbox.append("drift", w.encode),
                                policy=WindowPolicy(max_seconds=tel.window_s, max_samples=tel.window_samples))
        self.hub.start()
        updater = self.updater
        self.host.listeners.append(
            lambda m: self.hub.attach(m, baseline=updater.baseline_for(m.name) if updater else None))
        on_command = None
        if updater is not None:
            from agent.updater.commands import CommandProcessor

            self.commands = CommandProcessor(device_id=self.config.device_id, updater=updater,
                                             sink=lambda make: outbox.append("events", make))
            on_command = self._queue_command
            threading.Thread(target=self._command_loop, name="commands", daemon=True).start()
        tls = TlsSettings(mq.ca_file, mq.cert_file, mq.key_file) if mq.ca_file or mq.cert_file else None
        self.mqtt = AgentMqtt(
            MqttSettings(host=mq.host, device_id=self.config.device_id, port=mq.port, tls=tls,
                         keepalive_s=mq.keepalive_s, drain_rate=mq.drain_rate, ack_timeout_s=mq.ack_timeout_s,
                         agent_version=__version__),
            outbox, on_command=on_command, models=self._model_states)
        # A fresh retained status whenever a model starts serving (an install, a swap back on rollback), so the
        # fleet server sees the version change now rather than at the next reconnect.
        mqtt = self.mqtt
        self.host.listeners.append(lambda _model: mqtt.publish_status())

    def _model_states(self) -> list[Any]:
        from agent.protocol import ModelState

        return [ModelState(name=m.name, version=m.version,
                           slot=(self.updater.store.active(m.name) if self.updater else None), healthy=True)
                for m in self.host.models()]

    def _queue_command(self, topic: str, payload: bytes) -> None:
        """Called on the MQTT thread: never block it (an order downloads a bundle). Full queue: drop and count;
        the server resends until it sees the command's event."""
        try:
            self._command_queue.put_nowait((topic, payload))
        except queue.Full:
            self.commands_dropped += 1
            log.warning("command queue full; dropped a command (the server will resend it)")

    def _command_loop(self) -> None:
        while not self._stop.is_set():
            try:
                topic, payload = self._command_queue.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self.commands.on_message(topic, payload)
            except Exception:  # the top of a task: log with context, keep the loop alive
                log.exception("command handling failed")

    def _tick_loop(self) -> None:
        assert self.updater is not None
        while not self._stop.wait(self.config.updates.tick_s):
            try:
                self.updater.tick()
            except Exception:  # the top of a task: log with context, keep serving
                log.exception("updater tick failed")

    def install(self, path: Path) -> InstallOutcome:
        """Sideload a bundle file (``edge-agent install``): same checks as an order's bundle, except the order."""
        if self.updater is None:
            from agent.updater.updater import InstallOutcome

            return InstallOutcome("rejected", reason="disabled",
                                  message="bundle installs are disabled: set updates.trust_root in the config")
        return self.updater.install_file(path)

    def rotate_root(self, path: Path) -> dict[str, object]:
        """Apply the next trust-root version (``edge-agent rotate-root``): TUF rules, atomic replacement."""
        if self.updater is None:
            return {"status": "rejected", "reason": "disabled", "message": "set updates.trust_root in the config"}
        from agent.bundle import BundleError

        try:
            root = self.updater.trust.rotate(path.read_bytes())
        except OSError as exc:
            return {"status": "rejected", "reason": "io", "message": f"cannot read {path}: {exc.strerror}"}
        except BundleError as exc:
            log.warning("trust root rotation refused: %s", exc)
            return {"status": "rejected", "reason": exc.reason, "message": str(exc)}
        log.info("trust root rotated to version %d", root.version, extra={"root_version": root.version})
        return {"status": "rotated", "version": root.version}

    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        if signum is not None:
            log.info("received %s; stopping", signal.Signals(signum).name)
        self._stop.set()

    def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, stop cleanly. Returns the process exit code."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self.start()
        while not self._stop.wait(3600):
            pass
        self.stop()
        return 0

    def stop(self) -> None:
        self.state = "stopping"
        self._stop.set()
        sd_notify("STOPPING=1")
        self.api.stop()
        if self.hub is not None:
            self.hub.stop()  # closes open windows into the outbox: nothing counted is lost
        if self.mqtt is not None:
            self.mqtt.stop()
        if self.outbox is not None:
            self.outbox.close()
        self.host.close()
        log.info("edge-agent stopped")
