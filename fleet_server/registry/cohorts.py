"""Cohort membership: explicit members plus every device whose labels match the cohort's selector.

Resolved at each use (never stored), so a device that joins a cohort later, by a label change or an explicit
add, is in every rollout that targets the cohort from then on, under the same gates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa

from fleet_server.models import Cohort, CohortMember, Device, DeviceLabel, table_of
from fleet_server.registry.labels import selector_matches

__all__ = [
    "EXPLICIT",
    "SELECTOR",
    "UnknownCohortError",
    "cohort_devices_page",
    "cohort_selector",
    "cohort_size",
    "cohorts_of_device",
    "membership_condition",
    "membership_exists",
    "resolve_cohorts",
]

EXPLICIT = "explicit"
"""Why a device is in a cohort: it was added by name."""
SELECTOR = "selector"
"""Why a device is in a cohort: its labels match the cohort's selector."""


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


def cohort_selector(conn: sa.Connection, name: str) -> dict[str, str]:
    """The selector of cohort ``name``; :class:`UnknownCohortError` if there is no such cohort."""
    cohorts = table_of(Cohort)
    row = conn.execute(sa.select(cohorts.c.selector).where(cohorts.c.name == name)).first()
    if row is None:
        raise UnknownCohortError([name])
    return dict(row.selector or {})


def membership_condition(name: str, selector: Mapping[str, str],
                         id_column: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
    """A WHERE condition true for the devices (``id_column``) in cohort ``name``: explicit members, or carrying
    every pair of ``selector``. Each part is an ``IN`` over an index (``cohort_members`` primary key,
    ``device_labels (key, value)``), so a page ordered by device id never joins row by row."""
    members, labels = table_of(CohortMember), table_of(DeviceLabel)
    explicit = id_column.in_(sa.select(members.c.device_id).where(members.c.cohort == name))
    if not selector:
        return explicit
    by_labels = sa.and_(*(id_column.in_(sa.select(labels.c.device_id).where(labels.c.key == k, labels.c.value == v))
                          for k, v in sorted(selector.items())))
    return sa.or_(explicit, by_labels)


def membership_exists(name: str, selector: Mapping[str, str],
                      id_column: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
    """Like :func:`membership_condition`, as correlated ``EXISTS`` checks through primary keys
    (``cohort_members (cohort, device_id)``, ``device_labels (device_id, key)``): cheap per device, for a
    query that walks devices in id order."""
    members, labels = table_of(CohortMember), table_of(DeviceLabel)
    explicit = sa.exists().where(members.c.cohort == name, members.c.device_id == id_column)
    if not selector:
        return explicit
    return sa.or_(explicit, sa.and_(*(sa.exists().where(labels.c.device_id == id_column, labels.c.key == k,
                                                        labels.c.value == v) for k, v in sorted(selector.items()))))


def cohort_devices_page(conn: sa.Connection, name: str, selector: Mapping[str, str], *, after: str | None,
                        limit: int) -> tuple[list[tuple[str, list[str]]], bool]:
    """One page of the resolved membership of cohort ``name`` (revoked devices left out, as
    :func:`resolve_cohorts` does), ordered by device id after ``after``: ``[(device_id, why)]`` where ``why``
    lists :data:`EXPLICIT` and/or :data:`SELECTOR`, and whether more pages follow."""
    devices = table_of(Device)
    q = sa.select(devices.c.id).where(membership_condition(name, selector, devices.c.id),
                                      devices.c.revoked_at.is_(None))
    if after is not None:
        q = q.where(devices.c.id > after)
    ids = list(conn.execute(q.order_by(devices.c.id).limit(limit + 1)).scalars())
    more = len(ids) > limit
    ids = ids[:limit]
    if not ids:
        return [], False
    members = table_of(CohortMember)
    explicit = set(conn.execute(sa.select(members.c.device_id).where(
        members.c.cohort == name, members.c.device_id.in_(ids))).scalars())
    by_selector: set[str] = set()
    if selector:
        labels_of: dict[str, dict[str, str]] = {}
        labels = table_of(DeviceLabel)
        for r in conn.execute(sa.select(labels.c.device_id, labels.c.key, labels.c.value).where(
                labels.c.device_id.in_(ids), labels.c.key.in_(sorted(selector)))):
            labels_of.setdefault(r.device_id, {})[r.key] = r.value
        by_selector = {i for i, lab in labels_of.items() if selector_matches(selector, lab)}
    page = [(i, [w for w, yes in ((EXPLICIT, i in explicit), (SELECTOR, i in by_selector)) if yes]) for i in ids]
    return page, more


def cohort_size(conn: sa.Connection, name: str, selector: Mapping[str, str]) -> int:
    """How many devices (not revoked) cohort ``name`` resolves to now."""
    devices = table_of(Device)
    q = sa.select(sa.func.count()).select_from(devices).where(
        membership_condition(name, selector, devices.c.id), devices.c.revoked_at.is_(None))
    return int(conn.execute(q).scalar_one())


def cohorts_of_device(conn: sa.Connection, device_id: str,
                      labels: Mapping[str, str]) -> list[tuple[str, list[str]]]:
    """The cohorts a device is in, by name, each with why (:data:`EXPLICIT` and/or :data:`SELECTOR`). The
    caller leaves revoked devices out (they are in no cohort)."""
    members, cohorts = table_of(CohortMember), table_of(Cohort)
    explicit = set(conn.execute(sa.select(members.c.cohort).where(members.c.device_id == device_id)).scalars())
    by_selector = {r.name for r in conn.execute(sa.select(cohorts.c.name, cohorts.c.selector))
                   if selector_matches(r.selector or {}, labels)}
    return [(n, [w for w, yes in ((EXPLICIT, n in explicit), (SELECTOR, n in by_selector)) if yes])
            for n in sorted(explicit | by_selector)]
