"""The device's update engine: verify → stage → activate → health check → soak → commit, or roll back.

Every step is journalled (``models/<model>/install.json``) before it is taken, and every state change on disk is
atomic (see :mod:`agent.updater.store`), so ``kill -9`` or a power cut at any instant leaves a device that, on
restart, serves a verified model and either finishes the install or rolls it back (:meth:`Updater.recover`).

Trust decisions are delegated to the pure rules in :mod:`agent.bundle`; this module only does the I/O around them.
Outcomes are reported as :class:`UpdateEvent` through the ``events`` callback (the MQTT outbox takes them later).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.bundle import (
    BundleError,
    DeploymentOrder,
    Manifest,
    ReplayedOrderError,
    TrustRoot,
    check_order_matches,
    check_version,
    read_manifest,
    trusted_now,
    verify_bundle,
    verify_order,
)
from agent.fsutil import atomic_write
from agent.profiles import FirmwareProfile
from agent.runtime import ModelHost, ModelLoadError, ModelSpec
from agent.statedir import StateLayout
from agent.updater.health import HealthResult, SoakMonitor, run_health_check
from agent.updater.state import (
    AppliedCommands,
    HighWaterMark,
    HwmStore,
    SequenceStore,
    StateCorruptError,
    TrustedTimeStore,
)
from agent.updater.store import SlotError, SlotStore

__all__ = ["InstallOutcome", "TrustStore", "UpdateEvent", "UpdateSettings", "Updater"]

log = logging.getLogger("edge_agent.updater")

@dataclass(frozen=True, slots=True)
class UpdateEvent:
    """One deployment event (wire vocabulary: received, downloading, verified, installed, healthy, failed,
    rolled_back, rejected, cancelled)."""

    kind: str
    command_id: str | None = None
    model: str | None = None
    version: int | None = None
    reason: str | None = None
    message: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InstallOutcome:
    """How an install ended: ``soaking`` (health check passed, live soak running), ``healthy`` (committed),
    ``already_installed``, ``rejected``, ``rolled_back`` or ``failed``."""

    status: str
    model: str | None = None
    version: int | None = None
    reason: str | None = None
    message: str = ""


@dataclass(frozen=True, slots=True)
class UpdateSettings:
    crash_loop_limit: int = 3  # restarts on a new model before it is rolled back
    health_repeats: int = 21


class TrustStore:
    """The device's current trust root (``keys/root.json``); rotation replaces it atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def provision(self, initial: Path) -> None:
        """Install the initial root shipped with the agent, if the device has none yet."""
        if self.path.exists():
            return
        data = initial.read_bytes()
        TrustRoot.from_bytes(data)  # must be a valid, self-signed root
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(self.path, data)

    def current(self) -> TrustRoot:
        try:
            return TrustRoot.from_bytes(self.path.read_bytes())
        except FileNotFoundError:
            raise StateCorruptError(f"no trust root at {self.path}: provision one (updates.trust_root)") from None

    def rotate(self, new_data: bytes) -> TrustRoot:
        new = self.current().update(new_data)
        atomic_write(self.path, new.to_bytes())
        return new


class _Cancelled(Exception):
    pass


class Updater:
    """Owns installs for one device. Thread-safe: one install at a time."""

    def __init__(
        self,
        *,
        device_id: str,
        layout: StateLayout,
        host: ModelHost,
        profile: FirmwareProfile,
        events: Callable[[UpdateEvent], None],
        fetcher: Any | None = None,
        settings: UpdateSettings = UpdateSettings(),
        clock: Callable[[], float] = time.time,
        on_step: Callable[[str], None] = lambda step: None,
    ) -> None:
        self.device_id = device_id
        self.layout = layout
        self.host = host
        self.profile = profile
        self.store = SlotStore(layout)
        self.trust = TrustStore(layout.trust_root)
        self.hwm = HwmStore(layout.high_water_mark)
        self.ttime = TrustedTimeStore(layout.trusted_time)
        self.sequence = SequenceStore(layout.order_sequence)
        self.applied = AppliedCommands(layout.applied_commands)
        self.fetcher = fetcher
        self.settings = settings
        self._events = events
        self._clock = clock
        self._on_step = on_step
        self._lock = threading.Lock()
        self._soaks: dict[str, tuple[SoakMonitor, str | None]] = {}
        self._cancel: set[str] = set()

    # -- helpers -------------------------------------------------------------------------------------------
    def now(self) -> float:
        """Trusted time: never earlier than the newest signed time this device has seen."""
        persisted = self.ttime.get()
        return trusted_now(self._clock(), persisted)

    def _emit(self, event: UpdateEvent) -> None:
        log.info("deploy event %s %s", event.kind, event.reason or "",
                 extra={"event": event.kind, "command_id": event.command_id, "model": event.model,
                        "version": event.version, "reason": event.reason, "detail_message": event.message})
        self._events(event)

    def _step(self, for_model: str, step: str, /, **fields: Any) -> None:
        """Journal a step *before* taking it, then tell the observer (tests kill the process here)."""
        journal = self.layout.install_journal(for_model)
        doc = {**self._journal(for_model), **fields, "step": step}
        journal.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(journal, json.dumps(doc, sort_keys=True).encode())
        self._on_step(step)

    def _journal(self, model: str) -> dict[str, Any]:
        try:
            doc = json.loads(self.layout.install_journal(model).read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError:
            return {"step": "corrupt"}
        return doc if isinstance(doc, dict) else {"step": "corrupt"}

    def _end_journal(self, model: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.layout.install_journal(model).unlink()

    def _spec_for(self, model: str, slot: str) -> tuple[Manifest, ModelSpec]:
        contents = self.store.read(model, slot)
        manifest = Manifest.from_bytes(contents.manifest_bytes)
        self.store.check_files(contents, iter((f.path, f.length, f.sha256) for f in manifest.files))
        return manifest, ModelSpec(contents.files_dir / manifest.model_file, manifest.schema)

    def baseline_for(self, model: str) -> Any:
        """The drift baseline of the model's active bundle (``None`` for models not installed from a bundle)."""
        slot = self.store.active(model)
        if slot is None:
            return None
        try:
            return Manifest.from_bytes(self.store.read(model, slot).manifest_bytes).drift_baseline()
        except (SlotError, BundleError):
            return None

    # -- start-up ------------------------------------------------------------------------------------------
    def load_installed(self) -> list[str]:
        """Load every installed model from its active slot (falling back to the other slot if the active one is
        damaged). Returns the names loaded. Run :meth:`recover` first."""
        loaded = []
        for model in self.store.models():
            slot = self.store.active(model)
            assert slot is not None
            try:
                _manifest, spec = self._spec_for(model, slot)
                self.host.swap(spec)
                loaded.append(model)
                continue
            except (SlotError, BundleError, ModelLoadError) as exc:
                problem = str(exc)
            previous = self.store.other_with_contents(model)
            if previous is None:
                log.error("cannot serve '%s': %s; no previous slot to fall back to", model, problem)
                continue
            try:
                manifest, spec = self._spec_for(model, previous)
                self.host.swap(spec)
                self.store.activate(model, previous)
                loaded.append(model)
                self._emit(UpdateEvent("rolled_back", None, model, manifest.version, "storage",
                                       f"active slot {slot} unusable ({problem}); serving slot {previous}"))
            except (SlotError, BundleError, ModelLoadError) as exc:
                log.error("cannot serve '%s': active slot: %s; previous slot: %s", model, problem, exc)
        return loaded

    def recover(self) -> None:
        """Finish or roll back installs that a crash interrupted (call at start, before serving)."""
        shutil.rmtree(self.layout.staging, ignore_errors=True)
        for model_dir in sorted(self.layout.models.glob("*/install.json")):
            model = model_dir.parent.name
            j = self._journal(model)
            step = j.get("step")
            command_id = j.get("command_id")
            switched = step in ("activated", "soaking") and self.store.active(model) == j.get("slot")
            if step in ("staging", "staged") or (step == "activated" and not switched):
                # Nothing was switched: the active model never changed. Drop the half-done install.
                slot = j.get("slot")
                if isinstance(slot, str) and step == "staged":
                    with contextlib.suppress(SlotError):
                        self.store.clear_slot(model, slot)
                self._end_journal(model)
                if not self.store.active(model):  # a first install that never switched: nothing to serve
                    with contextlib.suppress(FileNotFoundError):
                        self.layout.active_pointer(model).unlink()
                self._emit(UpdateEvent("failed", command_id, model, j.get("version"), "interrupted",
                                       f"the install was interrupted at '{step}'; nothing was changed"))
            elif step in ("activated", "soaking"):
                boots = int(j.get("boots", 0)) + 1
                self._step(model, str(step), boots=boots)
                if boots > self.settings.crash_loop_limit:
                    self._rollback(model, j, "crash_loop",
                                   f"the agent restarted {boots} times on the new model")
                # else: load_installed serves it, and resume_pending() re-checks it.
            else:
                self._rollback(model, j, "interrupted", f"install journal unreadable ({step})")

    def resume_pending(self) -> None:
        """After :meth:`load_installed`: re-run the health check of an install that was activated but not yet
        committed when the agent stopped, and restart its soak."""
        for model_dir in sorted(self.layout.models.glob("*/install.json")):
            model = model_dir.parent.name
            j = self._journal(model)
            if j.get("step") not in ("activated", "soaking"):
                continue
            with self._lock:
                self._check_and_soak(model, j)

    # -- installs ------------------------------------------------------------------------------------------
    def install_file(self, path: Path, *, order: DeploymentOrder | None = None) -> InstallOutcome:
        """Verify and install a bundle file (an order's download, or a field engineer's sideload)."""
        with self._lock:
            try:
                return self._install(path, order)
            except OSError as exc:  # a disk fault anywhere in the install: put the device back, report, go on
                return self._abort_io(order, exc)
            except StateCorruptError as exc:  # e.g. the trust root or a rollback mark is unreadable
                cmd = order.command_id if order else None
                self._emit(UpdateEvent("failed", cmd, None, None, "storage", str(exc)))
                return InstallOutcome("failed", reason="storage", message=str(exc))

    def _abort_io(self, order: DeploymentOrder | None, exc: OSError) -> InstallOutcome:
        cmd = order.command_id if order else None
        log.error("install failed on an I/O error: %s", exc)
        shutil.rmtree(self.layout.staging, ignore_errors=True)
        for journal in self.layout.models.glob("*/install.json"):
            model = journal.parent.name
            j = self._journal(model)
            if j.get("command_id") != cmd:
                continue
            try:
                if self.store.active(model) == j.get("slot") and j.get("step") in ("activated", "soaking"):
                    return self._rollback(model, j, "io", f"disk error during the install: {exc}")
                slot = j.get("slot")
                if isinstance(slot, str) and self.store.active(model) != slot:
                    self.store.clear_slot(model, slot)
                self._end_journal(model)
            except (OSError, SlotError) as again:
                log.error("cleanup after the I/O error failed too (%s); the next start recovers", again)
        self._emit(UpdateEvent("failed", cmd, None, None, "io", f"disk error during the install: {exc}"))
        return InstallOutcome("failed", reason="io", message=str(exc))

    def _reject(self, order: DeploymentOrder | None, exc: BundleError, model: str | None = None,
                version: int | None = None) -> InstallOutcome:
        cmd = order.command_id if order else None
        self._emit(UpdateEvent("rejected", cmd, model, version, exc.reason, str(exc)))
        return InstallOutcome("rejected", model, version, exc.reason, str(exc))

    def _install(self, path: Path, order: DeploymentOrder | None) -> InstallOutcome:
        cmd = order.command_id if order else None
        now = self.now()
        root = self.trust.current()
        writer = self.store.begin_staging()
        self._on_step("verifying")
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                vb = verify_bundle(f, root, now=now, profile=self.profile, sink=writer)
            with open(path, "rb") as f:
                _manifest_bytes, signatures = read_manifest(f)
            m = vb.manifest
            if order is not None:
                check_order_matches(order, vb, downloaded_length=size)
            mark = self.hwm.effective(m.model, root.release_fingerprint())
            decision = check_version(model=m.model, version=m.version, digest=vb.digest,
                                     hwm_version=mark.version if mark else None,
                                     hwm_digest=mark.digest if mark else None,
                                     allow_downgrade=bool(order and order.allow_downgrade))
        except BundleError as exc:
            writer.abort()
            return self._reject(order, exc)
        except OSError:
            writer.abort()
            raise
        self.ttime.advance(m.created_at)  # a verified, signed time: the device's clock may not be trusted
        self._emit(UpdateEvent("verified", cmd, m.model, m.version, detail={"digest": vb.digest}))
        active = self.store.active(m.model)
        if decision == "reinstall" and active is not None:
            current = self.store.read(m.model, active)
            if current.digest == vb.digest:
                writer.abort()
                self._emit(UpdateEvent("healthy", cmd, m.model, m.version, message="already installed and active"))
                return InstallOutcome("already_installed", m.model, m.version)
        slot = self.store.inactive(m.model)
        try:
            self._step(m.model, "staging", command_id=cmd, model=m.model, version=m.version, digest=vb.digest,
                       slot=slot, previous=active, boots=0)
            writer.finish(vb.manifest_bytes, json.dumps({"signatures": signatures}, sort_keys=True).encode())
            self.store.commit_staging(m.model, slot)
            self._step(m.model, "staged")
            # Raise the rollback mark before switching: a crash after the switch must not reopen older versions.
            self.hwm.raise_to(m.model, HighWaterMark(m.version, vb.digest, root.release_fingerprint()))
            self._step(m.model, "activated", activated_at=self._clock())
            self.store.activate(m.model, slot)
            self._on_step("switched")
        except OSError:
            writer.abort()
            raise
        self._emit(UpdateEvent("installed", cmd, m.model, m.version, detail={"slot": slot}))
        return self._check_and_soak(m.model, self._journal(m.model))

    def _check_and_soak(self, model: str, j: Mapping[str, Any]) -> InstallOutcome:
        """Load the activated slot (next to the old model), run the health check, start the soak."""
        cmd = j.get("command_id")
        slot = self.store.active(model)
        try:
            assert slot is not None
            manifest, spec = self._spec_for(model, slot)
            loaded = self.host.swap(spec)
        except (SlotError, BundleError, ModelLoadError, AssertionError) as exc:
            return self._rollback(model, j, "load_failed", f"the new model could not be loaded: {exc}")
        self._step(model, "activated")
        result: HealthResult = run_health_check(loaded, manifest.health, repeats=self.settings.health_repeats)
        if not result.ok:
            return self._rollback(model, j, result.reason, result.message)
        self._step(model, "soaking")
        self._soaks[model] = (SoakMonitor(loaded, manifest.health, started=self._clock()), cmd)
        log.info("health check passed for %s@%d: %s; soaking %.0f s", model, manifest.version, result.message,
                 manifest.health.soak_s)
        if manifest.health.soak_s <= 0:
            return self._commit(model, f"health check passed ({result.message}); no soak window")
        return InstallOutcome("soaking", model, manifest.version, message=result.message)

    def tick(self) -> list[InstallOutcome]:
        """Advance soaks (the service calls this every second or so)."""
        out = []
        with self._lock:
            for model in list(self._soaks):
                monitor, _cmd = self._soaks[model]
                state, message = monitor.status(self._clock())
                if state == "passed":
                    out.append(self._commit(model, message))
                elif state == "failed":
                    out.append(self._rollback(model, self._journal(model), "soak", message))
        return out

    def _commit(self, model: str, message: str = "") -> InstallOutcome:
        j = self._journal(model)
        self._soaks.pop(model, None)
        self._end_journal(model)
        version = j.get("version")
        self._emit(UpdateEvent("healthy", j.get("command_id"), model, version, message=message or "committed"))
        if j.get("command_id"):
            self.applied.record(str(j["command_id"]), "healthy")
        return InstallOutcome("healthy", model, version, message=message)

    def _rollback(self, model: str, j: Mapping[str, Any], reason: str, message: str) -> InstallOutcome:
        """Point back at the previous slot and serve it again; the failed slot stays for inspection."""
        self._soaks.pop(model, None)
        previous = j.get("previous")
        version = j.get("version")
        cmd = j.get("command_id")
        try:
            if isinstance(previous, str):
                _m, spec = self._spec_for(model, previous)
                self.store.activate(model, previous)
                self.host.swap(spec)
            else:
                # First install of this model: nothing to go back to; stop serving the bad one.
                with contextlib.suppress(FileNotFoundError):
                    self.layout.active_pointer(model).unlink()
                with contextlib.suppress(Exception):
                    self.host.unload(model)
        except (SlotError, BundleError, ModelLoadError, OSError) as exc:
            log.error("rollback of %s failed: %s", model, exc)
            message = f"{message}; rollback failed: {exc}"
        try:
            self._end_journal(model)
            if cmd:
                self.applied.record(str(cmd), "rolled_back", reason)
        except OSError as exc:
            log.error("rollback bookkeeping of %s failed: %s (the next start finishes it)", model, exc)
        self._emit(UpdateEvent("rolled_back", cmd, model, version, reason, message))
        return InstallOutcome("rolled_back", model, version, reason, message)

    # -- orders --------------------------------------------------------------------------------------------
    def handle_order(self, doc: Mapping[str, Any]) -> InstallOutcome:
        """Apply one signed deployment order (deploy or cancel) exactly once."""
        signed = doc.get("signed") if isinstance(doc, Mapping) else None
        raw_cmd = signed.get("command_id") if isinstance(signed, Mapping) else None
        cmd_hint = raw_cmd if isinstance(raw_cmd, str) else None
        if cmd_hint is not None:
            done = self.applied.outcome(cmd_hint)
            if done is not None:  # a resend: acknowledge again with the recorded outcome, do not re-run
                kind, reason = done
                self._emit(UpdateEvent(kind, cmd_hint, reason=reason, message="already applied"))
                return InstallOutcome("already_applied", reason=reason)
        last = self.sequence.get()
        resumed = last is not None and cmd_hint is not None and cmd_hint == self.sequence.command_id()
        try:
            # The same unfinished command resent (we were interrupted) may reuse its own sequence number.
            order = verify_order(doc, self.trust.current(), device_id=self.device_id,
                                 last_sequence=(last - 1) if resumed and last is not None else last, now=self.now())
            if resumed and order.sequence != last:
                raise ReplayedOrderError(f"order {order.command_id} reuses a command id with another sequence")
        except BundleError as exc:
            self._emit(UpdateEvent("rejected", cmd_hint, None, None, exc.reason, str(exc)))
            return InstallOutcome("rejected", reason=exc.reason, message=str(exc))
        self.sequence.set(order.sequence, order.command_id)
        self.ttime.advance(order.issued_at)
        self._emit(UpdateEvent("received", order.command_id, order.model, order.version))
        if order.action == "cancel":
            finished = self.applied.outcome(order.cancels) if order.cancels else None
            if finished is not None and finished[0] != "cancelled":  # the wire rule: too late to cancel
                message = f"{order.cancels} already ended as {finished[0]}; nothing to cancel"
                self.applied.record(order.command_id, "rejected", "too_late")
                self._emit(UpdateEvent("rejected", order.command_id, None, None, "too_late", message))
                return InstallOutcome("rejected", reason="too_late", message=message)
            if order.cancels:
                self._cancel.add(order.cancels)
            self.applied.record(order.command_id, "cancelled")
            self._emit(UpdateEvent("cancelled", order.command_id, None, None,
                                   message=f"cancel of {order.cancels} noted"))
            return InstallOutcome("cancelled")
        return self._deploy(order)

    def _deploy(self, order: DeploymentOrder) -> InstallOutcome:
        from agent.updater.fetch import FetchConfig, FetchError, HttpFetcher

        if self.fetcher is None:  # the HTTP stack loads only when the first order arrives
            self.fetcher = HttpFetcher(FetchConfig())

        # verify_order guarantees these on a deploy order (only cancels lack them).
        assert order.url is not None and order.token is not None and order.bundle_length is not None
        part = self.layout.downloads / f"{order.bundle_digest}.part"
        part.parent.mkdir(parents=True, exist_ok=True)
        for stale in part.parent.glob("*.part"):  # one download at a time: older partials are abandoned
            if stale != part:
                stale.unlink(missing_ok=True)
        self._emit(UpdateEvent("downloading", order.command_id, order.model, order.version,
                               detail={"length": order.bundle_length}))

        def progress(have: int, total: int) -> None:
            if order.command_id in self._cancel:
                raise _Cancelled

        try:
            self._on_step("downloading")
            self.fetcher.fetch(order.url, order.token, part, order.bundle_length, on_progress=progress)
        except _Cancelled:
            part.unlink(missing_ok=True)
            self.applied.record(order.command_id, "cancelled")
            self._emit(UpdateEvent("cancelled", order.command_id, order.model, order.version))
            return InstallOutcome("cancelled", order.model, order.version)
        except FetchError as exc:
            self._emit(UpdateEvent("failed", order.command_id, order.model, order.version, "download", str(exc)))
            return InstallOutcome("failed", order.model, order.version, "download", str(exc))
        if order.command_id in self._cancel:
            part.unlink(missing_ok=True)
            self._emit(UpdateEvent("cancelled", order.command_id, order.model, order.version))
            return InstallOutcome("cancelled", order.model, order.version)
        outcome = self.install_file(part, order=order)
        part.unlink(missing_ok=True)
        if outcome.status in ("rejected", "failed") and outcome.reason != "io":
            self.applied.record(order.command_id, outcome.status, outcome.reason)
        return outcome
