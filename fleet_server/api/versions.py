"""Version tracking API (role ``viewer``).

* ``GET /api/v1/versions?model=&cohort=``: how many devices serve each version of each model, fleet-wide or
  in one cohort (revoked devices left out).
* ``GET /api/v1/versions/{model}/behind?cohort=&latest=``: the devices not on the latest version. Latest is
  ``latest`` when given, else the highest version among the uploaded bundles of the model, else the highest
  version any device serves.
* ``GET /api/v1/version-changes?device=&model=&rollout=``: every version change, newest first, with its time
  and the rollout that caused it (null: sideloaded, or rolled back by the agent itself).

The data comes from ingestion (:mod:`fleet_server.registry.versions`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, status

from agent.protocol import MAX_SEQ
from fleet_server.api.deps import ID_PATTERN, After, Limit, Viewer
from fleet_server.api.errors import error_responses
from fleet_server.db import SessionDep
from fleet_server.registry.cohorts import UnknownCohortError
from fleet_server.registry.schemas import (
    BehindDevicePublic,
    VersionBehindPublic,
    VersionChangeItem,
    VersionChangeListPublic,
    VersionCountPublic,
    VersionDistributionPublic,
)
from fleet_server.registry.versions import behind_page, changes_page, distribution, latest_version

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["versions"])


AfterDevice = Annotated[str | None, Query(pattern=ID_PATTERN, description="the previous page's `next`")]
CohortQuery = Annotated[str | None, Query(pattern=ID_PATTERN, description="only devices in this cohort")]


def _unknown_cohort(exc: UnknownCohortError) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"cohort: {exc}")


@router.get("/versions", response_model=VersionDistributionPublic, responses=error_responses(404, 422))
def version_distribution(*, session: SessionDep, _: Viewer,
                         model: Annotated[str | None, Query(pattern=ID_PATTERN, description="only this model")] = None,
                         cohort: CohortQuery = None) -> VersionDistributionPublic:
    """Devices per model and version (newest version first within a model)."""
    try:
        rows = distribution(session.connection(), model=model, cohort=cohort)
    except UnknownCohortError as exc:
        raise _unknown_cohort(exc) from None
    return VersionDistributionPublic(model=model, cohort=cohort, items=[
        VersionCountPublic(model=m, version=v, devices=n) for m, v, n in rows])


@router.get("/versions/{model}/behind", response_model=VersionBehindPublic, responses=error_responses(404, 422))
def devices_behind(*, session: SessionDep, _: Viewer, model: Annotated[str, Path(pattern=ID_PATTERN)],
                   cohort: CohortQuery = None,
                   latest: Annotated[int | None, Query(ge=0, le=MAX_SEQ, description="the version to be on")] = None,
                   include_missing: Annotated[bool, Query(description="also devices not serving the model")] = False,
                   limit: Limit = 100, after: AfterDevice = None) -> VersionBehindPublic:
    """Devices serving ``model`` at another version than the latest, by device id (with ``include_missing``,
    also the devices, e.g. of the cohort, that do not serve it at all)."""
    conn = session.connection()
    source: str | None = "param"
    if latest is None:
        latest, source = latest_version(conn, model)
    if latest is None:
        if cohort is not None:
            try:
                distribution(conn, model=model, cohort=cohort)  # an unknown cohort is still an error
            except UnknownCohortError as exc:
                raise _unknown_cohort(exc) from None
        return VersionBehindPublic(model=model, latest=None, latest_source=None, cohort=cohort, items=[], next=None)
    try:
        rows, more = behind_page(conn, model=model, latest=latest, cohort=cohort, include_missing=include_missing,
                                 after=after, limit=limit)
    except UnknownCohortError as exc:
        raise _unknown_cohort(exc) from None
    return VersionBehindPublic(model=model, latest=latest, latest_source=source, cohort=cohort,
                               items=[BehindDevicePublic.model_validate(r) for r in rows],
                               next=rows[-1]["device_id"] if more else None)


@router.get("/version-changes", response_model=VersionChangeListPublic, responses=error_responses(422))
def version_changes(*, session: SessionDep, _: Viewer,
                    device: Annotated[str | None, Query(pattern=ID_PATTERN, description="only this device")] = None,
                    model: Annotated[str | None, Query(pattern=ID_PATTERN, description="only this model")] = None,
                    rollout: Annotated[str | None, Query(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$",
                                                         description="only changes caused by this rollout")] = None,
                    limit: Limit = 100, after: After = None) -> VersionChangeListPublic:
    """Version changes, newest first."""
    rows, more = changes_page(session.connection(), device=device, model=model, rollout=rollout,
                              after=int(after) if after is not None else None, limit=limit)
    return VersionChangeListPublic(items=[VersionChangeItem.model_validate(r) for r in rows],
                                   next=str(rows[-1]["id"]) if more else None)
