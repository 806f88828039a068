"""The agent process: wires config, profile, model host and local API together and runs until SIGTERM.

Start-up order matters (seed F7, cold starts): every configured model is loaded and checked *before* the socket
accepts requests and before systemd is told ``READY=1``; a model that fails to load stops the start with its
reason (systemd restarts us and the journal says why) rather than serving half the models silently.
SIGTERM/SIGINT stop accepting, let in-flight requests finish, remove the socket and exit 0.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

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
                events=agent.events.append, settings=UpdateSettings(crash_loop_limit=config.updates.crash_loop_limit),
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
        self.state = "ready"
        sd_notify(f"READY=1\nSTATUS=serving {len(self.host.models())} model(s)")
        log.info(
            "edge-agent %s ready: device %s, profile %s, %d model(s), %.0f ms to ready",
            __version__, self.config.device_id, self.profile.name, len(self.host.models()),
            (time.monotonic() - started) * 1000,
            extra={"device_id": self.config.device_id, "profile": self.profile.name,
                   "ready_ms": round((time.monotonic() - started) * 1000, 1)},
        )

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
        sd_notify("STOPPING=1")
        self.api.stop()
        self.host.close()
        log.info("edge-agent stopped")
