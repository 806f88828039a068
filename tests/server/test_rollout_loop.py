"""The rollout loop on a real database (SQLite and PostgreSQL): scripted devices report real Event frames through
the real ingestion (``BatchWriter``), the loop follows them, decides with the pure policy and carries the decisions
out through the command bridge. Time is a test clock: no test waits for wall-clock time."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from agent.protocol import Command, DriftWindow, encode, message_topic
from fleet_server.app import create_app
from fleet_server.db import create_db_engine
from fleet_server.deploy.bridge import CommandBridge
from fleet_server.deploy.loop import ACTOR, RolloutLoop
from fleet_server.deploy.metrics import rollout_metrics
from fleet_server.deploy.runtime import DeployRuntime
from fleet_server.deploy.specs import state_from_row
from fleet_server.deploy.store import ConcurrentChangeError, save_state
from fleet_server.ingest import BatchWriter, Received
from fleet_server.models import AuditLog, Baseline, RolloutDevice, RolloutRecord, table_of
from fleet_server.rollouts import rank_devices
from tests.server.deploy_support import (
    HAPPY,
    CapturePublisher,
    Clock,
    Devices,
    add_bundle,
    add_cohort,
    add_devices,
    deploy_settings,
    join_cohort,
    make_bridge,
    make_loop,
    ts,
    verified,
)
from tests.server.support import AUTH, baseline, window_summary
from tests.updater.support import Keys

ROLLOUTS = table_of(RolloutRecord)
RD = table_of(RolloutDevice)
AUDIT = table_of(AuditLog)


@dataclass
class World:
    engine: Engine
    keys: Keys
    clock: Clock
    pub: CapturePublisher
    bridge: CommandBridge
    loop: RolloutLoop
    devices: Devices
    client: TestClient
    seen: int = 0
    answered: set[str] = field(default_factory=set)

    def create(self, cohorts: list[str], phases: list[dict[str, Any]], **spec: Any) -> str:
        r = self.client.post("/api/v1/rollouts", headers=AUTH, json={
            "name": "test", "bundle": spec.pop("bundle", None) or _digest(), "cohorts": cohorts, "phases": phases,
            **spec})
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def start(self, cohorts: list[str], phases: list[dict[str, Any]], **spec: Any) -> str:
        rid = self.create(cohorts, phases, **spec)
        r = self.client.post(f"/api/v1/rollouts/{rid}/start", headers=AUTH)
        assert r.status_code == 200, r.text
        return rid

    def commands(self) -> list[Command]:
        return self.pub.commands()

    def new_orders(self) -> list[Command]:
        """Deploy commands published since the last call (first copies only)."""
        out = [c for c in self.commands()[self.seen:] if c.kind == "deploy" and c.command_id not in self.answered]
        self.seen = len(self.pub.sent)
        self.answered.update(c.command_id for c in out)
        return out

    def get(self, rid: str) -> dict[str, Any]:
        r = self.client.get(f"/api/v1/rollouts/{rid}", headers=AUTH)
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc

    def steps(self, rid: str) -> dict[str, str]:
        with self.engine.connect() as conn:
            return {r.device_id: r.step for r in conn.execute(sa.select(RD).where(RD.c.rollout_id == rid))}

    def audits(self, action: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(sa.select(AUDIT).where(AUDIT.c.action == action)
                                                  .order_by(AUDIT.c.id)).mappings()]

    def tick(self, advance: float = 1.0) -> None:
        self.clock.advance(advance)
        self.loop.tick()


def _digest() -> str:
    from tests.server.deploy_support import DIGEST

    return DIGEST


@pytest.fixture
def world(engine: Engine, db_url: str, tmp_path: Path, writer: BatchWriter) -> Iterator[World]:
    keys = Keys()
    settings = deploy_settings(db_url, tmp_path, keys, command_resend_s=30.0)
    clock = Clock()
    pub = CapturePublisher()
    bridge = make_bridge(engine, settings, pub, clock)
    loop = make_loop(engine, settings, bridge, clock)
    add_bundle(engine)
    app = create_app(settings, engine=engine)
    app.state.deploy = DeployRuntime(bridge, loop, pub, clock)
    with TestClient(app) as client:
        yield World(engine, keys, clock, pub, bridge, loop, Devices(writer, clock), client)


def ids(n: int, prefix: str = "dev") -> list[str]:
    return [f"{prefix}-{i:03d}" for i in range(n)]


def test_rollout_escaping_its_cohort_200_devices_each_phase_orders_exactly_its_plan(world: World) -> None:
    """THREATS.md: with 200 devices, no device outside the current phase receives an order; every phase reaches
    exactly the planned devices and the rollout completes, each advance audited."""
    devices = ids(200)
    add_devices(world.engine, devices)
    add_devices(world.engine, ids(20, "outsider"))
    add_cohort(world.engine, "fleet", devices)
    rid = world.start(["fleet"], [{"count": 10, "min_soak_s": 300, "min_finished": 5},
                                  {"percent": 50, "min_soak_s": 300},
                                  {"percent": 100, "min_soak_s": 0}], max_concurrent=200)
    ranked = rank_devices(rid, devices)
    plan = [ranked[:10], ranked[:100], ranked[:200]]
    assert world.get(rid)["planned"] == [10, 100, 200]
    ordered: list[str] = []
    for phase, members in enumerate(plan):
        world.tick()
        got = world.new_orders()
        assert {c.device_id for c in got} == set(members) - set(ordered), f"phase {phase + 1}"
        assert world.get(rid)["phase"] == phase + 1
        ordered += [c.device_id for c in got]
        world.devices.events([(c.device_id, k, c.command_id, None) for c in got for k in HAPPY])
        world.tick()
        assert world.new_orders() == []  # soaking: nothing more before the next phase
        world.tick(advance=300)
    doc = world.get(rid)
    assert doc["status"] == "completed", doc
    assert doc["steps"]["healthy"] == 200 and doc["steps"]["not_started"] == 0
    assert sorted(ordered) == sorted(devices)
    assert not any(c.device_id.startswith("outsider") for c in world.commands())
    advances = world.audits("rollout.advance")
    assert [a["detail"]["to_phase"] for a in advances] == [2, 3]
    assert all(a["actor"] == ACTOR for a in advances)
    assert len(world.audits("rollout.complete")) == 1


def test_failure_rate_over_threshold_halts_with_an_audited_reason(world: World) -> None:
    devices = ids(20)
    add_devices(world.engine, devices)
    add_cohort(world.engine, "fleet", devices)
    rid = world.start(["fleet"], [{"count": 10, "failure_rate_halt": 0.2, "min_finished": 5},
                                  {"percent": 100}])
    world.tick()
    orders = world.new_orders()
    assert len(orders) == 10
    bad, good = orders[:3], orders[3:6]
    world.devices.events([(c.device_id, "received", c.command_id, None) for c in orders]
                         + [(c.device_id, "failed", c.command_id, "download") for c in bad]
                         + [(c.device_id, k, c.command_id, None) for c in good for k in HAPPY[1:]])
    world.tick()
    doc = world.get(rid)
    assert (doc["status"], doc["halt_rule"]) == ("paused", "failure_rate")
    assert "3/6 = 50.0%" in doc["reason"]
    (halt,) = world.audits("rollout.halt")
    assert (halt["actor"], halt["target"], halt["outcome"]) == (ACTOR, f"rollout:{rid}", "ok")
    assert halt["detail"]["rule"] == "failure_rate" and "3/6" in halt["detail"]["reason"]
    for _ in range(3):
        world.tick(advance=60)
    assert world.new_orders() == []  # halted: nothing more goes out
    assert doc["steps"]["failed"] == 3


def test_silent_device_times_out_counts_as_failure_and_its_order_is_withdrawn(world: World) -> None:
    devices = ids(3)
    add_devices(world.engine, devices)
    add_cohort(world.engine, "fleet", devices)
    rid = world.start(["fleet"], [{"count": 3, "min_finished": 1, "success_threshold": 0.9,
                                   "failure_rate_halt": 0.5}],
                      timeouts={"receive_s": 120, "download_s": 600, "install_s": 600, "health_s": 600})
    world.tick()
    orders = world.new_orders()
    silent, *talking = orders
    world.devices.events([(c.device_id, k, c.command_id, None) for c in talking for k in HAPPY])
    world.tick(advance=60)
    assert world.steps(rid)[silent.device_id] == "ordered"
    world.tick(advance=61)
    assert world.steps(rid)[silent.device_id] == "timed_out"
    cancels = [c for c in world.commands() if c.kind == "cancel"]
    assert [c.device_id for c in cancels] == [silent.device_id]
    order = verified(cancels[0], world.keys, now=world.clock.now, last_sequence=1)
    assert order.cancels == silent.command_id
    doc = world.get(rid)
    assert (doc["status"], doc["halt_rule"]) == ("paused", "success_threshold")
    assert "timed_out 1" in doc["reason"]
    with world.engine.connect() as conn:
        row = conn.execute(sa.select(RD).where(RD.c.device_id == silent.device_id)).mappings().one()
    assert row["reason"] == "timeout_receive"


def test_device_added_to_the_cohort_mid_rollout_is_gated_by_the_same_phases(world: World) -> None:
    first = ids(10)
    late = ids(10, "late")
    add_devices(world.engine, first + late)
    add_cohort(world.engine, "fleet", first)
    rid = world.start(["fleet"], [{"count": 3, "min_soak_s": 600, "min_finished": 1}, {"percent": 100}],
                      max_concurrent=100)
    world.tick()
    phase1 = world.new_orders()
    assert {c.device_id for c in phase1} == set(rank_devices(rid, first)[:3])
    world.devices.events([(c.device_id, k, c.command_id, None) for c in phase1 for k in HAPPY])
    world.tick()
    join_cohort(world.engine, "fleet", late)
    world.tick()
    ranked = rank_devices(rid, first + late)
    joined_now = [c.device_id for c in world.new_orders()]
    # a joiner ranked inside phase 1's 3 places is ordered now, under phase 1; the others wait for phase 2
    assert set(joined_now) == set(ranked[:3]) - {c.device_id for c in phase1}
    assert set(joined_now) <= set(late)
    world.tick(advance=60)
    assert world.new_orders() == []
    doc = world.get(rid)
    assert doc["target"] == 20 and doc["planned"] == [3, 20] and doc["phase"] == 1
    latest = [c for c in world.commands() if c.device_id in joined_now]
    world.devices.events([(c.device_id, k, c.command_id, None) for c in latest for k in HAPPY])
    world.tick(advance=600)
    world.tick()
    phase2 = {c.device_id for c in world.new_orders()}
    assert world.get(rid)["phase"] == 2
    assert phase2 == set(first + late) - {c.device_id for c in phase1} - set(joined_now)


def test_retry_failed_orders_only_the_failed_devices(world: World) -> None:
    devices = ids(6)
    add_devices(world.engine, devices)
    add_cohort(world.engine, "fleet", devices)
    rid = world.start(["fleet"], [{"count": 6, "min_soak_s": 3600, "failure_rate_halt": 1.0, "min_finished": 1,
                                   "success_threshold": 0.3}],
                      timeouts={"receive_s": 60, "download_s": 600, "install_s": 600, "health_s": 600})
    world.tick()
    o = {c.device_id: c for c in world.new_orders()}
    d = sorted(o)
    world.devices.events([(d[0], k, o[d[0]].command_id, None) for k in HAPPY]
                         + [(d[1], k, o[d[1]].command_id, None) for k in HAPPY]
                         + [(d[2], "received", o[d[2]].command_id, None), (d[2], "failed", o[d[2]].command_id, "io")]
                         + [(d[3], "received", o[d[3]].command_id, None),
                            (d[3], "rejected", o[d[3]].command_id, "signature")]
                         + [(d[4], k, o[d[4]].command_id, None) for k in HAPPY[:4]]
                         + [(d[4], "rolled_back", o[d[4]].command_id, "health_check")])
    world.tick(advance=61)  # d[5] stays silent: timed out
    assert world.steps(rid) == {d[0]: "healthy", d[1]: "healthy", d[2]: "failed", d[3]: "rejected",
                                d[4]: "rolled_back", d[5]: "timed_out"}
    assert world.get(rid)["status"] == "running"
    world.new_orders()
    r = world.client.post(f"/api/v1/rollouts/{rid}/retry-failed", headers=AUTH, json={"reason": "fixed the CDN"})
    assert r.status_code == 200, r.text
    assert r.json()["steps"]["not_started"] == 3
    world.tick()
    again = world.new_orders()
    assert sorted(c.device_id for c in again) == [d[2], d[3], d[5]]
    assert all(c.command_id != o[c.device_id].command_id for c in again)
    attempts = {c.device_id: verified(c, world.keys, now=world.clock.now).sequence for c in again}
    assert attempts[d[5]] == 3  # order, cancel of the timed-out order, then the retry
    (audit,) = world.audits("rollout.retry_failed")
    assert audit["detail"]["reason"] == "fixed the CDN" and audit["detail"]["devices"] == 3


def test_stuck_rollout_never_blocks_a_later_rollout_on_other_devices(world: World) -> None:
    stuck_devices = ids(3, "old")
    new_devices = ids(3, "new")
    add_devices(world.engine, stuck_devices + new_devices)
    add_cohort(world.engine, "a", stuck_devices)
    add_cohort(world.engine, "b", [*new_devices, stuck_devices[0]])
    stuck = world.start(["a"], [{"count": 3}], timeouts={"receive_s": 86400, "download_s": 86400,
                                                          "install_s": 86400, "health_s": 86400})
    world.tick()
    assert len(world.new_orders()) == 3  # and nobody ever answers
    later = world.start(["b"], [{"count": 4, "min_finished": 3, "success_threshold": 0.75}])
    world.tick()
    got = world.new_orders()
    assert sorted(c.device_id for c in got) == new_devices  # old-000 is busy in the stuck rollout: skipped
    world.devices.events([(c.device_id, k, c.command_id, None) for c in got for k in HAPPY])
    world.tick()
    assert world.get(later)["status"] == "completed"
    assert world.get(stuck)["status"] == "running"
    assert world.steps(later).get(stuck_devices[0]) is None


def test_abort_mid_update_sends_cancels_in_the_request(world: World) -> None:
    devices = ids(4)
    add_devices(world.engine, devices)
    add_cohort(world.engine, "fleet", devices)
    rid = world.start(["fleet"], [{"count": 4}])
    world.tick()
    o = {c.device_id: c for c in world.new_orders()}
    d = sorted(o)
    world.devices.events([(d[1], "received", o[d[1]].command_id, None),
                          (d[1], "downloading", o[d[1]].command_id, None)]
                         + [(d[2], k, o[d[2]].command_id, None) for k in HAPPY[:4]]
                         + [(d[3], k, o[d[3]].command_id, None) for k in HAPPY])
    world.tick()
    world.pub.clear()
    r = world.client.post(f"/api/v1/rollouts/{rid}/abort", headers=AUTH, json={"reason": "bad model"})
    assert r.status_code == 200 and r.json()["status"] == "aborted"
    cancels = world.pub.commands()  # published by the request itself: no tick in between
    assert sorted(c.device_id for c in cancels) == [d[0], d[1]]
    assert all(c.kind == "cancel" for c in cancels)
    for c in cancels:
        assert verified(c, world.keys, now=world.clock.now, last_sequence=1).cancels == o[c.device_id].command_id
    world.devices.events([(d[0], "received", cancels[0].command_id if cancels[0].device_id == d[0]
                           else cancels[1].command_id, None)])
    world.devices.events([(d[1], "cancelled", o[d[1]].command_id, None)])
    world.tick()
    assert world.steps(rid)[d[1]] == "cancelled"
    with world.engine.connect() as conn:
        states: dict[str, str] = {r.command_id: r.state for r in conn.execute(
            sa.text("SELECT command_id, state FROM commands"))}
    assert states[o[d[1]].command_id] == "acked"
    assert sum(1 for c in cancels if states[c.command_id] == "acked") == 1  # d[0] received its cancel


def test_agent_rolling_back_on_its_own_is_followed(world: World) -> None:
    add_devices(world.engine, ["cam-1"])
    add_cohort(world.engine, "fleet", ["cam-1"])
    rid = world.start(["fleet"], [{"count": 1, "min_soak_s": 3600, "min_finished": 1}])
    world.tick()
    (c,) = world.new_orders()
    world.devices.events([("cam-1", k, c.command_id, None) for k in HAPPY])
    world.tick()
    assert world.steps(rid)["cam-1"] == "healthy"
    world.devices.event("cam-1", "rolled_back", None, reason="crash_loop")
    world.tick()
    assert world.steps(rid)["cam-1"] == "rolled_back"
    assert world.get(rid)["halt_rule"] in ("failure_rate", "success_threshold")


def _drift_frames(devices: list[str], *, version: int, shift: float, at: float,
                  slis: dict[str, Any] | None = None) -> list[Received]:
    base = baseline()
    out = []
    for i, d in enumerate(devices):
        s = window_summary(base, 400, shift=shift, seed=i + 7)
        features: Any = s.to_dict()["features"]
        w = DriftWindow(device_id=d, stream_seq=0, model="cancer-mlp", version=version, window_start=at - 300,
                        window_end=at, samples=400, features=features,
                        slis=slis or {"format": 1, "requests": 400, "ok": 400})
        out.append(Received(message_topic(w), encode(w), at))
    return out


def _put_baselines(engine: Engine) -> None:
    with engine.begin() as conn:
        for version in (1, 2):
            conn.execute(sa.insert(table_of(Baseline)).values(
                model="cancer-mlp", version=version, summary=baseline().to_dict(), thresholds={},
                updated_at=ts(time.time()), updated_by="test"))


def test_drift_spike_in_the_canary_vs_the_control_group_halts(world: World, writer: BatchWriter) -> None:
    devices = ids(12)
    add_devices(world.engine, devices)
    add_cohort(world.engine, "fleet", devices)
    _put_baselines(world.engine)
    gate = {"max_excess_over_control": 0.2, "min_devices": 3, "required": True}
    rid = world.start(["fleet"], [{"count": 4, "min_finished": 1, "drift": gate}, {"percent": 100}])
    world.tick()
    canary = world.new_orders()
    world.devices.events([(c.device_id, k, c.command_id, None) for c in canary for k in HAPPY])
    world.tick()
    doc = world.get(rid)
    assert doc["status"] == "running" and "drift gate" in (doc["waiting"] or "")  # waits for data
    control = [d for d in devices if d not in {c.device_id for c in canary}]
    writer.write(_drift_frames([c.device_id for c in canary], version=2, shift=3.0, at=world.clock.now)
                 + _drift_frames(control, version=1, shift=0.0, at=world.clock.now))
    world.tick()
    doc = world.get(rid)
    assert (doc["status"], doc["halt_rule"]) == ("paused", "drift_control"), doc
    assert "control" in world.audits("rollout.halt")[0]["detail"]["reason"]


def test_inference_error_rate_over_the_sli_gate_halts(world: World, writer: BatchWriter) -> None:
    devices = ids(6)
    add_devices(world.engine, devices)
    add_cohort(world.engine, "fleet", devices)
    rid = world.start(["fleet"], [{"count": 3, "min_finished": 1,
                                   "sli": {"max_error_rate": 0.05, "min_requests": 300}}, {"percent": 100}])
    world.tick()
    canary = world.new_orders()
    world.devices.events([(c.device_id, k, c.command_id, None) for c in canary for k in HAPPY])
    slis = {"format": 1, "requests": 400, "ok": 360, "errors": {"inference_failed": 40},
            "latency_us": {"first": 30, "counts": [10, 300, 50], "sum": 1.0, "max": 1500.0}}
    writer.write(_drift_frames([c.device_id for c in canary], version=2, shift=0.0, at=world.clock.now,
                               slis=slis))
    world.tick()
    doc = world.get(rid)
    assert (doc["status"], doc["halt_rule"]) == ("paused", "sli_error_rate"), doc
    assert "120/1200" in doc["reason"]


def test_operator_pause_while_the_loop_decides_is_never_overwritten(world: World) -> None:
    devices = ids(6)
    add_devices(world.engine, devices)
    add_cohort(world.engine, "fleet", devices)
    rid = world.start(["fleet"], [{"count": 2, "min_finished": 1}, {"percent": 100}])
    read = threading.Event()
    release = threading.Event()
    original = world.loop._signals

    def slow_signals(*args: Any, **kw: Any) -> Any:
        read.set()
        release.wait(10)
        return original(*args, **kw)

    world.loop._signals = slow_signals  # type: ignore[method-assign]
    ticking = threading.Thread(target=world.loop.tick)
    ticking.start()
    assert read.wait(10)
    result: dict[str, Any] = {}
    pausing = threading.Thread(target=lambda: result.setdefault("r", world.client.post(
        f"/api/v1/rollouts/{rid}/pause", headers=AUTH, json={"reason": "hold on"})))
    pausing.start()
    time.sleep(0.2)  # let the pause reach the lock (the outcome holds whichever comes first)
    release.set()
    ticking.join(20)
    pausing.join(20)
    world.loop._signals = original  # type: ignore[method-assign]
    assert result["r"].status_code == 200, result["r"].text
    doc = world.get(rid)
    assert (doc["status"], doc["reason"]) == ("paused", "hold on")
    sent = len(world.new_orders())
    world.tick(advance=60)
    assert world.new_orders() == [] and world.get(rid)["status"] == "paused"
    assert sent == 2 and doc["revision"] >= 3


def test_a_write_based_on_a_stale_revision_is_refused(world: World) -> None:
    add_devices(world.engine, ["cam-1"])
    add_cohort(world.engine, "fleet", ["cam-1"])
    rid = world.start(["fleet"], [{"count": 1}])
    with world.engine.connect() as conn:
        row = dict(conn.execute(sa.select(ROLLOUTS).where(ROLLOUTS.c.id == rid)).mappings().one())
    assert world.client.post(f"/api/v1/rollouts/{rid}/pause", headers=AUTH).status_code == 200
    with pytest.raises(ConcurrentChangeError), world.engine.begin() as conn:
        save_state(conn, rid, state_from_row(row), revision=row["revision"], now=world.clock.now)
    assert world.get(rid)["status"] == "paused"


def test_loop_skips_a_bad_rollout_row_and_runs_the_others(world: World) -> None:
    devices = ids(2)
    add_devices(world.engine, devices)
    add_cohort(world.engine, "fleet", devices)
    with world.engine.begin() as conn:
        conn.execute(sa.insert(ROLLOUTS).values(
            id="ro-broken", name="broken", bundle_digest=_digest(), model="cancer-mlp", version=2, cohorts=["fleet"],
            spec={"phases": "all of them"}, status="running", phase=0, phase_started_at=world.clock.now,
            created_at=ts(world.clock.now - 10), created_by="test", updated_at=ts(world.clock.now), revision=0))
    rid = world.start(["fleet"], [{"count": 2}])
    world.tick()
    assert world.loop.metrics.skipped_rollouts == 1
    assert sorted(c.device_id for c in world.new_orders()) == devices
    assert world.loop.metrics.tick_errors == 0
    assert world.get(rid)["status"] == "running"


class _Proxy:
    """A TCP proxy in front of the database that can be cut (a database outage) and restored."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._server: socket.socket | None = None
        self.up()

    def up(self) -> None:
        if self._server is not None:
            return
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(16)
        self._server = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def down(self) -> None:
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (close alone does not)
            self._server.close()
            self._server = None
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        self._conns.clear()


def test_loop_survives_a_database_outage_and_catches_up(world: World, db_url: str) -> None:
    devices = ids(3)
    add_devices(world.engine, devices)
    add_cohort(world.engine, "fleet", devices)
    rid = world.start(["fleet"], [{"count": 3}])
    proxy: _Proxy | None = None
    if db_url.startswith("postgresql"):
        url = sa.engine.make_url(db_url)
        proxy = _Proxy((url.host or "127.0.0.1", url.port or 5432))
        flaky = create_db_engine(url.set(host="127.0.0.1", port=proxy.port))
        down, up = proxy.down, proxy.up
    else:  # SQLite's outage: another process holds the write lock past the busy timeout
        flaky = create_db_engine(db_url, busy_timeout_ms=50)
        holder: list[sa.Connection] = []

        def down() -> None:
            conn = world.engine.connect().execution_options(sqlite_immediate=True)
            conn.begin()
            holder.append(conn)

        def up() -> None:
            while holder:
                conn = holder.pop()
                conn.rollback()
                conn.close()
    settings = world.loop.settings
    bridge = make_bridge(flaky, settings, world.pub, world.clock)
    loop = RolloutLoop(flaky, bridge, settings, clock=world.clock)
    try:
        down()
        world.clock.advance(1)
        loop.tick()  # no exception: logged and counted
        loop.tick()
        assert loop.metrics.tick_errors == 2
        assert world.pub.sent == []
        up()
        world.clock.advance(1)
        loop.tick()
        assert loop.metrics.tick_errors == 2
        assert sorted(c.device_id for c in world.new_orders()) == devices
        assert world.get(rid)["steps"]["ordered"] == 3
    finally:
        up()
        flaky.dispose()
        if proxy is not None:
            proxy.down()


def test_rollout_metrics_report_statuses_commands_and_lag(world: World) -> None:
    devices = ids(3)
    add_devices(world.engine, devices)
    add_cohort(world.engine, "fleet", devices)
    world.start(["fleet"], [{"count": 3}])
    world.tick()
    orders = world.new_orders()
    world.devices.event(orders[0].device_id, "received", orders[0].command_id)
    text = rollout_metrics(world.engine, loop=world.loop, bridge=world.bridge, now=world.clock.now + 5)
    assert 'fleet_rollouts{status="running"} 1' in text
    assert 'fleet_rollout_commands{kind="deploy",state="pending"} 3' in text
    assert 'fleet_rollout_orders_sent_total{kind="deploy"} 3' in text
    assert "fleet_rollout_loop_lag_seconds 5" in text
    world.loop.tick()
    text = rollout_metrics(world.engine, loop=world.loop, bridge=world.bridge, now=world.clock.now)
    assert 'fleet_rollout_commands{kind="deploy",state="acked"} 1' in text
    assert "fleet_rollout_loop_lag_seconds 0" in text
    assert 'fleet_rollout_devices{step="received"} 1' in text
    assert 'fleet_rollout_decisions_total{decision="SendOrder"} 3' in text
