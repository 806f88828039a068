"""``edge-agent demo``: a real agent process serving the bundled int8 models to a client that uses them.

It writes a config into a temporary directory, starts ``edge-agent run`` as a separate process (exactly what the
systemd unit runs), waits until the agent reports ready, and then acts as an on-device app would: it classifies
held-out rows from each model's data set over the Unix socket, shows the agent refusing bad requests with clear
errors, sends concurrent traffic that the agent micro-batches, and stops the agent with SIGTERM.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from agent.localapi import LocalApiError, LocalClient

__all__ = ["MODELS_DIR", "demo_config_text", "run_demo"]

MODELS_DIR = Path(__file__).parent / "models"
DEMO_MODELS = ("cancer_mlp_int8.onnx", "digits_mlp_int8.onnx", "digits_int8.tflite")


def demo_config_text(state_dir: Path, socket_path: Path, *, profile: str | None = None,
                     models: tuple[str, ...] = DEMO_MODELS, trust_root: Path | None = None) -> str:
    """A complete agent config serving the bundled demo models (also used by tests and benchmarks)."""
    if profile is None:
        profile = "generic-x86-64" if platform.machine() in ("x86_64", "AMD64") else "raspberry-pi-4"
    lines = [
        'device_id = "demo-device-1"',
        f'state_dir = "{state_dir}"',
        f'profile = "{profile}"',
        'log_format = "text"',
        "",
        "[api]",
        f'socket_path = "{socket_path}"',
        'socket_mode = "0600"',
        "",
    ]
    for m in models:
        lines += ["[[models]]", f'path = "{MODELS_DIR / m}"', ""]
    if trust_root is not None:
        lines += ["[updates]", f'trust_root = "{trust_root}"', ""]
    return "\n".join(lines)


def _make_trust(work: Path) -> Any:
    """Demo keys: a root key signs a trust root naming one release key and one order key."""
    from agent.bundle import ROOT_PREFIX, SigningKey, make_root_signed, sign_document

    root_key, release, orders = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    signed = make_root_signed(version=1, expires_at=int(time.time() + 365 * 86400),
                              keys={"root": [root_key.public], "release": [release.public],
                                    "orders": [orders.public]},
                              thresholds={"root": 1, "release": 1, "orders": 1})
    (work / "root.json").write_bytes(sign_document(signed, ROOT_PREFIX, [root_key]))
    return release


def _signed_update(client: LocalClient, socket_path: Path, work: Path, release_key: Any) -> None:
    """Sideload a signed v2 while apps keep calling; then show a tampered and an older bundle refused."""
    import numpy as np

    from agent.bundletool.build import BuildOptions, build_bundle

    stem = "cancer_mlp_int8"
    samples = json.loads((MODELS_DIR / f"{stem}.samples.json").read_text())
    rows = np.asarray(samples["inputs"]["features"], dtype=np.float64)
    schema = json.loads((MODELS_DIR / f"{stem}.schema.json").read_text())
    opts = BuildOptions(soak_s=0.0, latency_budget_ms=200.0, bins=8)

    def bundle(version: int) -> Path:
        built = build_bundle(model=MODELS_DIR / f"{stem}.onnx", schema_doc=schema, name="cancer-mlp",
                             version=version, reference=rows, health_rows=rows[:4], signers=[release_key],
                             options=opts)
        path = work / f"cancer-mlp-{version}.bundle"
        path.write_bytes(built.data)
        return path

    print("\n== a signed update, installed while 4 apps keep calling ==")
    v2 = bundle(2)
    print(f"  built {v2.name}: signed by the release key (docs/release-flow.md does this with edge-bundle)")
    stop = threading.Event()
    calls = [0, 0]

    def app() -> None:
        with LocalClient(socket_path) as c:
            while not stop.is_set():
                try:
                    c.infer("cancer-mlp", {"features": [samples["inputs"]["features"][0]]})
                    calls[0] += 1
                except LocalApiError:
                    calls[1] += 1

    apps = [threading.Thread(target=app) for _ in range(4)]
    for t in apps:
        t.start()
    time.sleep(0.2)
    out = client.request("POST", "/v1/admin/install", {"path": str(v2)})
    time.sleep(0.2)
    stop.set()
    for t in apps:
        t.join()
    print(f"  install {v2.name} -> {out['model']}@{out['version']}: {out['status']}: {out['message']}")
    print(f"  during the update: {calls[0]} requests served, {calls[1]} failed; now serving "
          f"cancer-mlp@{client.infer('cancer-mlp', {'features': [samples['inputs']['features'][0]]})['version']}")
    tampered = work / "cancer-mlp-2-tampered.bundle"
    data = bytearray(v2.read_bytes())
    data[len(data) - 1024 - 1000] ^= 0x01  # inside the model file (the tar ends with two 512-byte zero blocks)
    tampered.write_bytes(bytes(data))
    older = bundle(1)
    for path, what in ((tampered, "one byte flipped"), (older, "an older version")):
        out = client.request("POST", "/v1/admin/install", {"path": str(path)})
        print(f"  install {path.name} ({what}) -> {out['status']} ({out['reason']}):\n      {out['message']}")


def _classify(client: LocalClient, model: str, samples: dict[str, Any]) -> None:
    (input_name, rows), = samples["inputs"].items()
    names = samples.get("label_names") or [str(i) for i in range(100)]
    correct = 0
    print(f"\n== {model}: {len(rows)} held-out rows, one request each ==")
    for i, (row, label) in enumerate(zip(rows, samples["labels"], strict=True)):
        out = client.infer(model, {input_name: [row]})
        (probs,) = next(iter(out["outputs"].values()))
        pred = max(range(len(probs)), key=probs.__getitem__)
        correct += pred == label
        if i < 6:
            print(f"  row {i:2}: predicted {names[pred]:>10} ({probs[pred]:.2f})  true {names[label]:>10}  "
                  f"{'ok' if pred == label else 'MISS'}")
    print(f"  ... accuracy on these rows: {correct}/{len(rows)} (model {model}@{out['version']})")


def _show_refusals(client: LocalClient, model: str, samples: dict[str, Any]) -> None:
    (input_name, rows), = samples["inputs"].items()
    print("\n== bad requests are refused with a reason, and the agent keeps serving ==")
    bad_nan = [list(rows[0])]
    bad_nan[0][0] = float("nan")
    cases = [
        ("NaN in a feature", model, {input_name: bad_nan}),
        ("wrong shape", model, {input_name: [rows[0][:-1]]}),
        ("wrong input name", model, {"pixels": [rows[0]]}),
        ("unknown model", "no-such-model", {input_name: [rows[0]]}),
    ]
    for what, m, inputs in cases:
        try:
            client.infer(m, inputs)
            print(f"  {what:18} -> served (unexpected)")
        except LocalApiError as exc:
            print(f"  {what:18} -> HTTP {exc.status} {exc.code}: {exc.message}")


def _concurrent(socket_path: Path, model: str, samples: dict[str, Any], threads: int = 8, each: int = 100) -> None:
    (input_name, rows), = samples["inputs"].items()
    errors: list[str] = []

    def worker() -> None:
        with LocalClient(socket_path) as c:
            for i in range(each):
                try:
                    c.infer(model, {input_name: [rows[i % len(rows)]]})
                except LocalApiError as exc:
                    errors.append(exc.code)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    dt = time.perf_counter() - t0
    print(f"\n== {threads} apps x {each} requests at once on {model}: {threads * each / dt:,.0f} req/s, "
          f"{len(errors)} refused ({', '.join(sorted(set(errors))) or 'none'}) ==")


def run_demo(*, keep: bool = False) -> int:
    """Run the demo; returns the process exit code."""
    work = Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
    sock = work / "api.sock"
    cfg = work / "agent.toml"
    release_key = _make_trust(work)
    cfg.write_text(demo_config_text(work / "state", sock, trust_root=work / "root.json"))
    log_path = work / "agent.log"
    print(f"edge-agent demo: starting an agent (config {cfg}, log {log_path})")
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)],
                                stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    code = 1
    try:
        with LocalClient(sock) as client:
            t0 = time.monotonic()
            health = client.wait_ready(alive=lambda: proc.poll() is None)
            print(f"agent ready in {time.monotonic() - t0:.2f} s serving {', '.join(health['models'])}")
            for m in client.models():
                fb = "; ".join(f"{f['wanted']} skipped: {f['reason']}" for f in m["fallbacks"]) or "none"
                print(f"  {m['name']}@{m['version']}: {m['runtime']} on {m['accelerator']}, {m['quantization']}, "
                      f"input {m['inputs'][0]['name']} {m['inputs'][0]['shape']} (fallbacks: {fb})")
            for f in DEMO_MODELS:
                samples = json.loads((MODELS_DIR / f"{Path(f).stem}.samples.json").read_text())
                _classify(client, samples["model"], samples)
            first = json.loads((MODELS_DIR / f"{Path(DEMO_MODELS[0]).stem}.samples.json").read_text())
            _show_refusals(client, first["model"], first)
            _concurrent(sock, first["model"], first)
            _signed_update(client, sock, work, release_key)
            stats = client.stats()
            print("\n== what the agent counted ==")
            for name, s in stats["models"].items():
                print(f"  {name}@{s['version']}: {s['requests']} requests, {s['ok']} ok, errors {s['errors'] or '{}'}, "
                      f"{s['batches']} micro-batches covering {s['batched_requests']} requests")
        code = 0
    except (LocalApiError, RuntimeError, OSError) as exc:
        print(f"edge-agent demo failed: {exc}\n--- agent log ---\n{log_path.read_text()}", file=sys.stderr)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        print(f"\nagent stopped with SIGTERM (exit code {rc})")
        if rc != 0:
            code = 1
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return code
