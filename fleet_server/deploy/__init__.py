"""The rollout machinery's I/O: the command bridge (sign, publish, resend, acknowledge) and the rollout loop
that applies the pure policy of :mod:`fleet_server.rollouts` to the database.

* :mod:`~fleet_server.deploy.signing`: signed orders and cancels in wire ``Command`` frames (pure).
* :mod:`~fleet_server.deploy.bridge`: commands stored, published, resent until acknowledged or expired.
* :mod:`~fleet_server.deploy.mqtt`: the paho publisher the bridge uses in the server.
* :mod:`~fleet_server.deploy.loop`: the tick (events, rollouts, resends).
* :mod:`~fleet_server.deploy.store`, :mod:`~fleet_server.deploy.specs`, :mod:`~fleet_server.deploy.signals`:
  rows <-> policy types, stored definitions, drift and SLI signals from telemetry.
* :mod:`~fleet_server.deploy.metrics`: Prometheus text; :mod:`~fleet_server.deploy.runtime`: what the server holds.

``docs/rollouts.md`` and ``docs/adr/0015-rollout-loop-and-command-bridge.md`` explain the design.
"""

from fleet_server.deploy.bridge import CommandBridge, CommandPublisher
from fleet_server.deploy.loop import RolloutLoop
from fleet_server.deploy.metrics import rollout_metrics
from fleet_server.deploy.runtime import DeployRuntime, runtime_for
from fleet_server.deploy.signing import OrderSigner, RolloutsDisabledError, rollouts_disabled_reason

__all__ = [
    "CommandBridge",
    "CommandPublisher",
    "DeployRuntime",
    "OrderSigner",
    "RolloutLoop",
    "RolloutsDisabledError",
    "rollout_metrics",
    "rollouts_disabled_reason",
    "runtime_for",
]
