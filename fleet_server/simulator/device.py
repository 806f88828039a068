"""One simulated agent: the device side of the wire contract, without a model runtime, a disk or a thread.

:class:`SimDevice` behaves like ``agent/`` on the wire (``agent/telemetry/mqtt.py``, ``agent/updater/``):

* **Presence.** A retained online :class:`~agent.protocol.Status` on every connect and after every version change;
  the transport sets the last will (retained ``Status.offline``).
* **Telemetry.** A :class:`~agent.protocol.Heartbeat` on connect and every ``heartbeat_s``; one
  :class:`~agent.protocol.DriftWindow` per installed model every ``window_s`` (:mod:`.windows`).
* **Outbox.** ``events`` and ``drift`` are numbered streams kept in memory until the *server's*
  :class:`~agent.protocol.Ack` (not the broker's PUBACK) lists them; sent again after ``ack_timeout_s`` without
  progress (go-back-N, the timeout doubling up to 16x), at once when an Ack lists them as ``missing``, and after
  every reconnect. ``extra["rejected"]`` ranges are dropped. Bounded by ``outbox_limit`` per stream.
* **Commands.** Decoded with :func:`~agent.protocol.decode_for_topic`; a repeat of a known ``command_id`` is answered
  with the command's latest event and never applied again (checked before the order's replay check, as the agent
  does); otherwise the order is verified with :func:`agent.bundle.verify_order` against the trust root (device id,
  sequence newer than the last accepted one, expiry at trusted time) and must agree with the command's
  ``command_id``/``kind``. A refused order is answered ``rejected`` with the verifier's reason code, without
  ``received``. A deploy then runs ``received -> downloading -> verified -> installed -> healthy`` with the
  scenario's latencies, or ends as the device's :class:`~fleet_server.simulator.scenario.Outcome` says; deploys run
  one at a time in arrival order. The version rule is kept: an older version without ``allow_downgrade`` is
  ``rejected`` (``rollback``), the same version is ``healthy`` ("already installed").
* **Cancel.** Answered under its own id with ``received`` and then ``cancelled`` (the deployment it names had not
  reached ``installed``: that deployment ends ``cancelled`` too, with ``detail.cancelled_by``) or ``rejected``
  reason ``too_late`` (it was installed or had ended otherwise). A cancel for an unknown command is noted, like the
  agent does: that deployment is cancelled if it arrives later.

Everything runs on the simulator's engine thread; the device reaches the outside world only through its
:class:`DeviceHost` (clock, timers, publish, download), so it can be driven without a broker.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from agent.bundle import (
    BundleError,
    DeploymentOrder,
    ExpiredError,
    FormatError,
    OrderError,
    ReplayedOrderError,
    TrustRoot,
    WrongDeviceError,
    trusted_now,
    verify_order,
)
from agent.protocol import (
    Ack,
    Channel,
    Command,
    DriftWindow,
    Event,
    Heartbeat,
    ModelState,
    ProtocolError,
    RangeSet,
    Status,
    decode_for_topic,
    device_topic,
    encode,
    validate_ranges,
)
from fleet_server.simulator.scenario import DevicePlan, Outcome, Scenario
from fleet_server.simulator.stats import SimStats
from fleet_server.simulator.windows import WindowFactory

__all__ = ["DeviceHost", "EventView", "SimDevice"]

log = logging.getLogger("fleet_server.simulator")

_STREAMS: Final = ("events", "drift")
_APPLIED_LIMIT: Final = 256
_EVENT_HISTORY: Final = 512
_FINAL: Final = frozenset({"healthy", "failed", "rolled_back", "rejected", "cancelled"})


class DeviceHost(Protocol):
    """What a simulated device needs from the simulator (the engine and the MQTT transport)."""

    stats: SimStats

    def now(self) -> float:
        """Monotonic seconds (timers)."""

    def wall(self) -> float:
        """Unix seconds (message timestamps)."""

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the engine thread after ``delay`` seconds."""

    def publish(self, device: SimDevice, channel: Channel, payload: bytes, *, retain: bool = False) -> bool:
        """Publish on the device's topic for ``channel`` (QoS 1); ``False`` if the device has no connection now."""

    def download(self, device: SimDevice, order: DeploymentOrder, done: Callable[[str | None], None]) -> None:
        """Fetch the order's bundle in the background; ``done(None)`` or ``done(reason)`` on the engine thread."""


@dataclass(frozen=True, slots=True)
class EventView:
    """One event the device sent (first transmission), for introspection."""

    seq: int
    kind: str
    command_id: str | None
    reason: str | None
    model: str | None
    version: int | None
    at: float
    detail: Mapping[str, Any]


@dataclass
class _Job:
    order: DeploymentOrder
    outcome: Outcome
    step: str = "received"
    done: bool = False


@dataclass
class _Stream:
    next_seq: int = 0
    pending: OrderedDict[int, bytes] = field(default_factory=OrderedDict)
    """Unacknowledged seq -> frame, in seq order."""
    last_progress: float = 0.0
    timeout: float = 0.0


class SimDevice:
    """A simulated agent (see the module docs). Not thread-safe: the engine thread drives it."""

    def __init__(self, plan: DevicePlan, scenario: Scenario, host: DeviceHost, windows: WindowFactory, *,
                 trust_root: TrustRoot | None) -> None:
        self.plan = plan
        self.device_id = plan.device_id
        self.scenario = scenario
        self.host = host
        self.windows = windows
        self.trust_root = trust_root
        self.models: dict[str, int] = dict(plan.installed)
        self.previous: dict[str, int] = {}
        self.slots: dict[str, str] = {m: "a" for m in self.models}
        self.connected = False
        self.online = True
        """False while the device is deliberately away (offline simulation)."""
        self.events: deque[EventView] = deque(maxlen=_EVENT_HISTORY)
        self.applied: OrderedDict[str, tuple[str, str | None]] = OrderedDict()
        self._latest: dict[str, tuple[str, str | None]] = {}
        self._jobs: dict[str, _Job] = {}
        self._queue: deque[_Job] = deque()
        self._current: _Job | None = None
        self._cancel_noted: set[str] = set()
        self._silenced: set[str] = set()
        self._bad_used = 0
        self._sequence: int | None = None
        self._trusted: float | None = None
        self._streams = {s: _Stream() for s in _STREAMS}
        self._window_k = 0
        self._last_window_end: dict[str, float] = {}
        self._started_at = 0.0
        self._timers_running = False
        self._commands_topic = device_topic(self.device_id, Channel.COMMANDS)
        self._acks_topic = device_topic(self.device_id, Channel.ACKS)

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the periodic timers (heartbeat and windows); called once, before the first connection."""
        if self._timers_running:
            return
        self._timers_running = True
        self._started_at = self.host.now()
        wall = self.host.wall()
        for m in self.models:
            self._last_window_end[m] = wall
        s = self.scenario
        self.host.call_later(s.heartbeat_s, self._heartbeat_timer)
        self.host.call_later(s.window_s * (0.5 + self.plan.phase), self._window_timer)

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take over persisted state (``snapshot_state`` of an earlier run): stream numbers, versions, sequence."""
        for name in _STREAMS:
            self._streams[name].next_seq = int(state.get("next_seq", {}).get(name, 0))
        models = state.get("models")
        if isinstance(models, Mapping):
            self.models = {str(k): int(v) for k, v in models.items()}
            self.slots = {m: str(state.get("slots", {}).get(m, "a")) for m in self.models}
        seq = state.get("order_sequence")
        self._sequence = int(seq) if seq is not None else None
        trusted = state.get("trusted_time")
        self._trusted = float(trusted) if trusted is not None else None

    def snapshot_state(self) -> dict[str, Any]:
        """What a real agent persists and a next run needs: stream numbers, versions, slots, order sequence."""
        return {"next_seq": {n: st.next_seq for n, st in self._streams.items()}, "models": dict(self.models),
                "slots": dict(self.slots), "order_sequence": self._sequence, "trusted_time": self._trusted}

    def on_connected(self) -> None:
        """The transport is connected (and subscribed): announce, beat, and send everything unacknowledged."""
        self.connected = True
        self.publish_status()
        self._send_heartbeat()
        now = self.host.now()
        for name, st in self._streams.items():
            st.last_progress, st.timeout = now, self.scenario.ack_timeout_s
            for seq, frame in list(st.pending.items()):
                self._send(name, seq, frame, resend=True)

    def on_disconnected(self) -> None:
        self.connected = False

    # -- publishing -----------------------------------------------------------------------------------------

    def model_states(self) -> tuple[ModelState, ...]:
        return tuple(ModelState(name=m, version=v, slot=self.slots.get(m), healthy=True)
                     for m, v in sorted(self.models.items()))

    def publish_status(self) -> None:
        status = Status(device_id=self.device_id, state="online", agent_version=self.scenario.agent_version,
                        models=self.model_states(), sent_at=self.host.wall())
        if self.host.publish(self, Channel.STATUS, encode(status), retain=True):
            self.host.stats.statuses_sent += 1

    def offline_status(self) -> bytes:
        """The last will: retained ``Status.offline``."""
        return encode(Status.offline(self.device_id, agent_version=self.scenario.agent_version))

    def _send_heartbeat(self) -> None:
        beat = Heartbeat(device_id=self.device_id, sent_at=self.host.wall(),
                         uptime_s=max(0.0, self.host.now() - self._started_at))
        if self.host.publish(self, Channel.HEARTBEAT, encode(beat)):
            self.host.stats.heartbeats_sent += 1

    def _heartbeat_timer(self) -> None:
        if self.connected:
            self._send_heartbeat()
        self.host.call_later(self.scenario.heartbeat_s, self._heartbeat_timer)

    def _window_timer(self) -> None:
        self.send_windows()
        self.host.call_later(self.scenario.window_s, self._window_timer)

    def send_windows(self) -> None:
        """Close one drift window per installed model (into the outbox; sent now if connected)."""
        end = self.host.wall()
        for model, version in sorted(self.models.items()):
            start = min(self._last_window_end.get(model, end - self.scenario.window_s), end)
            self._last_window_end[model] = end
            features, slis = self.windows.variant(self.device_id, model, version, self._window_k)
            self._window_k += 1
            st = self._streams["drift"]
            seq = st.next_seq
            st.next_seq += 1
            window = DriftWindow(device_id=self.device_id, stream_seq=seq, model=model, version=version,
                                 window_start=start, window_end=end, samples=int(slis["requests"]),
                                 features=features, slis=slis)
            self.host.stats.windows_sent += 1
            self._enqueue("drift", seq, encode(window))

    def _enqueue(self, stream: str, seq: int, frame: bytes) -> None:
        st = self._streams[stream]
        if not st.pending:
            st.last_progress, st.timeout = self.host.now(), self.scenario.ack_timeout_s
        st.pending[seq] = frame
        while len(st.pending) > self.scenario.outbox_limit:
            st.pending.popitem(last=False)
            self.host.stats.outbox_dropped += 1
        self._send(stream, seq, frame, resend=False)

    def _send(self, stream: str, seq: int, frame: bytes, *, resend: bool) -> None:
        if not self.connected:
            return
        channel = Channel.EVENTS if stream == "events" else Channel.DRIFT
        if self.host.publish(self, channel, frame) and resend:
            self.host.stats.resent += 1

    def check_outbox(self, now: float) -> bool:
        """Go back to the oldest unacknowledged message of a stream whose acks stalled; True while any is pending."""
        busy = False
        for name, st in self._streams.items():
            if not st.pending:
                continue
            busy = True
            if self.connected and now - st.last_progress >= st.timeout:
                st.last_progress = now
                st.timeout = min(st.timeout * 2, self.scenario.ack_timeout_s * 16)
                self.host.stats.go_backs += 1
                for seq, frame in list(st.pending.items()):
                    self._send(name, seq, frame, resend=True)
        return busy

    @property
    def unacked(self) -> dict[str, int]:
        return {name: len(st.pending) for name, st in self._streams.items()}

    # -- inbound --------------------------------------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes) -> None:
        """A message on one of this device's subscribed topics (commands or acks)."""
        if topic == self._acks_topic:
            self._on_ack(topic, payload)
        elif topic == self._commands_topic:
            self._on_command(topic, payload)
        else:
            self.host.stats.ignored += 1
            log.debug("%s: ignoring a message on %s", self.device_id, topic)

    def _on_ack(self, topic: str, payload: bytes) -> None:
        try:
            ack = decode_for_topic(topic, payload)
        except ProtocolError:
            self.host.stats.invalid_inbound += 1
            return
        if not isinstance(ack, Ack) or ack.stream not in self._streams:
            self.host.stats.invalid_inbound += 1
            return
        self.host.stats.acks_received += 1
        st = self._streams[ack.stream]
        done = RangeSet.from_ranges(ack.seqs)
        rejected: tuple[tuple[int, int], ...] = ()
        if "rejected" in ack.extra:
            try:
                rejected = validate_ranges(ack.extra["rejected"], "rejected")
            except ProtocolError:
                rejected = ()
        gone = RangeSet.from_ranges(rejected)
        removed = [seq for seq in st.pending if seq in done or seq in gone]
        for seq in removed:
            del st.pending[seq]
        if removed:
            st.last_progress, st.timeout = self.host.now(), self.scenario.ack_timeout_s
        if ack.missing:
            wanted = RangeSet.from_ranges(ack.missing)
            for seq, frame in list(st.pending.items()):
                if seq in wanted:
                    self._send(ack.stream, seq, frame, resend=True)

    def _on_command(self, topic: str, payload: bytes) -> None:
        stats = self.host.stats
        try:
            msg = decode_for_topic(topic, payload)
        except ProtocolError as exc:
            stats.invalid_inbound += 1
            log.debug("%s: dropping a malformed command: %s", self.device_id, exc)
            return
        if not isinstance(msg, Command):
            stats.invalid_inbound += 1
            return
        stats.commands_received += 1
        if self.plan.outcome is Outcome.SILENT:
            stats.commands_ignored += 1
            return
        signed = msg.order.get("signed") if isinstance(msg.order, Mapping) else None
        raw = signed.get("command_id") if isinstance(signed, Mapping) else None
        hint = raw if isinstance(raw, str) else None
        if hint is not None and self._repeat(hint):
            stats.commands_duplicate += 1
            return
        try:
            order = self._verify(msg)
        except BundleError as exc:
            stats.commands_rejected[exc.reason] += 1
            self._emit("rejected", hint if hint is not None else msg.command_id, reason=exc.reason,
                       message=str(exc))
            return
        self._sequence = order.sequence
        self._trusted = max(self._trusted or 0.0, order.issued_at)
        self._emit("received", order.command_id, order.model, order.version)
        if order.action == "cancel":
            self._cancel(order)
            return
        job = _Job(order, self._outcome_for_next_deploy())
        self._jobs[order.command_id] = job
        if order.command_id in self._cancel_noted:
            self._finish(job, "cancelled", message="cancelled before it started")
            return
        self._queue.append(job)
        if self._current is None:
            self._start_next()

    def _repeat(self, command_id: str) -> bool:
        """Answer a command seen before with its latest event (never apply it again)."""
        done = self.applied.get(command_id)
        if done is not None:
            kind, reason = done
            self._emit(kind, command_id, reason=reason, message="already applied", repeat=True)
            return True
        job = self._jobs.get(command_id)
        if job is not None and not job.done:
            kind, reason = self._latest.get(command_id, ("received", None))
            self._emit(kind, command_id, job.order.model, job.order.version, reason=reason, message="in progress",
                       repeat=True)
            return True
        return False

    def _verify(self, msg: Command) -> DeploymentOrder:
        now = trusted_now(self.host.wall(), self._trusted)
        if self.trust_root is not None:
            order = verify_order(msg.order, self.trust_root, device_id=self.device_id, last_sequence=self._sequence,
                                 now=now)
        else:
            order = _unverified_order(msg.order, device_id=self.device_id, last_sequence=self._sequence, now=now)
        if order.command_id != msg.command_id or order.action != msg.kind:
            raise OrderError(f"command {msg.command_id} ({msg.kind}) carries order {order.command_id} "
                             f"({order.action}): refusing a command that disagrees with its signed order")
        return order

    def _outcome_for_next_deploy(self) -> Outcome:
        outcome = self.plan.outcome
        if outcome in (Outcome.FAIL, Outcome.REJECT, Outcome.ROLLBACK):
            limit = self.scenario.bad_attempts
            if limit == 0 or self._bad_used < limit:
                self._bad_used += 1
                return outcome
        return Outcome.OK

    # -- events ---------------------------------------------------------------------------------------------

    def _emit(self, kind: str, command_id: str | None, model: str | None = None, version: int | None = None, *,
              reason: str | None = None, message: str | None = None, detail: Mapping[str, Any] | None = None,
              repeat: bool = False) -> None:
        """Number, record and send one event. ``repeat``: the answer to a duplicate command (counted in
        ``commands_duplicate``, not again in ``events_sent``)."""
        st = self._streams["events"]
        seq = st.next_seq
        st.next_seq += 1
        body = dict(detail or {})
        if message:
            body["message"] = message[:1024]
        at = self.host.wall()
        event = Event(device_id=self.device_id, stream_seq=seq, kind=kind, at=at, command_id=command_id,
                      model=model, version=version, reason=reason, detail=body)
        self.events.append(EventView(seq, kind, command_id, reason, model, version, at, body))
        if command_id is not None:
            self._latest[command_id] = (kind, reason)
        if not repeat:
            self.host.stats.events_sent[kind] += 1
        self._enqueue("events", seq, encode(event))

    def _record(self, command_id: str, kind: str, reason: str | None) -> None:
        self.applied.pop(command_id, None)
        self.applied[command_id] = (kind, reason)
        while len(self.applied) > _APPLIED_LIMIT:
            old, _ = self.applied.popitem(last=False)
            self._jobs.pop(old, None)
            self._latest.pop(old, None)

    # -- deployments ----------------------------------------------------------------------------------------

    def _delay(self, step: str) -> float:
        return self.plan.latency.delay(step, self.plan.jitter)

    def _start_next(self) -> None:
        while self._queue:
            job = self._queue.popleft()
            if job.done:
                continue
            self._current = job
            self.host.call_later(self._delay("downloading"), self._step_fn(self._downloading, job))
            return
        self._current = None

    @staticmethod
    def _step_fn(step: Callable[[_Job], None], job: _Job) -> Callable[[], None]:
        return lambda: step(job)

    def _downloading(self, job: _Job) -> None:
        if job.done:
            return
        o = job.order
        job.step = "downloading"
        self._emit("downloading", o.command_id, o.model, o.version, detail={"length": o.bundle_length})
        if self.plan.download and job.outcome in (Outcome.OK, Outcome.ROLLBACK):
            self.host.download(self, o, lambda error: self._downloaded(job, error))
        else:
            self.host.call_later(self._delay("verified"), lambda: self._downloaded(job, None))

    def _downloaded(self, job: _Job, error: str | None) -> None:
        if job.done:
            return
        o = job.order
        assert o.model is not None and o.version is not None
        s = self.scenario
        if error is not None:
            self._finish(job, "failed", error, message=f"bundle download failed ({error})")
            return
        if job.outcome is Outcome.FAIL:
            self._finish(job, "failed", s.fail_reason, message="simulated failure")
            return
        if job.outcome is Outcome.REJECT:
            self._finish(job, "rejected", s.reject_reason, message="simulated rejection")
            return
        current = self.models.get(o.model)
        if current is not None and o.version < current and not o.allow_downgrade:
            self._finish(job, "rejected", "rollback", message=f"version {o.version} is older than {current}")
            return
        job.step = "verified"
        self._emit("verified", o.command_id, o.model, o.version, detail={"digest": o.bundle_digest})
        if current == o.version:
            self._finish(job, "healthy", message="already installed and active")
            return
        self.host.call_later(self._delay("installed"), lambda: self._installed(job))

    def _installed(self, job: _Job) -> None:
        if job.done:
            return
        o = job.order
        assert o.model is not None and o.version is not None
        old = self.models.get(o.model)
        if old is not None:
            self.previous[o.model] = old
        slot = "b" if self.slots.get(o.model) == "a" else "a"
        self.slots[o.model] = slot
        self.models[o.model] = o.version
        job.step = "installed"
        self._emit("installed", o.command_id, o.model, o.version, detail={"slot": slot})
        self.host.stats.version_changes += 1
        self.publish_status()
        self.host.call_later(self._delay("healthy"), lambda: self._health(job))

    def _health(self, job: _Job) -> None:
        if job.done:
            return
        o = job.order
        assert o.model is not None
        if job.outcome is Outcome.ROLLBACK:
            restored = self.previous.pop(o.model, None)
            if restored is None:
                self.models.pop(o.model, None)
                self.slots.pop(o.model, None)
            else:
                self.models[o.model] = restored
                self.slots[o.model] = "b" if self.slots.get(o.model) == "a" else "a"
            self.host.stats.version_changes += 1
            self._finish(job, "rolled_back", self.scenario.rollback_reason, message="simulated health failure",
                         detail={"restored_version": restored} if restored is not None else None)
            self.publish_status()
            return
        self._finish(job, "healthy", message="simulated health check passed")

    def _finish(self, job: _Job, kind: str, reason: str | None = None, *, message: str | None = None,
                detail: Mapping[str, Any] | None = None) -> None:
        o = job.order
        job.done = True
        job.step = kind
        self._emit(kind, o.command_id, o.model, o.version, reason=reason, message=message, detail=detail)
        self._record(o.command_id, kind, reason)
        if self._current is job:
            self._start_next()

    def _cancel(self, order: DeploymentOrder) -> None:
        target = order.cancels
        assert target is not None
        finished = self.applied.get(target)
        job = self._jobs.get(target)
        too_late = (finished is not None and finished[0] != "cancelled") or (
            job is not None and not job.done and job.step == "installed")
        if too_late:
            state = finished[0] if finished is not None else "installed"
            self._emit("rejected", order.command_id, reason="too_late",
                       message=f"{target} already {state}; nothing to cancel")
            self._record(order.command_id, "rejected", "too_late")
            return
        self._emit("cancelled", order.command_id, message=f"cancel of {target} noted", detail={"cancels": target})
        self._record(order.command_id, "cancelled", None)
        if job is None:
            self._cancel_noted.add(target)
        elif not job.done:
            self._finish(job, "cancelled", message=f"cancelled by {order.command_id}",
                         detail={"cancelled_by": order.command_id})


def _unverified_order(doc: Mapping[str, Any], *, device_id: str, last_sequence: int | None,
                      now: float) -> DeploymentOrder:
    """Without a trust root: take the order's signed fields as they are (no signature check), but keep the device,
    replay and expiry rules. For benchmarks that do not want to manage keys; never what a real agent does."""
    signed = doc.get("signed")
    if not isinstance(signed, Mapping):
        raise FormatError("order.signed must be an object")
    try:
        order = DeploymentOrder(
            command_id=str(signed["command_id"]), action=signed["action"], device_id=str(signed["device_id"]),
            sequence=int(signed["sequence"]), issued_at=float(signed["issued_at"]),
            expires_at=float(signed["expires_at"]), rollout_id=signed.get("rollout_id"), model=signed.get("model"),
            version=signed.get("version"), bundle_digest=signed.get("bundle_digest"),
            bundle_length=signed.get("bundle_length"), url=signed.get("url"), token=signed.get("token"),
            token_expires_at=signed.get("token_expires_at"), allow_downgrade=bool(signed.get("allow_downgrade")),
            cancels=signed.get("cancels"))
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"order: {exc}") from None
    if order.action not in ("deploy", "cancel") or (order.action == "cancel" and not order.cancels) or (
            order.action == "deploy" and (not order.model or not isinstance(order.version, int))):
        raise FormatError(f"order {order.command_id}: incomplete {order.action} order")
    if order.device_id != device_id:
        raise WrongDeviceError(f"order {order.command_id} is for device {order.device_id!r}, not {device_id!r}")
    if last_sequence is not None and not order.sequence > last_sequence:
        raise ReplayedOrderError(f"order {order.command_id} has sequence {order.sequence}, not newer than "
                                 f"{last_sequence}")
    if not order.expires_at > now:
        raise ExpiredError(f"order {order.command_id} expired")
    return order
