"""Builders for the registry tests: devices through the API, statuses with models, rollout rows as the rollout
engine writes them (bundle, rollout, rollout_devices)."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from agent.protocol import ModelState, Status
from fleet_server.models import AuditLog, BundleRecord, RolloutDevice, RolloutRecord, table_of
from tests.server.support import AUTH


def register(client: TestClient, device_id: str, **body: Any) -> dict[str, Any]:
    r = client.post("/api/v1/devices", json={"id": device_id, **body}, headers=AUTH)
    assert r.status_code == 201, r.text
    doc: dict[str, Any] = r.json()
    return doc


def status_with(device: str, models: list[tuple[str, int]] | None = None, *, healthy: bool = True,
                schema: tuple[int, int] = (1, 0), agent: str = "0.3.0") -> Status:
    """An online status reporting ``models`` as ``(name, version)``."""
    return Status(device_id=device, state="online", agent_version=agent, sent_at=time.time(), schema_version=schema,
                  models=tuple(ModelState(name=n, version=v, slot="a", healthy=healthy) for n, v in models or []))


def put_bundle(engine: Engine, model: str, version: int) -> str:
    digest = hashlib.sha256(f"{model}:{version}".encode()).hexdigest()
    with engine.begin() as conn:
        conn.execute(sa.insert(table_of(BundleRecord)).values(
            digest=digest, file_sha256=digest, model=model, version=version, length=1, profiles=[], manifest={},
            signers=[], uploaded_at=datetime.now(UTC), uploaded_by="test"))
    return digest


def put_rollout(engine: Engine, rollout_id: str, model: str, version: int, *, status: str = "running",
                cohorts: list[str] | None = None, rollback_to: dict[str, Any] | None = None,
                devices: dict[str, dict[str, Any]] | None = None) -> None:
    """A rollout row (and its bundle) plus ``rollout_devices`` rows: ``{device: {step, command_id, ...}}``."""
    digest = put_bundle(engine, model, version)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(sa.insert(table_of(RolloutRecord)).values(
            id=rollout_id, name=f"roll {rollout_id}", bundle_digest=digest, model=model, version=version,
            cohorts=cohorts or [], spec={}, status=status, phase=0, rollback_to=rollback_to, created_at=now,
            created_by="test", updated_at=now, revision=0))
        for device, row in (devices or {}).items():
            conn.execute(sa.insert(table_of(RolloutDevice)).values(
                rollout_id=rollout_id, device_id=device,
                **{"step": "ordered", "ordered_at": time.time() - 60, "attempts": 1, "rollback": False, **row}))


def set_step(engine: Engine, rollout_id: str, device: str, step: str) -> None:
    rd = table_of(RolloutDevice)
    with engine.begin() as conn:
        conn.execute(sa.update(rd).where(rd.c.rollout_id == rollout_id, rd.c.device_id == device).values(step=step))


def audit_actions(engine: Engine) -> list[tuple[str, str]]:
    a = table_of(AuditLog)
    with engine.connect() as conn:
        return [(r.action, r.target) for r in conn.execute(sa.select(a.c.action, a.c.target).order_by(a.c.id))]


def rows(engine: Engine, model: Any, **where: Any) -> list[dict[str, Any]]:
    t = table_of(model)
    q = sa.select(t)
    for k, v in where.items():
        q = q.where(t.c[k] == v)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(q).mappings()]
