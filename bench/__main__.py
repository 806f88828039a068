"""Run every benchmark: ``python -m bench [--quick]``. Each prints one JSON object per metric per line."""

from __future__ import annotations

import subprocess
import sys

BENCHES = [
    "bench.inference", "bench.process", "bench.download", "bench.bundle", "bench.hotswap", "bench.rollout_policy",
    "bench.drift", "bench.server_ingest", "bench.telemetry", "bench.rollout_bridge",
    "bench.device_list",
    "bench.fleet_rollout",
]


def main() -> int:
    args = sys.argv[1:]
    rc = 0
    for mod in BENCHES:
        rc |= subprocess.call([sys.executable, "-m", mod, *args])
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
