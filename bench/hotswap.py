"""Hot swap under continuous local-API load: failed requests and p99 during the swap vs steady state.

Target (signed-bundles issue): 0 failed requests; p99 during the swap <= 3x steady state. The agent runs as its
own process with updates enabled; 4 app threads call it over the Unix socket without pause; a new signed
version is sideloaded through the admin API (load next to the old one, health check, switch) while they run.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from agent.localapi import LocalApiError, LocalClient
from bench.common import emit
from tests.updater.support import Keys, make_bundle

REPO = Path(__file__).resolve().parents[1]
ROW = [[13.5, 14.4, 87.5, 566.3, 0.098, 0.081, 0.066, 0.043, 0.18, 0.061, 0.27, 0.98, 2.0, 23.6, 0.0066, 0.015,
        0.02, 0.0098, 0.019, 0.0025, 15.1, 19.3, 99.7, 711.2, 0.14, 0.18, 0.18, 0.11, 0.29, 0.082]]


def _p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.99 * (len(xs) - 1)))]


def run_once(work: Path, keys: Keys, version: int, steady_s: float) -> tuple[float, float, int, int]:
    bundle = work / f"v{version}.bundle"
    bundle.write_bytes(make_bundle(keys, version=version))
    samples: list[tuple[float, float, bool]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def app() -> None:
        with LocalClient(work / "api.sock") as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    c.infer("cancer-mlp", {"features": ROW})
                    ok = True
                except LocalApiError:
                    ok = False
                t1 = time.perf_counter()
                with lock:
                    samples.append((t1, (t1 - t0) * 1e6, ok))

    threads = [threading.Thread(target=app) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(steady_s)
    s0 = time.perf_counter()
    with LocalClient(work / "api.sock", timeout=120) as admin:
        outcome = admin.request("POST", "/v1/admin/install", {"path": str(bundle)})
    s1 = time.perf_counter()
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join()
    assert outcome["status"] in ("healthy", "soaking"), outcome
    steady = [lat for ts, lat, ok in samples if ok and ts < s0 and ts > s0 - steady_s + 0.3]
    during = [lat for ts, lat, ok in samples if ok and s0 <= ts <= s1 + 0.05]
    failed = sum(1 for _, _, ok in samples if not ok)
    return _p99(steady), _p99(during), failed, len(during)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    repeats, steady_s = (3, 1.5) if args.quick else (7, 3.0)
    keys = Keys()
    with tempfile.TemporaryDirectory(prefix="hs-", dir="/tmp") as d:
        work = Path(d)
        (work / "root.json").write_bytes(keys.root_bytes())
        cfg = work / "agent.toml"
        cfg.write_text(f'device_id = "bench"\nstate_dir = "{work}/state"\nprofile = "generic-x86-64"\n'
                       f'log_format = "text"\n[api]\nsocket_path = "{work}/api.sock"\nsocket_mode = "0600"\n'
                       f'[updates]\ntrust_root = "{work}/root.json"\n')
        (work / "v1.bundle").write_bytes(make_bundle(keys, version=1))
        subprocess.run([sys.executable, "-m", "agent", "install", str(work / "v1.bundle"), "--socket",
                        str(work / "api.sock"), "--config", str(cfg)], cwd=REPO, check=True, capture_output=True)
        proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            LocalClient(work / "api.sock").wait_ready(alive=lambda: proc.poll() is None)
            results = [run_once(work, keys, v, steady_s) for v in range(2, 2 + repeats)]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    steady = [r[0] for r in results]
    during = [r[1] for r in results]
    ratios = [b / a for a, b in zip(steady, during, strict=True)]
    emit("hot_swap", "p99_us_during_swap", value=statistics.median(during),
         baseline="p99 in the steady state just before the swap, same run", baseline_value=statistics.median(steady),
         target="<= 3x", ratio_median=round(statistics.median(ratios), 3), ratio_min=round(min(ratios), 3),
         ratio_max=round(max(ratios), 3), requests_during_swap=sum(r[3] for r in results))
    emit("hot_swap", "failed_requests", value=sum(r[2] for r in results), baseline="none allowed",
         baseline_value=0, target="0", swaps=repeats)


if __name__ == "__main__":
    main()
