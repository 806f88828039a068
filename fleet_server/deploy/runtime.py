"""What a running server holds of the rollout machinery, and how the API finds it.

``fleet-server serve`` builds a :class:`DeployRuntime` (signer, MQTT publisher, bridge, loop) when the settings allow
rollouts and stores it as ``app.state.deploy``. The rollouts API takes it from there (:func:`runtime_for`); an app
without one (an API-only process, a test client) gets a bridge with no publisher, built from the settings on first
use: its commands are stored due at once, and the replica running the loop publishes them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine

from fleet_server.deploy.bridge import CommandBridge
from fleet_server.deploy.loop import RolloutLoop
from fleet_server.deploy.metrics import rollout_metrics
from fleet_server.deploy.signing import OrderSigner
from fleet_server.settings import FleetSettings

__all__ = ["DeployRuntime", "runtime_for"]

_lock = threading.Lock()


@dataclass
class DeployRuntime:
    bridge: CommandBridge
    loop: RolloutLoop | None = None
    publisher: Any = None
    clock: Callable[[], float] = time.time

    def wake(self) -> None:
        """Run the loop's next tick now (after an API action), if the loop runs in this process."""
        if self.loop is not None:
            self.loop.wake()

    def metrics(self, engine: Engine) -> str:
        """:func:`rollout_metrics` with this process's bridge and loop counters."""
        return rollout_metrics(engine, loop=self.loop, bridge=self.bridge, now=self.clock())


def runtime_for(state: Any, settings: FleetSettings, engine: Engine) -> DeployRuntime:
    """``state.deploy``, or a publisher-less runtime built from ``settings`` (cached on ``state``). Raises
    :class:`~fleet_server.deploy.signing.RolloutsDisabledError` when the settings cannot sign orders."""
    runtime: DeployRuntime | None = getattr(state, "deploy", None)
    if runtime is not None:
        return runtime
    with _lock:
        runtime = getattr(state, "deploy", None)
        if runtime is None:
            signer = OrderSigner.from_settings(settings)
            runtime = DeployRuntime(CommandBridge(engine, signer, None, resend_s=settings.command_resend_s))
            state.deploy = runtime
    return runtime
