"""``fleet-server``: the central service (registry, rollouts, telemetry ingestion, console)."""

from __future__ import annotations

import argparse

from agent import __version__
from agent.clitools import EXIT_USAGE, not_built_yet

__all__ = ["main"]

_COMMANDS = {
    "serve": ("run the API, console and MQTT ingestion", "the fleet server issue"),
    "db": ("database migrations (db upgrade)", "the fleet server issue"),
    "demo": ("the whole fleet demo: embedded broker, SQLite, simulated devices", "the fleet server issue"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fleet-server", description="Central fleet manager for edge-agent devices.")
    p.add_argument("--version", action="version", version=f"fleet-server {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, _) in _COMMANDS.items():
        sub.add_parser(name, help=f"{help_text} (not built yet)").add_argument("args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return EXIT_USAGE
    return not_built_yet("fleet-server", args.command, _COMMANDS[args.command][1])
