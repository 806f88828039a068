"""A/B model slots under the state directory, with an atomically switched active pointer.

Per model::

    models/<model>/slots/<slot>/manifest.json     the signed manifest bytes, exactly as verified
    models/<model>/slots/<slot>/signatures.json
    models/<model>/slots/<slot>/files/<path>      the payload files the manifest lists
    models/<model>/active                         the active slot's name

Only the inactive slot is ever written: a verified bundle is streamed into ``staging/`` (fsynced), then renamed
to become the inactive slot, and only then does the pointer switch (write, fsync, rename, fsync the directory).
So at every instant the active pointer names a complete, verified slot, and the other slot is the previous
model, kept for rollback.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from agent.fsutil import atomic_write, fsync_dir
from agent.statedir import DEFAULT_SLOTS, StateLayout, validate_slot_name

__all__ = ["SlotContents", "SlotError", "SlotStore", "StagingWriter"]

_MANIFEST = "manifest.json"
_SIGNATURES = "signatures.json"
_FILES = "files"


class SlotError(RuntimeError):
    """A slot is missing, incomplete or does not match its manifest."""


@dataclass(frozen=True, slots=True)
class SlotContents:
    """What a slot holds: the verified manifest bytes and where its files are."""

    model: str
    slot: str
    manifest_bytes: bytes
    signatures: bytes
    files_dir: Path

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.manifest_bytes).hexdigest()


class StagingWriter:
    """The sink a bundle verifier streams payload files into; everything is fsynced before ``finish``."""

    def __init__(self, staging: Path) -> None:
        self.dir = staging
        self._open: list[BinaryIO] = []

    def __call__(self, path: str) -> BinaryIO:
        # ``path`` comes from a signed, validated manifest ([A-Za-z0-9._-], no separators); checked again here.
        if "/" in path or path in ("", ".", "..") or "\x00" in path:
            raise SlotError(f"refusing unsafe payload path {path!r}")
        f = open(self.dir / _FILES / path, "xb")  # noqa: SIM115 - closed in finish()/abort()
        self._open.append(f)
        return f

    def finish(self, manifest_bytes: bytes, signatures: bytes) -> None:
        for f in self._open:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        self._open.clear()
        atomic_write(self.dir / _SIGNATURES, signatures)
        atomic_write(self.dir / _MANIFEST, manifest_bytes)
        fsync_dir(self.dir / _FILES)
        fsync_dir(self.dir)

    def abort(self) -> None:
        for f in self._open:
            with contextlib.suppress(OSError):
                f.close()
        self._open.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


class SlotStore:
    """Slots and the active pointer for every model in the state directory."""

    def __init__(self, layout: StateLayout, slots: tuple[str, ...] = DEFAULT_SLOTS) -> None:
        if len(slots) < 2:
            raise ValueError("at least two slots are needed to keep the previous model for rollback")
        self.layout = layout
        self.slots = tuple(validate_slot_name(s) for s in slots)

    def models(self) -> list[str]:
        """Models that have an active slot."""
        if not self.layout.models.is_dir():
            return []
        return sorted(p.name for p in self.layout.models.iterdir() if (p / "active").is_file())

    def active(self, model: str) -> str | None:
        try:
            name = self.layout.active_pointer(model).read_text().strip()
        except FileNotFoundError:
            return None
        try:
            return validate_slot_name(name)
        except ValueError as exc:
            raise SlotError(f"active pointer of '{model}' is corrupt: {exc}") from None

    def inactive(self, model: str) -> str:
        """The slot to install into: never the active one."""
        active = self.active(model)
        for s in self.slots:
            if s != active:
                return s
        raise AssertionError("unreachable: at least two slots")

    def other_with_contents(self, model: str) -> str | None:
        """The previous model's slot (the rollback target), if it holds a complete bundle."""
        active = self.active(model)
        for s in self.slots:
            if s != active and (self.layout.slot(model, s) / _MANIFEST).is_file():
                return s
        return None

    def begin_staging(self) -> StagingWriter:
        staging = self.layout.staging
        shutil.rmtree(staging, ignore_errors=True)
        (staging / _FILES).mkdir(parents=True)
        return StagingWriter(staging)

    def commit_staging(self, model: str, slot: str) -> Path:
        """Make the finished staging directory the contents of ``slot`` (which must not be active)."""
        if slot == self.active(model):
            raise SlotError(f"refusing to overwrite the active slot '{slot}' of '{model}'")
        target = self.layout.slot(model, slot)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(self.layout.staging, target)
        fsync_dir(target.parent)
        return target

    def activate(self, model: str, slot: str) -> None:
        """Switch the active pointer in one atomic step."""
        self.read(model, slot)  # never point at an incomplete slot
        atomic_write(self.layout.active_pointer(model), f"{slot}\n".encode())

    def read(self, model: str, slot: str) -> SlotContents:
        d = self.layout.slot(model, slot)
        try:
            manifest = (d / _MANIFEST).read_bytes()
            signatures = (d / _SIGNATURES).read_bytes()
        except FileNotFoundError:
            raise SlotError(f"slot '{slot}' of '{model}' is incomplete (no manifest)") from None
        return SlotContents(model, slot, manifest, signatures, d / _FILES)

    def check_files(self, contents: SlotContents, files: Iterator[tuple[str, int, str]]) -> None:
        """Re-hash a slot's files against (path, length, sha256) from its manifest: storage corruption check."""
        for path, length, sha in files:
            p = contents.files_dir / path
            try:
                size = p.stat().st_size
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
            except OSError as exc:
                raise SlotError(f"slot '{contents.slot}' of '{contents.model}': {path} unreadable: {exc}") from None
            if size != length or h.hexdigest() != sha:
                raise SlotError(f"slot '{contents.slot}' of '{contents.model}': {path} does not match its manifest")

    def clear_slot(self, model: str, slot: str) -> None:
        if slot == self.active(model):
            raise SlotError(f"refusing to clear the active slot '{slot}' of '{model}'")
        shutil.rmtree(self.layout.slot(model, slot), ignore_errors=True)
