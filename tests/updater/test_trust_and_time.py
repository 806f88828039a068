"""Trust-root rotation on the device, fast-forward recovery, frozen clocks, and the atomic active pointer."""

from __future__ import annotations

import threading
from pathlib import Path

from agent.bundle import SigningKey
from agent.updater.store import SlotError, SlotStore
from tests.updater.conftest import make_device
from tests.updater.support import YEAR, Keys, make_bundle, snapshot


def _file(tmp: Path, data: bytes, name: str) -> Path:
    (tmp / name).write_bytes(data)
    return tmp / name


def test_fast_forward_recovered_by_rotating_the_release_key(tmp_path: Path) -> None:
    keys = Keys()
    d = make_device(tmp_path, keys)
    assert d.updater.install_file(_file(tmp_path, make_bundle(keys, version=1), "v1")).status == "healthy"
    # A compromised release key signs version 99999: the device takes it (the signature is valid) ...
    assert d.updater.install_file(_file(tmp_path, make_bundle(keys, version=99999), "ff")).status == "healthy"
    assert d.updater.install_file(_file(tmp_path, make_bundle(keys, version=2), "v2")).reason == "rollback"
    # ... recovery: the root keys rotate the release key out (root v2 signed by old and new root threshold).
    new_release = SigningKey.generate()
    rotated = Keys(root=keys.root, release=[new_release], orders=keys.orders, version=2)
    d.updater.trust.rotate(rotated.root_bytes())
    # Old key's bundles no longer verify; the new key's v1 is accepted because the mark belonged to the old keys.
    assert d.updater.install_file(_file(tmp_path, make_bundle(keys, version=100000), "old")).reason == "signature"
    assert d.updater.install_file(_file(tmp_path, make_bundle(rotated, version=1), "new")).status == "healthy"
    assert d.serving() == 1
    d.host.close()


def test_root_rotation_without_old_root_signature_refused(tmp_path: Path) -> None:
    keys = Keys()
    d = make_device(tmp_path, keys)
    evil = Keys(root=[SigningKey.generate()], version=2)
    before = (d.state / "keys" / "root.json").read_bytes()
    import pytest

    from agent.bundle import BundleError

    with pytest.raises(BundleError) as err:
        d.updater.trust.rotate(evil.root_bytes())
    assert err.value.reason in {"trust_root", "signature"}
    assert (d.state / "keys" / "root.json").read_bytes() == before
    d.host.close()


def test_clock_at_1970_keeps_current_model_and_judges_expiry_by_trusted_time(tmp_path: Path) -> None:
    keys = Keys()
    d = make_device(tmp_path, keys)
    assert d.updater.install_file(_file(tmp_path, make_bundle(keys, version=1), "v1")).status == "healthy"
    import time

    d.updater.ttime.advance(time.time())  # the device once saw a signed time (an order's issued_at)
    d.clock[0] = 0.0  # reboot without a real-time clock
    before = snapshot(d.state)
    stale = make_bundle(keys, version=2, created_at=time.time() - 2 * YEAR, expires_at=time.time() - YEAR)
    outcome = d.updater.install_file(_file(tmp_path, stale, "stale"))
    assert (outcome.status, outcome.reason) == ("rejected", "stale")  # not fooled by the 1970 clock
    assert snapshot(d.state) == before
    assert d.serving() == 1  # and the current model keeps serving
    assert d.updater.now() >= time.time() - 60
    d.host.close()


def test_active_pointer_switch_is_atomic_for_readers(tmp_path: Path) -> None:
    keys = Keys()
    d = make_device(tmp_path, keys)
    assert d.updater.install_file(_file(tmp_path, make_bundle(keys, version=1), "v1")).status == "healthy"
    assert d.updater.install_file(_file(tmp_path, make_bundle(keys, version=2), "v2")).status == "healthy"
    store = SlotStore(d.updater.layout)
    partial: list[str] = []
    loads = [0]
    done = threading.Event()

    def reader() -> None:
        while loads[0] < 10_000:
            try:
                slot = store.active("cancer-mlp")
                assert slot in ("a", "b")
                contents = store.read("cancer-mlp", slot)
                assert contents.manifest_bytes and (contents.files_dir / "model.onnx").stat().st_size > 0
            except (SlotError, OSError, AssertionError) as exc:
                partial.append(repr(exc))
            loads[0] += 1
        done.set()

    t = threading.Thread(target=reader)
    t.start()
    swaps = 0
    while swaps < 1000 or not done.is_set():
        store.activate("cancer-mlp", "a" if swaps % 2 else "b")
        swaps += 1
        if done.is_set() and swaps >= 1000:
            break
    t.join()
    assert partial == []
    assert loads[0] == 10_000 and swaps >= 1000
    d.host.close()
