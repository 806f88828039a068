"""Disk faults (ENOSPC, EIO) at every write, rename and fsync of an install: the device keeps serving a verified
model, leaves no temporary files, reports the failure, and the next attempt succeeds."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.updater.conftest import make_device
from tests.updater.support import make_bundle


def _count_calls(name: str, action: Callable[[], Any]) -> int:
    real = getattr(os, name)
    n = [0]

    def counting(*a: Any, **k: Any) -> Any:
        n[0] += 1
        return real(*a, **k)

    setattr(os, name, counting)
    try:
        action()
    finally:
        setattr(os, name, real)
    return n[0]


def _leftovers(state: Path) -> list[str]:
    bad = [str(p.relative_to(state)) for p in state.rglob("*") if ".tmp-" in p.name]
    if (state / "staging").exists():
        bad.append("staging/")
    return bad


@pytest.mark.parametrize("name", ["write", "replace", "fsync"])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_disk_fault_at_every_call_site_keeps_serving(tmp_path: Path, name: str, err: int) -> None:
    # How many times does a clean v1 -> v2 install call os.<name>?
    probe = make_device(tmp_path / "probe")
    (tmp_path / "v1.bundle").write_bytes(make_bundle(probe.keys, version=1))
    assert probe.updater.install_file(tmp_path / "v1.bundle").status == "healthy"
    (tmp_path / "v2.bundle").write_bytes(make_bundle(probe.keys, version=2))
    calls = _count_calls(name, lambda: probe.updater.install_file(tmp_path / "v2.bundle"))
    probe.host.close()
    assert calls > 0
    for i in range(calls):
        d = make_device(tmp_path / f"run-{name}-{err}-{i}", probe.keys)
        assert d.updater.install_file(tmp_path / "v1.bundle").status == "healthy"
        real = getattr(os, name)
        seen = [0]

        def faulty(*a: Any, _i: int = i, _real: Any = real, _seen: list[int] = seen, **k: Any) -> Any:
            _seen[0] += 1
            if _seen[0] == _i + 1:
                raise OSError(err, os.strerror(err))
            return _real(*a, **k)

        setattr(os, name, faulty)
        try:
            outcome = d.updater.install_file(tmp_path / "v2.bundle")
        finally:
            setattr(os, name, real)
        assert d.serving() in (1, 2), (i, outcome)
        if outcome.status != "healthy":
            assert outcome.status in ("failed", "rolled_back"), outcome
            assert outcome.reason == "io", outcome
            assert d.serving() == 1
        assert _leftovers(d.state) == [], (i, outcome)
        again = d.updater.install_file(tmp_path / "v2.bundle")
        assert again.status in ("healthy", "already_installed"), (i, outcome, again)
        assert d.serving() == 2
        d.host.close()
