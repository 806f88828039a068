"""Every public package declares ``__all__``, and every name in it exists (httpx's test_exported_members)."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = [
    "agent.protocol", "agent.drift", "agent.model", "agent.profiles", "agent.statedir", "agent.runtime",
    "agent.localapi", "agent.config", "agent.clitools",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_public_names_declared_and_present(name: str) -> None:
    mod = importlib.import_module(name)
    assert hasattr(mod, "__all__"), f"{name} must declare __all__"
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"{name}.__all__ names missing attributes: {missing}"
    assert len(set(mod.__all__)) == len(mod.__all__)
