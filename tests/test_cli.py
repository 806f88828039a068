"""The three programs as a user meets them: --help, --version, clear 'not built yet', and the agent process
started, serving and stopped with SIGTERM exactly as systemd would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent import __version__
from agent.localapi import LocalClient
from tests.conftest import REPO, agent_config_text, samples

PROGRAMS = {"edge-agent": "agent.cli", "edge-bundle": "agent.bundletool.cli", "fleet-server": "fleet_server.cli"}


def run(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.mark.parametrize("prog", PROGRAMS)
def test_help_and_version(prog: str) -> None:
    h = run(PROGRAMS[prog], "--help")
    assert h.returncode == 0 and f"usage: {prog}" in h.stdout
    v = run(PROGRAMS[prog], "--version")
    assert v.returncode == 0 and v.stdout.strip() == f"{prog} {__version__}"


@pytest.mark.parametrize(("prog", "cmd"), [("edge-agent", "provision")])
def test_unbuilt_subcommand_says_so(prog: str, cmd: str) -> None:
    r = run(PROGRAMS[prog], cmd)
    assert r.returncode == 2
    assert f"{prog} {cmd}: not built yet" in r.stderr


def test_console_scripts_installed() -> None:
    bindir = Path(sys.executable).parent
    for prog in PROGRAMS:
        r = subprocess.run([str(bindir / prog), "--version"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and __version__ in r.stdout


def test_check_config_reports_bad_value_with_field(short_tmp: Path) -> None:
    cfg = short_tmp / "agent.toml"
    cfg.write_text(agent_config_text(short_tmp).replace('profile = "generic-x86-64"', 'profile = "toaster"'))
    r = run("agent.cli", "check-config", "--config", str(cfg))
    assert r.returncode == 2 and "toaster" in r.stderr and "generic-x86-64" in r.stderr
    cfg.write_text(agent_config_text(short_tmp, api_extra="max_batch = 0"))
    r = run("agent.cli", "check-config", "--config", str(cfg))
    assert r.returncode == 2 and "api.max_batch" in r.stderr and "1..1024" in r.stderr
    cfg.write_text(agent_config_text(short_tmp))
    r = run("agent.cli", "check-config", "--config", str(cfg))
    assert r.returncode == 0 and "OK" in r.stdout


def test_missing_model_file_stops_start_with_reason(short_tmp: Path) -> None:
    cfg = short_tmp / "agent.toml"
    cfg.write_text(agent_config_text(short_tmp, models=("digits_int8.tflite",))
                   + f'\n[[models]]\npath = "{short_tmp}/gone.onnx"\n'
                   f'schema = "{REPO}/agent/demo/models/cancer_mlp_int8.schema.json"\n')
    r = run("agent.cli", "run", "--config", str(cfg))
    assert r.returncode == 1
    assert "gone.onnx" in r.stderr and "missing or unreadable" in r.stderr
    assert not (short_tmp / "api.sock").exists()  # never half-ready


def test_agent_process_serves_then_stops_cleanly_on_sigterm(short_tmp: Path) -> None:
    cfg = short_tmp / "agent.toml"
    cfg.write_text(agent_config_text(short_tmp).replace('log_format = "text"', 'log_format = "json"'))
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sock = short_tmp / "api.sock"
    try:
        client = LocalClient(sock)
        assert client.wait_ready(alive=lambda: proc.poll() is None)["status"] == "ready"
        s = samples("digits_int8")
        out = client.infer("digits-tflite", {"features": s["inputs"]["features"][:1]})
        assert out["version"] == 1
        client.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert not sock.exists()
    import json

    logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(r["msg"].startswith("edge-agent") and "ready" in r["msg"] and "ready_ms" in r for r in logs)
    assert any(r["msg"] == "received SIGTERM; stopping" for r in logs)
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in logs)


def test_agent_reports_ready_to_systemd(short_tmp: Path) -> None:
    import socket

    notify = short_tmp / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
        ns.bind(str(notify))
        ns.settimeout(60)
        cfg = short_tmp / "agent.toml"
        cfg.write_text(agent_config_text(short_tmp, models=("cancer_mlp_int8.onnx",)))
        proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)], cwd=REPO,
                                env={**os.environ, "NOTIFY_SOCKET": str(notify)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            msg = ns.recv(4096).decode()
            assert msg.startswith("READY=1")
            # READY is sent only after the socket accepts requests and the models are loaded.
            assert LocalClient(short_tmp / "api.sock").health()["models"] == ["cancer-mlp@1"]
            proc.send_signal(signal.SIGTERM)
            assert ns.recv(4096).decode() == "STOPPING=1"
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_demo_runs_end_to_end() -> None:
    r = subprocess.run([sys.executable, "-m", "agent", "demo"], capture_output=True, text=True, timeout=300,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "accuracy on these rows" in r.stdout
    assert "HTTP 422 non_finite" in r.stdout
    assert "-> cancer-mlp@2: healthy" in r.stdout and " 0 failed; now serving cancer-mlp@2" in r.stdout
    assert "(one byte flipped) -> rejected (digest)" in r.stdout
    assert "(an older version) -> rejected (rollback)" in r.stdout
    assert "agent stopped with SIGTERM (exit code 0)" in r.stdout


def test_infer_and_models_commands_talk_to_a_running_agent(start_agent: object, short_tmp: Path) -> None:
    agent = start_agent(models=("cancer_mlp_int8.onnx",))  # type: ignore[operator]
    sock = str(agent.config.api.socket_path)
    row = samples("cancer_mlp_int8")["inputs"]["features"][0]
    import json

    r = run("agent.cli", "infer", "cancer-mlp", "--socket", sock, "--json", json.dumps({"features": [row]}))
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["outputs"]["probabilities"][0]) == 2
    r = run("agent.cli", "models", "--socket", sock)
    assert r.returncode == 0 and json.loads(r.stdout)[0]["name"] == "cancer-mlp"
    r = run("agent.cli", "infer", "cancer-mlp", "--socket", sock, "--json", '{"features": [[1, 2]]}')
    assert r.returncode == 1 and "shape_mismatch" in r.stderr and "[N, 30]" in r.stderr
    r = run("agent.cli", "infer", "cancer-mlp", "--socket", sock, "--json", "{not json")
    assert r.returncode != 0 and "not valid JSON" in r.stderr
    r = run("agent.cli", "infer", "cancer-mlp", "--socket", str(short_tmp / "nope.sock"), "--json", "{}")
    assert r.returncode == 1 and "is edge-agent running" in r.stderr


def test_invalid_trust_root_stops_start_and_check_config_with_reason(short_tmp: Path) -> None:
    root = short_tmp / "root.json"
    root.write_text('{"not": "a root"}')
    cfg = short_tmp / "agent.toml"
    cfg.write_text(agent_config_text(short_tmp, models=("cancer_mlp_int8.onnx",))
                   + f'\n[updates]\ntrust_root = "{root}"\n')
    r = run("agent.cli", "check-config", "--config", str(cfg))
    assert r.returncode == 2 and "updates.trust_root" in r.stderr and "malformed" in r.stderr
    r = run("agent.cli", "run", "--config", str(cfg))
    assert r.returncode == 1 and "cannot start" in r.stderr and "trust root is malformed" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (short_tmp / "api.sock").exists()
