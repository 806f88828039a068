"""A rollout's stored definition (``rollouts.spec``, plain JSON) <-> the pure policy's types.

The API validates a request into the plain dict below and stores it; the rollout loop rebuilds the
:class:`~fleet_server.rollouts.RolloutSpec` from it at every tick, with the cohorts resolved at that moment (late
joiners included). Both go through :func:`build_spec`, so a definition the API accepted is exactly one the loop can
run, and a :class:`~fleet_server.rollouts.RolloutSpecError` names the field by its path in the dict
(``phases[1].percent``).

The dict::

    {"phases": [{"count": 10, "percent": null, "min_soak_s": 600, "success_threshold": 0.95,
                 "failure_rate_halt": 0.1, "min_finished": 5, "drift": {...} | null, "sli": {...} | null}, ...],
     "max_concurrent": 100,
     "rate": {"kind": "constant", "per_minute": 1000}
           | {"kind": "exponential", "base_per_minute": 10, "factor": 2, "every_healthy": 10, "max_per_minute": 1000},
     "window": {"start": "22:00", "end": "04:00"} | null,
     "timeouts": {"receive_s": 3600, "download_s": 3600, "install_s": 600, "health_s": 1800}}

Gate dicts carry the fields of :class:`~fleet_server.rollouts.DriftGate` (``alert_level`` as ``ok``/``warn``/
``alert``) and :class:`~fleet_server.rollouts.SliGate`; a missing key takes the dataclass default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from fleet_server.rollouts import (
    ConstantRate,
    DriftGate,
    DriftLevel,
    ExponentialRate,
    HaltRule,
    MaintenanceWindow,
    Phase,
    RateLimit,
    Release,
    RolloutSpec,
    RolloutSpecError,
    RolloutState,
    RolloutStatus,
    SliGate,
    Timeouts,
)

__all__ = ["build_spec", "release_from_dict", "release_to_dict", "state_from_row", "state_to_row"]

T = TypeVar("T")

_DRIFT_KEYS = ("max_drifted_share", "max_alert_share", "max_excess_over_control", "alert_level", "min_devices",
               "required")
_SLI_KEYS = ("max_error_rate", "max_latency_p99_ms", "min_requests", "min_devices", "required")
_PHASE_KEYS = ("count", "percent", "min_soak_s", "success_threshold", "failure_rate_halt", "min_finished", "drift",
               "sli")
_TIMEOUT_KEYS = ("receive_s", "download_s", "install_s", "health_s")


def _at(path: str, build: Callable[[], T]) -> T:
    """Run ``build``; a :class:`RolloutSpecError` gets ``path`` in front of its field (``phase.percent`` becomes
    ``phases[0].percent``)."""
    try:
        return build()
    except RolloutSpecError as exc:
        leaf = exc.field.split(".", 1)[1] if "." in exc.field else exc.field
        message = str(exc).split(": ", 1)[1] if ": " in str(exc) else str(exc)
        raise RolloutSpecError(message, field=f"{path}.{leaf}" if path else leaf) from None
    except TypeError as exc:  # an unexpected key or a value of the wrong shape
        raise RolloutSpecError(str(exc), field=path or "spec") from None


def _mapping(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise RolloutSpecError(f"must be an object, got {type(value).__name__}", field=path)
    return value


def _pick(d: Mapping[str, Any], keys: Sequence[str], path: str) -> dict[str, Any]:
    unknown = sorted(set(d) - set(keys))
    if unknown:
        raise RolloutSpecError(f"unknown key(s) {unknown}; allowed: {', '.join(keys)}", field=path)
    return {k: d[k] for k in keys if k in d}


def _drift(value: object, path: str) -> DriftGate | None:
    if value is None:
        return None
    kw = _pick(_mapping(value, path), _DRIFT_KEYS, path)
    if "alert_level" in kw:
        level = kw["alert_level"]
        if level not in {lvl.value for lvl in DriftLevel}:
            raise RolloutSpecError(f"must be one of ok, warn, alert, got {level!r}", field=f"{path}.alert_level")
        kw["alert_level"] = DriftLevel(level)
    return _at(path, lambda: DriftGate(**kw))


def _sli(value: object, path: str) -> SliGate | None:
    if value is None:
        return None
    kw = _pick(_mapping(value, path), _SLI_KEYS, path)
    return _at(path, lambda: SliGate(**kw))


def _phase(value: object, path: str) -> Phase:
    kw = _pick(_mapping(value, path), _PHASE_KEYS, path)
    kw["drift"] = _drift(kw.get("drift"), f"{path}.drift")
    kw["sli"] = _sli(kw.get("sli"), f"{path}.sli")
    return _at(path, lambda: Phase(**kw))


def _rate(value: object) -> RateLimit:
    d = dict(_mapping(value, "rate"))
    kind = d.pop("kind", "constant")
    if kind == "constant":
        kw = _pick(d, ("per_minute",), "rate")
        return _at("rate", lambda: ConstantRate(**kw))
    if kind == "exponential":
        kw = _pick(d, ("base_per_minute", "factor", "every_healthy", "max_per_minute"), "rate")
        return _at("rate", lambda: ExponentialRate(**kw))
    raise RolloutSpecError(f"must be 'constant' or 'exponential', got {kind!r}", field="rate.kind")


def _window(value: object) -> MaintenanceWindow | None:
    if value is None:
        return None
    d = _pick(_mapping(value, "window"), ("start", "end"), "window")
    start, end = d.get("start"), d.get("end")
    if not isinstance(start, str) or not isinstance(end, str):
        raise RolloutSpecError("needs start and end as HH:MM (UTC)", field="window")
    try:
        return MaintenanceWindow.from_hhmm(start, end)
    except RolloutSpecError as exc:
        name = {"window.start_s": "window.start", "window.end_s": "window.end"}.get(exc.field, exc.field)
        raise RolloutSpecError(str(exc).split(": ", 1)[1], field=name) from None


def build_spec(spec: Mapping[str, Any], *, rollout_id: str, model: str, version: int, bundle_digest: str,
               target: Sequence[str]) -> RolloutSpec:
    """The policy's :class:`RolloutSpec` from a stored definition and the target resolved now. Raises
    :class:`RolloutSpecError` naming the field (its path in ``spec``)."""
    spec = _mapping(spec, "spec")
    unknown = sorted(set(spec) - {"phases", "max_concurrent", "rate", "window", "timeouts"})
    if unknown:
        raise RolloutSpecError(f"unknown key(s) {unknown}", field="spec")
    phases_in = spec.get("phases")
    if not isinstance(phases_in, Sequence) or isinstance(phases_in, str | bytes):
        raise RolloutSpecError("must be a list of phases", field="phases")
    phases = [_phase(p, f"phases[{i}]") for i, p in enumerate(phases_in)]
    rate = _rate(spec.get("rate") or {"kind": "constant", "per_minute": 1000.0})
    window = _window(spec.get("window"))
    timeouts_in = _pick(_mapping(spec.get("timeouts") or {}, "timeouts"), _TIMEOUT_KEYS, "timeouts")
    timeouts = _at("timeouts", lambda: Timeouts(**timeouts_in))
    max_concurrent = spec.get("max_concurrent", 100)
    return RolloutSpec(rollout_id=rollout_id, model=model, version=version, bundle_digest=bundle_digest,
                       target=tuple(target), phases=phases, max_concurrent=max_concurrent, rate=rate, window=window,
                       timeouts=timeouts)


def release_to_dict(release: Release) -> dict[str, Any]:
    return {"model": release.model, "version": release.version, "bundle_digest": release.bundle_digest}


def release_from_dict(d: Mapping[str, Any]) -> Release:
    return Release(d["model"], d["version"], d["bundle_digest"])


def state_from_row(row: Mapping[str, Any]) -> RolloutState:
    """The policy's :class:`RolloutState` from a ``rollouts`` row (raises :class:`RolloutSpecError` or
    ``ValueError`` for a row that does not make sense: the loop skips it and logs)."""
    rollback = row.get("rollback_to")
    return RolloutState(
        status=RolloutStatus(row["status"]), phase=row["phase"], phase_started_at=row["phase_started_at"],
        reason=row["reason"], halt_rule=HaltRule(row["halt_rule"]) if row["halt_rule"] else None,
        rollback_to=release_from_dict(rollback) if rollback else None, changed_at=row["changed_at"])


def state_to_row(state: RolloutState) -> dict[str, Any]:
    """The ``rollouts`` columns that hold a :class:`RolloutState`."""
    return {
        "status": state.status.value, "phase": state.phase, "phase_started_at": state.phase_started_at,
        "reason": state.reason[:2048] if state.reason else state.reason,
        "halt_rule": state.halt_rule.value if state.halt_rule is not None else None,
        "rollback_to": release_to_dict(state.rollback_to) if state.rollback_to is not None else None,
        "changed_at": state.changed_at,
    }
