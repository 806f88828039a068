"""10 000 simulated devices through a 3-phase rollout, end to end, every part in its own process.

What runs (all real, nothing in the bench process but the operator's HTTP calls and the measuring):

* a real mosquitto on a free port (``tests/services/mqtt.py``: anonymous, loopback, persistence), with
  ``max_queued_messages`` raised (see "The broker" below);
* ``fleet-server serve`` as a subprocess: HTTP API, MQTT ingestion, the rollout loop and the command bridge, on
  SQLite (a file in a temp directory, WAL) or, with ``--pg``, a throwaway PostgreSQL 15 cluster with fsync on
  (``tests/services/postgres.py``); all settings at their defaults except the ones the run needs (database, MQTT,
  keys, trust root, bundle directory, bootstrap token);
* ``fleet-server simulate`` as a subprocess: ``--devices`` simulated agents (multiplexed, 50 per MQTT connection
  above 200 devices) that verify every signed order against the trust root and answer with the real event
  sequence; 2 % of them (exactly ``round(0.02 * n)``, seeded) fail their download.

Set-up (not timed): ``fleet-server db upgrade``; the devices registered with the simulator's registration
(``register_devices``, what ``fleet-server simulate --register-db`` does); the server started; a cohort (label
selector) created and a real signed bundle (``cancer-mlp`` v2, the demo int8 model, ``tests.updater.support.
make_bundle``) uploaded through the API; the simulator started and every device seen online by the server (or,
if some statuses never arrive, after a 60 s grace: the count online at the start is reported).

Timed: a rollout created and started through the API: phases 1 %, 10 %, 100 %, no soak, success threshold 90 %,
failure-rate halt 50 %; ``max_concurrent`` = every device and a constant rate of 1 000 000 orders/minute (the
API's maximum), so neither limit holds anything back: what is measured is the server, the broker and the
simulated devices. The clock is the server's own: from the ``rollout.start`` audit record to ``rollout.complete``
(per phase: start/advance/complete records). The bench polls ``GET /rollouts/{id}`` every 0.5 s meanwhile.

Reported: wall time and per-phase times; orders/s (the 100 % phase's orders over the time from its start to the
last device's ``received`` event, i.e. signed, stored, published, delivered and opened by the device); events
ingested/s (event rows stored during the rollout over its wall time, and the busiest second by arrival); peak RSS
of the server and of the simulator process (psutil, sampled every 0.1 s from their start) and before the rollout,
their CPU seconds during the rollout and the machine's load (busy share of all CPUs, CPU seconds of processes that
are not the run's, load averages); delivery health: events that reached the server more than 5 s after the device
sent them (they waited in the broker's queue for the server: the server's MQTT reader fell behind), mosquitto's
"messages are being dropped" warnings, the simulator's resends, and the time from the last event's arrival at the
server to completion (the ingestion write backlog plus a loop tick); final healthy/failed counts, which must equal
the scenario's outcome (``n - round(0.02 n)`` healthy, ``round(0.02 n)`` failed, nothing else) or the bench fails.

The broker: mosquitto's default ``max_queued_messages`` is 1 000 per client, past which it drops QoS 1 messages for
that client. The server's single ingest subscription receives every device's traffic, so a rollout burst overflows
it (events come back after the device's 30 s ack timeout; a dropped status is lost until the next one). The bench
raises the limit to 100 000 (as ``bench.rollout_bridge`` does for its subscriber): ``--stock-mosquitto`` keeps the
default and shows the stalls.

Repeats: the median of ``--repeats`` runs (default 3; 1 with ``--quick``); a full run that takes over 2 minutes
from set-up to teardown is run once, which the output says.

Run: ``python -m bench.fleet_rollout [--quick] [--pg] [--devices N] [--repeats N] [--stock-mosquitto] [--keep]``.
One JSON object per metric per line, then a table.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import httpx
import psutil
import sqlalchemy as sa

from bench.common import emit

BENCH = "fleet_rollout"
TOKEN = "bench-token-0123456789abcdef"
SECRET = "bench-download-secret-0123456789abcdef"
FAIL_FRACTION = 0.02
HEARTBEAT_S = 60.0
WINDOW_S = 3600.0
RATE_PER_MINUTE = 1_000_000.0
PHASES_PERCENT = (1, 10, 100)
SUCCESS_THRESHOLD = 0.9
FAILURE_RATE_HALT = 0.5
ONE_RUN_BUDGET_S = 120.0
BROKER_QUEUE = 100_000
LATE_S = 5.0
ONLINE_GRACE_S = 60.0
POLL_S = 0.5
REPO = Path(__file__).resolve().parent.parent


def scenario_toml(n: int) -> str:
    """The simulated fleet: one group of ``n`` devices on cancer-mlp v1, ``FAIL_FRACTION`` failing the download;
    deploy latencies downloading 0.1 s, verified 0.3 s, installed 0.1 s, healthy 0.3 s (+-50 % per device)."""
    return f"""seed = 11
id_prefix = "sim"
heartbeat_s = {HEARTBEAT_S}
window_s = {WINDOW_S}

[fractions]
fail = {FAIL_FRACTION}

[latency]
received = 0.0
downloading = 0.1
verified = 0.3
installed = 0.1
healthy = 0.3
jitter = 0.5

[[groups]]
name = "fleet"
count = {n}
labels = {{ fleet = "bench" }}
installed = {{ "cancer-mlp" = 1 }}
"""


def rollout_body(digest: str, n: int) -> dict[str, Any]:
    phase = {"min_soak_s": 0, "success_threshold": SUCCESS_THRESHOLD, "failure_rate_halt": FAILURE_RATE_HALT,
             "min_finished": 1}
    return {"name": f"bench {n} devices", "bundle": digest, "cohorts": ["bench"],
            "phases": [{"percent": p, **phase} for p in PHASES_PERCENT], "max_concurrent": n,
            "rate": {"kind": "constant", "per_minute": RATE_PER_MINUTE}}


class Sampler:
    """Peak RSS of some processes, sampled every ``every_s`` in a thread."""

    def __init__(self, every_s: float = 0.1) -> None:
        self.every_s = every_s
        self.procs: dict[str, psutil.Process] = {}
        self.peak: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def watch(self, name: str, pid: int) -> None:
        with self._lock:
            self.procs[name] = psutil.Process(pid)
        self.sample()

    def rss(self, name: str) -> int:
        try:
            return int(self.procs[name].memory_info().rss)
        except psutil.Error:
            return 0

    def sample(self) -> None:
        with self._lock:
            for name in list(self.procs):
                self.peak[name] = max(self.peak.get(name, 0), self.rss(name))
            self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def cpu_s(self) -> dict[str, float]:
        out = {}
        for name, p in self.procs.items():
            try:
                t = p.cpu_times()
                out[name] = t.user + t.system
            except psutil.Error:
                out[name] = 0.0
        return out

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _wait(predicate: Any, timeout: float, what: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def _metrics(client: httpx.Client) -> dict[str, float]:
    """The fleet_ingest_* samples of ``GET /metrics``."""
    r = client.get("/metrics")
    r.raise_for_status()
    out = {}
    for line in r.text.splitlines():
        m = re.match(r"^(fleet_ingest_\w+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def _audit_times(client: httpx.Client, rollout_id: str) -> list[tuple[str, float]]:
    """(action, unix time) of the rollout's audit records, oldest first."""
    r = client.get("/api/v1/audit", params={"target": f"rollout:{rollout_id}", "limit": 1000})
    r.raise_for_status()
    return sorted(((i["action"], _unix(datetime.fromisoformat(i["at"]))) for i in r.json()["items"]),
                  key=lambda x: x[1])


def _unix(value: Any) -> float:
    """Unix seconds of a stored time: a datetime, a naive ISO string in UTC (SQLite through ``sa.text``), a number."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    return float(value)


def _tree_cpu_s(pid: int | None) -> float:
    """CPU seconds of a process and its live children (PostgreSQL's postmaster and backends); 0 without one."""
    if pid is None:
        return 0.0
    total = 0.0
    try:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
    except psutil.Error:
        pass
    return total


def _cpu_busy(before: Any, after: Any) -> tuple[float, float]:
    """(busy CPU-seconds, busy share of the machine) between two ``psutil.cpu_times()``."""
    idle = (after.idle + getattr(after, "iowait", 0.0)) - (before.idle + getattr(before, "iowait", 0.0))
    total = sum(after) - sum(before)
    return total - idle, (total - idle) / total if total > 0 else 0.0


def run_once(n: int, *, bundle: bytes, root: bytes, orders_pem: bytes, db_url: str, workdir: Path,
             mosquitto: str, timeout_s: float, stock_broker: bool = False,
             postgres_pid: int | None = None) -> dict[str, Any]:
    """One complete run in ``workdir``: returns the figures (raises when the rollout does not end completed with
    exactly the scenario's outcome)."""
    from fleet_server.db import create_db_engine
    from fleet_server.simulator import Scenario, plan_devices, register_devices
    from tests.services.mqtt import MosquittoBroker, free_port

    began = time.monotonic()
    (workdir / "mq").mkdir()
    (workdir / "root.json").write_bytes(root)
    (workdir / "orders.pem").write_bytes(orders_pem)
    (workdir / "scenario.toml").write_text(scenario_toml(n))
    broker = MosquittoBroker(mosquitto, workdir / "mq")
    if not stock_broker:
        with broker.conf.open("a") as conf:
            conf.write(f"max_queued_messages {BROKER_QUEUE}\n")
    broker.start()
    sampler = Sampler()
    assert broker.proc is not None
    sampler.watch("mosquitto", broker.proc.pid)
    port = free_port()
    env = {**os.environ, "FLEET_DATABASE_URL": db_url, "FLEET_API_TOKEN": TOKEN,
           "FLEET_ORDERS_KEY_FILE": str(workdir / "orders.pem"), "FLEET_DOWNLOAD_TOKEN_SECRET": SECRET,
           "FLEET_BUNDLE_TRUST_ROOT_FILE": str(workdir / "root.json"), "FLEET_BUNDLE_DIR": str(workdir / "bundles"),
           "FLEET_MQTT_HOST": broker.host, "FLEET_MQTT_PORT": str(broker.port),
           "FLEET_PUBLIC_URL": f"http://127.0.0.1:{port}"}
    procs: dict[str, subprocess.Popen[Any]] = {}
    logs: list[IO[Any]] = []
    facts: dict[str, Any] = {}
    try:
        up = subprocess.run([sys.executable, "-m", "fleet_server", "db", "upgrade"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300, check=False)
        if up.returncode != 0:
            raise RuntimeError(f"db upgrade failed: {up.stderr}")
        engine = create_db_engine(db_url)
        t = time.perf_counter()
        scenario = Scenario.from_toml(workdir / "scenario.toml")
        register_devices(engine, plan_devices(scenario), actor="bench")
        facts["register_s"] = round(time.perf_counter() - t, 2)

        logs.append((workdir / "server.log").open("w"))
        procs["server"] = subprocess.Popen(
            [sys.executable, "-m", "fleet_server", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env, cwd=REPO, stdout=logs[-1], stderr=subprocess.STDOUT)
        sampler.watch("server", procs["server"].pid)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"},
                              timeout=60)

        def ready() -> bool:
            if procs["server"].poll() is not None:
                raise RuntimeError(f"the server exited: {(workdir / 'server.log').read_text()[-2000:]}")
            try:
                return client.get("/readyz").status_code == 200
            except httpx.TransportError:
                return False
        _wait(ready, 60, "the server")
        r = client.post("/api/v1/cohorts", json={"name": "bench", "selector": {"fleet": "bench"}})
        assert r.status_code == 201, r.text
        r = client.post("/api/v1/bundles", content=bundle, headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        digest = r.json()["digest"]

        logs.append((workdir / "simulator.log").open("w"))
        t = time.perf_counter()
        procs["simulator"] = subprocess.Popen(
            [sys.executable, "-m", "fleet_server", "simulate", "--scenario", str(workdir / "scenario.toml"),
             "--host", broker.host, "--port", str(broker.port), "--trust-root", str(workdir / "root.json"),
             "--stats-every", "3600", "--connect-timeout", "300"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=logs[-1], text=True)
        sampler.watch("simulator", procs["simulator"].pid)
        assert procs["simulator"].stdout is not None
        line = procs["simulator"].stdout.readline()
        if not line.startswith('{"connected"'):
            raise RuntimeError(f"the simulator did not connect: {line!r} {(workdir / 'simulator.log').read_text()}")
        sim_connected = json.loads(line)
        facts["sim_connect_s"] = round(time.perf_counter() - t, 2)
        facts["sim_mode"] = sim_connected["mode"]
        facts["sim_connections"] = sim_connected["connections"]

        online_sql = sa.text("SELECT COUNT(*) FROM devices WHERE last_status = 'online'")

        def online() -> int:
            with engine.connect() as conn:
                return int(conn.execute(online_sql).scalar_one())
        # Every device online as the server sees it; a status the broker dropped is not sent again (only the next
        # connect sends one), so after a grace period the rollout starts anyway: it orders unknown devices too.
        deadline = time.monotonic() + ONLINE_GRACE_S
        while online() < n and time.monotonic() < deadline:
            time.sleep(0.5)
        facts["online_s"] = round(time.perf_counter() - t, 2)
        time.sleep(1.0)  # let the connect burst (status + heartbeat per device) drain
        facts["online_at_start"] = online()
        rss_before = {name: sampler.rss(name) for name in ("server", "simulator")}

        r = client.post("/api/v1/rollouts", json=rollout_body(digest, n))
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        metrics0 = _metrics(client)
        cpu0, sys0, load0 = sampler.cpu_s(), psutil.cpu_times(), os.getloadavg()
        pg0 = _tree_cpu_s(postgres_pid)
        own0 = psutil.Process().cpu_times()
        t_start = time.time()
        r = client.post(f"/api/v1/rollouts/{rid}/start")
        assert r.status_code == 200, r.text
        while True:
            doc = client.get(f"/api/v1/rollouts/{rid}").json()
            if doc["status"] != "running" or time.time() - t_start > timeout_s:
                break
            time.sleep(POLL_S)
        observed_s = time.time() - t_start
        cpu1, sys1, load1 = sampler.cpu_s(), psutil.cpu_times(), os.getloadavg()
        if postgres_pid is not None:
            cpu0["postgres"], cpu1["postgres"] = pg0, _tree_cpu_s(postgres_pid)
        own1 = psutil.Process().cpu_times()
        metrics1 = _metrics(client)
        audit = _audit_times(client, rid)
        if doc["status"] != "completed":
            raise RuntimeError(f"rollout ended {doc['status']} after {observed_s:.0f} s: {doc.get('reason')} "
                               f"steps={doc['steps']} waiting={doc.get('waiting')}")
        facts.update(measure_db(engine, rid, audit))
        facts["broker_drop_warnings"] = sum("being dropped" in line for line in
                                            broker.log.read_text(errors="replace").splitlines())
        engine.dispose()
        steps = {k: v for k, v in doc["steps"].items() if v}
        failing = round(FAIL_FRACTION * n)
        if steps != {"healthy": n - failing, "failed": failing}:
            raise RuntimeError(f"final steps {steps} != healthy {n - failing}, failed {failing}")
        busy_s, busy_share = _cpu_busy(sys0, sys1)
        ours = sum(cpu1[k] - cpu0.get(k, 0.0) for k in cpu1) + (own1.user + own1.system - own0.user - own0.system)
        facts.update({
            "observed_s": round(observed_s, 2), "healthy": steps["healthy"], "failed": steps["failed"],
            "planned": doc["planned"], "rss_before_mb": {k: round(v / 1e6, 1) for k, v in rss_before.items()},
            "cpu_s": {k: round(cpu1[k] - cpu0.get(k, 0.0), 1) for k in cpu1},
            "machine_busy_share": round(busy_share, 3), "others_cpu_s": round(max(0.0, busy_s - ours), 1),
            "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in load1],
            "ingest": {k.removeprefix("fleet_ingest_"): v - metrics0.get(k, 0.0) for k, v in metrics1.items()
                       if v - metrics0.get(k, 0.0) and "lag" not in k},
        })
    except Exception as exc:
        tails = {name: (workdir / f"{name}.log").read_text(errors="replace")[-3000:]
                 for name in ("server", "simulator") if (workdir / f"{name}.log").exists()}
        raise RuntimeError(f"{exc}\n" + "".join(f"--- {k}.log (tail) ---\n{v}\n" for k, v in tails.items())) from exc
    finally:
        sim = procs.get("simulator")
        if sim is not None:
            sim.send_signal(signal.SIGINT)
            try:
                out, _ = sim.communicate(timeout=60)
                final = [json.loads(x) for x in out.splitlines() if x.startswith('{"final"')]
                if final:
                    s = final[-1]["final"]
                    facts["sim"] = {"events_sent": sum(s["events_sent"].values()),
                                    **{k: s[k] for k in ("resent", "go_backs", "outbox_dropped", "commands_received",
                                                         "commands_duplicate", "commands_rejected", "published",
                                                         "acks_received", "handler_errors", "disconnects")}}
            except subprocess.TimeoutExpired:
                sim.kill()
        sampler.sample()
        server = procs.get("server")
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
        sampler.stop()
        broker.stop()
        for f in logs:
            f.close()
    facts["peak_rss_mb"] = {k: round(v / 1e6, 1) for k, v in sampler.peak.items()}
    facts["run_s"] = round(time.monotonic() - began, 1)
    return facts


def measure_db(engine: sa.Engine, rollout_id: str, audit: list[tuple[str, float]]) -> dict[str, Any]:
    """Wall and phase times from the audit records; orders and events from the stored rows."""
    marks = [at for action, at in audit if action in ("rollout.start", "rollout.advance", "rollout.complete")]
    actions = [action for action, _ in audit if action in ("rollout.start", "rollout.advance", "rollout.complete")]
    expected = ["rollout.start"] + ["rollout.advance"] * (len(PHASES_PERCENT) - 1) + ["rollout.complete"]
    if actions != expected:
        raise RuntimeError(f"audit trail {actions} != {expected}")
    start, end = marks[0], marks[-1]
    phase_s = [b - a for a, b in itertools.pairwise(marks)]
    with engine.connect() as conn:
        events = conn.execute(sa.text(
            "SELECT e.kind, e.at, e.received_at FROM events e JOIN commands c ON c.command_id = e.command_id "
            "WHERE c.rollout_id = :r"), {"r": rollout_id}).all()
        all_events = conn.execute(sa.text("SELECT received_at FROM events")).scalars().all()
        orders = conn.execute(sa.text("SELECT COUNT(*), SUM(sends) FROM commands WHERE rollout_id = :r AND "
                                      "kind = 'deploy'"), {"r": rollout_id}).one()
    received_at = sorted(_unix(x) for x in all_events)
    late = sum(1 for _, at, rcv in events if _unix(rcv) - float(at) > LATE_S)
    last_arrival = max((_unix(rcv) for _, _, rcv in events), default=end)
    during = [x for x in received_at if start <= x <= end]
    per_second = Counter(int(x) for x in during)
    last_phase_start = marks[-2]
    received_last = [float(at) for kind, at, _ in events if kind == "received" and float(at) >= last_phase_start]
    last_phase_orders = len(received_last)
    orders_s = max(received_last) - last_phase_start if received_last else 0.0
    return {
        "wall_s": round(end - start, 2), "phase_s": [round(x, 2) for x in phase_s],
        "orders": int(orders[0]), "order_sends": int(orders[1] or 0),
        "last_phase_orders": last_phase_orders,
        "orders_per_s": round(last_phase_orders / orders_s, 1) if orders_s > 0 else 0.0,
        "last_phase_orders_delivered_s": round(orders_s, 2),
        "events": len(during), "rollout_events": dict(Counter(kind for kind, _, _ in events)), "late_events": late,
        "tail_s": round(end - last_arrival, 2),
        "events_per_s": round(len(during) / (end - start), 1) if end > start else 0.0,
        "events_peak_per_s": max(per_second.values()) if per_second else 0,
    }


def run_all(n: int, repeats: int, *, pg: bool, timeout_s: float, quick: bool, keep: bool = False,
            stock_broker: bool = False) -> list[dict[str, Any]]:
    from tests.services.mqtt import find_mosquitto
    from tests.updater.support import Keys, make_bundle

    mosquitto = find_mosquitto()
    if mosquitto is None:
        print(json.dumps({"bench": BENCH, "skipped": "mqtt", "reason": "mosquitto not installed"}))
        return []
    keys = Keys()
    bundle = make_bundle(keys, version=2)
    runs: list[dict[str, Any]] = []
    cluster: Any = None
    pg_pid: int | None = None
    if pg:
        from tests.services.postgres import PostgresCluster

        cluster = PostgresCluster(durable=True).start()
        assert cluster.root is not None
        pg_pid = int((cluster.root / "data" / "postmaster.pid").read_text().split()[0])
    try:
        for i in range(repeats):
            tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-rollout-"))
            try:
                url = cluster.create_database(f"rollout{i}") if cluster else f"sqlite:///{tmp / 'fleet.db'}"
                facts = run_once(n, bundle=bundle, root=keys.root_bytes(), orders_pem=keys.orders[0].to_pem(),
                                 db_url=url, workdir=tmp, mosquitto=mosquitto, timeout_s=timeout_s,
                                 stock_broker=stock_broker, postgres_pid=pg_pid)
            finally:
                if keep:
                    print(json.dumps({"bench": BENCH, "kept": str(tmp)}), flush=True)
                else:
                    shutil.rmtree(tmp, ignore_errors=True)
            runs.append(facts)
            if not quick and i == 0 and repeats > 1 and facts["run_s"] > ONE_RUN_BUDGET_S:
                facts["note"] = (f"one run took {facts['run_s']:.0f} s (> {ONE_RUN_BUDGET_S:.0f} s): ran once "
                                 f"instead of {repeats} times")
                break
    finally:
        if cluster is not None:
            cluster.stop()
    return runs


def report(n: int, db: str, runs: list[dict[str, Any]], requested: int, *, stock_broker: bool = False) -> None:
    def med(key: str, sub: str | None = None) -> float:
        return float(statistics.median(r[key][sub] if sub else r[key] for r in runs))

    def spread(key: str, sub: str | None = None) -> dict[str, float]:
        vals = [r[key][sub] if sub else r[key] for r in runs]
        return {"min": min(vals), "max": max(vals)}

    last = runs[-1]
    common: dict[str, Any] = {"devices": n, "db": db, "runs": len(runs), "repeats_requested": requested,
                              "cpus": os.cpu_count(),
                              "broker": "mosquitto " + ("defaults" if stock_broker else
                                                        f"max_queued_messages {BROKER_QUEUE}"),
                              "rate_limit": f"constant {RATE_PER_MINUTE:.0f}/min, max_concurrent {n} (not limiting)"}
    if "note" in runs[0]:
        common["note"] = runs[0]["note"]
    emit(BENCH, "wall_s", value=med("wall_s"), baseline="none", baseline_value=0, target="(report)",
         **spread("wall_s"), phases=list(PHASES_PERCENT), observed_s=med("observed_s"), **common)
    for k in range(len(PHASES_PERCENT)):
        vals = [r["phase_s"][k] for r in runs]
        emit(BENCH, f"phase{k + 1}_s", value=statistics.median(vals), baseline="none", baseline_value=0,
             target="(report)", min=min(vals), max=max(vals), percent=PHASES_PERCENT[k],
             devices_in_phase=last["planned"][k] - (last["planned"][k - 1] if k else 0), **common)
    emit(BENCH, "orders_per_s", value=med("orders_per_s"), baseline="none", baseline_value=0,
         target=">= 1000 orders/s", **spread("orders_per_s"), orders=last["last_phase_orders"],
         measured="last phase: orders from its start to the last device's 'received' event",
         order_sends=last["order_sends"], total_orders=last["orders"], **common)
    emit(BENCH, "events_per_s", value=med("events_per_s"), baseline="none", baseline_value=0, target="(report)",
         **spread("events_per_s"), events=last["events"], peak_per_s=med("events_peak_per_s"),
         ingest=last["ingest"], **common)
    for proc in ("server", "simulator"):
        emit(BENCH, f"{proc}_peak_rss_mb", value=med("peak_rss_mb", proc), baseline="before the rollout",
             baseline_value=med("rss_before_mb", proc), target="(report)", **spread("peak_rss_mb", proc),
             cpu_s=med("cpu_s", proc), **common)
    emit(BENCH, "late_events", value=med("late_events"), baseline="none", baseline_value=0, target="0",
         **spread("late_events"), late_after_s=LATE_S, tail_s=med("tail_s"),
         broker_drop_warnings=[r["broker_drop_warnings"] for r in runs],
         online_at_start=[r["online_at_start"] for r in runs], simulator=last.get("sim"), **common)
    failing = round(FAIL_FRACTION * n)
    emit(BENCH, "healthy", value=last["healthy"], baseline="scenario", baseline_value=n - failing,
         target=f"== {n - failing}", failed=last["failed"], expected_failed=failing,
         fail_fraction=FAIL_FRACTION, **common)
    emit(BENCH, "machine_load", value=med("machine_busy_share"), baseline="none", baseline_value=0,
         target="(report)", others_cpu_s=med("others_cpu_s"), loadavg_before=last["loadavg_before"],
         loadavg_after=last["loadavg_after"], cpu_s=last["cpu_s"], **common)
    print()
    print(f"{n} devices, {db}, {len(runs)} run(s){' (' + runs[0]['note'] + ')' if 'note' in runs[0] else ''}; "
          f"rate limit {RATE_PER_MINUTE:.0f}/min and max_concurrent {n}: not the bottleneck")
    print()
    rows = [
        ("Wall time, start -> completed (server audit)", f"{med('wall_s'):.1f} s"),
        *[(f"Phase {k + 1} ({PHASES_PERCENT[k]} %, {last['planned'][k] - (last['planned'][k - 1] if k else 0)} "
           f"devices)", f"{statistics.median(r['phase_s'][k] for r in runs):.1f} s")
          for k in range(len(PHASES_PERCENT))],
        ("Orders/s (last phase, to the device's 'received')", f"{med('orders_per_s'):.0f}"),
        ("Events ingested/s (mean over the rollout; peak second)",
         f"{med('events_per_s'):.0f}; {med('events_peak_per_s'):.0f}"),
        ("Server peak RSS (before the rollout)",
         f"{med('peak_rss_mb', 'server'):.0f} MB ({med('rss_before_mb', 'server'):.0f} MB)"),
        ("Simulator peak RSS (before the rollout)",
         f"{med('peak_rss_mb', 'simulator'):.0f} MB ({med('rss_before_mb', 'simulator'):.0f} MB)"),
        ("CPU s during the rollout: server / simulator / mosquitto" + (" / postgres" if db == "postgresql" else ""),
         f"{med('cpu_s', 'server'):.1f} / {med('cpu_s', 'simulator'):.1f} / {med('cpu_s', 'mosquitto'):.1f}"
         + (f" / {med('cpu_s', 'postgres'):.1f}" if db == "postgresql" else "")),
        ("Machine busy during the rollout; CPU s of other processes",
         f"{med('machine_busy_share'):.0%}; {med('others_cpu_s'):.0f} s"),
        ("Events reaching the server > 5 s after sent; broker drop warnings",
         f"{med('late_events'):.0f}; {sum(r['broker_drop_warnings'] for r in runs)}"),
        ("Last event's arrival at the server -> completed", f"{med('tail_s'):.1f} s"),
        ("Final healthy / failed (expected)", f"{last['healthy']} / {last['failed']} ({n - failing} / {failing})"),
    ]
    print("| What | Figure |")
    print("|---|---|")
    for what, fig in rows:
        print(f"| {what} | {fig} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="1 000 devices, one run")
    ap.add_argument("--pg", action="store_true", help="PostgreSQL 15 (throwaway cluster) instead of SQLite")
    ap.add_argument("--devices", type=int, help="simulated devices (default 10 000; 1 000 with --quick)")
    ap.add_argument("--repeats", type=int, help="runs, median reported (default 3; 1 with --quick)")
    ap.add_argument("--timeout", type=float, default=900.0, help="give up on a rollout after this many seconds")
    ap.add_argument("--keep", action="store_true", help="keep each run's directory (logs, database) in /tmp")
    ap.add_argument("--stock-mosquitto", action="store_true",
                    help=f"keep mosquitto's default max_queued_messages (1000) instead of {BROKER_QUEUE}")
    args = ap.parse_args()
    n = args.devices or (1_000 if args.quick else 10_000)
    repeats = args.repeats or (1 if args.quick else 3)
    runs = run_all(n, repeats, pg=args.pg, timeout_s=args.timeout, quick=args.quick, keep=args.keep,
                   stock_broker=args.stock_mosquitto)
    if runs:
        report(n, "postgresql" if args.pg else "sqlite", runs, repeats, stock_broker=args.stock_mosquitto)


if __name__ == "__main__":
    main()
