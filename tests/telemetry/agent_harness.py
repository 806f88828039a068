"""A small device process for the store-and-forward tests: Outbox + AgentMqtt producing N drift windows.

    python -m tests.telemetry.agent_harness --db PATH --host H --port P --device DEV --count N [options]

It opens the outbox, starts the MQTT client (it connects whenever the broker is up), appends drift windows until
the drift stream's sequence reaches ``--count`` (a restarted process resumes where the killed one stopped: the
counter lives in the outbox), then keeps draining until SIGTERM. It prints one line per event on stdout, flushed,
so the test can SIGKILL it at a chosen moment::

    produced <next_seq>      after each committed append
    produced-all             the drift stream reached --count
    pending <n>              outbox size, every 0.2 s once everything is produced
    drained                  the outbox is empty: the server acknowledged everything
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import numpy as np

from agent.drift import Edges, NumericHistogram
from agent.protocol import DriftWindow, encode
from agent.telemetry.mqtt import AgentMqtt, MqttSettings
from agent.telemetry.outbox import Outbox

EDGES = Edges.uniform(0.0, 1.0, 8)


def window_frame(device: str, seq: int, now: float) -> bytes:
    rng = np.random.default_rng(seq)
    values = rng.random(16)
    hist = NumericHistogram.from_values(EDGES, values)
    return encode(DriftWindow(device_id=device, stream_seq=seq, model="detector", version=3, window_start=now,
                              window_end=now + 1.0, samples=len(values), features={"x": hist.to_dict()},
                              slis={"format": 1, "requests": len(values), "ok": len(values)}))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", type=Path, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--device", default="dev-1")
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--produce-interval", type=float, default=0.0)
    ap.add_argument("--drain-rate", type=float, default=400.0)
    ap.add_argument("--max-in-flight", type=int, default=200)
    ap.add_argument("--ack-timeout", type=float, default=1.0)
    args = ap.parse_args()

    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    outbox = Outbox(args.db).open()
    settings = MqttSettings(host=args.host, port=args.port, device_id=args.device, reconnect_min_s=0.05,
                            reconnect_max_s=0.5, drain_rate=args.drain_rate, max_in_flight=args.max_in_flight,
                            ack_timeout_s=args.ack_timeout, ack_timeout_max_s=4 * args.ack_timeout, heartbeat_s=None,
                            connect_timeout_s=2.0)
    mqtt = AgentMqtt(settings, outbox)
    mqtt.start()
    while not stop.is_set():
        next_seq = outbox.stats().streams["drift"].next_seq
        if next_seq >= args.count:
            break
        outbox.append("drift", lambda seq: window_frame(args.device, seq, time.time()))
        print(f"produced {next_seq + 1}", flush=True)
        if args.produce_interval:
            time.sleep(args.produce_interval)
    print("produced-all", flush=True)
    drained = False
    while not stop.wait(0.2):
        pending = outbox.stats().pending
        print(f"pending {pending}", flush=True)
        if pending == 0 and not drained:
            drained = True
            print("drained", flush=True)
    mqtt.stop()
    outbox.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
