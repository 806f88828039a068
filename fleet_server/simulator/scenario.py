"""What a simulated fleet looks like and how each device behaves: the :class:`Scenario` and its device plans.

A scenario is plain, frozen configuration (dataclasses, loadable from TOML with :meth:`Scenario.from_toml`): device
groups (count, labels, firmware profile, hardware, pre-installed model versions), outcome fractions (how many devices
fail, reject, roll back, stay silent, go offline), per-step latencies, per-version drift and SLI behaviour, and the
heartbeat and drift-window intervals.

:func:`plan_devices` turns it into one :class:`DevicePlan` per device. It is pure and deterministic: every random
choice is a hash of ``(seed, device id, purpose)``, so the same scenario always gives the same devices with the same
behaviour, whatever order or process they run in. Outcome fractions are exact per group: the ``round(fraction *
count)`` devices with the lowest outcome hash get the outcome (so "5 % fail" means exactly 5 of 100, and which 5 is
fixed by the seed).
"""

from __future__ import annotations

import enum
import hashlib
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal

from agent.profiles import builtin_profiles_dir, load_profiles
from agent.protocol import REASON_CODE_PATTERN, is_valid_identifier

__all__ = [
    "DEPLOY_STEPS",
    "DeviceGroup",
    "DevicePlan",
    "Download",
    "Fractions",
    "Latencies",
    "OfflinePlan",
    "Outcome",
    "Scenario",
    "ScenarioError",
    "VersionBehaviour",
    "plan_devices",
    "unit_hash",
]

DEPLOY_STEPS: Final = ("received", "downloading", "verified", "installed", "healthy")
"""The event kinds of a successful deployment, in order (``agent.protocol.deploy``)."""

_REASON_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz_")


class ScenarioError(ValueError):
    """A scenario value is invalid; ``field`` is its dotted path (``groups[1].fractions.fail``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class Outcome(enum.StrEnum):
    """What a device does with a deployment order (the first ``bad_attempts`` of them; then ``ok``)."""

    OK = "ok"
    """received -> downloading -> verified -> installed -> healthy."""
    FAIL = "fail"
    """received -> downloading -> failed (``fail_reason``, ``download`` by default)."""
    REJECT = "reject"
    """received -> downloading -> rejected (``reject_reason``, ``incompatible`` by default)."""
    ROLLBACK = "rollback"
    """received -> ... -> installed -> rolled_back (``rollback_reason``); the previous version serves again."""
    SILENT = "silent"
    """Never answers any command (a hung updater); heartbeats and windows keep flowing."""


def unit_hash(seed: int, device_id: str, purpose: str) -> float:
    """A number in ``[0, 1)`` fixed by ``(seed, device_id, purpose)`` (BLAKE2b; stable across runs and platforms)."""
    digest = hashlib.blake2b(f"{seed}\0{device_id}\0{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _fraction(value: float, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ScenarioError(where, f"must be a number from 0 to 1, got {value!r}")
    return float(value)


def _seconds(value: float, where: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0 or (
            positive and value == 0):
        raise ScenarioError(where, f"must be a {'positive' if positive else 'non-negative'} number of seconds, "
                                   f"got {value!r}")
    return float(value)


def _count(value: int, where: str, *, minimum: int = 0, maximum: int = 10_000_000) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ScenarioError(where, f"must be an integer from {minimum} to {maximum}, got {value!r}")
    return value


def _identifier(value: str, where: str) -> str:
    if not is_valid_identifier(value):
        raise ScenarioError(where, f"{value!r} must be 1-64 characters of a-z, 0-9, '.', '_' or '-'")
    return value


def _reason(value: str, where: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 32 or not set(value) <= _REASON_CHARS:
        raise ScenarioError(where, f"{value!r} is not a reason code ({REASON_CODE_PATTERN})")
    return value


def _frozen_map(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(value))


@dataclass(frozen=True)
class Fractions:
    """Share of a group's devices with each outcome. ``fail + reject + rollback + silent <= 1`` (the rest are
    ``ok``); ``offline`` is independent (an offline device also has one of the other outcomes)."""

    fail: float = 0.0
    reject: float = 0.0
    rollback: float = 0.0
    silent: float = 0.0
    offline: float = 0.0

    def __post_init__(self) -> None:
        for name in ("fail", "reject", "rollback", "silent", "offline"):
            _fraction(getattr(self, name), f"fractions.{name}")
        if self.fail + self.reject + self.rollback + self.silent > 1.0 + 1e-9:
            raise ScenarioError("fractions", "fail + reject + rollback + silent must not exceed 1")


@dataclass(frozen=True)
class Latencies:
    """Seconds before each deployment event, counted from the previous one (``received`` from the command's
    arrival). A device scales them all by ``1 + jitter * (2u - 1)`` with ``u`` from its hash. A real download
    (see :class:`Download`) replaces ``verified``'s delay by the download's own duration."""

    received: float = 0.0
    downloading: float = 0.02
    verified: float = 0.05
    installed: float = 0.05
    healthy: float = 0.1
    jitter: float = 0.5

    def __post_init__(self) -> None:
        for name in DEPLOY_STEPS:
            _seconds(getattr(self, name), f"latency.{name}")
        _fraction(self.jitter, "latency.jitter")

    def delay(self, step: str, unit: float) -> float:
        """The delay before ``step`` for a device whose jitter hash is ``unit``."""
        base: float = getattr(self, step)
        return max(0.0, base * (1.0 + self.jitter * (2.0 * unit - 1.0)))


@dataclass(frozen=True)
class OfflinePlan:
    """When an ``offline`` device disappears (``after_s`` after it first connected) and for how long."""

    after_s: float = 1.0
    for_s: float = 10.0

    def __post_init__(self) -> None:
        _seconds(self.after_s, "offline.after_s")
        _seconds(self.for_s, "offline.for_s")


@dataclass(frozen=True)
class Download:
    """Real bundle downloads: ``fraction`` of the ``ok``/``rollback`` deployments GET the order's ``url`` with its
    token (``Authorization: Bearer``), either the first ``range_bytes`` bytes (``mode="range"``) or all of it
    (``"full"``, and the length must equal the order's ``bundle_length``). A failed download ends the deployment
    with ``failed`` reason ``download`` (``size`` for a wrong length)."""

    fraction: float = 0.0
    mode: Literal["range", "full"] = "range"
    range_bytes: int = 1024
    timeout_s: float = 30.0
    workers: int = 4

    def __post_init__(self) -> None:
        _fraction(self.fraction, "download.fraction")
        if self.mode not in ("range", "full"):
            raise ScenarioError("download.mode", f"must be 'range' or 'full', got {self.mode!r}")
        _count(self.range_bytes, "download.range_bytes", minimum=1, maximum=2**31)
        _seconds(self.timeout_s, "download.timeout_s", positive=True)
        _count(self.workers, "download.workers", minimum=1, maximum=64)


@dataclass(frozen=True)
class VersionBehaviour:
    """How a model version behaves once installed: drift windows shifted by ``drift_shift`` baseline standard
    deviations (categorical features move that share/3 of their mass to a new category), and SLIs with
    ``error_rate`` failed requests and a log-normal latency around ``latency_ms``. ``model=None`` matches every
    model with that version."""

    version: int
    model: str | None = None
    drift_shift: float = 0.0
    error_rate: float = 0.0
    latency_ms: float = 5.0

    def __post_init__(self) -> None:
        _count(self.version, "versions.version", maximum=2**63 - 1)
        if self.model is not None:
            _identifier(self.model, "versions.model")
        if isinstance(self.drift_shift, bool) or not isinstance(self.drift_shift, int | float) or not math.isfinite(
                self.drift_shift):
            raise ScenarioError("versions.drift_shift", f"must be a finite number, got {self.drift_shift!r}")
        _fraction(self.error_rate, "versions.error_rate")
        _seconds(self.latency_ms, "versions.latency_ms", positive=True)


DEFAULT_BEHAVIOUR: Final = VersionBehaviour(version=0)


@dataclass(frozen=True)
class DeviceGroup:
    """``count`` devices sharing labels, firmware profile, hardware and pre-installed versions. ``fractions`` and
    ``latency`` replace the scenario's for this group (in TOML, a group's tables override the scenario's tables
    key by key)."""

    count: int
    name: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    profile: str = "generic-x86-64"
    hardware: Mapping[str, Any] = field(default_factory=dict)
    installed: Mapping[str, int] = field(default_factory=dict)
    fractions: Fractions | None = None
    latency: Latencies | None = None

    def __post_init__(self) -> None:
        _count(self.count, "groups.count")
        _identifier(self.name, "groups.name")
        for key, value in self.labels.items():
            _identifier(key, f"groups.labels.{key}")
            _identifier(value, f"groups.labels.{key}")
        _identifier(self.profile, "groups.profile")
        for model, version in self.installed.items():
            _identifier(model, f"groups.installed.{model}")
            _count(version, f"groups.installed.{model}", maximum=2**63 - 1)
        object.__setattr__(self, "labels", _frozen_map(self.labels))
        object.__setattr__(self, "hardware", _frozen_map(self.hardware))
        object.__setattr__(self, "installed", _frozen_map(self.installed))


@dataclass(frozen=True)
class Scenario:
    """A whole simulated fleet (see the module docs). Device ids are ``{id_prefix}-{n:05d}``, numbered across the
    groups in order."""

    groups: tuple[DeviceGroup, ...] = (DeviceGroup(count=10),)
    seed: int = 0
    id_prefix: str = "sim"
    fractions: Fractions = Fractions()
    bad_attempts: int = 1
    """How many deployment orders of a fail/reject/rollback device get that outcome (0: all of them); later ones
    succeed, so "retry failed" can succeed."""
    fail_reason: str = "download"
    reject_reason: str = "incompatible"
    rollback_reason: str = "health_check"
    latency: Latencies = Latencies()
    offline: OfflinePlan = OfflinePlan()
    download: Download = Download()
    versions: tuple[VersionBehaviour, ...] = ()
    heartbeat_s: float = 30.0
    window_s: float = 60.0
    window_samples: int = 200
    ack_timeout_s: float = 30.0
    """Unacknowledged stream messages are sent again after this long without acknowledgement progress (doubling up
    to 16x), and at once when an Ack lists them as missing."""
    outbox_limit: int = 256
    """Unacknowledged messages kept per stream and device; past it the oldest is dropped and counted."""
    agent_version: str = "sim-0.1"
    validate_profiles: bool = True
    """Check each group's ``profile`` against the built-in firmware profiles."""

    def __post_init__(self) -> None:
        if not self.groups:
            raise ScenarioError("groups", "at least one device group is needed")
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ScenarioError("groups", f"group names must be unique, got {names}")
        _count(self.seed, "seed", maximum=2**63 - 1)
        _identifier(self.id_prefix, "id_prefix")
        total = sum(g.count for g in self.groups)
        if len(self.id_prefix) + 1 + max(5, len(str(max(total - 1, 0)))) > 64:
            raise ScenarioError("id_prefix", "too long: device ids must stay within 64 characters")
        _count(self.bad_attempts, "bad_attempts", maximum=1_000_000)
        _reason(self.fail_reason, "fail_reason")
        _reason(self.reject_reason, "reject_reason")
        _reason(self.rollback_reason, "rollback_reason")
        _seconds(self.heartbeat_s, "heartbeat_s", positive=True)
        _seconds(self.window_s, "window_s", positive=True)
        _count(self.window_samples, "window_samples", minimum=1, maximum=10_000_000)
        _seconds(self.ack_timeout_s, "ack_timeout_s", positive=True)
        _count(self.outbox_limit, "outbox_limit", minimum=1, maximum=1_000_000)
        if not isinstance(self.agent_version, str) or not 0 < len(self.agent_version) <= 64 or \
                not self.agent_version.isprintable():
            raise ScenarioError("agent_version", "must be 1-64 printable characters")
        seen: set[tuple[str | None, int]] = set()
        for v in self.versions:
            key = (v.model, v.version)
            if key in seen:
                raise ScenarioError("versions", f"two entries for model {v.model!r} version {v.version}")
            seen.add(key)
        if self.validate_profiles:
            known = set(load_profiles(builtin_profiles_dir()))
            for i, g in enumerate(self.groups):
                if g.profile not in known:
                    raise ScenarioError(f"groups[{i}].profile",
                                        f"unknown firmware profile {g.profile!r}; known: {', '.join(sorted(known))}")

    @property
    def device_count(self) -> int:
        return sum(g.count for g in self.groups)

    def behaviour(self, model: str, version: int) -> VersionBehaviour:
        """The behaviour of ``model`` at ``version``: an exact entry, else a ``model=None`` one, else the default
        (no drift, no errors, 5 ms)."""
        fallback = None
        for v in self.versions:
            if v.version == version:
                if v.model == model:
                    return v
                if v.model is None:
                    fallback = v
        return fallback if fallback is not None else DEFAULT_BEHAVIOUR

    # -- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def from_toml(cls, source: str | Path) -> Scenario:
        """Load a scenario from a TOML file path (``Path``) or TOML text (``str``)."""
        try:
            text = source.read_text() if isinstance(source, Path) else source
            data = tomllib.loads(text)
        except OSError as exc:
            raise ScenarioError("file", f"cannot read {source}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ScenarioError("toml", str(exc)) from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scenario:
        """Build a scenario from plain data (the TOML layout: ``[fractions]``, ``[latency]``, ``[offline]``,
        ``[download]``, ``[[groups]]`` with ``[groups.fractions]``, ``[[versions]]``). Unknown keys are errors."""
        d = dict(data)
        kw: dict[str, Any] = {}
        simple = ("seed", "id_prefix", "bad_attempts", "fail_reason", "reject_reason", "rollback_reason",
                  "heartbeat_s", "window_s", "window_samples", "ack_timeout_s", "outbox_limit", "agent_version",
                  "validate_profiles")
        for key in simple:
            if key in d:
                kw[key] = d.pop(key)
        for key, klass in (("fractions", Fractions), ("latency", Latencies), ("offline", OfflinePlan),
                           ("download", Download)):
            if key in d:
                kw[key] = _table(klass, d.pop(key), key)
        if "groups" in d:
            defaults = {key: data[key] for key in ("fractions", "latency") if isinstance(data.get(key), Mapping)}
            kw["groups"] = tuple(_group(g, f"groups[{i}]", defaults)
                                 for i, g in enumerate(_list(d.pop("groups"), "groups")))
        if "versions" in d:
            kw["versions"] = tuple(_table(VersionBehaviour, v, f"versions[{i}]")
                                   for i, v in enumerate(_list(d.pop("versions"), "versions")))
        if d:
            raise ScenarioError(sorted(d)[0], "unknown scenario key")
        try:
            return cls(**kw)
        except TypeError as exc:
            raise ScenarioError("scenario", str(exc)) from None


def _list(value: object, where: str) -> Sequence[Any]:
    if not isinstance(value, list):
        raise ScenarioError(where, f"must be a list (an array of tables), got {type(value).__name__}")
    return value


def _table(klass: type[Any], value: object, where: str) -> Any:
    if not isinstance(value, Mapping):
        raise ScenarioError(where, f"must be a table, got {type(value).__name__}")
    allowed = set(klass.__dataclass_fields__)
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ScenarioError(f"{where}.{unknown[0]}", f"unknown key; allowed: {', '.join(sorted(allowed))}")
    try:
        return klass(**value)
    except ScenarioError as exc:
        leaf = f"{where}.{exc.field.rsplit('.', 1)[-1]}" if "." in exc.field else where
        raise ScenarioError(leaf, str(exc).split(": ", 1)[-1]) from None
    except TypeError as exc:
        raise ScenarioError(where, str(exc)) from None


def _group(value: object, where: str, defaults: Mapping[str, Mapping[str, Any]]) -> DeviceGroup:
    """A ``[[groups]]`` table; its ``fractions``/``latency`` tables override the scenario's key by key."""
    if not isinstance(value, Mapping):
        raise ScenarioError(where, f"must be a table, got {type(value).__name__}")
    g = dict(value)
    for key, klass in (("fractions", Fractions), ("latency", Latencies)):
        if key in g:
            if not isinstance(g[key], Mapping):
                raise ScenarioError(f"{where}.{key}", "must be a table")
            g[key] = _table(klass, {**defaults.get(key, {}), **g[key]}, f"{where}.{key}")
    for key in ("labels", "hardware", "installed"):
        if key in g and not isinstance(g[key], Mapping):
            raise ScenarioError(f"{where}.{key}", "must be a table")
    return _table(DeviceGroup, g, where)  # type: ignore[no-any-return]


# -- device plans ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevicePlan:
    """Everything fixed about one simulated device before it starts."""

    device_id: str
    group: str
    labels: Mapping[str, str]
    profile: str
    hardware: Mapping[str, Any]
    installed: Mapping[str, int]
    outcome: Outcome
    latency: Latencies
    """The step latencies (the group's, else the scenario's)."""
    offline: bool
    """Goes away ``offline.after_s`` after its first connection, for ``offline.for_s``."""
    jitter: float
    """In ``[0, 1)``: scales its step latencies (see :meth:`Latencies.delay`)."""
    phase: float
    """In ``[0, 1)``: offsets its window timer so a fleet does not send all windows at once."""
    download: bool
    """Its deployments really download the bundle (:class:`Download`)."""


def _assign(ids: Sequence[str], seed: int, fr: Fractions) -> dict[str, Outcome]:
    ranked = sorted(ids, key=lambda d: (unit_hash(seed, d, "outcome"), d))
    n = len(ids)
    out: dict[str, Outcome] = {}
    start = 0
    for outcome, share in ((Outcome.FAIL, fr.fail), (Outcome.REJECT, fr.reject), (Outcome.ROLLBACK, fr.rollback),
                           (Outcome.SILENT, fr.silent)):
        k = min(n - start, round(share * n))
        for d in ranked[start:start + k]:
            out[d] = outcome
        start += k
    for d in ranked[start:]:
        out[d] = Outcome.OK
    return out


def _chosen(ids: Sequence[str], seed: int, share: float, purpose: str) -> set[str]:
    ranked = sorted(ids, key=lambda d: (unit_hash(seed, d, purpose), d))
    return set(ranked[:round(share * len(ids))])


def plan_devices(scenario: Scenario) -> tuple[DevicePlan, ...]:
    """One plan per device, in id order. Pure and deterministic (see the module docs)."""
    width = max(5, len(str(max(scenario.device_count - 1, 0))))
    plans: list[DevicePlan] = []
    n = 0
    seed = scenario.seed
    for g in scenario.groups:
        ids = [f"{scenario.id_prefix}-{i:0{width}d}" for i in range(n, n + g.count)]
        n += g.count
        fr = g.fractions if g.fractions is not None else scenario.fractions
        outcomes = _assign(ids, seed, fr)
        offline = _chosen(ids, seed, fr.offline, "offline")
        downloads = _chosen(ids, seed, scenario.download.fraction, "download")
        for d in ids:
            plans.append(DevicePlan(
                device_id=d, group=g.name, labels=g.labels, profile=g.profile, hardware=g.hardware,
                installed=g.installed, outcome=outcomes[d],
                latency=g.latency if g.latency is not None else scenario.latency, offline=d in offline,
                jitter=unit_hash(seed, d, "jitter"), phase=unit_hash(seed, d, "phase"), download=d in downloads,
            ))
    return tuple(plans)
