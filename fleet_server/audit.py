"""The append-only audit log: one row per state-changing action (who, what, on what, outcome, when).

Write the audit row in the same transaction as the change, so there is never a change without its record
(nor a record of a change that rolled back). The database refuses UPDATE and DELETE on ``audit_log``
(triggers in the first migration). Store-and-forward telemetry ingestion is not audited per message.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session

from fleet_server.models import AuditLog, utcnow

__all__ = ["record"]


def record(session: Session, *, actor: str, action: str, target: str, outcome: str = "ok",
           detail: dict[str, Any] | None = None, at: datetime | None = None) -> AuditLog:
    """Add an audit row to ``session`` (committed with the caller's transaction)."""
    row = AuditLog(at=at or utcnow(), actor=actor, action=action, target=target, outcome=outcome,
                   detail=detail or {})
    session.add(row)
    return row
