"""Acceptance of issue 5, end to end with real processes: a real mosquitto, a migrated database (SQLite file and a
throwaway PostgreSQL), ``fleet-server serve`` as a subprocess configured by a settings TOML file, an admin and their
API token made with ``fleet-server user``, the real signed v2 bundle uploaded through ``POST /api/v1/bundles``,
three real ``edge-agent run`` processes and simulated devices speaking the wire contract.

1. A three-phase rollout through the 3 real agents and 200 simulated devices: while phase *k* runs, the devices that
   ever got an order (by the ``commands`` table, ``rollout_devices`` and every frame seen on
   ``fleet/v1/+/commands``) are exactly phase *k*'s planned members, computed here from ``rank_devices`` and the
   phase sizes, not read from the server; devices outside the cohort never get a frame; the rollout completes;
   the real agents download, install, pass their health checks, report ``healthy`` and serve version 2; the
   server's version tracking attributes every change to the rollout; the audit log has its records.
2. THREATS.md "Rollout escapes its cohort": 200 simulated devices whose canary fails over the threshold: the
   rollout halts by itself with an audited reason, and no device outside the canary ever gets an order.

Both share one module-scoped set-up per database. Every wait is for an observable state, with generous timeouts.

3. A regression test for what (1) and (2) found through the served API on SQLite: requests that read and then
   write in one transaction answered 500 ("database is locked") while the server's own writers were busy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from fleet_server.db import create_db_engine
from fleet_server.deploy.loop import ACTOR
from fleet_server.simulator import (
    DeviceGroup,
    Download,
    Fractions,
    Latencies,
    Outcome,
    Scenario,
    SimulatedFleet,
    plan_devices,
    register_via_api,
)
from tests.conftest import samples
from tests.server.acceptance_support import (
    ADMIN,
    FleetServer,
    OrderWatch,
    Snapshot,
    phase_plan,
    start_agent,
    start_fleet_server,
    wait_agents_ready,
)
from tests.server.deploy_support import CommandSubscriber
from tests.services.mqtt import MosquittoBroker, find_mosquitto, wait_until
from tests.services.postgres import PostgresCluster
from tests.services.required import unavailable
from tests.updater.support import Keys, make_bundle

pytestmark = pytest.mark.integration

MODEL = "cancer-mlp"
AGENTS = ("pi-a", "pi-b", "pi-c")
FAST = Latencies(received=0.0, downloading=0.02, verified=0.05, installed=0.05, healthy=0.1, jitter=0.5)
TERMINAL = {"healthy", "failed", "rolled_back", "rejected", "timed_out", "cancelled"}


@dataclass
class Stack:
    keys: Keys
    broker: MosquittoBroker
    server: FleetServer
    engine: Engine
    """The test's own connection to the server's database (reads only)."""
    digest: str
    """The uploaded v2 bundle."""
    length: int


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary = find_mosquitto()
    if binary is None:
        unavailable("mosquitto is not installed (apt-get install mosquitto)")
    tmp = tmp_path_factory.mktemp(f"acceptance-{request.param}")
    cluster: PostgresCluster | None = None
    if request.param == "sqlite":
        db_url = f"sqlite:///{tmp / 'fleet.db'}"
    else:
        cluster = request.getfixturevalue("postgres_cluster")
        db_url = cluster.create_database()
    broker = MosquittoBroker(binary, tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    keys = Keys()
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(broker.kill)
        server = start_fleet_server(tmp, db_url=db_url, broker=broker, keys=keys)
        cleanup.callback(lambda: _stop_server(server))
        engine = create_db_engine(db_url)
        cleanup.callback(engine.dispose)
        r = server.api.post("/api/v1/bundles", content=make_bundle(keys, version=2),
                            headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, f"{r.text}\n{server.log_tail()}"
        assert (r.json()["model"], r.json()["version"]) == (MODEL, 2)
        yield Stack(keys, broker, server, engine, r.json()["digest"], r.json()["length"])
    if cluster is not None:
        with contextlib.suppress(Exception):
            cluster.drop_database(db_url.rsplit("/", 1)[1])


def _stop_server(server: FleetServer) -> None:
    server.stop()
    # uvicorn exits cleanly on SIGTERM (or re-raises it); anything else is a crash worth seeing
    assert server.proc.returncode in (0, -15), server.log_tail()


# -- helpers ---------------------------------------------------------------------------------------------------------


def _ok(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    return r.json()


def _cohort(api: httpx.Client, name: str, selector: dict[str, str], size: int) -> None:
    _ok(api.post("/api/v1/cohorts", json={"name": name, "selector": selector}), 201)
    assert _ok(api.get(f"/api/v1/cohorts/{name}"))["size"] == size


def _versions(api: httpx.Client, cohort: str) -> dict[int, int]:
    doc = _ok(api.get("/api/v1/versions", params={"model": MODEL, "cohort": cohort}))
    return {int(i["version"]): int(i["devices"]) for i in doc["items"]}


def _wait_versions(api: httpx.Client, cohort: str, expected: dict[int, int], timeout: float) -> None:
    wait_until(lambda: _versions(api, cohort) == expected, timeout, interval=0.2,
               what=f"{MODEL} versions {expected} in cohort {cohort} (seen {_versions(api, cohort)})")


def _create(api: httpx.Client, digest: str, cohort: str, phases: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    doc: dict[str, Any] = _ok(api.post("/api/v1/rollouts", json={
        "name": f"{MODEL} v2 to {cohort}", "bundle": digest, "cohorts": [cohort], "phases": phases, **spec}), 201)
    return doc


def _watch(watch: OrderWatch, plan: Sequence[frozenset[str]], *, until: Callable[[Snapshot], bool],
           timeout: float, describe: Callable[[], str], max_phase: int | None = None) -> set[int]:
    """Snapshot until ``until``; every snapshot must show orders only to the members of the phase it belongs to
    (and any frame at all only to them). Returns the phases in which the ordered set was seen to be exactly the
    phase's plan while the phase was running (or, for the last phase, completed)."""
    exact: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        s = watch.take()
        k = s.phase_after
        allowed = plan[k - 1]
        outside = (s.ordered | s.mqtt_any) - allowed
        assert not outside, f"phase {k}: commands to devices outside the phase: {sorted(outside)}"
        assert max_phase is None or k <= max_phase, f"the rollout reached phase {k}: {describe()}"
        if s.stable and s.ordered == allowed and s.mqtt == s.commands == s.rollout_devices:
            exact.add(k)
        if until(s):
            return exact
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s; last snapshot phase {k} {s.status}, ordered "
                                 f"{len(s.ordered)}; rollout: {describe()}")
        time.sleep(0.05)


def _rollout_text(api: httpx.Client, rid: str, server: FleetServer) -> Callable[[], str]:
    def describe() -> str:
        doc = api.get(f"/api/v1/rollouts/{rid}").json()
        keep = {k: doc.get(k) for k in ("status", "phase", "reason", "halt_rule", "waiting", "steps", "tally")}
        return f"{keep}\nserver log tail:\n{server.log_tail()[-1500:]}"
    return describe


def _settled(status: str, bad: tuple[str, ...]) -> Callable[[Snapshot], bool]:
    def check(s: Snapshot) -> bool:
        assert s.status not in bad, f"the rollout went {s.status}"
        return s.status == status
    return check


# -- 1. three real agents + 200 simulated devices ---------------------------------------------------------------------


PHASES: list[dict[str, Any]] = [
    {"percent": 5, "min_soak_s": 2, "success_threshold": 0.9, "failure_rate_halt": 0.2, "min_finished": 3},
    {"percent": 30, "min_soak_s": 2, "success_threshold": 0.9, "failure_rate_halt": 0.2, "min_finished": 3},
    {"percent": 100, "min_soak_s": 0, "success_threshold": 0.9, "failure_rate_halt": 0.2, "min_finished": 3},
]


def test_rollout_through_three_real_agents_and_200_simulated_devices_reaches_exactly_each_phase(stack: Stack) -> None:
    api, server = stack.server.api, stack.server
    homes = Path(tempfile.mkdtemp(prefix="acc-", dir="/tmp"))  # short: the agents' socket paths
    scenario = Scenario(seed=1, id_prefix="sim", heartbeat_s=30, window_s=3600, groups=(
        DeviceGroup(name="fleet", count=200, labels={"ring": "acceptance"}, installed={MODEL: 1}, latency=FAST),
        DeviceGroup(name="holdout", count=10, labels={"ring": "holdout"}, installed={MODEL: 1}, latency=FAST)),
        download=Download(fraction=0.05, mode="range", range_bytes=4096))
    plans = plan_devices(scenario)
    holdout = [p.device_id for p in plans if p.group == "holdout"]
    for device in AGENTS:
        _ok(api.post("/api/v1/devices", json={"id": device, "firmware_profile": "generic-x86-64",
                                              "labels": {"ring": "acceptance", "kind": "real"}}), 201)
    assert register_via_api(server.base_url, server.token, plans, client=api) == {"created": 210, "updated": 0}
    _cohort(api, "acceptance", {"ring": "acceptance"}, 203)
    cohort = frozenset([*AGENTS, *(p.device_id for p in plans if p.group == "fleet")])

    agents = [start_agent(d, homes / d, stack.broker, stack.keys) for d in AGENTS]
    fleet = SimulatedFleet(scenario, stack.broker.host, stack.broker.port, trust_root=stack.keys.root_bytes(),
                           mode="per_device")
    sub: CommandSubscriber | None = None
    try:
        fleet.start()
        assert fleet.wait_connected(60), "simulated devices not connected"
        wait_agents_ready(agents)
        _wait_versions(api, "acceptance", {1: 203}, 60)  # every status ingested: the agents serve v1 from [[models]]
        sub = CommandSubscriber(stack.broker.host, stack.broker.port, client_id="acceptance-commands-1")

        doc = _create(api, stack.digest, "acceptance", PHASES, max_concurrent=250)
        rid = doc["id"]
        plan = phase_plan(rid, cohort, PHASES)
        assert [len(p) for p in plan] == [11, 61, 203]  # ceil(5% of 203), ceil(30% of 203), all
        assert doc["planned"] == [len(p) for p in plan] and doc["target"] == 203 and doc["status"] == "draft"
        watch = OrderWatch(stack.engine, sub, rid)
        assert watch.take().ordered == frozenset()  # a draft sends nothing
        started = _ok(api.post(f"/api/v1/rollouts/{rid}/start"))
        assert (started["status"], started["phase"]) == ("running", 1)
        sent_before = server.metric("fleet_bundle_download_bytes_total")

        describe = _rollout_text(api, rid, server)
        exact = _watch(watch, plan, until=_settled("completed", ("paused", "aborted", "rolled_back")), timeout=180,
                       describe=describe)
        assert exact == {1, 2, 3}, f"phases seen with exactly their planned members: {sorted(exact)}"
        for k in (1, 2):  # each phase was watched while running, and never saw more than its plan
            assert any(s.stable and s.phase_after == k and s.status == "running" for s in watch.snapshots)

        final = watch.take()
        assert final.mqtt == final.commands == final.rollout_devices == final.mqtt_any == cohort
        for device in holdout:  # outside the cohort: never a frame, still on v1 by their own account
            view = fleet.device(device)
            assert dict(view.applied) == {} and dict(view.models) == {MODEL: 1}, device
        doc = _ok(api.get(f"/api/v1/rollouts/{rid}"))
        assert doc["status"] == "completed" and doc["steps"]["healthy"] == 203, describe()
        assert sum(doc["steps"].values()) == 203

        # The real agents: downloaded the bundle from the server, installed, passed their health checks, reported.
        # (10 simulated devices fetched its first 4 KiB with a Range request too.)
        refused = {s: server.metric(f'fleet_bundle_download_requests_total{{status="{s}"}}') for s in (401, 403, 404)}
        assert refused == {401: 0, 403: 0, 404: 0}
        assert server.metric("fleet_bundle_download_bytes_total") - sent_before >= 3 * stack.length + 10 * 4096
        steps = watch.steps()
        orders = {c.device_id: c for c in watch.commands()
                  if c.kind == "deploy" and c.device_id in AGENTS}
        row = samples("cancer_mlp_int8")["inputs"]["features"][0]
        for a in agents:
            assert steps[a.device_id] == "healthy", a.log_tail()
            with a.client() as c:
                assert {m["name"]: m["version"] for m in c.models()} == {MODEL: 2}
                assert c.infer(MODEL, {"features": [row]})["version"] == 2
            events = _ok(api.get(f"/api/v1/rollouts/{rid}/devices", params={"step": "healthy", "limit": 1000}))
            assert a.device_id in {i["device_id"] for i in events["items"]}

        def attributed(device: str) -> bool:
            detail = _ok(api.get(f"/api/v1/devices/{device}"))
            models = {m["model"]: (m["version"], m["previous_version"]) for m in detail["models"]}
            changes = _ok(api.get("/api/v1/version-changes", params={"device": device, "model": MODEL}))["items"]
            return models == {MODEL: (2, 1)} and bool(changes) and (
                changes[0]["from_version"], changes[0]["to_version"], changes[0]["rollout_id"],
                changes[0]["command_id"]) == (1, 2, rid, orders[device].command_id)

        for device in AGENTS:
            wait_until(lambda d=device: attributed(d), 30, interval=0.2,  # type: ignore[misc]
                       what=f"{device}: device_models on v2 and the change attributed to {rid}")

        def changed_by_rollout() -> set[str]:
            seen: set[str] = set()
            after = None
            while True:
                params: dict[str, Any] = {"rollout": rid, "limit": 1000, **({"after": after} if after else {})}
                page = _ok(api.get("/api/v1/version-changes", params=params))
                seen.update(i["device_id"] for i in page["items"] if (i["from_version"], i["to_version"]) == (1, 2))
                after = page["next"]
                if after is None:
                    return seen

        wait_until(lambda: changed_by_rollout() == cohort, 30, interval=0.2,
                   what="a version change attributed to the rollout for every device of the cohort")
        _wait_versions(api, "acceptance", {2: 203}, 30)

        audit = _ok(api.get("/api/v1/audit", params={"target": f"rollout:{rid}", "limit": 1000}))["items"]
        by_action: dict[str, list[dict[str, Any]]] = {}
        for rec in reversed(audit):  # oldest first
            by_action.setdefault(rec["action"], []).append(rec)
        assert [(r["actor"], r["outcome"]) for r in by_action["rollout.create"]] == [(f"user:{ADMIN}", "ok")]
        assert [(r["actor"], r["outcome"]) for r in by_action["rollout.start"]] == [(f"user:{ADMIN}", "ok")]
        assert [r["detail"]["to_phase"] for r in by_action["rollout.advance"]] == [2, 3]
        assert [r["actor"] for r in by_action["rollout.complete"]] == [ACTOR]
        assert "rollout.halt" not in by_action
    finally:
        if sub is not None:
            sub.close()
        fleet.stop()
        for a in agents:
            a.stop()
        shutil.rmtree(homes, ignore_errors=True)


# -- 2. THREATS.md: rollout escapes its cohort ------------------------------------------------------------------------


HALT_THRESHOLD = 0.2
HALT_PHASES: list[dict[str, Any]] = [
    {"percent": 10, "min_soak_s": 2, "success_threshold": 0.9, "failure_rate_halt": HALT_THRESHOLD,
     "min_finished": 5},
    {"percent": 50, "min_soak_s": 2},
    {"percent": 100},
]


def _failing_canary(base: Scenario, canary: frozenset[str], threshold: float) -> Scenario:
    """``base`` with the seed that places its injected failures so that the canary's share is at least twice the
    threshold and some failing devices are outside the canary (they must never be reached). Device ids and labels
    do not depend on the seed, only the outcomes do."""
    for seed in range(10_000):
        scenario = dataclasses.replace(base, seed=seed)
        failing = {p.device_id for p in plan_devices(scenario) if p.outcome is Outcome.FAIL}
        if len(failing & canary) >= 2 * threshold * len(canary) and failing - canary:
            return scenario
    raise AssertionError("no seed gives the canary enough failures")


def test_rollout_escaping_its_cohort_canary_failures_over_threshold_halt_it_with_an_audited_reason(
        stack: Stack) -> None:
    api, server = stack.server.api, stack.server
    base = Scenario(id_prefix="bad", heartbeat_s=30, window_s=3600, fractions=Fractions(fail=0.3), groups=(
        DeviceGroup(name="ring", count=200, labels={"ring": "bad"}, installed={MODEL: 1}, latency=FAST),))
    ids = [p.device_id for p in plan_devices(base)]
    assert register_via_api(server.base_url, server.token, plan_devices(base), client=api) == {
        "created": 200, "updated": 0}
    _cohort(api, "bad-ring", {"ring": "bad"}, 200)
    doc = _create(api, stack.digest, "bad-ring", HALT_PHASES, max_concurrent=100)
    rid = doc["id"]
    plan = phase_plan(rid, ids, HALT_PHASES)
    canary = plan[0]
    assert len(canary) == 20 and doc["planned"] == [20, 100, 200]
    scenario = _failing_canary(base, canary, HALT_THRESHOLD)
    failing = {p.device_id for p in plan_devices(scenario) if p.outcome is Outcome.FAIL}
    fleet = SimulatedFleet(scenario, stack.broker.host, stack.broker.port, trust_root=stack.keys.root_bytes(),
                           mode="per_device")
    sub: CommandSubscriber | None = None
    try:
        fleet.start()
        assert fleet.wait_connected(60), "simulated devices not connected"
        _wait_versions(api, "bad-ring", {1: 200}, 60)
        sub = CommandSubscriber(stack.broker.host, stack.broker.port, client_id="acceptance-commands-2")
        watch = OrderWatch(stack.engine, sub, rid)
        _ok(api.post(f"/api/v1/rollouts/{rid}/start"))
        describe = _rollout_text(api, rid, server)
        _watch(watch, plan, until=_settled("paused", ("completed", "aborted", "rolled_back")), timeout=90,
               describe=describe, max_phase=1)

        doc = _ok(api.get(f"/api/v1/rollouts/{rid}"))
        assert (doc["status"], doc["phase"], doc["halt_rule"]) == ("paused", 1, "failure_rate"), describe()
        numbers = re.search(r"(\d+)/(\d+) = (\d+\.\d)%", doc["reason"] or "")
        assert numbers is not None, doc["reason"]
        failures, finished = int(numbers[1]), int(numbers[2])
        assert finished >= 5 and failures / finished > HALT_THRESHOLD
        (halt,) = _ok(api.get("/api/v1/audit", params={"action": "rollout.halt", "target": f"rollout:{rid}"}))["items"]
        assert (halt["actor"], halt["outcome"]) == (ACTOR, "ok")
        assert halt["detail"]["rule"] == "failure_rate" and halt["detail"]["reason"] == doc["reason"]

        # The canary's devices were all ordered before the halt and finish on their own; the loop goes on ticking
        # and orders nobody else.
        wait_until(lambda: set(watch.steps().values()) <= TERMINAL and len(watch.steps()) == len(canary), 60,
                   interval=0.1, what="every canary device to finish")
        ticks = server.metric("fleet_rollout_loop_ticks_total")
        wait_until(lambda: server.metric("fleet_rollout_loop_ticks_total") >= ticks + 5, 30, interval=0.1,
                   what="five more rollout loop ticks")
        final = watch.take()
        assert (final.phase_after, final.status) == (1, "paused")
        assert final.mqtt == final.commands == final.rollout_devices == final.mqtt_any == canary
        steps = watch.steps()
        assert {d for d, s in steps.items() if s == "failed"} == failing & canary
        assert {d for d, s in steps.items() if s == "healthy"} == canary - failing
        for device in set(ids) - canary:  # by the devices' own account too, failing ones included
            assert dict(fleet.device(device).applied) == {}, device
        _wait_versions(api, "bad-ring", {1: 200 - len(canary - failing), 2: len(canary - failing)}, 30)
    finally:
        if sub is not None:
            sub.close()
        fleet.stop()


# -- 3. found through `fleet-server serve`: API writes racing the server's own writers on SQLite ----------------


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_api_writes_while_another_connection_writes_never_fail(client: Any, engine: Engine) -> None:
    """``fleet-server serve`` writes all the time (ingestion, the rollout loop). On SQLite a transaction that has
    read and then writes gets ``database is locked`` at once (no busy wait: its snapshot is stale) when another
    connection committed in between; such requests answered 500. Covered: registering a device, creating a
    cohort, and the first use of a user's API token (which records ``last_used_at``)."""
    from sqlmodel import Session

    from fleet_server.auth.tokens import create_token
    from fleet_server.auth.users import create_user
    from tests.server.support import AUTH

    now = datetime.now(UTC)
    with Session(engine) as session:
        user = create_user(session, username="racer", role="admin", password=None, actor="test", now=now)
        secrets = [create_token(session, user, name=f"t{i}", now=now, actor="test").secret for i in range(40)]
        session.commit()
    counters = sa.table("counters", sa.column("name"), sa.column("value"))
    with engine.begin() as conn:
        conn.execute(sa.insert(counters).values(name="acceptance.race", value=0))
    stop = threading.Event()

    def write() -> None:
        while not stop.is_set():
            with engine.begin() as conn:
                conn.execute(sa.update(counters).where(counters.c.name == "acceptance.race")
                             .values(value=counters.c.value + 1))

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        for i in range(150):
            r = client.post("/api/v1/devices", headers=AUTH, json={"id": f"race-{i:03d}", "labels": {"ring": "r"}})
            assert r.status_code == 201, f"device {i}: {r.status_code} {r.text}"
        for i in range(30):
            r = client.post("/api/v1/cohorts", headers=AUTH, json={"name": f"race-{i}", "selector": {"ring": "r"}})
            assert r.status_code == 201, f"cohort {i}: {r.status_code} {r.text}"
        for i, secret in enumerate(secrets):  # each token's first use writes its last_used_at
            r = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {secret}"})
            assert r.status_code == 200, f"token {i}: {r.status_code} {r.text}"
    finally:
        stop.set()
        writer.join(10)
