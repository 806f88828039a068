"""Building blocks of the issue-5 acceptance test (``test_acceptance_rollout.py``), all real processes:

* :func:`start_fleet_server`: ``fleet-server db upgrade``, ``fleet-server user add/token`` (an admin and their API
  token) and ``python -m fleet_server serve`` as an operator runs them, from one settings TOML file;
* :func:`start_agent`: a real ``edge-agent run`` process with ``[mqtt]`` and ``[updates]``, serving the demo
  ``cancer-mlp`` (version 1) from its ``[[models]]`` file;
* :func:`phase_plan`: the members of each phase computed independently of the server (``rank_devices`` and the
  documented phase-size rule), and :class:`OrderWatch`: what the database and the command topics show as ordered,
  read so that a snapshot provably belongs to one phase.

Processes write their logs to files (a full pipe would block them); the tail is shown when a wait fails.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from agent.localapi import LocalClient
from agent.protocol import Command, decode
from fleet_server.models import CommandRecord, RolloutDevice, RolloutRecord, table_of
from fleet_server.rollouts import rank_devices
from tests.conftest import REPO
from tests.server.deploy_support import CommandSubscriber
from tests.services.mqtt import BrokerService, free_port, wait_until
from tests.updater.support import Keys

__all__ = ["AgentProcess", "FleetServer", "OrderWatch", "Snapshot", "phase_plan", "phase_sizes", "start_agent",
           "start_fleet_server", "wait_agents_ready"]

SECRET = "acceptance-download-secret-0123456789abcdef"
ADMIN = "acceptance-admin"

_COMMANDS = table_of(CommandRecord)
_ROLLOUT_DEVICES = table_of(RolloutDevice)
_ROLLOUTS = table_of(RolloutRecord)


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


# -- the fleet server ---------------------------------------------------------------------------------------------


@dataclass
class FleetServer:
    """A running ``fleet-server serve`` process and an admin's API token."""

    proc: subprocess.Popen[bytes]
    base_url: str
    token: str
    config: Path
    log: Path
    api: httpx.Client

    def log_tail(self) -> str:
        return _tail(self.log)

    def metric(self, name: str) -> float:
        """A metric's value (the sum over its label sets) from ``GET /metrics``."""
        text = self.api.get("/metrics").raise_for_status().text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        self.api.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _fleet_cli(args: Sequence[str], *, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "fleet_server", *args], cwd=REPO, input=stdin, capture_output=True,
                       text=True, timeout=120, check=False)
    if r.returncode != 0:
        raise AssertionError(f"fleet-server {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def server_settings_toml(*, db_url: str, broker: BrokerService, port: int, tmp: Path) -> str:
    """The settings file of the acceptance server: fast loop and resends, small ack interval."""
    return (
        f'public_url = "http://127.0.0.1:{port}"\n'
        f'[database]\nurl = "{db_url}"\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nclient_id = "fleet-acceptance"\n'
        f'[ingest]\nack_interval_s = 0.1\n'
        f'[bundle]\ndir = "{tmp / "bundles"}"\ntrust_root_file = "{tmp / "root.json"}"\n'
        f'[orders]\nkey_file = "{tmp / "orders.pem"}"\n'
        f'[download]\ntoken_secret = "{SECRET}"\n'
        f'[rollout]\ninterval_s = 0.2\n'
        f'[command]\nresend_s = 2.0\n')


def start_fleet_server(tmp: Path, *, db_url: str, broker: BrokerService, keys: Keys) -> FleetServer:
    """Migrate, create the admin and their token with the CLI, start ``serve`` and wait for ``/readyz``."""
    (tmp / "root.json").write_bytes(keys.root_bytes())
    (tmp / "orders.pem").write_bytes(keys.orders[0].to_pem())
    port = free_port()
    config = tmp / "server.toml"
    config.write_text(server_settings_toml(db_url=db_url, broker=broker, port=port, tmp=tmp))
    _fleet_cli(["db", "upgrade", "--config", str(config)])
    _fleet_cli(["user", "add", ADMIN, "--role", "admin", "--no-password", "--config", str(config)])
    token = _fleet_cli(["user", "token", ADMIN, "--name", "acceptance", "--config", str(config)]).stdout.strip()
    assert token and "\n" not in token, token
    log = tmp / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fleet_server", "serve", "--config", str(config), "--port",
                                 str(port)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    server = FleetServer(proc, base, token, config, log, api)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"fleet-server serve exited {proc.returncode}:\n{_tail(log)}")
        try:
            return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 60, interval=0.1, what="fleet-server serve to be ready")
    except BaseException:
        server.stop()
        raise
    return server


# -- real agents --------------------------------------------------------------------------------------------------


@dataclass
class AgentProcess:
    """A running ``edge-agent run`` process."""

    device_id: str
    proc: subprocess.Popen[bytes]
    socket: Path
    log: Path

    def client(self) -> LocalClient:
        return LocalClient(self.socket)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self) -> str:
        return _tail(self.log)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def agent_config_toml(device_id: str, home: Path, broker: BrokerService) -> str:
    """The agent's config as the telemetry end-to-end test writes it: the demo cancer-mlp file (version 1),
    the fleet's trust root for updates, the broker for events and statuses."""
    from agent.demo import MODELS_DIR

    return (
        f'device_id = "{device_id}"\nstate_dir = "{home}/state"\nprofile = "generic-x86-64"\nlog_format = "json"\n'
        f'[api]\nsocket_path = "{home}/api.sock"\nsocket_mode = "0600"\n'
        f'[[models]]\npath = "{MODELS_DIR}/cancer_mlp_int8.onnx"\n'
        f'[updates]\ntrust_root = "{home}/root.json"\ntick_s = 0.1\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nack_timeout_s = 2.0\n'
        f'[telemetry]\nwindow_s = 3600\n')


def start_agent(device_id: str, home: Path, broker: BrokerService, keys: Keys) -> AgentProcess:
    """Start ``edge-agent run`` (not waiting for it: see :meth:`AgentProcess.client` ``.wait_ready``)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "root.json").write_bytes(keys.root_bytes())
    cfg = home / "agent.toml"
    cfg.write_text(agent_config_toml(device_id, home, broker))
    log = home / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT)
    return AgentProcess(device_id, proc, home / "api.sock", log)


# -- the plan, computed independently -----------------------------------------------------------------------------


def phase_sizes(phases: Sequence[Mapping[str, Any]], target: int) -> list[int]:
    """Cumulative phase sizes by the documented rule (docs/rollouts.md): ``ceil(percent x target / 100)`` (float
    noise rounded away) or ``count``, capped at the target, never below the phase before."""
    sizes: list[int] = []
    for p in phases:
        size = math.ceil(round(p["percent"] * target / 100, 9)) if "percent" in p else int(p["count"])
        sizes.append(min(target, max(size, sizes[-1] if sizes else 0)))
    return sizes


def phase_plan(rollout_id: str, target: Iterable[str], phases: Sequence[Mapping[str, Any]]) -> list[frozenset[str]]:
    """The devices each phase may have ordered (cumulative): the first ``size`` devices by rollout rank."""
    ids = sorted(set(target))
    ranked = rank_devices(rollout_id, ids)
    return [frozenset(ranked[:n]) for n in phase_sizes(phases, len(ids))]


# -- what has been ordered ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """The devices ordered so far, by three witnesses, and the rollout's state read before and after them.

    Orders are stored in the transaction that stores the phase they belong to and published after its commit,
    and the phase never goes back; so when ``phase_before == phase_after`` every order seen was sent in that phase
    or an earlier one, and nothing of a later phase can have been sent yet."""

    phase_before: int
    phase_after: int
    status: str
    mqtt: frozenset[str]
    """Devices a deploy command of the rollout was published to (seen on ``fleet/v1/+/commands``)."""
    mqtt_any: frozenset[str]
    """Devices any command frame at all was published to."""
    commands: frozenset[str]
    """Devices with a deploy command of the rollout in the ``commands`` table."""
    rollout_devices: frozenset[str]
    """Devices with a ``rollout_devices`` row (rows exist from the first order on)."""

    @property
    def stable(self) -> bool:
        return self.phase_before == self.phase_after

    @property
    def ordered(self) -> frozenset[str]:
        return self.mqtt | self.commands | self.rollout_devices


@dataclass
class OrderWatch:
    """Takes :class:`Snapshot` s of one rollout (``phase`` is 1-based, as the API shows it). Frames from the
    subscriber are decoded once each (a snapshot is taken every few tens of milliseconds)."""

    engine: Engine
    subscriber: CommandSubscriber
    rollout_id: str
    snapshots: list[Snapshot] = field(default_factory=list)
    decoded: list[Command] = field(default_factory=list)

    def commands(self) -> list[Command]:
        """Every command frame the subscriber has received so far, in arrival order."""
        for _, payload in self.subscriber.frames[len(self.decoded):]:
            msg = decode(payload)
            assert isinstance(msg, Command), msg
            self.decoded.append(msg)
        return list(self.decoded)

    def _state(self) -> tuple[int, str]:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(_ROLLOUTS.c.phase, _ROLLOUTS.c.status)
                               .where(_ROLLOUTS.c.id == self.rollout_id)).one()
        return int(row.phase) + 1, str(row.status)

    def take(self) -> Snapshot:
        before, _ = self._state()
        frames = self.commands()
        mqtt = frozenset(cmd.device_id for cmd in frames
                         if cmd.kind == "deploy" and cmd.order["signed"].get("rollout_id") == self.rollout_id)
        mqtt_any = frozenset(cmd.device_id for cmd in frames)
        with self.engine.connect() as conn:
            commands = frozenset(conn.execute(sa.select(_COMMANDS.c.device_id).where(
                _COMMANDS.c.rollout_id == self.rollout_id, _COMMANDS.c.kind == "deploy")).scalars())
            rds = frozenset(conn.execute(sa.select(_ROLLOUT_DEVICES.c.device_id).where(
                _ROLLOUT_DEVICES.c.rollout_id == self.rollout_id)).scalars())
        after, status = self._state()
        snap = Snapshot(before, after, status, mqtt, mqtt_any, commands, rds)
        self.snapshots.append(snap)
        return snap

    def steps(self) -> dict[str, str]:
        with self.engine.connect() as conn:
            return {r.device_id: r.step for r in conn.execute(
                sa.select(_ROLLOUT_DEVICES.c.device_id, _ROLLOUT_DEVICES.c.step)
                .where(_ROLLOUT_DEVICES.c.rollout_id == self.rollout_id))}


def wait_agents_ready(agents: Sequence[AgentProcess], timeout: float = 90.0) -> None:
    """Wait for every agent's local API to say ready (an agent that exits fails with its log)."""
    deadline = time.monotonic() + timeout
    for a in agents:
        try:
            with a.client() as c:
                c.wait_ready(timeout=max(1.0, deadline - time.monotonic()), alive=a.alive)
        except Exception as exc:
            raise AssertionError(f"agent {a.device_id} not ready ({exc}):\n{a.log_tail()}") from None
