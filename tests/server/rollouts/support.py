"""Builders shared by the rollout policy tests (not a test module)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from fleet_server.rollouts import (
    ConstantRate,
    Decision,
    DeviceState,
    DeviceStep,
    Phase,
    Release,
    RolloutSpec,
    RolloutState,
    SendCancel,
    SendOrder,
    order_command_id,
)

DIGEST = "ab" * 32
OLD_DIGEST = "cd" * 32
T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
PREVIOUS = Release("cancer-mlp", 2, OLD_DIGEST)


def ids(n: int, prefix: str = "dev") -> list[str]:
    return [f"{prefix}-{i:03d}" for i in range(n)]


def make_spec(n: int = 20, *, phases: Sequence[Phase] | None = None, target: Iterable[str] | None = None,
              **kw: Any) -> RolloutSpec:
    """A spec over ``n`` devices with generous pacing unless told otherwise."""
    kw.setdefault("max_concurrent", 1000)
    kw.setdefault("rate", ConstantRate(100_000))
    return RolloutSpec("ro-test", "cancer-mlp", 3, DIGEST, list(target) if target is not None else ids(n),
                       phases if phases is not None else [Phase(count=5, min_finished=1), Phase(percent=100)], **kw)


def running(phase: int = 0, since: float = T0) -> RolloutState:
    return RolloutState.running(phase, since)


def at(step: DeviceStep, since: float = T0, *, device: str = "x", attempts: int = 1, reason: str | None = None,
       online: bool = True, rollback: bool = False, ordered_at: float | None = None) -> DeviceState:
    """A device at ``step`` since ``since`` under this rollout's order for it."""
    if step is DeviceStep.NOT_STARTED:
        return DeviceState(online=online)
    if reason is None and step in (DeviceStep.FAILED, DeviceStep.REJECTED, DeviceStep.ROLLED_BACK):
        reason = "download" if step is DeviceStep.FAILED else "health_check"
    return DeviceState(step, since, reason, order_command_id("ro-test", device, attempts, rollback=rollback),
                       since if ordered_at is None else ordered_at, attempts, rollback, online)


def fleet(spec: RolloutSpec, steps: dict[DeviceStep, int], since: float = T0,
          **kw: Any) -> dict[str, DeviceState]:
    """Give the first devices in rank order the given steps, in the order of ``steps``."""
    out: dict[str, DeviceState] = {}
    ranked = list(spec.ranked)
    for step, count in steps.items():
        for _ in range(count):
            device = ranked.pop(0)
            out[device] = at(step, since, device=device, **kw)
    return out


def orders(decisions: Iterable[Decision]) -> list[SendOrder]:
    return [d for d in decisions if isinstance(d, SendOrder)]


def cancels(decisions: Iterable[Decision]) -> list[SendCancel]:
    return [d for d in decisions if isinstance(d, SendCancel)]


def of_type(decisions: Iterable[Decision], kind: type) -> list[Any]:
    return [d for d in decisions if isinstance(d, kind)]
