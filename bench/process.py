"""Agent process memory and start-to-ready time against a bare runtime process, interleaved.

Memory target: everything the agent loads (MQTT client with TLS included) <= 1.20x a bare
python + numpy + onnxruntime + session process with the same model loaded. The agent does not speak MQTT yet
(telemetry issue), so two figures are reported: the agent as it is, and the agent with paho-mqtt and an SSL
context loaded into the same process (what it will carry).

Start-to-ready: process start until the agent tells systemd READY=1 (its models loaded and the socket
accepting), against a bare process that imports the runtimes and loads the same models.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.demo import DEMO_MODELS, MODELS_DIR, demo_config_text
from bench.common import emit

REPO = Path(__file__).resolve().parents[1]

BARE = """
import sys, numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
s.run(None, {"features": np.zeros((1, 30), dtype=np.float32)})
print("ready", flush=True)
sys.stdin.read()
"""

AGENT = """
import sys, numpy as np
from agent.config import load_config
from agent.service import Agent
if sys.argv[2] == "mqtt":
    import ssl
    import paho.mqtt.client as mqtt
    ctx = ssl.create_default_context()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench", protocol=mqtt.MQTTv5)
    client.tls_set_context(ctx)
agent = Agent.from_config(load_config(__import__("pathlib").Path(sys.argv[1])))
agent.start()
agent.host.infer("cancer-mlp", {"features": np.zeros((1, 30), dtype=np.float32)})
print("ready", flush=True)
sys.stdin.read()
agent.stop()
"""

BARE_ALL = """
import sys, numpy as np, onnxruntime as ort
from ai_edge_litert.interpreter import Interpreter
for p in sys.argv[1:]:
    if p.endswith(".onnx"):
        so = ort.SessionOptions(); so.intra_op_num_threads = 1
        ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
    else:
        Interpreter(model_path=p).allocate_tensors()
"""


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _measure_rss(args: list[str]) -> int:
    proc = subprocess.Popen([sys.executable, "-c", *args], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        return _rss_kib(proc.pid)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)


def bench_memory(repeats: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-", dir="/tmp"))
    cfg = work / "agent.toml"
    cfg.write_text(demo_config_text(work / "state", work / "api.sock", models=("cancer_mlp_int8.onnx",)))
    from tests.updater.support import Keys

    (work / "root.json").write_bytes(Keys().root_bytes())
    full = work / "agent-updates.toml"
    full.write_text(cfg.read_text().replace("api.sock", "api2.sock")
                    + f'\n[updates]\ntrust_root = "{work}/root.json"\n')
    model = str(MODELS_DIR / "cancer_mlp_int8.onnx")
    bare, agent, agent_up, agent_full = [], [], [], []
    for _ in range(repeats):
        bare.append(_measure_rss([BARE, model]))
        agent.append(_measure_rss([AGENT, str(cfg), "plain"]))
        agent_up.append(_measure_rss([AGENT, str(full), "plain"]))
        agent_full.append(_measure_rss([AGENT, str(full), "mqtt"]))
    b = statistics.median(bare)
    for name, vals in (("agent_rss_mib", agent), ("agent_with_updates_rss_mib", agent_up),
                       ("agent_with_updates_mqtt_tls_rss_mib", agent_full)):
        ratios = [v / x for v, x in zip(vals, bare, strict=True)]
        emit("memory", name, value=statistics.median(vals) / 1024,
             baseline="python+numpy+onnxruntime+session (tiny model), RSS MiB", baseline_value=b / 1024,
             target="<= 1.20x", ratio_median=round(statistics.median(ratios), 3), ratio_min=round(min(ratios), 3),
             ratio_max=round(max(ratios), 3))


def _agent_ready_s(cfg: Path, work: Path) -> float:
    notify = work / "notify.sock"
    notify.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
        ns.bind(str(notify))
        ns.settimeout(60)
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)], cwd=REPO,
                                env={**os.environ, "NOTIFY_SOCKET": str(notify)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            msg = ns.recv(4096)
            dt = time.perf_counter() - t0
            assert msg.startswith(b"READY=1")
        finally:
            proc.terminate()
            proc.wait(30)
    return dt


def _bare_ready_s() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", BARE_ALL, *(str(MODELS_DIR / m) for m in DEMO_MODELS)], check=True,
                   cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def bench_startup(repeats: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-", dir="/tmp"))
    cfg = work / "agent.toml"
    cfg.write_text(demo_config_text(work / "state", work / "api.sock"))
    agent, bare = [], []
    _bare_ready_s()  # warm the page cache
    for _ in range(repeats):
        agent.append(_agent_ready_s(cfg, work))
        bare.append(_bare_ready_s())
    ratios = [a / b for a, b in zip(agent, bare, strict=True)]
    emit("startup", "start_to_ready_ms", value=statistics.median(agent) * 1000,
         baseline="bare process importing onnxruntime + LiteRT and loading the same 3 models, ms",
         baseline_value=statistics.median(bare) * 1000, target="report (no target yet)",
         ratio_median=round(statistics.median(ratios), 3), ratio_min=round(min(ratios), 3),
         ratio_max=round(max(ratios), 3))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_idle_cpu(seconds: float) -> None:
    """CPU the agent burns with no traffic (all three demo models loaded), against a sleeping Python process."""
    work = Path(tempfile.mkdtemp(prefix="bench-", dir="/tmp"))
    cfg = work / "agent.toml"
    cfg.write_text(demo_config_text(work / "state", work / "api.sock"))
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    try:
        from agent.localapi import LocalClient

        with LocalClient(work / "api.sock") as client:
            client.wait_ready(alive=lambda: proc.poll() is None)
        time.sleep(1.0)
        a0, b0 = _cpu_seconds(proc.pid), _cpu_seconds(idle.pid)
        time.sleep(seconds)
        a1, b1 = _cpu_seconds(proc.pid), _cpu_seconds(idle.pid)
    finally:
        proc.terminate()
        idle.terminate()
        proc.wait(30)
        idle.wait(30)
    emit("idle", "cpu_percent_of_one_core", value=100 * (a1 - a0) / seconds,
         baseline="a sleeping python process", baseline_value=100 * (b1 - b0) / seconds, target="< 1%",
         window_s=seconds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    quick = ap.parse_args().quick
    repeats = 5 if quick else 9
    bench_memory(repeats)
    bench_startup(repeats)
    bench_idle_cpu(5.0 if quick else 30.0)


if __name__ == "__main__":
    main()
