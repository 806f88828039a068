"""Small persisted facts the updater needs across restarts and power loss.

Each is one tiny JSON file written with :func:`agent.fsutil.atomic_write` (temp file, fsync, rename, fsync dir),
so after ``kill -9`` or a power cut it holds the old value or the new one, never a torn mix. A file that cannot
be parsed is treated as a fault to report, not silently as "nothing stored" (that would reopen rollback).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.fsutil import atomic_write

__all__ = ["AppliedCommands", "HighWaterMark", "HwmStore", "SequenceStore", "StateCorruptError", "TrustedTimeStore"]


class StateCorruptError(RuntimeError):
    """A persisted state file is unreadable; the agent refuses updates for that item until an operator looks."""


def _read_json(path: Path) -> Any | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return json.loads(data)
    except ValueError as exc:
        raise StateCorruptError(f"{path} is corrupt ({exc}); updates for it are refused until it is repaired") from exc


def _write_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(doc, sort_keys=True).encode() + b"\n")


@dataclass(frozen=True, slots=True)
class HighWaterMark:
    """The highest version ever activated for a model, that version's bundle digest, and the release-role
    fingerprint it was set under (a root rotation that replaces the release keys resets the mark: fast-forward
    recovery, as TUF deletes targets metadata when the targets keys rotate)."""

    version: int
    digest: str
    release_fingerprint: str


class HwmStore:
    """Per-model rollback high-water marks (``models/<model>/hwm``)."""

    def __init__(self, path_of: Any) -> None:
        self._path_of = path_of  # StateLayout.high_water_mark

    def get(self, model: str) -> HighWaterMark | None:
        doc = _read_json(self._path_of(model))
        if doc is None:
            return None
        try:
            return HighWaterMark(int(doc["version"]), str(doc["digest"]), str(doc["release_fingerprint"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise StateCorruptError(f"{self._path_of(model)} is corrupt: {exc}") from exc

    def effective(self, model: str, release_fingerprint: str) -> HighWaterMark | None:
        """The mark that applies under the current release keys (``None`` once those keys were rotated)."""
        mark = self.get(model)
        if mark is None or mark.release_fingerprint != release_fingerprint:
            return None
        return mark

    def raise_to(self, model: str, mark: HighWaterMark) -> None:
        """Persist ``mark`` if it is higher than the stored one (or the stored one is from older keys)."""
        current = self.effective(model, mark.release_fingerprint)
        if current is None or mark.version > current.version:
            _write_json(self._path_of(model), {"version": mark.version, "digest": mark.digest,
                                               "release_fingerprint": mark.release_fingerprint})


class TrustedTimeStore:
    """The newest trusted time seen (unix seconds); never moves backwards."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def get(self) -> float | None:
        doc = _read_json(self._path)
        return None if doc is None else float(doc["t"])

    def advance(self, t: float) -> None:
        current = self.get()
        if current is None or t > current:
            _write_json(self._path, {"t": t})


class SequenceStore:
    """The highest deployment-order sequence accepted (replay protection), and the command that carried it
    (so the server's resend of that same, unfinished command is still accepted after a restart)."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def get(self) -> int | None:
        doc = _read_json(self._path)
        return None if doc is None else int(doc["sequence"])

    def command_id(self) -> str | None:
        doc = _read_json(self._path)
        return None if doc is None else doc.get("command_id")

    def set(self, sequence: int, command_id: str | None = None) -> None:
        _write_json(self._path, {"sequence": sequence, "command_id": command_id})


class AppliedCommands:
    """Command ids already applied, with their final event, so a resent command is answered, not re-run.

    Bounded: the newest ``limit`` ids are kept (orders also carry increasing sequences, which stop older replays).
    """

    def __init__(self, path: Path, limit: int = 256) -> None:
        self._path = path
        self._limit = limit

    def _load(self) -> dict[str, tuple[str, str | None]]:
        doc = _read_json(self._path)
        if doc is None:
            return {}
        return {str(row[0]): (str(row[1]), row[2] if len(row) > 2 else None) for row in doc["applied"]}

    def outcome(self, command_id: str) -> tuple[str, str | None] | None:
        """The final event kind and reason recorded for a command, if it was applied."""
        return self._load().get(command_id)

    def record(self, command_id: str, outcome: str, reason: str | None = None) -> None:
        doc = self._load()
        doc.pop(command_id, None)
        doc[command_id] = (outcome, reason)
        while len(doc) > self._limit:
            doc.pop(next(iter(doc)))
        _write_json(self._path, {"applied": [[k, v[0], v[1]] for k, v in doc.items()]})  # a list keeps the age order
