"""Shared fixtures: the real demo models, real firmware profiles, a real agent on a real Unix socket."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.demo import MODELS_DIR
from agent.profiles import FirmwareProfile, builtin_profiles_dir, resolve_profile

REPO = Path(__file__).resolve().parents[1]

# Fixtures that start real services (brokers, PostgreSQL) on free ports.
pytest_plugins = ["tests.services.mqtt", "tests.services.postgres"]


def profile(name: str = "generic-x86-64") -> FirmwareProfile:
    return resolve_profile(name, builtin_profiles_dir())


def samples(stem: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((MODELS_DIR / f"{stem}.samples.json").read_text())
    return doc


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory: Unix socket paths must stay under 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="ea-", dir="/tmp") as d:
        os.chmod(d, 0o755)
        yield Path(d)


def agent_config_text(tmp: Path, *, models: tuple[str, ...] | None = None, api_extra: str = "",
                      profile_name: str = "generic-x86-64") -> str:
    """The demo config with a socket in ``tmp`` and extra ``[api]`` lines."""
    from agent.demo import DEMO_MODELS, demo_config_text

    text = demo_config_text(tmp / "state", tmp / "api.sock", profile=profile_name,
                            models=models if models is not None else DEMO_MODELS)
    overridden = {line.split("=", 1)[0].strip() for line in api_extra.splitlines() if "=" in line}
    kept = [line for line in text.splitlines() if line.split("=", 1)[0].strip() not in overridden]
    return "\n".join(kept).replace("[api]\n", "[api]\n" + api_extra + "\n", 1)


@pytest.fixture
def start_agent(short_tmp: Path) -> Iterator[Any]:
    """Start a real in-process agent (real models, real socket); stopped at teardown."""
    from agent.config import parse_config
    from agent.service import Agent

    started: list[Agent] = []

    def start(api_extra: str = "", models: tuple[str, ...] | None = None) -> Agent:
        cfg = parse_config(agent_config_text(short_tmp, models=models, api_extra=api_extra), base=short_tmp)
        agent = Agent.from_config(cfg)
        agent.start()
        started.append(agent)
        return agent

    yield start
    for a in started:
        a.stop()
