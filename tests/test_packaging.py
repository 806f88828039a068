"""The systemd unit is valid and locked down (systemd's own analyzers, offline)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_config
from tests.conftest import REPO

UNIT = REPO / "packaging" / "systemd" / "edge-agent.service"


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is missing: .ci/run installs the 'systemd' package")
    return tool


def _unit_with_real_binary(tmp_path: Path) -> Path:
    exe = Path(sys.executable).parent / "edge-agent"
    unit = tmp_path / "edge-agent.service"
    unit.write_text(UNIT.read_text().replace("/opt/edge-agent/bin/edge-agent", str(exe)))
    return unit


def test_unit_file_verifies(tmp_path: Path) -> None:
    r = subprocess.run([_analyze(), "verify", str(_unit_with_real_binary(tmp_path))],
                       capture_output=True, text=True, timeout=60)
    problems = [line for line in (r.stdout + r.stderr).splitlines() if "edge-agent.service" in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


def test_unit_exposure_is_low(tmp_path: Path) -> None:
    r = subprocess.run([_analyze(), "security", "--offline=true", str(_unit_with_real_binary(tmp_path))],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for edge-agent.service: ([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout


def test_example_config_is_valid() -> None:
    cfg = load_config(REPO / "packaging" / "config" / "agent.toml")
    assert cfg.api.socket_group == "edge-apps"
    assert cfg.api.socket_path == Path("/run/edge-agent/api.sock")
