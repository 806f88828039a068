"""Helpers of the console's browser tests: a real uvicorn server on a free port, a hostile web site, a real
Chromium driven by Playwright, and the seeded fleet (users of every role, devices, a cohort, a bundle, two
running rollouts)."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from sqlalchemy.engine import Engine
from sqlmodel import Session

from agent.bundle import SigningKey
from fleet_server.auth.users import create_user
from fleet_server.models import (
    BundleRecord,
    Cohort,
    CohortMember,
    Device,
    DeviceLabel,
    DeviceModel,
    RolloutDevice,
    RolloutRecord,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PASSWORD = "correct horse battery staple"
USERS = {"viewer": "vera", "operator": "otto", "release_manager": "rita", "admin": "ada"}
"""One user per role (role -> username), all with :data:`PASSWORD`."""
STALE_AFTER_S = 300.0


def free_socket(host: str = "127.0.0.1") -> socket.socket:
    """A listening-ready TCP socket bound to a free port (handed to the server: no port race)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return sock


class LiveServer:
    """The real app behind a real uvicorn on a free port, in a thread of the test process."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.sock = free_socket()
        self.port: int = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="console-uvicorn")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


class _EvilHandler(http.server.BaseHTTPRequestHandler):
    """Serves one page that posts a form to the target URL as soon as it loads."""

    target = ""

    def do_GET(self) -> None:
        page = (
            "<!doctype html><html><body><h1>You won a prize</h1>"
            f'<form id="f" method="POST" action="{self.target}">'
            '<input type="hidden" name="reason" value="forged"></form>'
            "<script>document.getElementById('f').submit()</script></body></html>"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def evil_site(target: str) -> Iterator[int]:
    """A web site of another origin (a free port on this host) whose page auto-submits a form to ``target``;
    yields its port. Reach it as ``http://127.0.0.1:<port>/`` (same site as the console, other origin) or
    ``http://localhost:<port>/`` (another site)."""
    handler = type("Handler", (_EvilHandler,), {"target": target})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="evil-site")
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


# -- the seeded fleet ---------------------------------------------------------------------------------------


XSS_TEXT = '<img src=x onerror="window.__pwned=1"><b>bold</b><script>window.__pwned=2</script>'
"""A cohort description that would run code if the console ever parsed data as markup."""


@dataclass
class Fleet:
    """What :func:`seed_fleet` put in the database (expected figures for the assertions)."""

    now: datetime
    devices: list[str] = field(default_factory=list)
    by_status: dict[str, int] = field(default_factory=dict)
    berlin: list[str] = field(default_factory=list)
    versions: dict[tuple[str, int], int] = field(default_factory=dict)
    bundle_digest: str = ""
    rollouts: dict[str, str] = field(default_factory=dict)
    """Purpose -> rollout id (``pause``: the operator pauses it; ``keep``: must stay running...)."""
    rollout_status: dict[str, str] = field(default_factory=dict)
    """Rollout id -> its seeded status."""
    xss_text: str = XSS_TEXT


DEVICE_PLAN = (("online", 23), ("offline", 9), ("stale", 5), ("never", 3))
"""Status -> how many devices (40 in all, listed in id order cam-000 ...)."""


def signing_settings(directory: Path) -> dict[str, Any]:
    """Settings that let the API sign orders (an orders key file and a download-token secret): start, resume,
    retry and roll back need them. No broker: an API-only app stores the commands for the loop to publish."""
    key_file = directory / "orders.pem"
    key_file.write_bytes(SigningKey.generate().to_pem())
    return {"orders_key_file": key_file, "download_token_secret": "console-test-secret-" + "x" * 24}


def seed_users(engine: Engine, now: datetime) -> None:
    with Session(engine) as db:
        for role, name in USERS.items():
            create_user(db, username=name, role=role, password=PASSWORD, actor="test:seed", now=now)
        db.commit()


def seed_fleet(engine: Engine, now: datetime) -> Fleet:
    """Devices of every status with labels and model versions, a cohort, a bundle."""
    fleet = Fleet(now=now)
    n = 0
    with Session(engine) as db:
        for status, count in DEVICE_PLAN:
            for _ in range(count):
                dev_id = f"cam-{n:03d}"
                site = "berlin" if n % 2 == 0 else "paris"
                seen = {
                    "online": now - timedelta(seconds=10),
                    "offline": now - timedelta(seconds=60),
                    "stale": now - timedelta(seconds=STALE_AFTER_S * 4),
                    "never": None,
                }[status]
                last_status = {"online": "online", "offline": "offline", "stale": "online", "never": None}[status]
                version = 3 if n % 4 else 2
                db.add(Device(id=dev_id, first_seen_at=seen, last_seen_at=seen, last_status=last_status,
                              last_status_at=seen, agent_version="0.9.0", schema_version="1.0",
                              firmware_profile="generic-x86-64", hardware={"board": "test"},
                              registered_at=now - timedelta(days=1), registered_by="test:seed",
                              heartbeat_at=seen,
                              models=[] if seen is None else [{"name": "detector", "version": version,
                                                               "slot": "a", "healthy": True}]))
                db.flush()
                db.add(DeviceLabel(device_id=dev_id, key="site", value=site))
                if seen is not None:
                    db.add(DeviceModel(device_id=dev_id, model="detector", version=version,
                                       previous_version=version - 1, healthy=True, changed_at=seen))
                    fleet.versions[("detector", version)] = fleet.versions.get(("detector", version), 0) + 1
                fleet.devices.append(dev_id)
                fleet.by_status[status] = fleet.by_status.get(status, 0) + 1
                if site == "berlin":
                    fleet.berlin.append(dev_id)
                n += 1
        db.add(Cohort(name="berlin", description="Devices in Berlin", selector={"site": "berlin"},
                      created_at=now, created_by="test:seed", updated_at=now))
        db.flush()
        db.add(CohortMember(cohort="berlin", device_id="cam-001", added_at=now, added_by="test:seed"))
        fleet.berlin.append("cam-001")
        db.add(Cohort(name="xss", description=XSS_TEXT, selector={}, created_at=now, created_by="test:seed",
                      updated_at=now))
        fleet.bundle_digest = "ab" * 32
        db.add(BundleRecord(digest=fleet.bundle_digest, file_sha256="cd" * 32, model="detector", version=4,
                            length=123456, profiles=["generic-x86-64"], manifest={"model": "detector"},
                            signers=["k1"], uploaded_at=now, uploaded_by="user:rita"))
        db.commit()
    fleet.berlin.sort()
    return fleet


ROLLOUTS = (("pause", "running"), ("keep", "running"), ("abort", "running"), ("conflict", "running"),
            ("later", "draft"))
"""Purpose -> seeded status of the rollouts, each of the bundle to the ``berlin`` cohort."""
SPEC: dict[str, Any] = {
    "phases": [{"count": 4, "min_soak_s": 3600, "success_threshold": 0.95, "failure_rate_halt": 0.5,
                "min_finished": 5},
               {"percent": 100, "min_soak_s": 0, "success_threshold": 0.95, "failure_rate_halt": 0.1,
                "min_finished": 5}],
    "max_concurrent": 10,
    "rate": {"kind": "constant", "per_minute": 60},
    "window": None,
    "timeouts": {"receive_s": 3600, "download_s": 3600, "install_s": 600, "health_s": 1800},
}


def seed_rollouts(engine: Engine, fleet: Fleet) -> None:
    """Rollouts of :data:`ROLLOUTS` in the database as the API and the rollout loop store them: the definition
    (``spec``), the state columns, and per-device rows (running ones: three devices healthy, one failed;
    nobody mid-update, so no command has to go out)."""
    now = fleet.now
    t = now.timestamp()
    with Session(engine) as db:
        for purpose, status in ROLLOUTS:
            rid = f"r-{purpose}"
            running = status == "running"
            db.add(RolloutRecord(id=rid, name=f"detector v4 ({purpose})", bundle_digest=fleet.bundle_digest,
                                 model="detector", version=4, cohorts=["berlin"], spec=SPEC, status=status,
                                 phase=0, phase_started_at=t - 600 if running else None,
                                 reason="started" if running else None, changed_at=t - 600 if running else None,
                                 created_at=now, created_by="user:rita", updated_at=now, revision=1))
            db.flush()
            if running:
                for i, device in enumerate(fleet.berlin[:4]):
                    step = "failed" if i == 3 else "healthy"
                    db.add(RolloutDevice(rollout_id=rid, device_id=device, step=step, since=t - 300,
                                         reason="download" if step == "failed" else None,
                                         command_id=f"{rid}-{device}-1", ordered_at=t - 590, attempts=1))
            fleet.rollouts[purpose] = rid
            fleet.rollout_status[rid] = status
        db.commit()


def utcnow() -> datetime:
    return datetime.now(UTC)
