"""Cohort membership: explicit members plus every device whose labels match the cohort's selector.

Resolved at each use (never stored), so a device that joins a cohort later, by a label change or an explicit
add, is in every rollout that targets the cohort from then on, under the same gates.
"""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa

from fleet_server.models import Cohort, CohortMember, Device, DeviceLabel, table_of

__all__ = ["UnknownCohortError", "resolve_cohorts"]


class UnknownCohortError(LookupError):
    """A cohort name that does not exist."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = sorted(names)
        super().__init__(f"unknown cohort(s): {', '.join(self.names)}")


def _selector_query(selector: dict[str, str]) -> sa.Select[tuple[str]]:
    """Devices carrying every ``key=value`` of ``selector`` (one self-join-free GROUP BY over the label index)."""
    labels = table_of(DeviceLabel)
    match = sa.or_(*(sa.and_(labels.c.key == k, labels.c.value == v) for k, v in selector.items()))
    return (sa.select(labels.c.device_id).where(match).group_by(labels.c.device_id)
            .having(sa.func.count() == len(selector)))


def resolve_cohorts(conn: sa.Connection, names: Iterable[str], *, include_revoked: bool = False) -> list[str]:
    """The ids of the devices in any of the cohorts ``names`` (explicit members and selector matches), sorted,
    without duplicates; revoked devices are left out unless ``include_revoked``. Raises
    :class:`UnknownCohortError` for names that do not exist."""
    wanted = sorted(set(names))
    if not wanted:
        return []
    cohorts = table_of(Cohort)
    rows = conn.execute(sa.select(cohorts.c.name, cohorts.c.selector).where(cohorts.c.name.in_(wanted))).all()
    missing = set(wanted) - {r.name for r in rows}
    if missing:
        raise UnknownCohortError(missing)
    members = table_of(CohortMember)
    parts: list[sa.Select[tuple[str]]] = [sa.select(members.c.device_id).where(members.c.cohort.in_(wanted))]
    parts += [_selector_query(dict(r.selector)) for r in rows if r.selector]
    union = sa.union(*parts).subquery() if len(parts) > 1 else parts[0].subquery()
    devices = table_of(Device)
    query = sa.select(devices.c.id).where(devices.c.id.in_(sa.select(union.c[0])))
    if not include_revoked:
        query = query.where(devices.c.revoked_at.is_(None))
    return list(conn.execute(query.order_by(devices.c.id)).scalars())
