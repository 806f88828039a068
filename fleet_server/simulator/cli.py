"""``fleet-server simulate``: run a simulated fleet against an MQTT broker until stopped.

    fleet-server simulate --count 1000 --host 127.0.0.1 --port 1883 --trust-root root.json
    fleet-server simulate --scenario fleet.toml --register-db sqlite:///fleet.db --duration 600

Prints one JSON line of statistics every ``--stats-every`` seconds and a final one at exit (SIGINT/SIGTERM or
``--duration``). ``fleet_server/cli.py`` mounts it with :func:`add_parser` and dispatches to :func:`run`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from agent.clitools import EXIT_FAILED, EXIT_USAGE

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``simulate`` command to ``fleet-server``'s sub-commands."""
    p = subparsers.add_parser(
        "simulate", help="run simulated devices that speak the wire contract over MQTT",
        description="Run many simulated edge agents against an MQTT broker (see docs/simulator.md).")
    p.add_argument("--scenario", metavar="TOML", type=Path, help="scenario file (default: one group of --count)")
    p.add_argument("--count", type=int, default=100, help="devices when no scenario file is given (default 100)")
    p.add_argument("--seed", type=int, help="overrides the scenario's seed")
    p.add_argument("--prefix", metavar="ID", help="overrides the scenario's device id prefix")
    p.add_argument("--host", default="127.0.0.1", help="MQTT broker host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=1883, help="MQTT broker port (default 1883)")
    p.add_argument("--mode", choices=("auto", "per_device", "multiplexed"), default="auto",
                   help="one MQTT connection per device, or several devices per connection (default auto)")
    p.add_argument("--per-connection", type=int, default=50, metavar="N",
                   help="devices per connection in multiplexed mode (default 50)")
    p.add_argument("--trust-root", metavar="FILE", type=Path,
                   help="trust root that orders are verified against (default: accept orders unverified)")
    p.add_argument("--register-db", metavar="URL",
                   help="register the devices (labels, profile, hardware) in this migrated fleet database first")
    p.add_argument("--state", metavar="FILE", type=Path,
                   help="keep stream numbers, versions and order sequences here across runs")
    p.add_argument("--duration", type=float, metavar="S", help="stop after this many seconds (default: run until "
                                                                 "interrupted)")
    p.add_argument("--stats-every", type=float, default=10.0, metavar="S", help="print statistics every S seconds")
    p.add_argument("--connect-timeout", type=float, default=120.0, metavar="S",
                   help="give up if not every device is connected within S seconds (default 120)")
    return p


def _scenario(args: argparse.Namespace) -> Any:
    from fleet_server.simulator.scenario import DeviceGroup, Scenario

    scenario = Scenario.from_toml(args.scenario) if args.scenario is not None else Scenario(
        groups=(DeviceGroup(count=args.count),))
    changes: dict[str, Any] = {}
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.prefix is not None:
        changes["id_prefix"] = args.prefix
    return dataclasses.replace(scenario, **changes) if changes else scenario


def run(args: argparse.Namespace) -> int:
    """Run the simulator; returns the process exit code."""
    from fleet_server.simulator.fleet import SimulatedFleet
    from fleet_server.simulator.scenario import ScenarioError, plan_devices

    try:
        scenario = _scenario(args)
        root = args.trust_root.read_bytes() if args.trust_root is not None else None
        if args.per_connection < 1 or (args.duration is not None and args.duration <= 0) or args.stats_every <= 0:
            raise ScenarioError("arguments", "--per-connection, --duration and --stats-every must be positive")
    except ScenarioError as exc:
        print(f"fleet-server simulate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"fleet-server simulate: cannot read {args.trust_root}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    if args.register_db:
        from sqlalchemy.exc import SQLAlchemyError

        from fleet_server.db import create_db_engine
        from fleet_server.simulator.register import register_devices

        engine = create_db_engine(args.register_db)
        try:
            result = register_devices(engine, plan_devices(scenario))
        except SQLAlchemyError as exc:
            print(f"fleet-server simulate: registering devices failed (run 'fleet-server db upgrade' first?): "
                  f"{str(exc).splitlines()[0]}", file=sys.stderr)
            return EXIT_FAILED
        finally:
            engine.dispose()
        print(json.dumps({"registered": dict(result)}), flush=True)
    try:
        fleet = SimulatedFleet(scenario, args.host, args.port, trust_root=root, mode=args.mode,
                               devices_per_connection=args.per_connection, state_path=args.state)
    except ValueError as exc:
        print(f"fleet-server simulate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    started = time.monotonic()
    fleet.start()
    try:
        if not fleet.wait_connected(args.connect_timeout):
            print(f"fleet-server simulate: not every device connected to {args.host}:{args.port} within "
                  f"{args.connect_timeout:.0f} s", file=sys.stderr)
            return EXIT_FAILED
        print(json.dumps({"connected": len(fleet.plans), "mode": fleet.mode, "connections": len(fleet.links),
                          "seconds": round(time.monotonic() - started, 2)}), flush=True)
        end = started + args.duration if args.duration is not None else None
        while not stop.is_set():
            wait = args.stats_every if end is None else min(args.stats_every, end - time.monotonic())
            if wait <= 0 or stop.wait(wait):
                break
            print(json.dumps({"stats": fleet.stats().as_dict(), "unacked": fleet.unacked()}), flush=True)
    finally:
        fleet.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(json.dumps({"final": fleet.stats().as_dict()}), flush=True)
    return 0
