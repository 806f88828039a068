"""A device simulator: many lightweight simulated agents speaking the real wire contract over MQTT.

For tests, benchmarks and the demo. See ``docs/simulator.md`` and ADR 0016. Quick start::

    from fleet_server.simulator import DeviceGroup, Scenario, SimulatedFleet

    scenario = Scenario(seed=1, groups=(DeviceGroup(count=200, labels={"ring": "canary"},
                                                    installed={"cancer-mlp": 1}),))
    with SimulatedFleet(scenario, "127.0.0.1", 1883, trust_root=root_bytes) as fleet:
        fleet.wait_connected(30)
        ...

Modules: :mod:`.scenario` (configuration, deterministic device plans), :mod:`.device` (one simulated agent, no
I/O), :mod:`.windows` (drift windows and SLIs), :mod:`.engine` (the one thread), :mod:`.transport` (paho),
:mod:`.download` (real bundle downloads), :mod:`.fleet` (the public API), :mod:`.register` (server DB/API
registration), :mod:`.cli` (``fleet-server simulate``).
"""

from typing import TYPE_CHECKING, Any

# Imported on first use (PEP 562): ``fleet-server``'s command line imports ``.cli`` for its parser on every run,
# and the package's modules pull in SQLAlchemy, paho and numpy.
_LAZY = {
    "EventView": "device", "SimDevice": "device",
    "DeviceView": "fleet", "Mode": "fleet", "SimulatedFleet": "fleet",
    "register_devices": "register", "register_via_api": "register",
    "DeviceGroup": "scenario", "DevicePlan": "scenario", "Download": "scenario", "Fractions": "scenario",
    "Latencies": "scenario", "OfflinePlan": "scenario", "Outcome": "scenario", "Scenario": "scenario",
    "ScenarioError": "scenario", "VersionBehaviour": "scenario", "plan_devices": "scenario",
    "SimStats": "stats",
    "WindowFactory": "windows", "bundle_baseline": "windows", "default_baseline": "windows",
}

if TYPE_CHECKING:
    from fleet_server.simulator.device import EventView, SimDevice
    from fleet_server.simulator.fleet import DeviceView, Mode, SimulatedFleet
    from fleet_server.simulator.register import register_devices, register_via_api
    from fleet_server.simulator.scenario import (
        DeviceGroup,
        DevicePlan,
        Download,
        Fractions,
        Latencies,
        OfflinePlan,
        Outcome,
        Scenario,
        ScenarioError,
        VersionBehaviour,
        plan_devices,
    )
    from fleet_server.simulator.stats import SimStats
    from fleet_server.simulator.windows import WindowFactory, bundle_baseline, default_baseline


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "DeviceGroup",
    "DevicePlan",
    "DeviceView",
    "Download",
    "EventView",
    "Fractions",
    "Latencies",
    "Mode",
    "OfflinePlan",
    "Outcome",
    "Scenario",
    "ScenarioError",
    "SimDevice",
    "SimStats",
    "SimulatedFleet",
    "VersionBehaviour",
    "WindowFactory",
    "bundle_baseline",
    "default_baseline",
    "plan_devices",
    "register_devices",
    "register_via_api",
]
