"""The audit log, read-only: ``GET /api/v1/audit`` (admin).

Newest first, paginated (``?limit=``, ``?after=``), filtered by ``actor``, ``action`` (exact, or a prefix with
a trailing ``*``: ``user.*``), ``target``, and ``since``/``until`` (ISO 8601; a time without a zone is UTC;
``until`` is exclusive). Nothing can change the log through the API (and the database refuses UPDATE and
DELETE on it).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel
from sqlmodel import col, select

from fleet_server.api.deps import Admin, After, Limit, page_cursor
from fleet_server.api.errors import error_responses
from fleet_server.db import SessionDep
from fleet_server.models import AuditLog, AuditLogPublic

__all__ = ["AuditPage", "router"]

router = APIRouter(prefix="/api/v1", tags=["audit"])

_TEXT = r"^[^\x00-\x1f\x7f]+$"


class AuditPage(BaseModel):
    items: list[AuditLogPublic]
    next: str | None


def _utc(text: str | None, name: str) -> datetime | None:
    """An ISO 8601 time (no zone: UTC) as an aware UTC datetime; 422 naming the parameter otherwise. Numbers
    are refused: the schema says date-time, and a unix time would be ambiguous with a year."""
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"{name} must be an ISO 8601 date-time such as 2026-01-31T12:00:00Z") from None


@router.get("/audit", response_model=AuditPage, responses=error_responses(422))
def list_audit(
    *, session: SessionDep, _: Admin, limit: Limit = 100, after: After = None,
    actor: Annotated[str | None, Query(max_length=128, pattern=_TEXT, description="exact actor")] = None,
    action: Annotated[str | None, Query(max_length=64, pattern=_TEXT,
                                        description="exact action, or a prefix ending in '*'")] = None,
    target: Annotated[str | None, Query(max_length=256, pattern=_TEXT, description="exact target")] = None,
    since: Annotated[str | None, Query(max_length=64, json_schema_extra={"format": "date-time"},
                                       description="from this time (inclusive, ISO 8601)")] = None,
    until: Annotated[str | None, Query(max_length=64, json_schema_extra={"format": "date-time"},
                                       description="before this time (exclusive, ISO 8601)")] = None,
) -> AuditPage:
    """Audit records, newest first."""
    q = select(AuditLog).order_by(col(AuditLog.id).desc()).limit(limit + 1)
    if after is not None:
        last = int(after)
        q = q.where(col(AuditLog.id) < last)
    if actor is not None:
        q = q.where(AuditLog.actor == actor)
    if action is not None:
        if action.endswith("*"):
            prefix = action[:-1].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            q = q.where(col(AuditLog.action).like(prefix + "%", escape="\\"))
        else:
            q = q.where(AuditLog.action == action)
    if target is not None:
        q = q.where(AuditLog.target == target)
    start, end = _utc(since, "since"), _utc(until, "until")
    if start is not None:
        q = q.where(col(AuditLog.at) >= start)
    if end is not None:
        q = q.where(col(AuditLog.at) < end)
    rows = list(session.exec(q))
    cursor = page_cursor([r.id for r in rows], limit)
    rows = rows[:limit]
    return AuditPage(items=[AuditLogPublic.model_validate(r, from_attributes=True) for r in rows],
                     next=cursor)
