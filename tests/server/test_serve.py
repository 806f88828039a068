"""`fleet-server serve` as an operator runs it: refuses an unmigrated database with the command to run, then
serves the API and ingests a device's drift window from a real mosquitto into the drift API."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol import encode, message_topic
from tests.conftest import REPO
from tests.server.support import baseline, window
from tests.services.mqtt import MosquittoBroker, wait_until

pytestmark = pytest.mark.integration
TOKEN = "serve-test-token-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fleet(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleet_server", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_serve_refuses_unmigrated_db_then_ingests_and_answers(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    env = {**os.environ, "FLEET_DATABASE_URL": f"sqlite:///{tmp_path / 'fleet.db'}", "FLEET_API_TOKEN": TOKEN,
           "FLEET_MQTT_HOST": mosquitto.host, "FLEET_MQTT_PORT": str(mosquitto.port)}
    port = _free_port()
    r = _fleet("serve", "--port", str(port), env=env)
    assert r.returncode == 1 and "fleet-server db upgrade" in r.stderr
    assert _fleet("db", "upgrade", env=env).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "fleet_server", "serve", "--port", str(port)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None
        wait_until(healthy, 30, what="the server to be ready")
        assert proc.poll() is None
        device = paho.Client(CallbackAPIVersion.VERSION2, client_id="cam-7")
        device.connect(mosquitto.host, mosquitto.port)
        device.loop_start()
        w = window("cam-7", 0, baseline(), model="m", version=1, rows=50, start=time.time() - 60)
        device.publish(message_topic(w), encode(w), qos=1).wait_for_publish(5)
        headers = {"Authorization": f"Bearer {TOKEN}"}

        def stored() -> bool:
            got = httpx.get(f"{base}/api/v1/drift", params={"model": "m", "version": 1}, headers=headers, timeout=2)
            return got.status_code == 200 and got.json().get("windows", 0) >= 1
        wait_until(stored, 30, what="the window to reach the drift API")
        doc = httpx.get(f"{base}/api/v1/drift", params={"model": "m", "version": 1}, headers=headers).json()
        assert doc["samples"] == 50
        assert httpx.get(f"{base}/api/v1/drift", params={"model": "m", "version": 1}).status_code in (401, 403)
        device.loop_stop()
        device.disconnect()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    # uvicorn shuts down gracefully and then re-raises the signal; systemd counts SIGTERM as a clean exit.
    assert proc.returncode in (0, -signal.SIGTERM), proc.stderr.read() if proc.stderr else ""
