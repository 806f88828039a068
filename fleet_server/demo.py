"""``fleet-server demo``: the whole system on embedded defaults, in one command, with nothing to install.

It starts the embedded MQTT broker, a SQLite fleet database, the fleet server (HTTP API, console, MQTT ingestion,
rollout loop) and a fleet of simulated devices that speak the real wire contract, then shows the two things a
model rollout system must get right:

1. **A staged rollout that completes.** ``cancer-mlp`` version 2, a real signed bundle of a real int8 model,
   goes to the whole fleet in three phases (canary 10 %, 50 %, 100 %). A few devices fail their first attempt
   (a failed download, say); the failure rate stays under the halt threshold, the phases advance on their soak
   time, and "retry failed" then brings the stragglers along.
2. **A rollout halted by model health.** Version 3 installs fine everywhere it goes, but on the canary devices its
   input distribution drifts away from the training baseline the bundle carries. The drift gate halts the
   rollout in its canary phase, with the reason in the audit log, before the rest of the fleet gets it.

Everything is real except the devices: keys are generated, bundles are built and signed, orders are signed with
the orders key and verified by the simulated devices against the trust root, devices download with the order's
token. Keys, database and bundles live in a fresh directory (``--dir``) and are not reused.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DemoResult", "run_demo"]

MODEL = "cancer-mlp"
YEAR_S = 365 * 86400


@dataclass
class DemoResult:
    completed: bool
    """The first rollout completed."""
    halted: bool
    """The second rollout was halted by its drift gate."""
    halt_reason: str | None
    versions: dict[int, int]
    """Devices per cancer-mlp version at the end."""

    @property
    def ok(self) -> bool:
        return self.completed and self.halted


def _keys(workdir: Path) -> tuple[Path, Path, Path]:
    """A fresh trust root (root, release and orders keys) in ``workdir``: (root.json, orders key, release key),
    the private keys as PEM files readable by their owner only."""
    from agent.bundle import ROOT_PREFIX, SigningKey, make_root_signed, sign_document

    root, release, orders = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    signed = make_root_signed(version=1, expires_at=int(time.time()) + YEAR_S,
                              keys={"root": [root.public], "release": [release.public], "orders": [orders.public]},
                              thresholds={"root": 1, "release": 1, "orders": 1})
    root_file = workdir / "root.json"
    root_file.write_bytes(sign_document(signed, ROOT_PREFIX, [root]))
    files = []
    for name, key in (("orders-key.pem", orders), ("release-key.pem", release)):
        path = workdir / name
        path.touch(mode=0o600)
        path.write_bytes(key.to_pem())
        files.append(path)
    return root_file, files[0], files[1]


def _bundle(version: int, release_key: Path, workdir: Path) -> bytes:
    """A real signed bundle of the demo's int8 cancer model, built the way CI does: ``edge-bundle build``."""
    import agent

    models = Path(agent.__file__).resolve().parent / "demo" / "models"  # the committed demo models (data)
    stem = "cancer_mlp_int8"
    out = workdir / f"{MODEL}-{version}.bundle"
    cmd = [sys.executable, "-c", "from agent.bundletool.cli import main; raise SystemExit(main())", "build",
           "--model", str(models / f"{stem}.onnx"), "--schema", str(models / f"{stem}.schema.json"),
           "--name", MODEL, "--version", str(version), "--reference", str(models / f"{stem}.samples.json"),
           "--health-samples", str(models / f"{stem}.samples.json"), "--health-rows", "4", "--bins", "8",
           "--soak-s", "0", "--min-samples", "100", "--metadata", f"demo={MODEL}-v{version}",
           "--sign", str(release_key), "--out", str(out)]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"edge-bundle build failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()} "
                           "(the demo needs the agent extra: pip install 'edge-fleet[agent,server]')")
    return out.read_bytes()


def _free_port(wanted: int = 0) -> int:
    """``wanted`` if it can be listened on (any free port for 0); ``ValueError`` saying what to do otherwise."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", wanted))
        except OSError as exc:
            raise ValueError(f"port {wanted} is not available ({exc.strerror}): pass --port N, or --port 0 for "
                             "any free port") from None
        return int(s.getsockname()[1])


def run_demo(*, devices: int = 60, port: int = 0, workdir: Path | None = None, keep_running: bool = False,
             timeout_s: float = 120.0, say: Callable[[str], None] = print) -> DemoResult:
    """Run the demo (see the module docs); returns what happened. ``port`` 0 picks a free one."""
    import httpx
    from sqlmodel import Session

    from fleet_server.auth.tokens import create_token
    from fleet_server.auth.users import create_user
    from fleet_server.broker import EmbeddedBroker
    from fleet_server.db import create_db_engine
    from fleet_server.migrate import upgrade
    from fleet_server.models import utcnow
    from fleet_server.service import FleetService
    from fleet_server.settings import FleetSettings
    from fleet_server.simulator import DeviceGroup, Fractions, Latencies, Scenario, SimulatedFleet, VersionBehaviour
    from fleet_server.simulator.register import register_devices
    from fleet_server.simulator.scenario import plan_devices
    from fleet_server.simulator.windows import bundle_baseline

    if devices < 20:
        raise ValueError("the demo needs at least 20 devices (a canary phase of 10 % must hold a few)")
    port = _free_port(port)
    workdir = Path(tempfile.mkdtemp(prefix="fleet-demo-")) if workdir is None else workdir
    workdir.mkdir(parents=True, exist_ok=True)
    say(f"== fleet-server demo: {devices} simulated devices; state in {workdir}")

    root_file, orders_file, release_key = _keys(workdir)
    bundles = {v: _bundle(v, release_key, workdir) for v in (1, 2, 3)}
    say("   generated a trust root (root, release and orders keys) and built signed bundles of "
        f"{MODEL} v1, v2, v3")

    broker = EmbeddedBroker(port=_free_port())
    broker.start()
    settings = FleetSettings(
        database_url=f"sqlite:///{workdir / 'fleet.db'}", mqtt_host="127.0.0.1", mqtt_port=broker.port,
        mqtt_protocol="3.1.1",  # the embedded broker speaks MQTT 3.1.1
        public_url=f"http://127.0.0.1:{port}", bundle_dir=workdir / "bundles", bundle_trust_root_file=root_file,
        orders_key_file=orders_file, download_token_secret=secrets.token_hex(32), session_cookie_secure=False,
        rollout_interval_s=0.5, command_resend_s=5.0, device_stale_after_s=60.0)
    upgrade(settings.database_url)
    engine = create_db_engine(settings.database_url)
    password = secrets.token_urlsafe(12)
    with Session(engine) as session:
        admin = create_user(session, username="admin", role="admin", password=password, actor="system:demo",
                            now=utcnow())
        token = create_token(session, admin, name="demo driver", now=utcnow(), actor="system:demo").secret
        session.commit()

    service = FleetService(settings, port=port)
    server = threading.Thread(target=service.run, name="fleet-server", daemon=True)
    server.start()
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"},
                       timeout=30.0)
    fleet: SimulatedFleet | None = None
    try:
        _wait(lambda: _up(api), 30, "the fleet server to answer /readyz")
        say(f"   fleet server on http://127.0.0.1:{port} (embedded MQTT broker on port {broker.port}, SQLite)")

        # The fleet: most devices succeed; 3 % fail their first download (retry succeeds); version 3 drifts.
        scenario = Scenario(
            groups=(DeviceGroup(count=devices, name="demo", labels={"fleet": "demo"}, installed={MODEL: 1}),),
            seed=7, id_prefix="demo", fractions=Fractions(fail=0.03), bad_attempts=1,
            latency=Latencies(received=0.05, downloading=0.1, verified=0.3, installed=0.2, healthy=0.3),
            versions=(VersionBehaviour(version=3, model=MODEL, drift_shift=3.0),),
            heartbeat_s=5.0, window_s=1.0, window_samples=150)
        plans = plan_devices(scenario)
        register_devices(engine, plans, actor="system:demo")
        baselines: dict[str | tuple[str, int], Any] = dict(bundle_baseline(b) for b in bundles.values())
        fleet = SimulatedFleet(scenario, "127.0.0.1", broker.port, mode="multiplexed", devices_per_connection=20,
                               trust_root=root_file.read_bytes(), baselines=baselines)
        fleet.start()
        if not fleet.wait_connected(60):
            raise RuntimeError("the simulated devices did not all connect to the broker within 60 s")
        say(f"   {devices} simulated devices online, serving {MODEL} v1, registered with label fleet=demo")

        digests = {v: _ok(api.post("/api/v1/bundles", content=bundles[v],
                                   headers={"Content-Type": "application/octet-stream"}))["digest"]
                   for v in (2, 3)}
        _ok(api.post("/api/v1/cohorts", json={"name": "demo", "description": "every demo device",
                                              "selector": {"fleet": "demo"}}))
        say("   uploaded v2 and v3 (signatures verified on upload) and created cohort 'demo' (selector fleet=demo)")

        say(f"\n== rollout 1: {MODEL} v2 in three phases (canary 10 %, 50 %, 100 %)")
        first = _ok(api.post("/api/v1/rollouts", json={
            "name": f"{MODEL} v2 to the demo fleet", "bundle": digests[2], "cohorts": ["demo"],
            "phases": [{"percent": 10, "min_soak_s": 3, "success_threshold": 0.8, "failure_rate_halt": 0.5,
                        "min_finished": 2},
                       {"percent": 50, "min_soak_s": 3, "success_threshold": 0.8, "failure_rate_halt": 0.2,
                        "min_finished": 5},
                       {"percent": 100, "success_threshold": 0.8, "failure_rate_halt": 0.2, "min_finished": 5}],
            "max_concurrent": 50, "rate": {"kind": "constant", "per_minute": 6000}}))["id"]
        _ok(api.post(f"/api/v1/rollouts/{first}/start", json={"reason": "demo"}))
        done = _follow(api, first, say, timeout_s, until=("completed", "paused", "aborted"))
        completed = done["status"] == "completed"
        failed = sum(n for step, n in done["steps"].items() if step in ("failed", "timed_out", "rejected"))
        if completed and failed:
            say(f"   {failed} device(s) failed their first attempt: retry failed")
            _ok(api.post(f"/api/v1/rollouts/{first}/retry-failed", json={"reason": "demo: retry the stragglers"}))
            _wait(lambda: _steps(api, first).get("healthy", 0) == devices, timeout_s, "the retried devices")
            say(f"   all {devices} devices healthy on v2")

        say(f"\n== rollout 2: {MODEL} v3 in two phases (canary of {max(4, devices // 10)} devices, then all), gated "
            "on drift (its inputs drift on the canary devices)")
        second = _ok(api.post("/api/v1/rollouts", json={
            "name": f"{MODEL} v3 (drifting)", "bundle": digests[3], "cohorts": ["demo"],
            "phases": [{"count": max(4, devices // 10), "min_soak_s": 6, "failure_rate_halt": 0.5, "min_finished": 3},
                       {"percent": 100}],
            "max_concurrent": 50, "rate": {"kind": "constant", "per_minute": 6000},
            "drift": {"max_alert_share": 0.3, "max_excess_over_control": 0.2, "alert_level": "alert",
                      "min_devices": 3, "required": True}}))["id"]
        _ok(api.post(f"/api/v1/rollouts/{second}/start", json={"reason": "demo"}))
        halted_state = _follow(api, second, say, timeout_s, until=("completed", "paused", "aborted"))
        halted = halted_state["status"] == "paused" and halted_state.get("halt_rule") is not None
        reason = halted_state.get("reason")
        if halted:
            say(f"   HALTED by the {halted_state['halt_rule']} gate: {reason}")

        dist = _ok(api.get("/api/v1/versions", params={"model": MODEL}))
        versions = _version_counts(dist)
        say("\n== where the fleet stands: " + ", ".join(f"v{v}: {n} devices" for v, n in sorted(versions.items())))
        audit = _ok(api.get("/api/v1/audit", params={"limit": 200}))["items"]
        say(f"   audit log: {len(audit)} records (rollout.create, rollout.start, rollout.halt, ...)")
        say(f"\n   console: http://127.0.0.1:{port}/console/  (user admin, password {password})")
        result = DemoResult(completed, halted, reason, versions)
        say("\n== demo " + ("OK: the rollout completed and the drifting model was stopped at the canary"
                            if result.ok else "FAILED: see above"))
        if keep_running:
            say("   running until Ctrl-C")
            try:
                while server.is_alive():
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
        return result
    finally:
        if fleet is not None:
            fleet.stop()
        service.stop()
        server.join(30)
        api.close()
        broker.stop()
        engine.dispose()


def _up(api: Any) -> bool:
    import httpx

    try:
        return bool(api.get("/readyz").status_code == 200)
    except httpx.TransportError:  # not listening yet
        return False


def _ok(response: Any) -> Any:
    if response.status_code >= 400:
        raise RuntimeError(f"{response.request.method} {response.request.url.path} answered "
                           f"{response.status_code}: {response.text}")
    return response.json() if response.content else None


def _wait(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout_s:.0f} s")
        time.sleep(0.25)


def _steps(api: Any, rollout: str) -> dict[str, int]:
    steps: dict[str, int] = _ok(api.get(f"/api/v1/rollouts/{rollout}"))["steps"]
    return steps


def _follow(api: Any, rollout: str, say: Callable[[str], None], timeout_s: float, *,
            until: tuple[str, ...]) -> dict[str, Any]:
    """Print the rollout's progress once a second (when it changes) until its status is in ``until``."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        state: dict[str, Any] = _ok(api.get(f"/api/v1/rollouts/{rollout}"))
        steps = {k: v for k, v in state["steps"].items() if v}
        line = (f"   {state['status']:<9} phase {state['phase']}/{state['phases']}  "
                + "  ".join(f"{k}={v}" for k, v in sorted(steps.items())))
        if line != last:
            say(line)
            last = line
        if state["status"] in until:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"rollout {rollout} still {state['status']} after {timeout_s:.0f} s")
        time.sleep(1.0)


def _version_counts(dist: Any) -> dict[int, int]:
    """Devices per version of the demo model, from ``GET /api/v1/versions?model=...``."""
    return {int(row["version"]): int(row["devices"]) for row in dist["items"] if row["model"] == MODEL}
