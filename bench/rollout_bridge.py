"""Command bridge throughput: the orders of a 10 000-device phase signed, stored and published through a real
mosquitto, by the rollout loop as the server runs it.

One measured run: a fresh database (SQLite file in /tmp, or a throwaway PostgreSQL 15 cluster with fsync on, from
tests/services/postgres.py) with 10 000 registered devices in one cohort, a bundle, and a started rollout whose first
phase is the whole cohort (``max_concurrent`` and the rate high enough not to hold anything back). The clock starts
before ``RolloutLoop.tick()`` and stops when mosquitto has acknowledged (PUBACK) every order and a subscriber on
``fleet/v1/+/commands`` has received all of them. That covers: resolving the cohort, ranking, ``decide``, signing
(Ed25519 over the canonical order, download token, msgpack ``Command``), the batched DB writes (sequence numbers and
command rows, 2 000 per transaction, plus rollout-device rows) and QoS 1 publishing.

Baseline (same run, interleaved): one transaction and one publish per order (``CommandBridge.send`` per decision),
on fewer orders. Also reported: signing alone (the CPU floor per order).

Target (fleet-server issue): >= 1 000 orders/s.

Run: ``python -m bench.rollout_bridge [--quick] [--no-postgres]``. One JSON object per metric per line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion

from agent.bundle import SigningKey
from bench.common import emit
from fleet_server.db import create_db_engine
from fleet_server.deploy.bridge import CommandBridge
from fleet_server.deploy.loop import RolloutLoop
from fleet_server.deploy.mqtt import MqttCommandPublisher
from fleet_server.deploy.signing import BundleInfo, OrderSigner
from fleet_server.migrate import upgrade
from fleet_server.models import BundleRecord, Cohort, CohortMember, Device, RolloutRecord, table_of
from fleet_server.rollouts import SendOrder, order_command_id
from fleet_server.settings import FleetSettings

DIGEST = "ab" * 32
SPEC = {"phases": [{"percent": 100, "min_soak_s": 0}], "max_concurrent": 1_000_000,
        "rate": {"kind": "constant", "per_minute": 1_000_000}}


def _now() -> datetime:
    return datetime.now(UTC)


def prepare(url: str, devices: int) -> None:
    engine = create_db_engine(url)
    upgrade(engine)
    now = _now()
    ids = [f"dev-{i:06d}" for i in range(devices)]
    with engine.begin() as conn:
        conn.execute(sa.insert(table_of(Device)), [{"id": d, "models": [], "hardware": {}, "order_sequence": 0,
                                                    "firmware_profile": "generic-x86-64", "last_status": "online",
                                                    "last_seen_at": now} for d in ids])
        conn.execute(sa.insert(table_of(Cohort)).values(name="fleet", description="", selector={}, created_at=now,
                                                        created_by="bench", updated_at=now))
        conn.execute(sa.insert(table_of(CohortMember)),
                     [{"cohort": "fleet", "device_id": d, "added_at": now, "added_by": "bench"} for d in ids])
        conn.execute(sa.insert(table_of(BundleRecord)).values(
            digest=DIGEST, file_sha256=DIGEST, model="bench-model", version=2, length=123456,
            profiles=["generic-x86-64"], manifest={}, signers=[], uploaded_at=now, uploaded_by="bench"))
        conn.execute(sa.insert(table_of(RolloutRecord)).values(
            id="ro-bench", name="bench", bundle_digest=DIGEST, model="bench-model", version=2, cohorts=["fleet"],
            spec=SPEC, status="running", phase=0, phase_started_at=time.time(), changed_at=time.time(),
            created_at=now, created_by="bench", updated_at=now, revision=0))
    engine.dispose()


class Counter:
    """A real MQTT subscriber that counts command frames."""

    def __init__(self, host: str, port: int) -> None:
        self.count = 0
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{os.getpid()}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("fleet/v1/+/commands", qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: ready.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        if not ready.wait(10):
            raise RuntimeError("subscriber not ready")

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.count += 1

    def wait(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.count < n:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def reset(self) -> None:
        with self._lock:
            self.count = 0

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def settings_for(url: str, key_file: Path, host: str, port: int) -> FleetSettings:
    return FleetSettings(database_url=url, orders_key_file=key_file, download_token_secret="b" * 40,
                         mqtt_host=host, mqtt_port=port, mqtt_client_id=f"bench-{os.getpid()}")


def run_loop(url: str, key_file: Path, host: str, port: int, *, sub: Counter,
             devices: int) -> tuple[float, float | None, int]:
    """(orders/s PUBACKed, orders/s delivered to the subscriber or ``None`` if some did not arrive within a minute,
    frames delivered) for one phase of ``devices`` orders. The PUBACK rate is the figure."""
    prepare(url, devices)
    s = settings_for(url, key_file, host, port)
    engine = create_db_engine(url)
    publisher = MqttCommandPublisher(s)
    publisher.start()
    if not publisher.wait_connected(10):
        raise RuntimeError("publisher not connected")
    bridge = CommandBridge(engine, OrderSigner.from_settings(s), publisher, resend_s=s.command_resend_s)
    loop = RolloutLoop(engine, bridge, s)
    sub.reset()
    t0 = time.perf_counter()
    loop.tick()
    if not publisher.flush(120):
        raise RuntimeError("publishes not acknowledged")
    acked = time.perf_counter() - t0
    complete = sub.wait(devices, 60)
    delivered = time.perf_counter() - t0
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT COUNT(*) FROM commands")).scalar_one()
        seqs = conn.execute(sa.text("SELECT MIN(order_sequence), MAX(order_sequence) FROM devices")).one()
    assert stored == devices and tuple(seqs) == (1, 1), (stored, seqs)
    publisher.stop()
    engine.dispose()
    return devices / acked, devices / delivered if complete else None, sub.count


def run_naive(url: str, key_file: Path, host: str, port: int, devices: int) -> float:
    """Orders/s with one transaction and one publish per order."""
    prepare(url, devices)
    s = settings_for(url, key_file, host, port)
    engine = create_db_engine(url)
    publisher = MqttCommandPublisher(s)
    publisher.start()
    if not publisher.wait_connected(10):
        raise RuntimeError("publisher not connected")
    bridge = CommandBridge(engine, OrderSigner.from_settings(s), publisher, resend_s=s.command_resend_s)
    ids = [f"dev-{i:06d}" for i in range(devices)]
    t0 = time.perf_counter()
    for d in ids:
        bridge.send(rollout_id="ro-bench", orders=[SendOrder(d, order_command_id("ro-bench", d, 1), "bench-model", 2,
                                                             DIGEST, False, 0, 1)])
    publisher.flush(120)
    elapsed = time.perf_counter() - t0
    publisher.stop()
    engine.dispose()
    return devices / elapsed


def sign_only(key_file: Path, n: int) -> float:
    s = FleetSettings(orders_key_file=key_file, download_token_secret="b" * 40)
    signer = OrderSigner.from_settings(s)
    bundle = BundleInfo(DIGEST, "bench-model", 2, 123456)
    now = time.time()
    t0 = time.perf_counter()
    for i in range(n):
        signer.deploy(device_id=f"dev-{i:06d}", command_id=f"cmd-{i:032x}", rollout_id="ro-bench", bundle=bundle,
                      sequence=1, now=now)
    return n / (time.perf_counter() - t0)


def measure(name: str, new_url: Callable[[str], str], key_file: Path, broker: Any, sub: Counter, *, devices: int,
            naive_devices: int, repeats: int, common: dict[str, Any]) -> None:
    acked: list[float] = []
    delivered: list[float] = []
    frames: list[int] = []
    naive: list[float] = []
    for i in range(repeats):  # interleaved: a noisy neighbour slows both alike
        a, d, n = run_loop(new_url(f"loop{i}"), key_file, broker.host, broker.port, sub=sub, devices=devices)
        acked.append(a)
        frames.append(n)
        if d is not None:
            delivered.append(d)
        naive.append(run_naive(new_url(f"naive{i}"), key_file, broker.host, broker.port, naive_devices))
    emit("rollout_bridge", f"{name}_orders_per_s", value=statistics.median(acked),
         baseline="one transaction + publish per order", baseline_value=statistics.median(naive),
         target=">= 1000 orders/s", min=round(min(acked), 1), max=round(max(acked), 1),
         delivered_per_s=round(statistics.median(delivered), 1) if delivered else None,
         subscriber_received=frames, orders=devices, baseline_orders=naive_devices,
         repeats=repeats, **common)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-postgres", action="store_true")
    args = ap.parse_args()
    devices, naive_devices, repeats = (2000, 200, 1) if args.quick else (10_000, 500, 3)
    from tests.services.mqtt import MosquittoBroker, find_mosquitto

    binary = find_mosquitto()
    common: dict[str, Any] = {"cpus": os.cpu_count(), "broker": "mosquitto"}
    with tempfile.TemporaryDirectory(prefix="bench-bridge-") as tmp:
        key_file = Path(tmp) / "orders.pem"
        key_file.write_bytes(SigningKey.generate().to_pem())
        emit("rollout_bridge", "sign_orders_per_s", value=sign_only(key_file, 2000 if args.quick else 10_000),
             baseline="none", baseline_value=0, target="(CPU floor)", **common)
        if binary is None:
            print('{"bench": "rollout_bridge", "skipped": "mqtt", "reason": "mosquitto not installed"}')
            return
        (Path(tmp) / "mq").mkdir()
        broker = MosquittoBroker(binary, Path(tmp) / "mq")
        # The one subscriber takes every device's commands; a device gets one at a time. Let it fall behind
        # without mosquitto's default 1 000-message queue dropping (which the bridge's resends would repair).
        with broker.conf.open("a") as conf:
            conf.write("max_queued_messages 100000\n")
        broker.start()
        sub = Counter(broker.host, broker.port)
        try:
            measure("sqlite", lambda name: f"sqlite:///{Path(tmp) / name}.db", key_file, broker, sub,
                    devices=devices, naive_devices=naive_devices, repeats=repeats, common=common)
            if args.no_postgres:
                return
            from tests.services.postgres import PostgresCluster, PostgresUnavailable

            try:
                cluster = PostgresCluster(durable=True)
            except PostgresUnavailable as exc:
                print(f'{{"bench": "rollout_bridge", "skipped": "postgresql", "reason": "{exc}"}}')
                return
            with cluster:
                measure("postgres", cluster.create_database, key_file, broker, sub, devices=devices,
                        naive_devices=naive_devices, repeats=repeats, common=common)
        finally:
            sub.close()
            broker.stop()


if __name__ == "__main__":
    main()
