"""One rule for a missing integration component (broker, database, browser, privilege): skip on a developer's
machine, fail on CI (``CI`` set), where ``scripts/test`` installs everything and every integration test must run."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

__all__ = ["unavailable"]


def unavailable(message: str) -> NoReturn:
    """Fail with ``message`` when ``CI`` is set; skip with it otherwise."""
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set: scripts/test installs it and every integration test must run)")
    pytest.skip(message)
