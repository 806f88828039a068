"""Run one install in a real agent process and SIGKILL it at a chosen step (used by test_kill9.py).

    python -m tests.updater.kill_harness CONFIG STEP (--bundle PATH | --order ORDER.json)

The agent is built exactly as ``edge-agent run`` builds it (recover, load, resume), then the install runs; when
the updater reports STEP, the process kills itself with SIGKILL: no cleanup, no atexit, like a power cut after
the journal write.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from agent.config import load_config
from agent.service import Agent
from agent.updater.fetch import FetchConfig, HttpFetcher


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", type=Path)
    ap.add_argument("step")
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--order", type=Path)
    args = ap.parse_args()
    agent = Agent.from_config(load_config(args.config))
    up = agent.updater
    assert up is not None and agent.config.updates.trust_root is not None
    up.trust.provision(agent.config.updates.trust_root)
    up.recover()
    up.load_installed()
    up.resume_pending()

    def on_step(step: str) -> None:
        if step == args.step:
            os.kill(os.getpid(), signal.SIGKILL)

    up._on_step = on_step
    if args.order:
        up.fetcher = HttpFetcher(FetchConfig(read_timeout_s=5, stall_window_s=5))
        outcome = up.handle_order(json.loads(args.order.read_text()))
    else:
        outcome = up.install_file(args.bundle)
    print(json.dumps({"status": outcome.status, "reason": outcome.reason}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
