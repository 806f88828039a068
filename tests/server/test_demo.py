"""``fleet-server demo`` (the README's quick start) runs end to end: a rollout completes, the drifting one halts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_fleet_demo_completes_one_rollout_and_halts_the_drifting_one(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "fleet_server", "demo", "--devices", "20", "--port", "0",
                        "--dir", str(tmp_path / "demo")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "completed phase 3/3" in out
    assert "HALTED by the drift_baseline gate" in out
    assert "demo OK" in out
    assert (tmp_path / "demo" / "fleet.db").exists() and (tmp_path / "demo" / "root.json").exists()
    # keys never leave the demo directory with loose permissions
    assert (tmp_path / "demo" / "orders-key.pem").stat().st_mode & 0o077 == 0
