"""Installing signed bundles on a device: the happy path, every rejection leaving the device untouched, health-
gated rollback, crash loops, and hot swap under load. Real bundles, real runtimes, real files."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import SigningKey
from tests.conftest import samples
from tests.updater.conftest import Device, make_device
from tests.updater.support import YEAR, make_bundle, snapshot


def write(tmp: Path, data: bytes, name: str = "b.bundle") -> Path:
    p = tmp / name
    p.write_bytes(data)
    return p


def install(d: Device, tmp: Path, data: bytes, name: str = "b.bundle") -> str:
    return d.updater.install_file(write(tmp, data, name)).status


def test_signed_bundle_installs_and_serves(device: Device, tmp_path: Path) -> None:
    outcome = device.updater.install_file(write(tmp_path, make_bundle(device.keys, version=1)))
    assert outcome.status == "healthy"  # soak_s 0 in these bundles: committed after the health check
    assert device.serving() == 1
    assert device.kinds() == ["verified", "installed", "healthy"]
    assert device.updater.store.active("cancer-mlp") == "a"
    assert device.updater.hwm.get("cancer-mlp").version == 1  # type: ignore[union-attr]
    x = np.asarray(samples("cancer_mlp_int8")["inputs"]["features"][:1], dtype=np.float32)
    assert device.host.infer("cancer-mlp", {"features": x}).version == 1
    assert not (device.state / "staging").exists()
    assert not (device.state / "models" / "cancer-mlp" / "install.json").exists()


def test_upgrade_keeps_previous_slot_for_rollback(device: Device, tmp_path: Path) -> None:
    assert install(device, tmp_path, make_bundle(device.keys, version=1)) == "healthy"
    assert install(device, tmp_path, make_bundle(device.keys, version=2)) == "healthy"
    assert device.serving() == 2
    assert device.updater.store.active("cancer-mlp") == "b"
    assert device.updater.store.other_with_contents("cancer-mlp") == "a"


def test_state_survives_restart(tmp_path: Path) -> None:
    d = make_device(tmp_path)
    assert install(d, tmp_path, make_bundle(d.keys, version=3)) == "healthy"
    d.host.close()
    again = make_device(tmp_path, d.keys)
    assert again.serving() == 3


@pytest.fixture
def installed_v2(device: Device, tmp_path: Path) -> Device:
    device.bundles[2] = make_bundle(device.keys, version=2)
    assert install(device, tmp_path, device.bundles[2]) == "healthy"
    device.events.clear()
    return device


def _rejected_unchanged(d: Device, tmp: Path, data: bytes, reason: str | tuple[str, ...]) -> None:
    before = snapshot(d.state)
    hwm = d.updater.hwm.get("cancer-mlp")
    outcome = d.updater.install_file(write(tmp, data, "bad.bundle"))
    assert outcome.status == "rejected", outcome
    reasons = (reason,) if isinstance(reason, str) else reason
    assert outcome.reason in reasons, outcome
    assert snapshot(d.state) == before
    assert d.updater.hwm.get("cancer-mlp") == hwm
    assert d.serving() == 2
    assert d.events[-1].kind == "rejected" and d.events[-1].reason == outcome.reason
    assert not (d.state / "staging").exists()


def test_unsigned_bundle_rejected(installed_v2: Device, tmp_path: Path) -> None:
    _rejected_unchanged(installed_v2, tmp_path, make_bundle(installed_v2.keys, version=3, signers=[]), "signature")


def test_bundle_signed_by_unknown_key_rejected(installed_v2: Device, tmp_path: Path) -> None:
    data = make_bundle(installed_v2.keys, version=3, signers=[SigningKey.generate()])
    _rejected_unchanged(installed_v2, tmp_path, data, "signature")


@pytest.mark.parametrize("where", [100, 700, -2000, -600])
def test_flipped_byte_rejected(installed_v2: Device, tmp_path: Path, where: int) -> None:
    data = bytearray(make_bundle(installed_v2.keys, version=3))
    data[where] ^= 0x01
    _rejected_unchanged(installed_v2, tmp_path, bytes(data),
                        ("signature", "digest", "malformed", "bad_member", "size"))


def test_lower_version_rejected(installed_v2: Device, tmp_path: Path) -> None:
    _rejected_unchanged(installed_v2, tmp_path, make_bundle(installed_v2.keys, version=1), "rollback")


def test_same_version_different_digest_rejected(installed_v2: Device, tmp_path: Path) -> None:
    data = make_bundle(installed_v2.keys, version=2, health_overrides={"atol": 0.03})
    _rejected_unchanged(installed_v2, tmp_path, data, "rollback")


def test_same_bundle_again_is_idempotent(installed_v2: Device, tmp_path: Path) -> None:
    before = snapshot(installed_v2.state)
    outcome = installed_v2.updater.install_file(write(tmp_path, installed_v2.bundles[2], "again.bundle"))
    assert outcome.status == "already_installed"
    assert snapshot(installed_v2.state) == before
    assert installed_v2.kinds() == ["verified", "healthy"]


def test_rollback_rejected_again_after_restart(installed_v2: Device, tmp_path: Path) -> None:
    installed_v2.host.close()
    again = make_device(tmp_path, installed_v2.keys)
    again.events.clear()
    assert again.serving() == 2
    assert again.updater.install_file(write(tmp_path, make_bundle(again.keys, version=1))).reason == "rollback"


def test_rollback_rejected_after_local_manifest_expired(installed_v2: Device, tmp_path: Path) -> None:
    installed_v2.clock[0] += 5 * YEAR  # the installed manifest has long expired; the mark still holds
    data = make_bundle(installed_v2.keys, version=1, created_at=installed_v2.clock[0] - 10,
                       expires_at=installed_v2.clock[0] + YEAR)
    _rejected_unchanged(installed_v2, tmp_path, data, "rollback")


def test_expired_manifest_not_installed_reported_stale(installed_v2: Device, tmp_path: Path) -> None:
    import time

    data = make_bundle(installed_v2.keys, version=3, created_at=time.time() - 2 * YEAR,
                       expires_at=time.time() - YEAR)
    _rejected_unchanged(installed_v2, tmp_path, data, "stale")


def test_expiry_never_stops_a_serving_model(installed_v2: Device, tmp_path: Path) -> None:
    installed_v2.clock[0] += 10 * YEAR
    installed_v2.host.close()
    later = make_device(tmp_path, installed_v2.keys)
    assert later.serving() == 2  # the v2 manifest expired years ago; the model keeps serving


def test_bundle_for_other_firmware_profile_rejected(installed_v2: Device, tmp_path: Path) -> None:
    data = make_bundle(installed_v2.keys, version=3, profiles=("coral-dev-board",))
    _rejected_unchanged(installed_v2, tmp_path, data, "incompatible")


def test_model_that_fails_health_check_rolled_back(installed_v2: Device, tmp_path: Path) -> None:
    # Signed and valid, but its samples say the outputs should be different: a broken export.
    data = make_bundle(installed_v2.keys, version=3, health_overrides={
        "expected": {"probabilities": [[0.5, 0.5]] * 4}, "atol": 0.01})
    outcome = installed_v2.updater.install_file(write(tmp_path, data))
    assert (outcome.status, outcome.reason) == ("rolled_back", "health_check")
    assert installed_v2.serving() == 2
    assert installed_v2.updater.store.active("cancer-mlp") == "a"
    assert installed_v2.kinds() == ["verified", "installed", "rolled_back"]
    assert "differs from the expected samples" in (installed_v2.events[-1].message or "")


def test_model_over_latency_budget_rolled_back(installed_v2: Device, tmp_path: Path) -> None:
    data = make_bundle(installed_v2.keys, version=3, health_overrides={"latency_budget_ms": 0.0001})
    outcome = installed_v2.updater.install_file(write(tmp_path, data))
    assert (outcome.status, outcome.reason) == ("rolled_back", "latency")
    assert installed_v2.serving() == 2


def test_live_error_rate_during_soak_rolls_back(installed_v2: Device, tmp_path: Path) -> None:
    from agent.runtime import InferenceFailedError

    data = make_bundle(installed_v2.keys, version=3, health_overrides={"soak_s": 30.0, "max_error_rate": 0.1})
    outcome = installed_v2.updater.install_file(write(tmp_path, data))
    assert outcome.status == "soaking"
    assert installed_v2.serving() == 3
    model = installed_v2.host.get("cancer-mlp")

    def failing_run(_inputs: object) -> dict[str, np.ndarray]:
        raise InferenceFailedError("device fault injected by the test")

    model.batcher._run_one = failing_run  # the runtime starts failing on live traffic
    x = np.asarray(samples("cancer_mlp_int8")["inputs"]["features"][:1], dtype=np.float32)
    for _ in range(30):
        with pytest.raises(InferenceFailedError):
            installed_v2.host.infer("cancer-mlp", {"features": x})
    (result,) = installed_v2.updater.tick()
    assert (result.status, result.reason) == ("rolled_back", "soak")
    assert installed_v2.serving() == 2


def test_soak_passes_and_commits(installed_v2: Device, tmp_path: Path) -> None:
    data = make_bundle(installed_v2.keys, version=3, health_overrides={"soak_s": 30.0})
    assert installed_v2.updater.install_file(write(tmp_path, data)).status == "soaking"
    assert installed_v2.updater.tick() == []
    installed_v2.clock[0] += 31
    (result,) = installed_v2.updater.tick()
    assert result.status == "healthy"
    assert installed_v2.kinds()[-1] == "healthy"


def test_crash_loop_after_update_rolls_back(tmp_path: Path) -> None:
    d = make_device(tmp_path, crash_loop_limit=2)
    assert install(d, tmp_path, make_bundle(d.keys, version=1)) == "healthy"
    assert install(d, tmp_path, make_bundle(d.keys, version=2, health_overrides={"soak_s": 600.0})) == "soaking"
    keys = d.keys
    d.host.close()
    # The agent keeps dying on the new model (restarts while the soak is still open).
    for _ in range(2):
        d = make_device(tmp_path, keys, crash_loop_limit=2)
        assert d.serving() == 2
        d.host.close()
    d = make_device(tmp_path, keys, crash_loop_limit=2)
    assert d.serving() == 1
    assert d.events[0].kind == "rolled_back" and d.events[0].reason == "crash_loop"


def test_hot_swap_under_load_fails_no_request(device: Device, tmp_path: Path) -> None:
    assert install(device, tmp_path, make_bundle(device.keys, version=1)) == "healthy"
    x = np.asarray(samples("cancer_mlp_int8")["inputs"]["features"][:1], dtype=np.float32)
    stop = threading.Event()
    failures: list[BaseException] = []
    versions: set[int] = set()
    count = [0]

    def app() -> None:
        while not stop.is_set():
            try:
                versions.add(device.host.infer("cancer-mlp", {"features": x}).version)
                count[0] += 1
            except BaseException as exc:
                failures.append(exc)

    threads = [threading.Thread(target=app) for _ in range(4)]
    for t in threads:
        t.start()
    import time

    for v in (2, 3, 4):
        assert install(device, tmp_path, make_bundle(device.keys, version=v), f"v{v}.bundle") == "healthy"
        deadline = time.monotonic() + 30
        while v not in versions and time.monotonic() < deadline:  # the apps reach the new version
            time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join()
    assert failures == []
    assert {1, 2, 3, 4} <= versions
    assert count[0] > 0
