"""The bundle rows and their files together: recording an upload, what references a bundle, deleting one, and
garbage collection. Every state change writes its audit record in the same transaction.

**What references a bundle** (so it may be neither deleted nor collected):

* every rollout that names it (``rollouts.bundle_digest``, in any status): the foreign key keeps a rollout's
  bundle for as long as the rollout exists, and a completed rollout still orders late joiners of its cohorts;
* a rolled-back rollout whose rollback target it is (``rollouts.rollback_to``): rollback orders may still go out;
* a device serving its (model, version), or holding it as the previous version (``device_models``): a rollback
  may need it again.

Files are removed only under the store's exclusive lock and after the rows were re-read (see
:mod:`fleet_server.bundles.store`), and after the transaction that deleted their rows committed: a crash in
between leaves an orphan file, which the next collection removes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from fleet_server import audit
from fleet_server.bundles.compat import UnknownBundleError
from fleet_server.bundles.store import BundleStore, Upload
from fleet_server.bundles.verify import VerifiedUpload
from fleet_server.models import BundleRecord, DeviceModel, RolloutRecord, table_of

__all__ = [
    "BundleConflictError",
    "BundleInUseError",
    "BundleReferences",
    "GcReport",
    "RolloutReference",
    "collect_garbage",
    "delete_bundle",
    "find_references",
    "record_upload",
]


class BundleConflictError(Exception):
    """The upload conflicts with a stored bundle: the same (model, version) with other content, or the same
    manifest with other bytes (other signatures)."""


@dataclass(frozen=True, slots=True)
class RolloutReference:
    rollout_id: str
    status: str
    role: str
    """``bundle`` (the rollout deploys it) or ``rollback_target`` (a rolled-back rollout returns devices to it)."""


@dataclass(frozen=True, slots=True)
class BundleReferences:
    """Everything that keeps a bundle (see the module docstring)."""

    rollouts: tuple[RolloutReference, ...] = ()
    devices_active: int = 0
    """Devices serving the bundle's (model, version)."""
    devices_previous: int = 0
    """Devices holding it as the version before their current one."""

    @property
    def in_use(self) -> bool:
        return bool(self.rollouts) or self.devices_active > 0 or self.devices_previous > 0

    def describe(self) -> str:
        parts = [f"rollout {r.rollout_id} ({r.status}{', rollback target' if r.role != 'bundle' else ''})"
                 for r in self.rollouts[:10]]
        if len(self.rollouts) > 10:
            parts.append(f"{len(self.rollouts) - 10} more rollout(s)")
        if self.devices_active:
            parts.append(f"active on {self.devices_active} device(s)")
        if self.devices_previous:
            parts.append(f"previous version on {self.devices_previous} device(s)")
        return "; ".join(parts) or "nothing"


class BundleInUseError(Exception):
    """The bundle is referenced and may not be deleted."""

    def __init__(self, digest: str, references: BundleReferences) -> None:
        super().__init__(f"bundle {digest} is in use: {references.describe()}")
        self.digest = digest
        self.references = references


def _rollback_digest(value: Any) -> str | None:
    if isinstance(value, str):  # a JSON column read back as text by some driver path
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if isinstance(value, dict):
        digest = value.get("bundle_digest")
        return digest if isinstance(digest, str) else None
    return None


def _rollout_references(conn: sa.Connection, digest: str | None = None) -> list[tuple[str, RolloutReference]]:
    """(digest, reference) for every rollout naming a bundle, optionally only ``digest``."""
    r = table_of(RolloutRecord)
    out: list[tuple[str, RolloutReference]] = []
    q = sa.select(r.c.id, r.c.status, r.c.bundle_digest)
    if digest is not None:
        q = q.where(r.c.bundle_digest == digest)
    out += [(row.bundle_digest, RolloutReference(row.id, row.status, "bundle")) for row in conn.execute(q)]
    # Rollback targets live in a JSON column: few rows (rolled-back rollouts), filtered here, not in SQL.
    for row in conn.execute(sa.select(r.c.id, r.c.status, r.c.rollback_to).where(r.c.rollback_to.is_not(None))):
        target = _rollback_digest(row.rollback_to)
        if target is not None and (digest is None or target == digest):
            out.append((target, RolloutReference(row.id, row.status, "rollback_target")))
    return out


def find_references(conn: sa.Connection, digest: str) -> BundleReferences:
    """What references bundle ``digest`` (raises :class:`UnknownBundleError` if there is no such bundle)."""
    b = table_of(BundleRecord)
    row = conn.execute(sa.select(b.c.model, b.c.version).where(b.c.digest == digest)).one_or_none()
    if row is None:
        raise UnknownBundleError(digest)
    dm = table_of(DeviceModel)
    active = conn.execute(sa.select(sa.func.count()).select_from(dm).where(
        dm.c.model == row.model, dm.c.version == row.version)).scalar_one()
    previous = conn.execute(sa.select(sa.func.count()).select_from(dm).where(
        dm.c.model == row.model, dm.c.previous_version == row.version)).scalar_one()
    rollouts = sorted((ref for _, ref in _rollout_references(conn, digest)), key=lambda x: (x.rollout_id, x.role))
    return BundleReferences(tuple(rollouts), int(active), int(previous))


def _versions_on_devices(conn: sa.Connection) -> set[tuple[str, int]]:
    dm = table_of(DeviceModel)
    current = sa.select(dm.c.model, dm.c.version)
    previous = sa.select(dm.c.model, dm.c.previous_version).where(dm.c.previous_version.is_not(None))
    return {(m, int(v)) for m, v in conn.execute(sa.union(current, previous))}


# -- upload -------------------------------------------------------------------------------------------------------


def _conflict(session: Session, verified: VerifiedUpload, upload: Upload) -> BundleRecord | None:
    """The stored row this upload duplicates (``None``: it is new); :class:`BundleConflictError` if it clashes."""
    existing = session.get(BundleRecord, verified.digest)
    m = verified.manifest
    if existing is not None:
        if existing.file_sha256 == upload.sha256:
            return existing
        raise BundleConflictError(
            f"bundle {verified.digest} ({m.model} version {m.version}) is already stored with other bytes (file "
            f"sha256 {existing.file_sha256}, this upload {upload.sha256}): the same manifest with other signatures. "
            "Delete the stored bundle first to replace it")
    b = table_of(BundleRecord)
    other = session.connection().execute(sa.select(b.c.digest).where(
        b.c.model == m.model, b.c.version == m.version)).scalar_one_or_none()
    if other is not None:
        raise BundleConflictError(
            f"{m.model} version {m.version} is already stored as bundle {other} with other content; a (model, "
            "version) is immutable: build and sign a new version")
    return None


def record_upload(session: Session, store: BundleStore, upload: Upload, verified: VerifiedUpload, *, actor: str,
                  now: datetime) -> tuple[BundleRecord, bool]:
    """Store a verified upload: place the file and commit its row and audit record. Returns the row and whether
    it was created (``False``: the same bytes were already stored; a missing file is restored). Raises
    :class:`BundleConflictError` (nothing stored; the caller audits the failure)."""
    m = verified.manifest
    with store.placing():
        for attempt in range(2):
            existing = _conflict(session, verified, upload)
            if existing is not None:
                restored = not store.exists(existing.file_sha256)
                if restored:
                    store.place(upload)
                audit.record(session, actor=actor, action="bundle.upload", target=f"bundle:{verified.digest}",
                             at=now, detail={"model": m.model, "version": m.version, "existing": True,
                                             "file_restored": restored, "length": upload.size})
                session.commit()
                return existing, False
            store.place(upload)
            row = BundleRecord(digest=verified.digest, file_sha256=upload.sha256, model=m.model, version=m.version,
                               length=upload.size, profiles=list(m.profiles), manifest=verified.manifest_doc,
                               signers=list(verified.signers), uploaded_at=now, uploaded_by=actor)
            session.add(row)
            audit.record(session, actor=actor, action="bundle.upload", target=f"bundle:{verified.digest}", at=now,
                         detail={"model": m.model, "version": m.version, "existing": False, "length": upload.size,
                                 "file_sha256": upload.sha256, "signers": list(verified.signers)})
            try:
                session.commit()
            except IntegrityError:
                # A concurrent upload of the same digest or (model, version) committed first: judge again. A file
                # placed for a clashing upload stays as an orphan until the next garbage collection.
                session.rollback()
                if attempt:
                    raise
                continue
            return row, True
    raise AssertionError("unreachable")  # pragma: no cover


# -- delete -------------------------------------------------------------------------------------------------------


def _file_still_used(conn: sa.Connection, sha256: str) -> bool:
    b = table_of(BundleRecord)
    return conn.execute(sa.select(b.c.digest).where(b.c.file_sha256 == sha256).limit(1)).first() is not None


def delete_bundle(session: Session, store: BundleStore, digest: str, *, actor: str, now: datetime) -> BundleRecord:
    """Delete an unreferenced bundle: row and audit record in one transaction, then its file. Raises
    :class:`UnknownBundleError` or :class:`BundleInUseError` (nothing changed; the caller audits the refusal)."""
    with store.removing():
        row = session.get(BundleRecord, digest)
        if row is None:
            raise UnknownBundleError(digest)
        refs = find_references(session.connection(), digest)
        if refs.in_use:
            raise BundleInUseError(digest, refs)
        session.delete(row)
        audit.record(session, actor=actor, action="bundle.delete", target=f"bundle:{digest}", at=now,
                     detail={"model": row.model, "version": row.version, "length": row.length})
        try:
            session.commit()
        except IntegrityError:  # a rollout naming it was created meanwhile (the foreign key refused the delete)
            session.rollback()
            raise BundleInUseError(digest, find_references(session.connection(), digest)) from None
        if not _file_still_used(session.connection(), row.file_sha256):
            store.remove(row.file_sha256)
        session.commit()
        return row


# -- garbage collection -------------------------------------------------------------------------------------------


@dataclass
class GcReport:
    """What :func:`collect_garbage` removed (or would remove, with ``dry_run``)."""

    dry_run: bool
    bundles: list[dict[str, Any]] = field(default_factory=list)
    """``{digest, model, version, length}`` of every unreferenced bundle older than the grace period."""
    orphan_files: list[dict[str, Any]] = field(default_factory=list)
    """``{sha256, length}`` of files under ``sha256/`` without a row."""
    tmp_files: list[str] = field(default_factory=list)
    """Names of stale temporary upload files."""
    bytes_freed: int = 0
    kept_in_use: int = 0
    kept_recent: int = 0
    """Unreferenced bundles kept because they are younger than the grace period."""


def collect_garbage(session: Session, store: BundleStore, *, now: datetime, grace_s: float, actor: str,
                    dry_run: bool = False) -> GcReport:
    """Remove unreferenced bundles uploaded more than ``grace_s`` seconds before ``now`` (rows, then files),
    files without a row, and temporary upload files no upload holds. One audit record (``bundle.gc``) in the
    transaction that deletes the rows; with ``dry_run`` nothing is changed and nothing audited."""
    report = GcReport(dry_run=dry_run)
    cutoff = now - timedelta(seconds=grace_s)
    with store.removing():
        conn = session.connection()
        b = table_of(BundleRecord)
        rows = conn.execute(sa.select(b.c.digest, b.c.file_sha256, b.c.model, b.c.version, b.c.length,
                                      b.c.uploaded_at).order_by(b.c.model, b.c.version)).all()
        by_rollout = {d for d, _ in _rollout_references(conn)}
        on_devices = _versions_on_devices(conn)
        victims = []
        for r in rows:
            if r.digest in by_rollout or (r.model, int(r.version)) in on_devices:
                report.kept_in_use += 1
            elif r.uploaded_at >= cutoff:
                report.kept_recent += 1
            else:
                victims.append(r)
        deleted = []
        for r in victims:
            if not dry_run:
                try:
                    with session.begin_nested():
                        conn.execute(sa.delete(b).where(b.c.digest == r.digest))
                except IntegrityError:  # a rollout naming it was created meanwhile: it is in use now
                    report.kept_in_use += 1
                    continue
            deleted.append(r)
            report.bundles.append({"digest": r.digest, "model": r.model, "version": int(r.version),
                                   "length": int(r.length)})
        gone = {r.digest for r in deleted}
        survivors = {r.file_sha256 for r in rows if r.digest not in gone}
        dead_files = {r.file_sha256 for r in deleted} - survivors
        for f in store.files():
            if f.sha256 not in survivors and f.sha256 not in dead_files:
                report.orphan_files.append({"sha256": f.sha256, "length": f.size})
        tmp = store.stale_tmp_files(now=now.timestamp())
        report.tmp_files = [p.name for p in tmp]
        if dry_run:
            session.rollback()
            report.bytes_freed = (sum(_sizes(store, dead_files)) + sum(f["length"] for f in report.orphan_files)
                                  + sum(_file_size(p) for p in tmp))
            return report
        audit.record(session, actor=actor, action="bundle.gc", target="bundles", at=now, detail={
            "grace_s": grace_s, "bundles": [x["digest"] for x in report.bundles],
            "orphan_files": [x["sha256"] for x in report.orphan_files], "tmp_files": len(report.tmp_files)})
        session.commit()
        for sha, size in zip(sorted(dead_files), _sizes(store, sorted(dead_files)), strict=True):
            if store.remove(sha):
                report.bytes_freed += size
        for orphan in report.orphan_files:
            if store.remove(orphan["sha256"]):
                report.bytes_freed += orphan["length"]
        for p in tmp:
            size = _file_size(p)
            try:
                p.unlink()
            except FileNotFoundError:
                continue
            report.bytes_freed += size
        return report


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _sizes(store: BundleStore, shas: Iterable[str]) -> list[int]:
    out = []
    for sha in shas:
        try:
            out.append(store.path_of(sha).stat().st_size)
        except FileNotFoundError:
            out.append(0)
    return out
