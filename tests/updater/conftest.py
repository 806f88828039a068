"""Fixtures for the update path: a device state directory with a provisioned trust root and a real host."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.profiles import builtin_profiles_dir, resolve_profile
from agent.runtime import ModelHost
from agent.statedir import StateLayout
from agent.updater.updater import UpdateEvent, Updater, UpdateSettings
from tests.updater.support import Keys


@dataclass
class Device:
    state: Path
    keys: Keys
    updater: Updater
    host: ModelHost
    events: list[UpdateEvent] = field(default_factory=list)
    clock: list[float] = field(default_factory=lambda: [0.0])
    bundles: dict[int, bytes] = field(default_factory=dict)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def serving(self, model: str = "cancer-mlp") -> int | None:
        try:
            return self.host.get(model).version
        except Exception:
            return None


def make_device(tmp: Path, keys: Keys | None = None, *, fetcher: object | None = None,
                crash_loop_limit: int = 3) -> Device:
    import time

    keys = keys or Keys()
    state = tmp / "state"
    state.mkdir(parents=True, exist_ok=True)
    root_file = tmp / "root.json"
    if not root_file.exists():
        root_file.write_bytes(keys.root_bytes())
    host = ModelHost(resolve_profile("generic-x86-64", builtin_profiles_dir()))
    events: list[UpdateEvent] = []
    clock = [time.time()]
    up = Updater(device_id="dev-1", layout=StateLayout(state), host=host,
                 profile=resolve_profile("generic-x86-64", builtin_profiles_dir()), events=events.append,
                 fetcher=fetcher, settings=UpdateSettings(crash_loop_limit=crash_loop_limit, health_repeats=5),
                 clock=lambda: clock[0])
    up.trust.provision(root_file)
    up.recover()
    up.load_installed()
    up.resume_pending()
    return Device(state, keys, up, host, events, clock)


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    d = make_device(tmp_path)
    yield d
    d.host.close()
