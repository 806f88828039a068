"""The release flow of docs/release-flow.md, command by command, with the real programs: keys, a 2-of-2 release
root, build, sign, verify, inspect, root rotation, then a sideload through `edge-agent install` into a running
agent and into a stopped one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.demo import MODELS_DIR
from agent.localapi import LocalClient
from tests.conftest import REPO


def eb(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "import sys; from agent.bundletool.cli import main; sys.exit(main())",
                           *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def ea(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def release(short_tmp: Path) -> Path:
    w = short_tmp
    for k in ("root-1", "release-1", "release-2", "orders-1"):
        r = eb("keygen", "--out", f"{k}.pem", cwd=w)
        assert r.returncode == 0, r.stderr
        assert (w / f"{k}.pub.json").exists() and oct((w / f"{k}.pem").stat().st_mode)[-3:] == "600"
    r = eb("root", "create", "--root", "root-1.pub.json", "--release", "release-1.pub.json", "release-2.pub.json",
           "--orders", "orders-1.pub.json", "--release-threshold", "2", "--sign", "root-1.pem", "--out",
           "root.json", cwd=w)
    assert r.returncode == 0, r.stderr
    return w


def _build(w: Path, version: int, out: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return eb("build", "--model", MODELS_DIR / "cancer_mlp_int8.onnx",
              "--schema", MODELS_DIR / "cancer_mlp_int8.schema.json", "--name", "cancer-mlp",
              "--version", str(version), "--reference", MODELS_DIR / "cancer_mlp_int8.samples.json",
              "--health-samples", MODELS_DIR / "cancer_mlp_int8.samples.json", "--soak-s", "0",
              "--latency-budget-ms", "500", "--out", out, *extra, cwd=w)


def test_k_of_n_release_flow(release: Path) -> None:
    w = release
    r = _build(w, 1, "cancer-1.bundle")
    assert r.returncode == 0, r.stderr
    assert "0 signature(s)" in r.stdout
    r = eb("verify", "cancer-1.bundle", "--root", "root.json", cwd=w)
    assert r.returncode == 1 and "REJECTED (signature)" in r.stderr
    assert eb("sign", "cancer-1.bundle", "--key", "release-1.pem", cwd=w).returncode == 0
    r = eb("verify", "cancer-1.bundle", "--root", "root.json", cwd=w)
    assert r.returncode == 1 and "signature" in r.stderr  # 1 of 2 is below the threshold
    assert eb("sign", "cancer-1.bundle", "--key", "release-2.pem", cwd=w).returncode == 0
    r = eb("verify", "cancer-1.bundle", "--root", "root.json", "--profile", "raspberry-pi-4", cwd=w)
    assert r.returncode == 0 and r.stdout.startswith("OK cancer-mlp@1 digest "), r.stderr
    r = eb("inspect", "cancer-1.bundle", "--json", cwd=w)
    doc = json.loads(r.stdout)
    assert doc["manifest"]["version"] == 1 and len(doc["signatures"]) == 2
    assert doc["manifest"]["files"][0]["length"] == (MODELS_DIR / "cancer_mlp_int8.onnx").stat().st_size
    r = eb("inspect", "cancer-1.bundle", cwd=w)
    assert "cancer-mlp@1 (onnx)" in r.stdout and "signatures  2" in r.stdout


def test_root_rotation_needs_old_and_new_root_keys(release: Path) -> None:
    w = release
    assert eb("keygen", "--out", "root-2.pem", cwd=w).returncode == 0
    args = ["root", "create", "--root", "root-2.pub.json", "--release", "release-1.pub.json", "release-2.pub.json",
            "--orders", "orders-1.pub.json", "--release-threshold", "2", "--version", "2", "--previous",
            "root.json"]
    r = eb(*args, "--sign", "root-2.pem", "--out", "root-2-bad.json", cwd=w)
    assert r.returncode == 2 and "would refuse" in r.stderr and not (w / "root-2-bad.json").exists()
    r = eb(*args, "--sign", "root-1.pem", "root-2.pem", "--out", "root-2.json", cwd=w)
    assert r.returncode == 0, r.stderr


def test_bad_inputs_get_clear_errors(release: Path) -> None:
    w = release
    r = eb("verify", "missing.bundle", "--root", "root.json", cwd=w)
    assert r.returncode == 2 and "missing.bundle" in r.stderr
    (w / "junk.bundle").write_bytes(b"not a tar at all" * 100)
    r = eb("verify", "junk.bundle", "--root", "root.json", cwd=w)
    assert r.returncode == 1 and "REJECTED" in r.stderr
    r = eb("inspect", "junk.bundle", cwd=w)
    assert r.returncode == 2 and "not a readable bundle" in r.stderr
    r = eb("keygen", "--out", "root-1.pem", cwd=w)
    assert r.returncode == 2 and "refusing to overwrite" in r.stderr
    (w / "model.txt").write_text("x")
    r = eb("build", "--model", "model.txt", "--schema", MODELS_DIR / "cancer_mlp_int8.schema.json", "--name",
           "x", "--version", "1", "--reference", "model.txt", "--health-samples", "model.txt", "--out", "o", cwd=w)
    assert r.returncode == 2 and ".onnx or .tflite" in r.stderr


def test_sideload_into_running_and_stopped_agent(release: Path) -> None:
    w = release
    for v in (1, 2):
        assert _build(w, v, f"cancer-{v}.bundle", "--sign", "release-1.pem", "--sign", "release-2.pem").returncode == 0
    cfg = w / "agent.toml"
    cfg.write_text(f'device_id = "field-1"\nstate_dir = "{w}/state"\nprofile = "generic-x86-64"\n'
                   f'[api]\nsocket_path = "{w}/api.sock"\nsocket_mode = "0600"\n'
                   f'[updates]\ntrust_root = "{w}/root.json"\n')
    # Agent stopped: install offline into its state directory.
    r = ea("install", w / "cancer-1.bundle", "--socket", w / "api.sock", "--config", cfg)
    assert r.returncode == 0, r.stderr
    assert "cancer-mlp@1: healthy" in r.stdout
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with LocalClient(w / "api.sock") as c:
            c.wait_ready(alive=lambda: proc.poll() is None)
            assert [m["version"] for m in c.models()] == [1]
            r = ea("install", w / "cancer-2.bundle", "--socket", w / "api.sock")
            assert r.returncode == 0 and "cancer-mlp@2: healthy" in r.stdout, r.stderr
            assert [m["version"] for m in c.models()] == [2]
            r = ea("install", w / "cancer-1.bundle", "--socket", w / "api.sock")
            assert r.returncode == 1 and "rejected (rollback)" in r.stderr
            assert [m["version"] for m in c.models()] == [2]
            # Rotate the root on the running device: a forged root is refused, the proper chain is applied.
            assert eb("keygen", "--out", "root-2.pem", cwd=w).returncode == 0
            args = ["root", "create", "--root", "root-2.pub.json", "--release", "release-1.pub.json",
                    "release-2.pub.json", "--orders", "orders-1.pub.json", "--release-threshold", "2",
                    "--version", "2"]
            assert eb(*args, "--sign", "root-2.pem", "--out", "forged.json", cwd=w).returncode == 0
            r = ea("rotate-root", w / "forged.json", "--socket", w / "api.sock")
            assert r.returncode == 1 and "refused (trust_root)" in r.stderr
            assert eb(*args, "--sign", "root-1.pem", "root-2.pem", "--out", "root-v2.json", cwd=w).returncode == 0
            r = ea("rotate-root", w / "root-v2.json", "--socket", w / "api.sock")
            assert r.returncode == 0 and "version 2" in r.stdout, r.stderr
            stored = json.loads((w / "state" / "keys" / "root.json").read_bytes())
            assert stored["signed"]["version"] == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
