"""fleet-server: device registry, staged rollouts and telemetry ingestion for edge-agent fleets."""

from agent import __version__

__all__ = ["__version__"]
