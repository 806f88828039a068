"""``edge-bundle``: build, sign, verify and inspect model bundles (used in CI and by release managers)."""

from __future__ import annotations

import argparse

from agent import __version__
from agent.clitools import EXIT_USAGE, not_built_yet

__all__ = ["main"]

_COMMANDS = {
    "keygen": "generate a signing key pair",
    "root": "create or rotate the trust root",
    "build": "build a bundle from a model, reference data and health-check samples",
    "sign": "add a signature to a bundle (several keys for k-of-n)",
    "verify": "verify a bundle against a trust root",
    "inspect": "show a bundle's manifest (readable or --json)",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edge-bundle", description="Build, sign, verify and inspect model bundles.")
    p.add_argument("--version", action="version", version=f"edge-bundle {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in _COMMANDS.items():
        sub.add_parser(name, help=f"{help_text} (not built yet)", add_help=True).add_argument(
            "args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return EXIT_USAGE
    return not_built_yet("edge-bundle", args.command, "signed OTA model bundles")
