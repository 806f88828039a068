"""The whole device over a real broker: a real `edge-agent run` process with [mqtt] serves requests, sends its
drift windows and deployment events through the outbox, takes a signed deployment command from the commands
topic, and is marked offline by its last will when killed."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.drift import NumericHistogram, Summary
from agent.localapi import LocalClient
from agent.protocol import Command, DriftWindow, Event
from tests.conftest import REPO, samples
from tests.services.mqtt import IngestStub, MosquittoBroker, wait_until
from tests.sim.fleet_http import FleetHttpSim
from tests.updater.support import Keys, make_bundle, make_order


@pytest.fixture
def fleet(mosquitto: MosquittoBroker) -> Iterator[IngestStub]:
    stub = IngestStub(mosquitto, client_id="e2e-server")
    stub.connect()
    yield stub
    stub.close()


def _start(tmp: Path, mosquitto: MosquittoBroker, keys: Keys) -> subprocess.Popen[bytes]:
    (tmp / "root.json").write_bytes(keys.root_bytes())
    cfg = tmp / "agent.toml"
    from agent.demo import MODELS_DIR

    cfg.write_text(
        f'device_id = "pi-e2e"\nstate_dir = "{tmp}/state"\nprofile = "generic-x86-64"\nlog_format = "json"\n'
        f'[api]\nsocket_path = "{tmp}/api.sock"\nsocket_mode = "0600"\n'
        f'[[models]]\npath = "{MODELS_DIR}/cancer_mlp_int8.onnx"\n'
        f'[updates]\ntrust_root = "{tmp}/root.json"\ntick_s = 0.1\n'
        f'[mqtt]\nhost = "{mosquitto.host}"\nport = {mosquitto.port}\nack_timeout_s = 2.0\n'
        f'[telemetry]\nwindow_s = 1.0\n')
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    LocalClient(tmp / "api.sock").wait_ready(alive=lambda: proc.poll() is None)
    return proc


def test_agent_sends_drift_windows_and_takes_a_signed_command(short_tmp: Path, mosquitto: MosquittoBroker,
                                                              fleet: IngestStub) -> None:
    keys = Keys()
    proc = _start(short_tmp, mosquitto, keys)
    try:
        wait_until(lambda: "online" in fleet.states("pi-e2e"), 15, what="the agent's retained online status")
        rows = samples("cancer_mlp_int8")["inputs"]["features"]
        with LocalClient(short_tmp / "api.sock") as c:
            for r in rows:
                c.infer("cancer-mlp", {"features": [r]})
        wait_until(lambda: fleet.count("pi-e2e", "drift") >= 1, 20, what="a drift window at the server")
        windows = [m for (d, s, _), m in fleet.stored.items() if d == "pi-e2e" and s == "drift"]
        assert all(isinstance(w, DriftWindow) for w in windows)
        assert sum(w.samples for w in windows if isinstance(w, DriftWindow)) == len(rows)
        w = next(w for w in windows if isinstance(w, DriftWindow) and w.samples)
        summary = Summary.from_dict({"layout": 1, "features": dict(w.features)})
        first = summary["mean radius"]
        assert isinstance(first, NumericHistogram) and first.total == w.samples
        assert w.slis["requests"] >= w.samples

        # A signed deployment command over MQTT: the agent downloads, installs and reports.
        data = make_bundle(keys, version=2)
        with FleetHttpSim() as http:
            url = http.add_bundle(hashlib.sha256(data).hexdigest(), data, tokens={"tok"})
            order = make_order(keys, data, device_id="pi-e2e", url=url, token="tok", sequence=1,
                               command_id="cmd-e2e")
            fleet.send_command(Command(device_id="pi-e2e", command_id="cmd-e2e", kind="deploy", order=order,
                                       sent_at=time.time()))

            def kinds() -> list[str]:
                return [m.kind for (d, s, _), m in sorted(fleet.stored.items())
                        if d == "pi-e2e" and s == "events" and isinstance(m, Event) and m.command_id == "cmd-e2e"]

            try:
                wait_until(lambda: "healthy" in kinds(), 30, what="the deployment's healthy event")
            except AssertionError:
                proc.send_signal(signal.SIGTERM)
                _, err = proc.communicate(timeout=30)
                raise AssertionError(f"events {kinds()}; agent log tail:\n{err.decode()[-3000:]}") from None
        assert kinds() == ["received", "downloading", "verified", "installed", "healthy"]
        with LocalClient(short_tmp / "api.sock") as c:
            out = c.infer("cancer-mlp", {"features": [rows[0]]})
        assert out["version"] == 2
        assert fleet.duplicates.total() == 0 or all(v >= 0 for v in fleet.duplicates.values())
    finally:
        proc.send_signal(signal.SIGKILL)  # abrupt: the broker publishes the last will
        proc.wait(30)
    wait_until(lambda: fleet.states("pi-e2e")[-1:] == ["offline"], 30, what="the last will marking the agent offline")


def test_windows_counted_before_sigterm_are_not_lost(short_tmp: Path, mosquitto: MosquittoBroker,
                                                      fleet: IngestStub) -> None:
    keys = Keys()
    proc = _start(short_tmp, mosquitto, keys)
    rows = np.asarray(samples("cancer_mlp_int8")["inputs"]["features"])
    with LocalClient(short_tmp / "api.sock") as c:
        for r in rows[:7]:
            c.infer("cancer-mlp", {"features": [r.tolist()]})
    proc.send_signal(signal.SIGTERM)  # stop before the window would close: the hub closes it into the outbox
    assert proc.wait(30) == 0
    proc = _start(short_tmp, mosquitto, keys)  # the next start drains the outbox
    try:
        def total() -> int:
            return sum(m.samples for (d, s, _), m in list(fleet.stored.items())
                       if d == "pi-e2e" and s == "drift" and isinstance(m, DriftWindow))

        wait_until(lambda: total() >= 7, 30, what="the 7 counted rows at the server")
        assert total() == 7
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
