"""Rollout policy: phase membership for 100 000 devices and ``decide`` on a 10 000-device phase.

Targets (fleet-server issue, PERFORMANCE.md): phase membership for 100 000 devices < 1 s. ``decide`` has no
published target; it runs once per rollout per loop tick, so it is reported against a 100 ms budget and against
the least any policy must do (one pass over the device states).

Each metric times the candidate and its baseline interleaved (A B A B ...) after a warm-up, and reports the
median with the median, min and max of the per-repeat ratios (``bench.common``).

    python -m bench.rollout_policy [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench.common import emit, ratio_stats
from fleet_server.rollouts import (
    ConstantRate,
    DeviceState,
    DeviceStep,
    Phase,
    RolloutSpec,
    RolloutState,
    decide,
    order_command_id,
    select_devices,
)

DIGEST = "ab" * 32
NOW = 1_700_000_000.0
PHASES = [Phase(percent=1), Phase(percent=10), Phase(percent=50), Phase(percent=100)]


def _time_ms(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def _pair(candidate: Callable[[], Any], baseline: Callable[[], Any], repeats: int) -> tuple[list[float], list[float]]:
    candidate()
    baseline()
    cand: list[float] = []
    base: list[float] = []
    for _ in range(repeats):
        cand.append(_time_ms(candidate))
        base.append(_time_ms(baseline))
    return cand, base


def _report(metric: str, cand: list[float], base: list[float], *, baseline: str, target: str, **extra: Any) -> None:
    med, lo, hi = ratio_stats(cand, base)
    emit("rollout_policy", metric, value=statistics.median(cand), baseline=baseline,
         baseline_value=statistics.median(base), target=target, ratio_median=round(med, 3), ratio_min=round(lo, 3),
         ratio_max=round(hi, 3), repeats=len(cand), **extra)


def naive_select(rollout_id: str, device_ids: list[str], count: int) -> list[str]:
    """The obvious implementation: Python sort by each device's sha256 hex digest."""
    return sorted(device_ids, key=lambda d: hashlib.sha256(f"{rollout_id}\n{d}".encode()).hexdigest())[:count]


def bench_membership(repeats: int) -> None:
    devices = [f"dev-{i:06d}" for i in range(100_000)]
    half = 50_000
    assert select_devices("ro-bench", devices, half) == naive_select("ro-bench", devices, half)
    cand, base = _pair(lambda: select_devices("ro-bench", devices, half),
                       lambda: naive_select("ro-bench", devices, half), repeats)
    _report("phase_membership_100k_ms", cand, base, baseline="sorted() by sha256 hexdigest per device, same run",
            target="< 1000 ms", devices=len(devices))

    def from_scratch() -> None:
        # What a loop tick pays when it rebuilds the spec from the database: id validation, ranking, membership.
        RolloutSpec("ro-bench", "cancer-mlp", 3, DIGEST, devices, PHASES).members(2)

    cand, base = _pair(from_scratch, lambda: naive_select("ro-bench", devices, half), repeats)
    _report("spec_and_membership_100k_ms", cand, base,
            baseline="sorted() by sha256 hexdigest per device (no validation), same run", target="< 1000 ms",
            devices=len(devices))


def _fleet(spec: RolloutSpec) -> dict[str, DeviceState]:
    """30% healthy, 2% failed, 5% updating (since recently), the rest not started."""
    devices: dict[str, DeviceState] = {}
    n = len(spec.ranked)
    for i, device in enumerate(spec.ranked):
        share = i / n
        cmd = order_command_id(spec.rollout_id, device, 1)
        if share < 0.30:
            devices[device] = DeviceState(DeviceStep.HEALTHY, NOW - 600, None, cmd, NOW - 900, 1)
        elif share < 0.32:
            devices[device] = DeviceState(DeviceStep.FAILED, NOW - 600, "download", cmd, NOW - 900, 1)
        elif share < 0.37:
            devices[device] = DeviceState(DeviceStep.DOWNLOADING, NOW - 60, None, cmd, NOW - 90, 1)
        else:
            devices[device] = DeviceState()
    return devices


def bench_decide(repeats: int) -> None:
    target = [f"dev-{i:05d}" for i in range(10_000)]
    spec = RolloutSpec("ro-bench", "cancer-mlp", 3, DIGEST, target, [Phase(percent=100, failure_rate_halt=0.5)],
                       max_concurrent=1000, rate=ConstantRate(1000))
    devices = _fleet(spec)
    state = RolloutState.running(0, NOW - 3600)
    decisions = decide(spec, state, devices, NOW)
    orders = sum(1 for d in decisions if type(d).__name__ == "SendOrder")

    fresh_device = DeviceState()

    def floor() -> int:
        # The least any policy must do: look at every device's state once.
        return sum(1 for d in target if devices.get(d, fresh_device).step is DeviceStep.HEALTHY)

    cand, base = _pair(lambda: decide(spec, state, devices, NOW), floor, repeats)
    _report("decide_10k_phase_ms", cand, base, baseline="one dict pass over the 10 000 device states",
            target="< 100 ms", devices=len(target), orders=orders)

    def cold() -> None:
        fresh = RolloutSpec("ro-bench", "cancer-mlp", 3, DIGEST, target, spec.phases, max_concurrent=1000,
                            rate=ConstantRate(1000))
        decide(fresh, state, devices, NOW)

    cand, base = _pair(cold, floor, repeats)
    _report("decide_10k_phase_cold_spec_ms", cand, base,
            baseline="one dict pass over the 10 000 device states", target="< 100 ms", devices=len(target),
            note="spec rebuilt per call: validation and ranking included")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    repeats = 5 if args.quick else 15
    bench_membership(repeats)
    bench_decide(repeats)


if __name__ == "__main__":
    main()
