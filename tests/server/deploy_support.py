"""Builders for the rollout-loop, bridge and rollouts-API tests: registry rows, bundles, a fake clock, a capturing
publisher, scripted device events through the real ingestion, and a real MQTT subscriber of command topics."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as paho
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy.engine import Engine

from agent.bundle import TrustRoot, verify_order
from agent.protocol import Command, Event, Status, decode, encode, message_topic
from fleet_server.deploy.bridge import CommandBridge
from fleet_server.deploy.loop import RolloutLoop
from fleet_server.deploy.signing import OrderSigner
from fleet_server.ingest import BatchWriter, Received
from fleet_server.models import BundleRecord, Cohort, CohortMember, Device, table_of
from fleet_server.settings import FleetSettings
from tests.server.support import TOKEN
from tests.updater.support import Keys

SECRET = "download-secret-0123456789abcdefghij"
PUBLIC = "http://fleet.example:8080"
DIGEST = hashlib.sha256(b"bundle v2").hexdigest()
OLD_DIGEST = hashlib.sha256(b"bundle v1").hexdigest()
PROFILE = "generic-x86-64"


def ts(unix: float) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


@dataclass
class Clock:
    """A settable clock (unix seconds), starting near the real time so order expiry checks make sense."""

    now: float = field(default_factory=lambda: float(int(time.time())))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class CapturePublisher:
    """A publisher that records what it was given (``up = False`` plays a disconnected client)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.up = True

    def publish(self, topic: str, payload: bytes) -> bool:
        if not self.up:
            return False
        self.sent.append((topic, payload))
        return True

    def commands(self) -> list[Command]:
        out = []
        for _, payload in self.sent:
            msg = decode(payload)
            assert isinstance(msg, Command)
            out.append(msg)
        return out

    def clear(self) -> None:
        self.sent.clear()


def deploy_settings(db_url: str, tmp: Path, keys: Keys, **kw: Any) -> FleetSettings:
    key_file = tmp / "orders.pem"
    key_file.write_bytes(keys.orders[0].to_pem())
    return FleetSettings(database_url=db_url, api_token=TOKEN, orders_key_file=key_file,
                         download_token_secret=SECRET, public_url=kw.pop("public_url", PUBLIC), **kw)


def trust_root(keys: Keys) -> TrustRoot:
    return TrustRoot.from_bytes(keys.root_bytes())


def add_devices(engine: Engine, ids: Iterable[str], *, profile: str | None = PROFILE, online: bool = True,
                seen: float | None = None) -> None:
    seen_at = ts(seen if seen is not None else time.time())
    rows: list[dict[str, Any]] = [
        {"id": d, "firmware_profile": profile, "models": [], "hardware": {}, "order_sequence": 0,
         "last_status": "online" if online else "offline", "last_seen_at": seen_at} for d in ids]
    with engine.begin() as conn:
        conn.execute(sa.insert(table_of(Device)), rows)


def add_cohort(engine: Engine, name: str, members: Iterable[str] = (), selector: dict[str, str] | None = None) -> None:
    now = ts(time.time())
    with engine.begin() as conn:
        conn.execute(sa.insert(table_of(Cohort)).values(name=name, description="", selector=selector or {},
                                                        created_at=now, created_by="test", updated_at=now))
        rows = [{"cohort": name, "device_id": d, "added_at": now, "added_by": "test"} for d in members]
        if rows:
            conn.execute(sa.insert(table_of(CohortMember)), rows)


def join_cohort(engine: Engine, name: str, members: Iterable[str]) -> None:
    now = ts(time.time())
    with engine.begin() as conn:
        conn.execute(sa.insert(table_of(CohortMember)),
                     [{"cohort": name, "device_id": d, "added_at": now, "added_by": "test"} for d in members])


def add_bundle(engine: Engine, *, digest: str = DIGEST, model: str = "cancer-mlp", version: int = 2, length: int = 4096,
               profiles: Iterable[str] = (PROFILE,), manifest: dict[str, Any] | None = None) -> None:
    with engine.begin() as conn:
        conn.execute(sa.insert(table_of(BundleRecord)).values(
            digest=digest, file_sha256=hashlib.sha256(digest.encode()).hexdigest(), model=model, version=version,
            length=length, profiles=list(profiles), manifest=manifest or {}, signers=[], uploaded_at=ts(time.time()),
            uploaded_by="test"))


def make_bridge(engine: Engine, settings: FleetSettings, publisher: Any, clock: Clock) -> CommandBridge:
    return CommandBridge(engine, OrderSigner.from_settings(settings), publisher, resend_s=settings.command_resend_s,
                         clock=clock)


def make_loop(engine: Engine, settings: FleetSettings, bridge: CommandBridge, clock: Clock,
              **kw: Any) -> RolloutLoop:
    return RolloutLoop(engine, bridge, settings, clock=clock, **kw)


class Devices:
    """Scripted devices: each numbers its events and reports through the real ingestion (``BatchWriter``), with
    the server's receive time taken from the test clock."""

    def __init__(self, writer: BatchWriter, clock: Clock) -> None:
        self.writer = writer
        self.clock = clock
        self.seq: dict[str, int] = {}

    def event(self, device: str, kind: str, command_id: str | None, *, reason: str | None = None,
              model: str | None = "cancer-mlp", version: int | None = 2) -> None:
        self.events([(device, kind, command_id, reason)], model=model, version=version)

    def events(self, items: Iterable[tuple[str, str, str | None, str | None]], *, model: str | None = "cancer-mlp",
               version: int | None = 2) -> None:
        batch = []
        for device, kind, command_id, reason in items:
            seq = self.seq.get(device, 0)
            self.seq[device] = seq + 1
            ev = Event(device_id=device, stream_seq=seq, kind=kind, at=self.clock(), command_id=command_id,
                       model=model, version=version, reason=reason)
            batch.append(Received(message_topic(ev), encode(ev), self.clock()))
        self.writer.write(batch)

    def run(self, device: str, command_id: str, kinds: Iterable[str], **kw: Any) -> None:
        self.events([(device, k, command_id, kw.get("reason") if k in ("failed", "rejected", "rolled_back") else None)
                     for k in kinds])

    def status(self, device: str, state: Literal["online", "offline"] = "online") -> None:
        msg = Status(device_id=device, state=state, agent_version="0.1.0", models=(), sent_at=self.clock())
        self.writer.write([Received(message_topic(msg), encode(msg), self.clock())])


HAPPY = ("received", "downloading", "verified", "installed", "healthy")


class CommandSubscriber:
    """A real MQTT client subscribed to ``fleet/v1/+/commands`` that records every Command frame it receives."""

    def __init__(self, host: str, port: int, client_id: str = "test-cmd-sub") -> None:
        self.frames: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("fleet/v1/+/commands", qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise AssertionError("command subscriber not subscribed")

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.frames.append((message.topic, bytes(message.payload)))

    def commands(self) -> list[tuple[str, Command]]:
        with self._lock:
            frames = list(self.frames)
        out = []
        for topic, payload in frames:
            msg = decode(payload)
            assert isinstance(msg, Command)
            out.append((topic, msg))
        return out

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def verified(cmd: Command, keys: Keys, *, now: float, last_sequence: int | None = None) -> Any:
    """The command's order, verified as the agent verifies it."""
    return verify_order(dict(cmd.order), trust_root(keys), device_id=cmd.device_id, last_sequence=last_sequence,
                        now=now)
