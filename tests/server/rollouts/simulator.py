"""A small in-memory fleet for driving the rollout policy: simulated devices answer orders and cancels with the
agent's deployment events on a simulated clock, and the loop is the one the fleet server's I/O loop runs
(decide -> carry out -> apply -> deliver events), with every order checked against the phase membership it was
sent under and every halt written to an audit list.

Not a test module (no ``test_`` prefix): imported by the tests as ``tests.server.rollouts.simulator``.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from fleet_server.rollouts import (
    IN_FLIGHT_STEPS,
    Advance,
    Complete,
    Decision,
    DeviceDrift,
    DeviceSli,
    DeviceState,
    DriftLevel,
    Halt,
    RolloutSpec,
    RolloutState,
    RolloutStatus,
    SendCancel,
    SendOrder,
    Signals,
    apply_decisions,
    decide,
    on_event,
    start,
)

PREVIOUS_VERSION = 2


@dataclass(frozen=True)
class Behaviour:
    """How one simulated device reacts to an order."""

    outcome: str = "healthy"  # healthy | failed | rolled_back | rejected | silent | stalls
    drift: DriftLevel = DriftLevel.OK
    drifted_share: float = 0.0
    errors_per_100: int = 0
    latency_p99_ms: float = 5.0


@dataclass(order=True)
class _Pending:
    at: float
    seq: int
    device: str = field(compare=False)
    kind: str = field(compare=False)
    command_id: str = field(compare=False)
    reason: str | None = field(compare=False, default=None)


@dataclass
class AuditRecord:
    at: float
    action: str
    reason: str


@dataclass
class OrderRecord:
    at: float
    device: str
    status: RolloutStatus
    phase: int
    in_phase: bool
    rollback: bool


class FleetSim:
    """Devices ``dev-000`` ... with per-device behaviour drawn from ``behaviour(device_id, rng)``."""

    def __init__(self, spec: RolloutSpec, behaviour: Callable[[str, random.Random], Behaviour] | None = None, *,
                 seed: int = 0, step_s: float = 1.0, busy_elsewhere: Collection[str] = frozenset()) -> None:
        self.spec = spec
        self.rng = random.Random(seed)
        self.step_s = step_s
        self.now = 1_000_000.0
        self.state = RolloutState.draft()
        self.devices: dict[str, DeviceState] = {}
        self.behaviour: dict[str, Behaviour] = {}
        self._choose = behaviour or (lambda _d, _r: Behaviour())
        self._queue: list[_Pending] = []
        self._seq = 0
        self.audit: list[AuditRecord] = []
        self.orders: list[OrderRecord] = []
        self.cancels: list[SendCancel] = []
        self.advances: list[tuple[float, int, frozenset[str]]] = []  # (at, to_phase, devices ordered so far)
        self.max_updating = 0
        self.busy_elsewhere = frozenset(busy_elsewhere)
        self.version_of: dict[str, int] = {}  # what each device serves

    # -- the server side -----------------------------------------------------------------------------------------

    def start(self) -> None:
        self.state = start(self.state, self.now).state
        self.audit.append(AuditRecord(self.now, "start", "started"))

    def signals(self) -> Signals:
        drift: dict[str, DeviceDrift] = {}
        sli: dict[str, DeviceSli] = {}
        for device in self.spec.target:
            b = self.behaviour.get(device, Behaviour())
            version = self.version_of.get(device, PREVIOUS_VERSION)
            on_new = version == self.spec.version
            drift[device] = DeviceDrift(version, b.drift if on_new else DriftLevel.OK,
                                        b.drifted_share if on_new else 0.0)
            sli[device] = DeviceSli(version, 100, b.errors_per_100 if on_new else 0,
                                    b.latency_p99_ms if on_new else 5.0)
        return Signals(drift, sli)

    def tick(self, *, with_signals: bool = False) -> list[Decision]:
        """Deliver due events, decide, carry out, apply; repeat at once after Advance (as the real loop does)."""
        self._deliver()
        out: list[Decision] = []
        for _ in range(len(self.spec.phases) + 2):
            decisions = decide(self.spec, self.state, self.devices, self.now,
                               self.signals() if with_signals else None, busy_elsewhere=self.busy_elsewhere)
            self.carry_out(decisions)
            out += decisions
            if not any(isinstance(d, Advance) for d in decisions):
                break
        return out

    def carry_out(self, decisions: list[Decision] | tuple[Decision, ...]) -> None:
        members = set(self.spec.members(min(self.state.phase, len(self.spec.phases) - 1)))
        for d in decisions:
            if isinstance(d, SendOrder):
                self.orders.append(OrderRecord(self.now, d.device, self.state.status, self.state.phase,
                                               d.device in members, d.rollback))
                self._device_gets_order(d)
            elif isinstance(d, SendCancel):
                self.cancels.append(d)
                self._device_gets_cancel(d)
            elif isinstance(d, Halt):
                self.audit.append(AuditRecord(self.now, f"halt:{d.rule}", d.reason))
            elif isinstance(d, Complete):
                self.audit.append(AuditRecord(self.now, "complete", d.reason))
            elif isinstance(d, Advance):
                self.advances.append((self.now, d.to_phase, frozenset(self.ordered_devices())))
        self.state, changed = apply_decisions(self.state, self.devices, decisions, self.now)
        self.devices.update(changed)
        updating = sum(1 for d in self.spec.target
                       if (s := self.devices.get(d)) is not None and s.step in IN_FLIGHT_STEPS)
        self.max_updating = max(self.max_updating, updating)

    def run(self, seconds: float, *, with_signals: bool = False, stop: Callable[[FleetSim], bool] | None = None
            ) -> None:
        end = self.now + seconds
        while self.now < end:
            self.tick(with_signals=with_signals)
            if stop is not None and stop(self):
                return
            self.now += self.step_s

    # -- the device side -----------------------------------------------------------------------------------------

    def _emit(self, delay: float, device: str, kind: str, command_id: str, reason: str | None = None) -> None:
        self._seq += 1
        heapq.heappush(self._queue, _Pending(self.now + delay, self._seq, device, kind, command_id, reason))

    def _device_gets_order(self, order: SendOrder) -> None:
        if order.rollback:
            b = Behaviour()
        else:
            b = self.behaviour.setdefault(order.device, self._choose(order.device, self.rng))
        if b.outcome == "silent":
            return
        cmd = order.command_id
        t = self.rng.uniform(1, 5)
        self._emit(t, order.device, "received", cmd)
        if b.outcome == "rejected":
            self._emit(t + 1, order.device, "rejected", cmd, "incompatible")
            return
        self._emit(t + 2, order.device, "downloading", cmd)
        if b.outcome == "stalls":
            return
        if b.outcome == "failed":
            self._emit(t + self.rng.uniform(3, 20), order.device, "failed", cmd, "download")
            return
        self._emit(t + 20, order.device, "verified", cmd)
        self._emit(t + 25, order.device, "installed", cmd, None)
        final = "rolled_back" if b.outcome == "rolled_back" else "healthy"
        self._emit(t + 25 + self.rng.uniform(20, 60), order.device, final, cmd,
                   "health_check" if final == "rolled_back" else None)

    def _device_gets_cancel(self, cancel: SendCancel) -> None:
        # The device drops the rest of that deployment if it has not installed yet, and says so.
        remaining = [p for p in self._queue if p.device == cancel.device and p.command_id == cancel.command]
        installed = any(p.kind in ("healthy", "rolled_back") for p in remaining) and not any(
            p.kind == "installed" for p in remaining)
        if installed:
            return  # too late: the agent answers rejected(too_late) under the cancel's own command id
        self._queue = [p for p in self._queue if p not in remaining]
        heapq.heapify(self._queue)
        if self.behaviour.get(cancel.device, Behaviour()).outcome != "silent":
            self._emit(0.5, cancel.device, "cancelled", cancel.command)

    def _deliver(self) -> None:
        while self._queue and self._queue[0].at <= self.now:
            p = heapq.heappop(self._queue)
            st = self.devices.get(p.device)
            if st is None:
                continue
            new = on_event(st, p.kind, p.at, command_id=p.command_id, reason=p.reason)
            if p.kind == "installed" and new.command_id == p.command_id:
                self.version_of[p.device] = PREVIOUS_VERSION if new.rollback else self.spec.version
            if p.kind == "rolled_back":
                self.version_of[p.device] = PREVIOUS_VERSION
            self.devices[p.device] = new

    # -- helpers for assertions ----------------------------------------------------------------------------------

    def ordered_devices(self) -> set[str]:
        return {o.device for o in self.orders if not o.rollback}

    def count(self, step: str) -> int:
        return sum(1 for d in self.spec.target if (s := self.devices.get(d)) is not None and s.step == step)
