"""Atomic replacement of state files, including when the disk fails mid-write."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from agent.fsutil import atomic_write


def test_atomic_write_replaces_content(tmp_path: Path) -> None:
    p = tmp_path / "active"
    atomic_write(p, b"a\n")
    atomic_write(p, b"b\n")
    assert p.read_bytes() == b"b\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["active"]


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_io_error_keeps_old_content_and_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           failing: str) -> None:
    p = tmp_path / "active"
    atomic_write(p, b"old\n")

    def boom(*_a: object, **_k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="No space"):
        atomic_write(p, b"new\n")
    monkeypatch.undo()
    assert p.read_bytes() == b"old\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["active"]
    atomic_write(p, b"new\n")  # the next attempt succeeds
    assert p.read_bytes() == b"new\n"
