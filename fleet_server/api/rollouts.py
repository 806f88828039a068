"""Rollouts API: create a staged rollout of a bundle to cohorts, follow it, and steer it.

* ``POST /api/v1/rollouts`` (release_manager): a draft. The body mirrors :class:`fleet_server.rollouts.RolloutSpec`
  (phases, pacing, window, timeouts, gates); the definition is validated by building the policy's own spec, so a
  :class:`~fleet_server.rollouts.RolloutSpecError` answers 422 naming the field (``phases[1].percent``). 404 for
  an unknown bundle or cohort; 409 listing the devices whose firmware profile the bundle does not support.
* ``GET /api/v1/rollouts`` (viewer): newest first, ``?status=``, paginated. ``GET /api/v1/rollouts/{id}``: state,
  phase, halt rule and reason, per-step tally, planned phase sizes for the current target.
  ``GET /api/v1/rollouts/{id}/devices``: per-device states (devices ordered at least once), paginated.
* Actions, each with an optional ``{"reason": ...}`` and one audit record (``rollout.<action>``, target
  ``rollout:<id>``, outcome ``ok`` or ``failed``): ``start``, ``rollback``, ``retry-failed`` (release_manager),
  ``pause``, ``resume``, ``abort`` (operator). A transition the rollout's state does not allow answers 409 with the
  policy's message. ``abort`` and ``rollback`` sign and publish their cancels (and rollback orders) inside the
  request, not at the next tick.

Writes lock the rollout's row and check its ``revision`` (:mod:`fleet_server.deploy.store`), so an action and the
rollout loop never overwrite each other. Actions that lead to orders answer 503 when the server cannot sign them
(``orders_key_file`` and ``download_token_secret`` unset), saying which settings to set.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, Body, HTTPException, Path, Query, Request, status
from pydantic import BaseModel, ConfigDict, Field

from agent.protocol import IDENTIFIER_PATTERN
from fleet_server.api.deps import ID_PATTERN, Limit, Operator, Principal, ReleaseManager, Viewer
from fleet_server.api.errors import error_responses
from fleet_server.bundles.compat import incompatible_devices_for_bundle
from fleet_server.deploy.bridge import Outgoing
from fleet_server.deploy.runtime import DeployRuntime, runtime_for
from fleet_server.deploy.signing import RolloutsDisabledError, rollouts_disabled_reason
from fleet_server.deploy.specs import build_spec, state_from_row
from fleet_server.deploy.store import (
    ROLLOUT_DEVICES,
    ROLLOUTS,
    ConcurrentChangeError,
    audit,
    busy_by_rollout,
    busy_elsewhere,
    device_states,
    lock_rollout,
    resolve_target,
    save_devices,
    save_state,
    ts,
    union_target,
)
from fleet_server.models import BundleRecord, table_of
from fleet_server.rollouts import (
    DeviceStep,
    InvalidTransitionError,
    Outcome,
    Release,
    RolloutSpec,
    RolloutSpecError,
    RolloutState,
    RolloutStatus,
    SendCancel,
    SendOrder,
    abort,
    apply_decisions,
    pause,
    resume,
    retry_failed,
    rollback,
    start,
    tally,
)

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["rollouts"])


UNPROCESSABLE = 422
_DIGEST = "^[0-9a-f]{64}$"
_HHMM = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"
_LIST_CURSOR = f"^[0-9]{{1,16}}~{IDENTIFIER_PATTERN}$"
"""``<created_at in µs since the epoch>~<rollout id>`` of the last item of the previous page."""
_MAX_S = 365 * 86400.0
_BUNDLES = table_of(BundleRecord)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

RolloutId = Annotated[str, Path(pattern=ID_PATTERN, description="rollout id")]


# -- request bodies ---------------------------------------------------------------------------------------


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DriftGateIn(_In):
    """Halt on drift in the canary: vs the baseline (absolute limits) and vs the control group on the old version.
    ``null`` turns a limit off."""

    max_drifted_share: float | None = Field(None, ge=0, le=1)
    max_alert_share: float | None = Field(None, ge=0, le=1)
    max_excess_over_control: float | None = Field(0.2, ge=0, le=1)
    alert_level: Literal["ok", "warn", "alert"] = "alert"
    min_devices: int = Field(3, ge=1, le=1_000_000)
    required: bool = True


class SliGateIn(_In):
    """Halt on the canary's inference error rate (pooled) or median device p99 latency."""

    max_error_rate: float | None = Field(0.01, ge=0, le=1)
    max_latency_p99_ms: float | None = Field(None, gt=0, le=3_600_000)
    min_requests: int = Field(100, ge=1, le=10**12)
    min_devices: int = Field(3, ge=1, le=1_000_000)
    required: bool = True


class PhaseIn(_In):
    """One phase: exactly one of ``count`` and ``percent`` (cumulative), soak, thresholds and optional gates."""

    count: int | None = Field(None, ge=1, le=100_000_000)
    percent: float | None = Field(None, gt=0, le=100)
    min_soak_s: float = Field(0.0, ge=0, le=_MAX_S)
    success_threshold: float = Field(0.95, ge=0, le=1)
    failure_rate_halt: float = Field(0.10, ge=0, le=1)
    min_finished: int = Field(5, ge=1, le=100_000_000)
    drift: DriftGateIn | None = None
    sli: SliGateIn | None = None


class ConstantRateIn(_In):
    """At most ``per_minute`` new orders per minute (sliding window)."""

    kind: Literal["constant"]
    per_minute: float = Field(gt=0, le=1_000_000)


class ExponentialRateIn(_In):
    """Starts at ``base_per_minute``, times ``factor`` per ``every_healthy`` healthy devices, capped."""

    kind: Literal["exponential"]
    base_per_minute: float = Field(gt=0, le=1_000_000)
    factor: float = Field(2.0, ge=1, le=100)
    every_healthy: int = Field(10, ge=1, le=100_000_000)
    max_per_minute: float = Field(1000.0, gt=0, le=1_000_000)


class WindowIn(_In):
    """A daily UTC maintenance window, ``HH:MM``-``HH:MM`` (may wrap midnight)."""

    start: str = Field(pattern=_HHMM)
    end: str = Field(pattern=_HHMM)


class TimeoutsIn(_In):
    """Per-step timeouts in seconds, each from the device's last event."""

    receive_s: float = Field(3600.0, gt=0, le=_MAX_S)
    download_s: float = Field(3600.0, gt=0, le=_MAX_S)
    install_s: float = Field(600.0, gt=0, le=_MAX_S)
    health_s: float = Field(1800.0, gt=0, le=_MAX_S)


RateIn = Annotated[ConstantRateIn | ExponentialRateIn, Field(discriminator="kind")]


class RolloutCreate(_In):
    """A rollout definition. ``drift`` and ``sli`` at the top apply to every phase that sets none of its own."""

    name: str = Field(min_length=1, max_length=256)
    bundle: str = Field(pattern=_DIGEST, description="the bundle digest (sha256 of its manifest)")
    cohorts: list[Annotated[str, Field(pattern=ID_PATTERN)]] = Field(min_length=1, max_length=100)
    phases: list[PhaseIn] = Field(min_length=1, max_length=100)
    max_concurrent: int = Field(100, ge=1, le=10_000_000)
    rate: RateIn = Field(default_factory=lambda: ConstantRateIn(kind="constant", per_minute=1000.0))
    window: WindowIn | None = None
    timeouts: TimeoutsIn = Field(default_factory=lambda: TimeoutsIn.model_validate({}))
    drift: DriftGateIn | None = None
    sli: SliGateIn | None = None

    def stored_spec(self) -> dict[str, Any]:
        """The definition as stored in ``rollouts.spec`` (top-level gates copied into phases without their own)."""
        phases = []
        for p in self.phases:
            d = p.model_dump()
            if d["drift"] is None and self.drift is not None:
                d["drift"] = self.drift.model_dump()
            if d["sli"] is None and self.sli is not None:
                d["sli"] = self.sli.model_dump()
            phases.append(d)
        return {"phases": phases, "max_concurrent": self.max_concurrent, "rate": self.rate.model_dump(),
                "window": self.window.model_dump() if self.window is not None else None,
                "timeouts": self.timeouts.model_dump()}


class ActionIn(_In):
    reason: str | None = Field(None, min_length=1, max_length=1024)


class RollbackIn(ActionIn):
    bundle: str | None = Field(None, pattern=_DIGEST,
                               description="the version to go back to (default: the newest stored bundle of the "
                                           "model with a lower version)")


class RetryIn(ActionIn):
    devices: list[Annotated[str, Field(pattern=ID_PATTERN)]] | None = Field(
        None, max_length=100_000, description="retry only these of the failed devices (default: all of them)")


# -- responses --------------------------------------------------------------------------------------------


class ReleasePublic(BaseModel):
    model: str
    version: int
    bundle_digest: str


class TallyPublic(BaseModel):
    """The current phase's numbers as the gates judge them (timeouts due now included)."""

    phase: int
    """1-based."""
    members: int
    population: int
    healthy: int
    failed: int
    failures: dict[str, int]
    cancelled: int
    updating: int
    pending: int
    busy: int


class RolloutSummaryPublic(BaseModel):
    id: str
    name: str
    bundle: str
    model: str
    version: int
    cohorts: list[str]
    status: RolloutStatus
    phase: int
    """The current phase, 1-based (``running(phase 1)`` after start)."""
    phases: int
    reason: str | None
    halt_rule: str | None
    created_at: datetime
    created_by: str
    updated_at: datetime
    revision: int


class RolloutPublic(RolloutSummaryPublic):
    spec: dict[str, Any]
    phase_started_at: datetime | None
    changed_at: datetime | None
    rollback_to: ReleasePublic | None
    target: int
    """Devices in the target now (cohorts resolved now, plus devices still updating)."""
    planned: list[int]
    """Cumulative size of each phase for the current target."""
    steps: dict[str, int]
    """Devices per step, every step listed (``not_started``: target devices never ordered)."""
    tally: TallyPublic
    waiting: str | None
    """What the rollout waits for, as the loop last saw it (``null``: unknown in this process)."""
    rollouts_enabled: bool
    """False when the server cannot sign orders (see the detail of a refused start)."""


class RolloutPage(BaseModel):
    items: list[RolloutSummaryPublic]
    next: str | None


class RolloutDevicePublic(BaseModel):
    device_id: str
    step: DeviceStep
    since: datetime | None
    reason: str | None
    command_id: str | None
    ordered_at: datetime | None
    attempts: int
    rollback: bool


class RolloutDevicePage(BaseModel):
    items: list[RolloutDevicePublic]
    next: str | None


# -- helpers ----------------------------------------------------------------------------------------------


def _clock(request: Request) -> Callable[[], float]:
    runtime: DeployRuntime | None = getattr(request.app.state, "deploy", None)
    return runtime.clock if runtime is not None else time.time


def _runtime(request: Request) -> DeployRuntime:
    try:
        return runtime_for(request.app.state, request.app.state.settings, request.app.state.engine)
    except RolloutsDisabledError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None


@contextmanager
def _write(request: Request) -> Iterator[sa.Connection]:
    """A write transaction (``BEGIN IMMEDIATE`` on SQLite: writers queue instead of failing mid-way)."""
    with request.app.state.engine.connect().execution_options(sqlite_immediate=True) as conn, conn.begin():
        yield conn


def _list_cursor(created_at: datetime, rollout_id: str) -> str:
    micros = (created_at - _EPOCH) // timedelta(microseconds=1)
    return f"{micros}~{rollout_id}"


def _parse_list_cursor(text: str) -> tuple[datetime, str]:
    """The position a cursor names (any string matching its pattern is a position: no invalid cursors)."""
    micros, rollout_id = text.split("~", 1)
    return _EPOCH + timedelta(microseconds=int(micros)), rollout_id


def _opt_ts(value: float | None) -> datetime | None:
    return ts(value) if value is not None else None


def _summary(row: Mapping[str, Any]) -> RolloutSummaryPublic:
    return RolloutSummaryPublic(
        id=row["id"], name=row["name"], bundle=row["bundle_digest"], model=row["model"], version=row["version"],
        cohorts=list(row["cohorts"]), status=RolloutStatus(row["status"]), phase=row["phase"] + 1,
        phases=len(row["spec"].get("phases", [])) if isinstance(row["spec"], Mapping) else 0, reason=row["reason"],
        halt_rule=row["halt_rule"], created_at=row["created_at"], created_by=row["created_by"],
        updated_at=row["updated_at"], revision=row["revision"])


def _spec_of(conn: sa.Connection, row: Mapping[str, Any], devices: Mapping[str, Any]) -> RolloutSpec:
    target, _unknown = resolve_target(conn, list(row["cohorts"]))
    return build_spec(row["spec"], rollout_id=row["id"], model=row["model"], version=row["version"],
                      bundle_digest=row["bundle_digest"], target=union_target(target, devices))


def _public(request: Request, conn: sa.Connection, row: Mapping[str, Any], now: float) -> RolloutPublic:
    devices = device_states(conn, row["id"])
    spec = _spec_of(conn, row, devices)
    state = state_from_row(row)
    busy = busy_elsewhere(busy_by_rollout(conn), row["id"])
    t = tally(spec, state, devices, now, busy_elsewhere=busy)
    counted: Counter[str] = Counter(st.step.value for st in devices.values())
    counted[DeviceStep.NOT_STARTED.value] += sum(1 for d in spec.target if d not in devices)
    steps = {s.value: counted.get(s.value, 0) for s in DeviceStep}
    runtime: DeployRuntime | None = getattr(request.app.state, "deploy", None)
    waiting = None
    if runtime is not None and runtime.loop is not None:
        seen = runtime.loop.waiting.get(row["id"])
        waiting = seen[1] if seen is not None else None
    rb = state.rollback_to
    return RolloutPublic(
        **_summary(row).model_dump(), spec=dict(row["spec"]), phase_started_at=_opt_ts(state.phase_started_at),
        changed_at=_opt_ts(state.changed_at),
        rollback_to=ReleasePublic(model=rb.model, version=rb.version, bundle_digest=rb.bundle_digest) if rb else None,
        target=len(spec.target), planned=list(spec.sizes), steps=steps,
        tally=TallyPublic(phase=t.phase + 1, members=t.members, population=t.population, healthy=t.healthy,
                          failed=t.failed, failures={k.value: v for k, v in t.failures.items()},
                          cancelled=t.cancelled, updating=t.updating_in_target, pending=len(t.pending), busy=t.busy),
        waiting=waiting, rollouts_enabled=rollouts_disabled_reason(request.app.state.settings) is None
        or getattr(request.app.state, "deploy", None) is not None)


def _get_row(conn: sa.Connection, rollout_id: str) -> Mapping[str, Any]:
    row = conn.execute(sa.select(ROLLOUTS).where(ROLLOUTS.c.id == rollout_id)).mappings().first()
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no rollout {rollout_id!r}")
    return dict(row)


# -- create -----------------------------------------------------------------------------------------------


@router.post("/rollouts", response_model=RolloutPublic, status_code=status.HTTP_201_CREATED,
             responses=error_responses(404, 409, 422))
def create_rollout(*, request: Request, who: ReleaseManager, body: RolloutCreate) -> RolloutPublic:
    """Create a draft rollout of ``bundle`` to ``cohorts``. Nothing is sent until it is started. Audited."""
    now = _clock(request)()
    stored = body.stored_spec()
    with _write(request) as conn:
        bundle = conn.execute(sa.select(_BUNDLES).where(_BUNDLES.c.digest == body.bundle)).mappings().first()
        if bundle is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND,
                                f"bundle: no bundle with digest {body.bundle} (upload it first)")
        target, unknown = resolve_target(conn, sorted(set(body.cohorts)))
        if unknown:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"cohorts: unknown cohort(s): {', '.join(unknown)}")
        rollout_id = f"ro-{secrets.token_hex(6)}"
        try:
            build_spec(stored, rollout_id=rollout_id, model=bundle["model"], version=bundle["version"],
                       bundle_digest=bundle["digest"], target=target)
        except RolloutSpecError as exc:
            raise HTTPException(UNPROCESSABLE, str(exc)) from None
        bad = incompatible_devices_for_bundle(conn, bundle["digest"], target)
        if bad:
            raise HTTPException(status.HTTP_409_CONFLICT, {
                "message": f"bundle {bundle['model']} version {bundle['version']} supports the firmware profiles "
                           f"{sorted(bundle['profiles'] or [])}; {len(bad)} device(s) of the cohorts cannot take it",
                "count": len(bad),
                "devices": [{"device": d, "why": why} for d, why in sorted(bad.items())[:100]]})
        created = ts(now)
        conn.execute(sa.insert(ROLLOUTS).values(
            id=rollout_id, name=body.name, bundle_digest=bundle["digest"], model=bundle["model"],
            version=bundle["version"], cohorts=sorted(set(body.cohorts)), spec=stored, status=RolloutStatus.DRAFT.value,
            phase=0, phase_started_at=None, reason=None, halt_rule=None, rollback_to=None, changed_at=None,
            created_at=created, created_by=who.actor, updated_at=created, revision=0))
        audit(conn, actor=who.actor, action="rollout.create", target=f"rollout:{rollout_id}", at=now,
              detail={"name": body.name, "bundle": bundle["digest"], "model": bundle["model"],
                      "version": bundle["version"], "cohorts": sorted(set(body.cohorts)), "target": len(target)})
        row = _get_row(conn, rollout_id)
        return _public(request, conn, row, now)


# -- read -------------------------------------------------------------------------------------------------


@router.get("/rollouts", response_model=RolloutPage, responses=error_responses(422))
def list_rollouts(*, request: Request, _: Viewer,
                  status_: Annotated[RolloutStatus | None, Query(alias="status")] = None,
                  limit: Limit = 100,
                  after: Annotated[str | None, Query(pattern=_LIST_CURSOR, description=(
                      "the `next` value of the previous page (opaque)"))] = None) -> RolloutPage:
    """Rollouts, newest first (optionally only those in ``status``)."""
    q = sa.select(ROLLOUTS)
    if status_ is not None:
        q = q.where(ROLLOUTS.c.status == status_.value)
    if after is not None:
        at, last_id = _parse_list_cursor(after)
        q = q.where(sa.or_(ROLLOUTS.c.created_at < at,
                           sa.and_(ROLLOUTS.c.created_at == at, ROLLOUTS.c.id < last_id)))
    q = q.order_by(ROLLOUTS.c.created_at.desc(), ROLLOUTS.c.id.desc()).limit(limit + 1)
    with request.app.state.engine.connect() as conn:
        rows = conn.execute(q).mappings().all()
    items = [_summary(r) for r in rows[:limit]]
    nxt = _list_cursor(rows[limit - 1]["created_at"], rows[limit - 1]["id"]) if len(rows) > limit else None
    return RolloutPage(items=items, next=nxt)


@router.get("/rollouts/{rollout_id}", response_model=RolloutPublic, responses=error_responses(404))
def get_rollout(*, request: Request, _: Viewer, rollout_id: RolloutId) -> RolloutPublic:
    """One rollout: state, phase, halt rule and reason, per-step tally, planned phase sizes."""
    with request.app.state.engine.connect() as conn:
        return _public(request, conn, _get_row(conn, rollout_id), _clock(request)())


@router.get("/rollouts/{rollout_id}/devices", response_model=RolloutDevicePage, responses=error_responses(404, 422))
def list_rollout_devices(*, request: Request, _: Viewer, rollout_id: RolloutId,
                         step: Annotated[DeviceStep | None, Query()] = None,
                         limit: Limit = 100,
                         after: Annotated[str | None, Query(pattern=ID_PATTERN, description=(
                             "the `next` value of the previous page (opaque)"))] = None) -> RolloutDevicePage:
    """Per-device states of the devices this rollout has ordered (by device id; ``?step=`` filters)."""
    q = sa.select(ROLLOUT_DEVICES).where(ROLLOUT_DEVICES.c.rollout_id == rollout_id)
    if step is not None:
        q = q.where(ROLLOUT_DEVICES.c.step == step.value)
    if after is not None:
        q = q.where(ROLLOUT_DEVICES.c.device_id > after)
    q = q.order_by(ROLLOUT_DEVICES.c.device_id).limit(limit + 1)
    with request.app.state.engine.connect() as conn:
        _get_row(conn, rollout_id)
        rows = conn.execute(q).mappings().all()
    items = [RolloutDevicePublic(device_id=r["device_id"], step=DeviceStep(r["step"]), since=_opt_ts(r["since"]),
                                 reason=r["reason"], command_id=r["command_id"], ordered_at=_opt_ts(r["ordered_at"]),
                                 attempts=r["attempts"], rollback=bool(r["rollback"])) for r in rows[:limit]]
    nxt = str(rows[limit - 1]["device_id"]) if len(rows) > limit else None
    return RolloutDevicePage(items=items, next=nxt)


# -- actions ----------------------------------------------------------------------------------------------

class _Refused(Exception):
    """An operation refused for a reason of this API (not the policy's): answered with ``code``, audited."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


Operation = Callable[[sa.Connection, Mapping[str, Any], RolloutSpec, RolloutState, dict[str, Any], float], Outcome]


def _act(request: Request, who: Principal, rollout_id: str, action: str, *, reason: str | None,
         operation: Operation, needs_signer: bool) -> RolloutPublic:
    """Run one manual operation: lock, decide, carry out (sign and store commands), store, audit; publish after the
    commit. Refusals are audited too (outcome ``failed``)."""
    clock = _clock(request)
    now = clock()
    runtime: DeployRuntime | None = _runtime(request) if needs_signer else getattr(request.app.state, "deploy", None)
    outgoing: list[Outgoing] = []
    target = f"rollout:{rollout_id}"
    try:
        with _write(request) as conn:
            row = lock_rollout(conn, rollout_id)
            if row is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, f"no rollout {rollout_id!r}")
            state = state_from_row(row)
            devices: dict[str, Any] = dict(device_states(conn, rollout_id))
            spec = _spec_of(conn, row, devices)
            outcome = operation(conn, row, spec, state, devices, now)
            commands = [d for d in outcome.decisions if isinstance(d, SendOrder | SendCancel)]
            if commands:
                if runtime is None:
                    runtime = _runtime(request)
                outgoing = runtime.bridge.prepare(
                    conn, rollout_id=rollout_id, orders=[d for d in commands if isinstance(d, SendOrder)],
                    cancels=[d for d in commands if isinstance(d, SendCancel)], now=now)
            new_state, changed = apply_decisions(outcome.state, devices, outcome.decisions, now)
            changed = {**outcome.devices, **changed}
            save_devices(conn, rollout_id, changed)
            save_state(conn, rollout_id, new_state, revision=row["revision"], now=now)
            audit(conn, actor=who.actor, action=f"rollout.{action}", target=target, at=now,
                  detail={"reason": reason, "from": state.status.value, "to": new_state.status.value,
                          "orders": sum(isinstance(d, SendOrder) for d in commands),
                          "cancels": sum(isinstance(d, SendCancel) for d in commands),
                          "devices": len(outcome.devices)})
            public = _public(request, conn, _get_row(conn, rollout_id), now)
    except (InvalidTransitionError, RolloutSpecError, ConcurrentChangeError, _Refused) as exc:
        code = (exc.code if isinstance(exc, _Refused) else UNPROCESSABLE if isinstance(exc, RolloutSpecError)
                else status.HTTP_409_CONFLICT)
        with _write(request) as conn:
            audit(conn, actor=who.actor, action=f"rollout.{action}", target=target, outcome="failed", at=now,
                  detail={"reason": reason, "error": str(exc)})
        message = str(exc) if not isinstance(exc, ConcurrentChangeError) else f"{exc}: retry"
        raise HTTPException(code, message) from None
    if runtime is not None:
        runtime.bridge.publish(outgoing)
        runtime.wake()
    return public


def _reason(body: ActionIn | None, verb: str, who: Principal) -> str:
    return body.reason if body is not None and body.reason else f"{verb} by {who.actor}"


_ActionBody = Annotated[ActionIn | None, Body()]


@router.post("/rollouts/{rollout_id}/start", response_model=RolloutPublic, responses=error_responses(404, 409, 503))
def start_rollout(*, request: Request, who: ReleaseManager, rollout_id: RolloutId,
                  body: _ActionBody = None) -> RolloutPublic:
    """draft -> running(phase 1). The rollout loop sends the first orders at its next tick. Audited."""
    reason = _reason(body, "started", who)
    return _act(request, who, rollout_id, "start", reason=reason, operation=
                lambda conn, row, spec, state, devices, now: start(state, now, reason), needs_signer=True)


@router.post("/rollouts/{rollout_id}/pause", response_model=RolloutPublic, responses=error_responses(404, 409))
def pause_rollout(*, request: Request, who: Operator, rollout_id: RolloutId,
                  body: _ActionBody = None) -> RolloutPublic:
    """running -> paused: no new orders; devices mid-update finish or time out. Audited."""
    reason = _reason(body, "paused", who)
    return _act(request, who, rollout_id, "pause", reason=reason, operation=
                lambda conn, row, spec, state, devices, now: pause(state, now, reason), needs_signer=False)


@router.post("/rollouts/{rollout_id}/resume", response_model=RolloutPublic,
             responses=error_responses(404, 409, 503))
def resume_rollout(*, request: Request, who: Operator, rollout_id: RolloutId,
                   body: _ActionBody = None) -> RolloutPublic:
    """paused (by hand or halted) -> running in the same phase; the gates are judged again at once. Audited."""
    reason = _reason(body, "resumed", who)
    return _act(request, who, rollout_id, "resume", reason=reason, operation=
                lambda conn, row, spec, state, devices, now: resume(state, now, reason), needs_signer=True)


@router.post("/rollouts/{rollout_id}/abort", response_model=RolloutPublic,
             responses=error_responses(404, 409, 503))
def abort_rollout(*, request: Request, who: Operator, rollout_id: RolloutId,
                  body: _ActionBody = None) -> RolloutPublic:
    """-> aborted, at any time. Every device mid-update (ordered ... verified) gets a signed cancel, published in
    this request. Devices already on the new version keep it (that is ``rollback``). Audited."""
    reason = _reason(body, "aborted", who)
    return _act(request, who, rollout_id, "abort", reason=reason, operation=
                lambda conn, row, spec, state, devices, now: abort(spec, state, devices, now, reason),
                needs_signer=False)


def _previous(conn: sa.Connection, row: Mapping[str, Any], digest: str | None) -> Release:
    if digest is not None:
        prev = conn.execute(sa.select(_BUNDLES).where(_BUNDLES.c.digest == digest)).mappings().first()
        if prev is None:
            raise _Refused(status.HTTP_404_NOT_FOUND, f"bundle: no bundle with digest {digest}")
    else:
        prev = conn.execute(sa.select(_BUNDLES).where(_BUNDLES.c.model == row["model"],
                                                      _BUNDLES.c.version < row["version"])
                            .order_by(_BUNDLES.c.version.desc()).limit(1)).mappings().first()
        if prev is None:
            raise _Refused(status.HTTP_409_CONFLICT, f"no earlier version of {row['model']} than {row['version']} is "
                           "stored to roll back to: name the bundle to go back to")
    return Release(prev["model"], prev["version"], prev["digest"])


@router.post("/rollouts/{rollout_id}/rollback", response_model=RolloutPublic,
             responses=error_responses(404, 409, 422, 503))
def rollback_rollout(*, request: Request, who: ReleaseManager, rollout_id: RolloutId,
                     body: Annotated[RollbackIn | None, Body()] = None) -> RolloutPublic:
    """-> rolled_back: cancels as abort, and the previous version (``allow_downgrade``) to every device that
    installed the new one, published in this request (within ``max_concurrent``; the loop orders the rest). Audited.
    """
    reason = _reason(body, "rolled back", who)

    def op(conn: sa.Connection, row: Mapping[str, Any], spec: RolloutSpec, state: RolloutState,  # noqa: PLR0917
           devices: dict[str, Any], now: float) -> Outcome:
        previous = _previous(conn, row, body.bundle if body is not None else None)
        busy = busy_elsewhere(busy_by_rollout(conn), row["id"])
        return rollback(spec, state, devices, now, previous=previous, reason=reason, busy_elsewhere=busy)

    return _act(request, who, rollout_id, "rollback", reason=reason, operation=op, needs_signer=True)


@router.post("/rollouts/{rollout_id}/retry-failed", response_model=RolloutPublic,
             responses=error_responses(404, 409, 422, 503))
def retry_failed_rollout(*, request: Request, who: ReleaseManager, rollout_id: RolloutId,
                         body: Annotated[RetryIn | None, Body()] = None) -> RolloutPublic:
    """Failed, timed-out and rejected devices (or those of ``devices``) start over; only they. The loop orders
    them, paced, in the current phase. The rollout's state is unchanged (a halted rollout stays halted until
    resumed). Audited."""
    reason = _reason(body, "retried", who)
    only = set(body.devices) if body is not None and body.devices is not None else None
    return _act(request, who, rollout_id, "retry_failed", reason=reason, operation=
                lambda conn, row, spec, state, devices, now: retry_failed(spec, state, devices, now, only=only),
                needs_signer=True)
