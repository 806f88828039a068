"""kill -9 at every install step, then a real `edge-agent run` on the same state: it serves a verified model and
either finishes the install or rolls it back. Power loss is approximated by this plus the fsync faults in
test_io_faults.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.localapi import LocalClient
from tests.conftest import REPO
from tests.sim.fleet_http import FleetHttpSim
from tests.updater.support import Keys, make_bundle, make_order, snapshot

# "activated" is journalled just before the pointer switch; "switched" is just after it.
STEPS_BEFORE_SWITCH = ["verifying", "staging", "staged", "activated"]
STEPS_AFTER_SWITCH = ["switched", "soaking"]


def _config(tmp: Path, root: Path) -> Path:
    cfg = tmp / "agent.toml"
    cfg.write_text(
        f'device_id = "dev-1"\nstate_dir = "{tmp}/state"\nprofile = "generic-x86-64"\nlog_format = "json"\n'
        f'[api]\nsocket_path = "{tmp}/api.sock"\nsocket_mode = "0600"\n'
        f'[updates]\ntrust_root = "{root}"\ncrash_loop_limit = 3\ntick_s = 0.1\n')
    return cfg


def _harness(cfg: Path, step: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tests.updater.kill_harness", str(cfg), step, *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def _serve_and_check(cfg: Path, tmp: Path) -> tuple[int, list[dict[str, object]]]:
    """Start the real agent on the crashed state; return the version it serves and its deploy events."""
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with LocalClient(tmp / "api.sock") as c:
            c.wait_ready(alive=lambda: proc.poll() is None)
            (model,) = c.models()
            events = c.request("GET", "/v1/admin/events")["events"]
            out = c.infer("cancer-mlp", {"features": [[14.0] * 2 + [90.0, 600.0] + [0.1] * 26]})
            assert out["version"] == model["version"]
        return int(model["version"]), events
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@pytest.fixture
def setup(short_tmp: Path) -> tuple[Keys, Path, Path]:
    keys = Keys()
    root = short_tmp / "root.json"
    root.write_bytes(keys.root_bytes())
    cfg = _config(short_tmp, root)
    v1 = short_tmp / "v1.bundle"
    v1.write_bytes(make_bundle(keys, version=1))
    r = _harness(cfg, "never", "--bundle", str(v1))
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "healthy", r.stderr
    return keys, cfg, short_tmp


@pytest.mark.parametrize("step", STEPS_BEFORE_SWITCH + STEPS_AFTER_SWITCH)
def test_kill9_at_install_step_recovers(setup: tuple[Keys, Path, Path], step: str) -> None:
    keys, cfg, tmp = setup
    v2 = tmp / "v2.bundle"
    v2.write_bytes(make_bundle(keys, version=2))
    before = snapshot(tmp / "state")
    r = _harness(cfg, step, "--bundle", str(v2))
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    version, events = _serve_and_check(cfg, tmp)
    journal = tmp / "state" / "models" / "cancer-mlp" / "install.json"
    if step in STEPS_BEFORE_SWITCH:
        assert version == 1  # rolled back: nothing had been switched
        models = {k: v for k, v in snapshot(tmp / "state").items() if "/slots/a/" in k or k.endswith("/active")}
        assert models == {k: v for k, v in before.items() if "/slots/a/" in k or k.endswith("/active")}
        if step != "verifying":
            assert any(e["kind"] == "failed" and e["reason"] == "interrupted" for e in events)
    else:
        assert version == 2  # finished: health re-checked after restart, then committed
        assert any(e["kind"] == "healthy" for e in events)
    assert not journal.exists()
    assert not (tmp / "state" / "staging").exists()
    # And the device can still install afterwards.
    v3 = tmp / "v3.bundle"
    v3.write_bytes(make_bundle(keys, version=3))
    r = _harness(cfg, "never", "--bundle", str(v3))
    assert json.loads(r.stdout)["status"] == "healthy", r.stderr[-2000:]


def test_kill9_while_downloading_then_order_resent_completes(setup: tuple[Keys, Path, Path]) -> None:
    keys, cfg, tmp = setup
    data = make_bundle(keys, version=2)
    with FleetHttpSim() as sim:
        import hashlib

        digest = hashlib.sha256(data).hexdigest()
        url = sim.add_bundle(digest, data, tokens={"tok"})
        order = make_order(keys, data, device_id="dev-1", url=url, token="tok", sequence=1)
        order_file = tmp / "order.json"
        order_file.write_text(json.dumps(order))
        r = _harness(cfg, "downloading", "--order", str(order_file))
        assert r.returncode == -signal.SIGKILL
        version, _events = _serve_and_check(cfg, tmp)
        assert version == 1
        # The server resends the same command (it was never acknowledged): applied once, now completes.
        r = _harness(cfg, "never", "--order", str(order_file))
        assert json.loads(r.stdout)["status"] in ("healthy",), r.stderr[-2000:]
        version, _events = _serve_and_check(cfg, tmp)
        assert version == 2
    assert os.path.exists(tmp / "state" / "orders" / "sequence")
