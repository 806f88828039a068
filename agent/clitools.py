"""Small helpers shared by the three command-line programs (standard library only)."""

from __future__ import annotations

import sys

from agent import __version__

__all__ = ["EXIT_FAILED", "EXIT_USAGE", "not_built_yet"]

EXIT_USAGE = 2
EXIT_FAILED = 1


def not_built_yet(prog: str, command: str, arrives_with: str) -> int:
    """Say clearly that a subcommand exists in the design but is not implemented in this release."""
    print(f"{prog} {command}: not built yet in {__version__}; it arrives with {arrives_with}. "
          f"See README.md for what works today.", file=sys.stderr)
    return EXIT_USAGE
